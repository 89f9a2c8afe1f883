"""Train a few-shot model headless: ``python Training/train.py --config FILE [--resume]``.

One process on the CPU or one GPU, or many GPUs / nodes under ``torchrun``
(DistributedDataParallel; gloo on CPU, NCCL on CUDA). Self-supervised from unlabeled
volumes (superpixel episodes) and/or supervised from label files. Writes, in ``out``:
``train_state.pt`` (for --resume), ``<name>.pt`` (the release checkpoint), ``log.jsonl``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import load_training_state, save_checkpoint, save_training_state  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.models import build_model  # noqa: E402
from FewShotSegLib.preprocessing import PreprocessConfig  # noqa: E402
from Training.episodes import AugmentConfig, EpisodeSampler, VolumeSlices  # noqa: E402

DEFAULTS = {
    "name": "fewshotseg-model",
    "model": "alpnet",
    "model_config": {},
    "data": {"images": [], "labels": [], "axis": "axial", "preprocess": {}, "cache_dir": "cache/superpixels",
             "adjacent_probability": 0.0},
    "augment": {},
    "steps": 1000,
    "batch_size": 1,
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_decay_every": 1000,
    "lr_decay": 0.95,
    "class_weights": [0.05, 1.0],
    "align_weight": 1.0,
    "checkpoint_every": 500,
    "seed": 0,
    "device": "auto",
    "out": "runs/fewshotseg-model",
    "card": {},
}


def load_config(path: Path, overrides: dict) -> dict:
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FewShotSegError(f"config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise FewShotSegError(f"{path} is not valid JSON: {exc}") from None
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise FewShotSegError(f"{path}: unknown keys {', '.join(unknown)}")
    config = {**DEFAULTS, **user, **{k: v for k, v in overrides.items() if v is not None}}
    config["data"] = {**DEFAULTS["data"], **user.get("data", {})}
    config["_config_dir"] = str(Path(path).resolve().parent)
    return config


def _expand(patterns, base: Path) -> list[Path]:
    """Globs are relative to the repository root (or absolute); missing data is an error."""
    files = []
    for pattern in patterns:
        p = pattern if os.path.isabs(pattern) else str(base / pattern)
        matches = sorted(glob.glob(p))
        if not matches:
            raise FewShotSegError(f"no file matches {pattern}")
        files += [Path(m) for m in matches]
    return files


class EpisodeLoss(torch.nn.Module):
    """Segmentation CE on the query + PANet prototype alignment (query prediction re-segments
    the support). A module so that DDP sees one forward per step."""

    def __init__(self, model, class_weights, align_weight):
        super().__init__()
        self.model = model
        self.register_buffer("weights", torch.tensor(class_weights, dtype=torch.float32))
        self.align_weight = align_weight

    def forward(self, s_img, s_mask, q_img, q_mask):
        b = s_img.shape[0]
        feats = self.model.encode(torch.cat([s_img, q_img])[:, None])
        s_feat, q_feat = feats[:b], feats[b:]
        seg = align = 0.0
        for i in range(b):
            logits = self.model.segment(s_feat[i:i + 1], s_mask[i:i + 1], q_feat[i:i + 1])
            seg = seg + F.cross_entropy(logits.float(), q_mask[i:i + 1].long(), weight=self.weights)
            if self.align_weight:
                pred = torch.softmax(logits.float(), 1)[:, 1]
                back = self.model.segment(q_feat[i:i + 1], pred, s_feat[i:i + 1])
                align = align + F.cross_entropy(back.float(), s_mask[i:i + 1].long(), weight=self.weights)
        return seg / b, align / b


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local_rank


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.machine()} ({os.cpu_count()} cores), {world} process(es), {torch.get_num_threads()} threads"


def build_sampler(config: dict, rank: int) -> tuple[EpisodeSampler, list[str], PreprocessConfig]:
    data = config["data"]
    preprocess = PreprocessConfig.from_dict(data.get("preprocess", {}))
    images = _expand(data["images"], ROOT)
    cache = data.get("cache_dir")
    cache = (ROOT / cache) if cache and not os.path.isabs(cache) else cache
    volumes = [VolumeSlices(p, preprocess, data["axis"], cache) for p in images]
    for pair in data.get("labels", []):
        volumes.append(VolumeSlices(_expand([pair[0]], ROOT)[0], preprocess, data["axis"], None,
                                    label_path=_expand([pair[1]], ROOT)[0]))
    augment = AugmentConfig(**config.get("augment", {}))
    sampler = EpisodeSampler(volumes, augment, seed=config["seed"], rank=rank,
                             adjacent_probability=data.get("adjacent_probability", 0.0))
    files = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in images]
    return sampler, files, preprocess


def train(config: dict, resume: bool = False, argv=None) -> Path:
    rank, world, local_rank = _distributed()
    device = _device(config["device"], local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(config["out"])
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)

    sampler, files, preprocess = build_sampler(config, rank)
    model = build_model(config["model"], **config["model_config"]).to(device)
    loss_module = EpisodeLoss(model, config["class_weights"], config["align_weight"]).to(device)
    if config["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                    weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config["lr_decay_every"], config["lr_decay"])
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, elapsed = 0, 0.0
    state_path = out / "train_state.pt"
    if resume and state_path.is_file():
        state = load_training_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        torch.set_rng_state(state["torch_rng"])
    wrapped = loss_module
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[local_rank] if device.type == "cuda" else None)
    model.train()
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=config["steps"], initial=step, desc="training", dynamic_ncols=True)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    command = " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:]))

    def save(final: bool):
        if rank != 0:
            return
        save_training_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "elapsed": elapsed, "torch_rng": torch.get_rng_state()})
        provenance = {"data": files, "steps": step, "command": command, "code_version": _git_commit(),
                      "wall_seconds": round(elapsed, 1), "hardware": _hardware(device, world),
                      "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                      "seed": config["seed"], "final": final,
                      "training": "self-supervised superpixel episodes" + (" + labels" if config["data"].get("labels") else "")}
        save_checkpoint(out / f"{config['name']}.pt", model, preprocess=preprocess, provenance=provenance,
                        card=config.get("card", {}))

    last = time.perf_counter()
    while step < config["steps"]:
        batch = [t.to(device) for t in sampler.batch(step, config["batch_size"])]
        with torch.autocast(device.type, enabled=use_amp):
            seg, align = wrapped(*batch)
            loss = seg + config["align_weight"] * align
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - last
        last = now
        if rank == 0:
            record = {"step": step, "loss": loss.item(), "seg": float(seg.detach()), "align": float(align.detach()) if torch.is_tensor(align) else 0.0,
                      "lr": scheduler.get_last_lr()[0], "world_size": world, "seconds": round(elapsed, 2)}
            log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if step % config["checkpoint_every"] == 0 and step < config["steps"]:
            save(final=False)
    save(final=True)
    if rank == 0:
        bar.close()
        log.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out / f"{config['name']}.pt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file (see Training/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from out/train_state.pt")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--out", default=None, help="override the output folder")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    try:
        config = load_config(Path(args.config), {"steps": args.steps, "out": args.out, "device": args.device})
        path = train(config, resume=args.resume, argv=argv)
    except FewShotSegError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
