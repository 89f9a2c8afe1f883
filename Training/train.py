"""Train a few-shot model headless: ``python Training/train.py --config FILE [--resume]``.

One process on the CPU or one GPU, or many GPUs / nodes under ``torchrun``
(DistributedDataParallel; gloo on CPU, NCCL on CUDA). Self-supervised from unlabeled
volumes (superpixel episodes) and/or supervised from label files. Writes, in ``out``:
``train_state.pt`` (for --resume), ``<name>.pt`` (the release checkpoint), ``log.jsonl``.

Exact continuation: episodes are pure functions of (seed, rank, step) and the global
torch RNG is re-seeded from (seed, rank, step) before every step, so a resumed run (any
number of DataLoader workers) repeats the uninterrupted one bit for bit on the CPU.
SIGINT / SIGTERM (cluster pre-emption) end the run after the current step with the
state saved.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import glob
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotSegLib.episode_loss import EpisodeLoss  # noqa: E402,F401  (the loss trained on)
from FewShotSegLib.checkpoints import load_training_state, save_checkpoint, save_training_state  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.models import build_model  # noqa: E402
from FewShotSegLib.preprocessing import PreprocessConfig  # noqa: E402
from Training.episodes import (AugmentConfig, EpisodeDataset, EpisodeSampler, VolumeSlices,  # noqa: E402
                               worker_init)
from Training.slice_packs import load_pack  # noqa: E402
from Training.volume_cache import VolumeProgress, fill_cache  # noqa: E402
from FewShotSegLib.model_store import sha256_of  # noqa: E402
from Training.provenance import cores, display_path, git_commit, hardware  # noqa: E402

DATA_DEFAULTS = {
    "images": [],                 # globs of unlabeled volumes (superpixel episodes)
    "packs": [],                  # globs of slice packs (Training/slice_packs.py): the same, pre-computed
    "exclude": [],                # globs removed from "images" (e.g. a test fold)
    "labels": [],                 # [image glob, label glob] pairs (supervised episodes)
    "label_probability": None,    # share of labelled episodes when both kinds exist
    "axis": "axial",
    "preprocess": {},             # PreprocessConfig fields (stored in the checkpoint)
    "cache_dir": "cache/superpixels",
    "adjacent_probability": 0.0,  # query = neighbouring slice instead of the same slice
    # few-shot setting 2: {"labels": [label globs], "values": [ints]}; a slice of an "images"
    # volume whose label (paired by the numbers in the file names) holds ANY of the values
    # is never used (strict rule, SSL-ALPNet). Packs carry their labels' per-slice values, so
    # packs alone need only {"values": [ints]}. None: keep every slice.
    "exclude_labels": None,
}
DEFAULTS = {
    "name": "fewshotseg-model",   # release checkpoint = out/<name>.pt
    "model": "alpnet",
    "model_config": {},
    "data": DATA_DEFAULTS,
    "augment": {},                # AugmentConfig fields
    "steps": 1000,
    "batch_size": 1,              # episodes per step and per process
    "optimizer": "sgd",           # 'sgd' | 'adamw'
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "step",        # 'step': x lr_decay every lr_decay_every steps (SSL-ALPNet's, made
                                  # for 100k steps) | 'cosine': to 0 over `steps` (a short budget ends annealed)
    "lr_decay_every": 1000,
    "lr_decay": 0.95,
    "class_weights": [0.05, 1.0],
    "align_weight": 1.0,
    "freeze_backbone_blocks": 0,
    "grad_clip": None,
    "amp": "auto",                # CUDA only: 'auto' (bf16 if supported, else fp16) | 'bf16' | 'fp16' | 'off'
    "checkpoint_every": 500,
    "seed": 0,
    "device": "auto",
    "num_workers": 0,             # DataLoader processes building episodes
    "num_threads": None,          # default: the cores / processes on this node
    "deterministic": None,        # default: on for the CPU, off for CUDA (speed)
    "find_unused_parameters": None,  # DDP; None: found by a probe step
    "out": "runs/fewshotseg-model",
    "card": {},
}


# ----------------------------------------------------------------------------- config
def load_config(path: Path, overrides: dict) -> dict:
    """Defaults <- JSON file <- non-None ``overrides``; unknown keys are errors (typos)."""
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FewShotSegError(f"config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise FewShotSegError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise FewShotSegError(f"{path} must hold a JSON object")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise FewShotSegError(f"{path}: unknown keys {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    unknown = sorted(set(user.get("data", {})) - set(DATA_DEFAULTS))
    if unknown:
        raise FewShotSegError(f"{path}: unknown data keys {', '.join(unknown)}")
    config = {**DEFAULTS, **user, **{k: v for k, v in overrides.items() if v is not None}}
    config["data"] = {**DATA_DEFAULTS, **user.get("data", {})}
    config["_config_dir"] = str(Path(path).resolve().parent)
    for key in ("steps", "batch_size", "checkpoint_every", "lr_decay_every"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise FewShotSegError(f"{path}: {key} must be a positive integer, not {config[key]!r}")
    if config["optimizer"] not in ("sgd", "adamw"):
        raise FewShotSegError(f"{path}: optimizer must be 'sgd' or 'adamw'")
    if config["lr_schedule"] not in ("step", "cosine"):
        raise FewShotSegError(f"{path}: lr_schedule must be 'step' or 'cosine'")
    if config["amp"] not in ("auto", "bf16", "fp16", "off"):
        raise FewShotSegError(f"{path}: amp must be auto, bf16, fp16 or off")
    try:   # here, before any output folder exists; build_sampler checks configs made in code
        AugmentConfig(**config.get("augment") or {})
    except (TypeError, ValueError) as exc:
        raise FewShotSegError(f"{path}: invalid augment settings: {exc}") from None
    return config


def _expand(patterns, bases: list[Path], required: bool = True) -> list[Path]:
    """Absolute globs as they are; relative ones against the config folder, then the
    repository root (the first that matches). No match is an error naming the pattern."""
    files = []
    for pattern in patterns:
        pattern = os.path.expandvars(os.path.expanduser(str(pattern)))
        candidates = [pattern] if os.path.isabs(pattern) else [str(b / pattern) for b in bases]
        matches = []
        for c in candidates:
            matches = sorted(glob.glob(c))
            if matches:
                break
        if not matches and required:
            raise FewShotSegError(f"no file matches {pattern}")
        files += [Path(m).resolve() for m in matches]
    return list(dict.fromkeys(files))


def _pairs(pairs, bases) -> list[tuple[Path, Path]]:
    """[image glob, label glob] -> file pairs, matched in sorted order by the numbers in their names."""
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise FewShotSegError(f"data.labels entries must be [image, label] pairs, not {pair!r}")
        images, labels = _expand([pair[0]], bases), _expand([pair[1]], bases)
        key = lambda p: re.findall(r"\d+", p.name)  # noqa: E731
        if len(images) != len(labels) or any(key(a) != key(b) for a, b in zip(images, labels)):
            raise FewShotSegError(f"images {pair[0]} and labels {pair[1]} do not pair up one to one")
        out += list(zip(images, labels))
    return out


def _exclusion_values(spec, images: list[Path]) -> tuple:
    """The label values of ``data.exclude_labels`` (``()`` for None), its shape checked."""
    if spec is None:
        return ()
    keys = {"labels", "values"} if images else {"values"}
    if not isinstance(spec, dict) or not keys <= set(spec) <= {"labels", "values"}:
        raise FewShotSegError('data.exclude_labels must be {"labels": [globs], "values": [ints]}'
                              + ("" if images else ' (or {"values": [ints]} for packs alone)'))
    values = spec["values"]
    if not isinstance(values, list) or not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise FewShotSegError(f"data.exclude_labels.values must be positive integers, not {values!r}")
    return tuple(values)


def _exclusion_labels(spec, images: list[Path], bases) -> dict:
    """``data.exclude_labels`` -> {image: (its label file, values)}. Every image needs its
    label (same numbers in the file name): a slice we cannot check would leak a test class."""
    values = _exclusion_values(spec, images)
    if not values or not images:
        return {}
    patterns = [spec["labels"]] if isinstance(spec["labels"], str) else list(spec["labels"])
    key = lambda p: tuple(re.findall(r"\d+", p.name))  # noqa: E731
    labels = {}
    for path in _expand(patterns, bases):
        if labels.get(key(path), path) != path:
            raise FewShotSegError(f"data.exclude_labels: {labels[key(path)].name} and {path.name} carry the "
                                  "same numbers; narrow the label globs")
        labels[key(path)] = path
    out = {}
    for image in images:
        if key(image) not in labels:
            raise FewShotSegError(f"data.exclude_labels: no label file for {image.name} in {', '.join(patterns)}")
        out[image] = (labels[key(image)], tuple(values))
    return out


# ----------------------------------------------------------------------------- pieces
def freeze_early_layers(model, blocks: int) -> None:
    """Keep the stem and the first ``blocks`` backbone blocks at their ImageNet weights.

    Edges and blobs are generic; freezing the high-resolution blocks removes most of the
    backward pass's cost on a CPU (half of Lite0's compute sits at strides 2 and 4).
    """
    if blocks <= 0:
        return
    backbone = model.backbone
    stages = [m for name, m in backbone.named_children() if name in ("_conv_stem", "_bn0", "conv1", "bn1")]
    blocks_list = getattr(backbone, "_blocks", None)
    if blocks_list is None:
        blocks_list = [getattr(backbone, n) for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(backbone, n)]
    for module in stages + list(blocks_list)[:blocks]:
        for p in module.parameters():
            p.requires_grad_(False)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return hash((int(seed), int(rank), int(step), 0x5EED)) & 0x7FFFFFFFFFFF


def _device(name: str, local_rank: int) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FewShotSegError("device 'cuda' requested but no CUDA GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise FewShotSegError(f"training runs on cpu or cuda, not '{name}'")
    return torch.device("cpu")


def _distributed(device: torch.device):
    """(rank, world size, local rank, local world size) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return (rank, world, int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def _barrier(device: torch.device) -> None:
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _parameter_checksums(model, world: int, device) -> list[float]:
    """One checksum of the weights per rank: equal values prove DDP kept replicas in sync."""
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    if world == 1:
        return [float(local)]
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [float(t) for t in gathered]


def _unused_parameters(loss_module, batch) -> list[str]:
    """Names of trainable weights one step does not reach (DDP must be told about them).
    Buffers (BN statistics) are restored so the probe leaves no trace."""
    saved = [b.detach().clone() for b in loss_module.buffers()]
    seg, align = loss_module(*batch)
    (seg + align).backward()
    names = [n for n, p in loss_module.named_parameters() if p.requires_grad and p.grad is None]
    for p in loss_module.parameters():
        p.grad = None
    with torch.no_grad():
        for b, s in zip(loss_module.buffers(), saved):
            b.copy_(s)
    return names


def build_sampler(config: dict, rank: int, world: int = 1, device=None):
    """The episode sampler of this rank, the data files (for the provenance), the pre-processing.

    Under DDP the ranks first fill the cache together (volume i by rank i % world), then
    every rank memory-maps all volumes from it; episodes differ by rank through the seed.
    """
    data = config["data"]
    bases = [Path(config.get("_config_dir", ROOT)), ROOT]
    preprocess = PreprocessConfig.from_dict(data.get("preprocess", {}))
    try:
        augment = AugmentConfig(**config.get("augment", {}))
    except (TypeError, ValueError) as exc:
        raise FewShotSegError(f"invalid augment settings: {exc}") from None
    excluded = set(_expand(data["exclude"], bases, required=False))
    images = [p for p in (_expand(data["images"], bases) if data["images"] else []) if p not in excluded]
    pairs = [(i, lab) for i, lab in _pairs(data["labels"], bases) if i not in excluded]
    packs = [p for p in (_expand(data["packs"], bases) if data["packs"] else []) if p not in excluded]
    if not images and not pairs and not packs:
        raise FewShotSegError("the config lists no training images (data.images, data.packs or data.labels)")
    cache = data.get("cache_dir")
    cache = (ROOT / cache) if cache and not os.path.isabs(cache) else cache
    workers = int(config.get("_prepare_workers") or 1)
    if cache and (world > 1 or workers > 1):       # the ranks (and their workers) share the work
        fill_cache(images[rank::world], preprocess, data["axis"], cache, rank, workers)
        _barrier(device)
    excluding = _exclusion_labels(data.get("exclude_labels"), images, bases)
    with VolumeProgress(images, rank) as bar:
        volumes = [VolumeSlices(p, preprocess, data["axis"], cache, exclude_labels=excluding.get(p),
                                progress=bar.slice_done(p)) for p in images]
    volumes += [VolumeSlices(i, preprocess, data["axis"], cache, label_path=lab) for i, lab in pairs]
    values = _exclusion_values(data.get("exclude_labels"), images)
    volumes += [load_pack(p, preprocess, data["axis"], values) for p in packs]
    try:
        sampler = EpisodeSampler(volumes, augment, seed=config["seed"], rank=rank,
                                 adjacent_probability=data.get("adjacent_probability", 0.0),
                                 label_probability=data.get("label_probability"))
    except ValueError as exc:
        raise FewShotSegError(f"no usable training slices: {exc}") from None
    files = images + [f for pair in pairs for f in pair] + packs
    return sampler, files, preprocess


# ----------------------------------------------------------------------------- training
class _StopFlag:
    """SIGINT / SIGTERM ask for a clean stop after the current step (state saved)."""

    def __init__(self):
        self.requested, self._previous = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: dict, resume: bool = False, argv=None) -> Path:
    """Run (or continue) the training described by ``config``; returns the release checkpoint."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(config["device"], local_rank)
    rank, world, local_rank, local_world = _distributed(device)
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(int(config["num_threads"] or max(1, cores() // max(1, local_world))))
    deterministic = config["deterministic"] if config["deterministic"] is not None else device.type == "cpu"
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(config["out"])
    out = out if out.is_absolute() else ROOT / out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(config, resume, argv, device, rank, world, out)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
        if dist.is_initialized():
            # Free what DDP may leave in reference cycles while its process group still
            # exists, not at interpreter exit (a rank once aborted at exit under load).
            gc.collect()
            dist.destroy_process_group()


def make_scheduler(optimizer, config):
    """The learning-rate schedule, stepped once per training step."""
    if config["lr_schedule"] == "cosine":
        total = config["steps"]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    return torch.optim.lr_scheduler.StepLR(optimizer, config["lr_decay_every"], config["lr_decay"])


def _train(config, resume, argv, device, rank, world, out) -> Path:
    sampler, files, preprocess = build_sampler(config, rank, world, device)
    # a pack stands for its source scan: the protocol checks these hashes against its query scans
    pack_sources = {display_path(v.image_path): v.pack_meta["source_sha256"]
                    for v in sampler.volumes if hasattr(v, "pack_meta")}
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model_config = dict(config["model_config"])
    if model_config.get("backbone_weights") and model_config.get("pretrained", True):
        # like the data globs: relative to the config's folder, then the repository root
        bases = [Path(config.get("_config_dir", ROOT)), ROOT]
        model_config["backbone_weights"] = str(_expand([model_config["backbone_weights"]], bases)[0])
    model = build_model(config["model"], **model_config).to(device).train()
    freeze_early_layers(model, config["freeze_backbone_blocks"])
    loss_module = EpisodeLoss(model, config["class_weights"], config["align_weight"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"],
                                    weight_decay=config["weight_decay"])
    scheduler = make_scheduler(optimizer, config)
    amp_dtype = None
    if device.type == "cuda" and config["amp"] != "off":
        bf16 = config["amp"] == "bf16" or (config["amp"] == "auto" and torch.cuda.is_bf16_supported())
        amp_dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step, elapsed = 0, 0.0
    state_path = out / "train_state.pt"
    if resume:
        state = None
        if world > 1:  # rank 0 reads, everyone gets it (nodes need not share a disk)
            box = [load_training_state(state_path) if rank == 0 and state_path.is_file() else None]
            dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            state = box[0]
        elif state_path.is_file():
            state = load_training_state(state_path)
        if state is None:
            if rank == 0:
                print(f"train: no {state_path} to resume from; starting at step 0", file=sys.stderr)
        else:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise FewShotSegError(f"{state_path} does not match this config's model: "
                                      f"{str(exc).splitlines()[0]}") from None
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step, elapsed = int(state["step"]), float(state["elapsed"])

    wrapped = loss_module
    if world > 1:
        find_unused = config["find_unused_parameters"]
        if find_unused is None:
            probe = [t.to(device) for t in sampler.batch(step, config["batch_size"])]
            find_unused = bool(_unused_parameters(loss_module, probe))
        wrapped = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    loader = torch.utils.data.DataLoader(
        EpisodeDataset(sampler, step, config["steps"], config["batch_size"]), batch_size=None,
        shuffle=False, num_workers=config["num_workers"], worker_init_fn=worker_init,
        pin_memory=device.type == "cuda")

    bar = log = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=config["steps"], initial=step, desc="training", dynamic_ncols=True)
        log = open(out / "log.jsonl", "a")
        log.write(json.dumps({"event": "resume" if step else "start", "step": step, "world_size": world,
                              "device": str(device), "threads": torch.get_num_threads(),
                              "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"}) + "\n")
    command = shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
    labelled = bool(config["data"]["labels"])

    def save(final: bool):
        if rank != 0:
            return
        save_training_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "elapsed": elapsed, "torch_rng": torch.get_rng_state(),
            "world_size": world, "config": json.dumps(config, default=str)})
        provenance = {
            "data": [display_path(p) for p in files], "data_sha256": {display_path(p): sha256_of(p) for p in files},
            "pack_sources_sha256": pack_sources,
            "steps": step, "episodes": step * world * config["batch_size"], "command": command,
            "arguments": list(argv) if argv is not None else None, "code_version": git_commit(),
            "wall_seconds": round(elapsed, 1), "hardware": hardware(device, world), "world_size": world,
            "torch": str(torch.__version__), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seed": config["seed"], "final": final, "config": json.dumps(config, default=str),
            "training": ("self-supervised superpixel episodes" if config["data"]["images"] or config["data"]["packs"]
                         else "")
                        + (" + supervised label episodes" if labelled else "")}
        save_checkpoint(out / f"{config['name']}.pt", model, preprocess=preprocess, provenance=provenance,
                        card=config.get("card", {}))

    last = time.perf_counter()
    with _StopFlag() as stop:
        for batch in loader:
            torch.manual_seed(_step_seed(config["seed"], rank, step))  # dropout etc.: resumable
            batch = [t.to(device, non_blocking=True) for t in batch]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                seg, align = wrapped(*batch)
                loss = seg + config["align_weight"] * align
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            step_seconds, last = now - last, now
            elapsed += step_seconds
            stats = torch.stack([seg.detach().float(), align.detach().float(),
                                 torch.tensor(float(stop.requested), device=device)])
            if world > 1:  # mean loss over ranks; any rank's stop request stops all
                dist.all_reduce(stats)
                stats[:2] /= world
            seg_v, align_v, stopping = stats.tolist()
            loss_v = seg_v + config["align_weight"] * align_v
            if loss_v != loss_v or abs(loss_v) == float("inf"):
                raise FewShotSegError(f"the loss became {loss_v} at step {step}; lower lr or use amp 'off'")
            if rank == 0:
                log.write(json.dumps({"step": step, "loss": loss_v, "seg": seg_v, "align": align_v,
                                      "lr": scheduler.get_last_lr()[0], "world_size": world,
                                      "step_seconds": round(step_seconds, 4), "seconds": round(elapsed, 2)}) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.3f}")
            if stopping:
                save(final=False)
                break
            if step % config["checkpoint_every"] == 0 and step < config["steps"]:
                save(final=False)
                last = time.perf_counter()  # checkpoint writing is not training time
    if step >= config["steps"]:
        save(final=True)
    checksums = _parameter_checksums(model, world, device)
    if rank == 0:
        bar.close()
        log.write(json.dumps({"event": "end" if step >= config["steps"] else "stopped", "step": step,
                              "world_size": world, "parameter_checksums": checksums}) + "\n")
        log.close()
    _barrier(device)
    if step < config["steps"]:
        raise KeyboardInterrupt(f"stopped at step {step}; the state is saved: continue with --resume")
    return out / f"{config['name']}.pt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file (see Training/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--out", default=None, help="override the output folder (relative to here)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the cores / processes on this node)")
    parser.add_argument("--prepare-workers", type=int, default=1, metavar="N",
                        help="compute the cache (superpixels) of N volumes at once before training (default 1)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="fill the cache (data.cache_dir) and stop: a later start reads no scan")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `fewshotseg train -- --config ...` hands the separator on
        argv = argv[1:]
    args = parser.parse_args(argv)
    if _is_refiner_config(Path(args.config)):   # one entry point for every model we train
        from Training.train_refiner import main as train_refiner_main
        return train_refiner_main(argv)
    out = str(Path(args.out).resolve()) if args.out else None
    try:
        config = load_config(Path(args.config), {"steps": args.steps, "out": out, "device": args.device,
                                                     "num_threads": args.threads})
        if args.prepare_workers < 1:
            raise FewShotSegError("--prepare-workers must be at least 1")
        config["_prepare_workers"] = args.prepare_workers
        if args.prepare_only:
            return prepare(config)
        path = train(config, resume=args.resume, argv=argv)
    except FewShotSegError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"train: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


def prepare(config: dict) -> int:
    """``--prepare-only``: the cache filled, checked as training would read it, nothing trained."""
    if not config["data"].get("cache_dir"):
        raise FewShotSegError("--prepare-only needs data.cache_dir in the config: the cache is what it fills")
    sampler, files, _ = build_sampler(config, 0)
    print(f"prepared {len(files)} files: {len(sampler.volumes)} volumes with training slices, "
          f"cache {config['data']['cache_dir']}")
    return 0


def _is_refiner_config(path: Path) -> bool:
    """A config naming a refiner (medsegdiff_v2, hlfnet) is trained by train_refiner.py."""
    from FewShotSegLib.refinement import available_refiners
    try:
        return json.loads(path.read_text()).get("model") in available_refiners()
    except (OSError, ValueError, AttributeError):
        return False   # load_config reports unreadable or invalid files with a clear message


if __name__ == "__main__":
    sys.exit(main())
