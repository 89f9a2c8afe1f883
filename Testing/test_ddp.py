"""DistributedDataParallel on the CPU: two gloo processes under torchrun, as on a GPU node.

Checks that both ranks trained (the log's world size, one weight checksum per rank), that
the replicas stayed identical, that only rank 0 wrote files, and that --resume works
under DDP.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from FewShotSegLib.checkpoints import load_checkpoint, load_training_state

ROOT = Path(__file__).resolve().parents[1]


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "Training" / "train.py"), "--config", str(config), *extra],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, chaos_dir):
    config = {
        "name": "ddp-model", "model": "alpnet",
        "model_config": {"backbone": "effnet-lite0", "pretrained": True},
        "data": {"images": [str(chaos_dir / "image_5.nii.gz"), str(chaos_dir / "image_8.nii.gz")],
                 "preprocess": {"size": 64}, "cache_dir": str(tmp_path / "cache")},
        "steps": 3, "batch_size": 1, "checkpoint_every": 100, "seed": 3, "device": "cpu",
        "freeze_backbone_blocks": 3, "out": str(tmp_path / "run"),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = torchrun(path, "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]   # rank 0 alone logs
    assert all(r["world_size"] == 2 for r in records)
    end = records[-1]
    assert end["event"] == "end" and end["step"] == 3
    a, b = end["parameter_checksums"]                 # gathered from both ranks
    assert a == pytest.approx(b, rel=0, abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ddp-model.pt", "log.jsonl", "train_state.pt"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2   # filled by the two ranks together
    assert load_training_state(tmp_path / "run" / "train_state.pt")["world_size"] == 2
    loaded = load_checkpoint(tmp_path / "run" / "ddp-model.pt")
    assert loaded.provenance["steps"] == 3 and loaded.provenance["world_size"] == 2
    assert loaded.provenance["episodes"] == 6
