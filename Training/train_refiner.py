"""Train a mask refiner: degraded masks in, clean masks out.

    python Training/train_refiner.py --config Training/configs/refiner_default.json [--resume]
    torchrun --nproc_per_node 2 Training/train_refiner.py --config FILE      (DDP; gloo on CPU)

Training pairs come from label files (CHAOS-T2 manual labels, TotalSegmentator CT/MR
labels), degraded on the fly by `FewShotSegLib.refinement.perturb` (erosion/dilation,
shift, ragged contour, missed part, leak, the adjacent slice's mask) and, with
``data.fewshot_fraction``, by the few-shot model's own errors: each structure is propagated
once from its largest slice by ``data.fewshot_model`` (the product's defaults) and that
propagation is the coarse mask; optionally from Felzenszwalb superpixels when no label
exists. Slices go through
`FewShotSegLib.preprocessing` and crops through `refinement.crops`, exactly as at
inference. Loss: BCE + Dice on the predicted x0 (and, weighted, on the condition network's
own anchor prediction). CHAOS cases listed in ``holdout_cases`` are never trained on; the
benchmark uses them. Self-contained on purpose (no dependency on Training/train.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
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

from FewShotSegLib.checkpoints import (load_training_state, save_checkpoint,  # noqa: E402
                                       save_training_state)
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.evaluation import label_array  # noqa: E402
from FewShotSegLib.imageio import read_image  # noqa: E402
from FewShotSegLib.preprocessing import PreprocessConfig, prepare_volume  # noqa: E402
from FewShotSegLib.refinement import build_refiner  # noqa: E402
from FewShotSegLib.refinement.crops import crop_resize  # noqa: E402
from FewShotSegLib.refinement.perturb import degrade_mask, square_box  # noqa: E402

DEFAULTS = {
    "model": "medsegdiff_v2", "model_config": {}, "preprocess": {"size": 256},
    "data": {"root": None, "chaos_cases": None, "chaos_holdout": ["34", "36", "37", "38", "39"],
             "totalseg": ["ct_abdomen_3mm", "ct_small_3mm", "mr_small_3mm"], "totalseg_min_voxels": 300,
             "superpixel_fraction": 0.0, "fewshot_model": None, "fewshot_fraction": 0.0},
    "steps": 4000, "batch_size": 8, "lr": 3e-4, "weight_decay": 1e-4, "warmup": 200,
    "anchor_weight": 0.5, "t_max": 0.7, "margin_px": [3, 14], "empty_fraction": 0.08,
    "train_crops": [64, 96], "train_crop_p": [0.7, 0.3],
    "threads": 1, "seed": 0, "device": "cpu", "max_minutes": None,
    "log_every": 25, "save_every": 200, "eval_every": 500, "eval_samples": 48,
    "out": "runs/refiner", "release": None, "card": {},
}


# ----------------------------------------------------------------------------- data
class Structure:
    """One labelled structure of one volume: bool masks for slices lo-1 .. hi+1."""

    def __init__(self, volume: int, first: int, masks: torch.Tensor, name: str,
                 propagated: torch.Tensor | None = None):
        self.volume, self.first, self.masks, self.name = volume, first, masks, name
        self.propagated = propagated   # the few-shot model's masks for the same slices, or None

    def mask(self, i: int) -> np.ndarray:
        j = i - self.first
        if 0 <= j < len(self.masks):
            return self.masks[j].numpy()
        return np.zeros(self.masks.shape[-2:], bool)


class RefinerData:
    """Volumes on the model grid (float16) and their structures; samples training crops."""

    def __init__(self, cfg: dict, preprocess: PreprocessConfig, split: str = "train", log=print):
        from FewShotSegLib.evaluation import shared_data_dir
        d = cfg["data"]
        root = shared_data_dir(d.get("root"))
        self.cfg = cfg
        self.split = split
        self.volumes: list[torch.Tensor] = []
        self.structures: list[Structure] = []
        self.sources: list[str] = []
        holdout = {str(c) for c in d.get("chaos_holdout", [])}
        chaos = root / "chaos_t2"
        for img_path in sorted(chaos.glob("image_*.nii.gz"), key=lambda p: int(p.name[6:-7])):
            case = img_path.name[6:-7]
            if (case in holdout) != (split == "holdout"):
                continue
            if split == "train" and d.get("chaos_cases") and case not in {str(c) for c in d["chaos_cases"]}:
                continue
            self._add(img_path, chaos / f"label_{case}.nii.gz", preprocess, {1, 2, 3, 4}, f"chaos_{case}", 1)
        if split == "train":
            for name in d.get("totalseg", []):
                folder = root / "totalseg"
                self._add(folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz", preprocess, None,
                          name, int(d.get("totalseg_min_voxels", 300)))
        if not self.structures:
            raise FewShotSegError(f"no training structures found under {root}")
        log(f"[data] {split}: {len(self.volumes)} volumes, {len(self.structures)} structures "
            f"({', '.join(self.sources)})")
        self._superpixel_cache: dict = {}

    def _fewshot_checkpoint(self):
        """The few-shot model whose propagation errors become coarse masks (loaded once)."""
        name = self.cfg["data"].get("fewshot_model")
        if not name or self.split == "holdout" or not self.cfg["data"].get("fewshot_fraction"):
            return None
        if not hasattr(self, "_fewshot"):
            from FewShotSegLib.checkpoints import load_checkpoint
            from FewShotSegLib.model_store import resolve_model_path
            self._fewshot = load_checkpoint(resolve_model_path(name))
        return self._fewshot

    def _propagated(self, image, m: np.ndarray, axis: int) -> np.ndarray | None:
        """Propagate ``m``'s largest slice through ``image`` as a user would (no oracle)."""
        checkpoint = self._fewshot_checkpoint()
        if checkpoint is None:
            return None
        from FewShotSegLib.evaluation import largest_slice_support
        from FewShotSegLib.propagation import PropagationOptions, propagate
        support, _ = largest_slice_support(m, axis)
        return propagate(image, support, checkpoint, PropagationOptions()).mask.astype(bool)

    def _add(self, image_path, label_path, preprocess, values, source, min_voxels):
        image = read_image(image_path)
        label = label_array(label_path, image)
        prepared = prepare_volume(image, "axial", preprocess)
        vol = len(self.volumes)
        self.volumes.append(prepared.slices.half())
        axis = prepared.axis_index
        present = values or {int(v) for v in np.unique(label) if v}
        for v in sorted(present):
            m = label == v
            if m.sum() < min_voxels:
                continue
            idx = np.flatnonzero(np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1).any(1))
            lo, hi = max(0, idx[0] - 1), min(prepared.num_slices - 1, idx[-1] + 1)
            rows = np.arange(lo, hi + 1)
            masks = prepared.mask_to_model(m, indices=rows) > 0.5
            coarse = self._propagated(image, m, axis)
            propagated = None if coarse is None else prepared.mask_to_model(coarse, indices=rows) > 0.5
            self.structures.append(Structure(vol, int(lo), masks, f"{source}:{v}", propagated))
        self.sources.append(source)

    def _superpixel(self, rng):
        """A Felzenszwalb superpixel as a pseudo-structure (SSL-ALPNet recipe), no neighbour."""
        from skimage.segmentation import felzenszwalb
        vol = int(rng.integers(len(self.volumes)))
        i = int(rng.integers(len(self.volumes[vol])))
        key = (vol, i)
        if key not in self._superpixel_cache:
            s = self.volumes[vol][i].float().numpy()
            s = (255 * (s - s.min()) / (np.ptp(s) + 1e-6)).astype(np.float32)
            self._superpixel_cache[key] = felzenszwalb(s, scale=1, sigma=1, min_size=400)
        seg = self._superpixel_cache[key]
        ids, counts = np.unique(seg, return_counts=True)
        ok = ids[(counts >= 200) & (counts <= 20000)]
        if not len(ok):
            return None
        return vol, i, seg == rng.choice(ok), None

    def _pick(self, rng):
        """(volume, slice, clean mask, neighbour mask, coarse mask or None = degrade clean)."""
        if rng.random() < self.cfg["data"].get("superpixel_fraction", 0.0):
            got = self._superpixel(rng)
            if got is not None:
                return got + (None,)
        if rng.random() < self.cfg["data"].get("fewshot_fraction", 0.0):
            got = self._fewshot_error(rng)
            if got is not None:
                return got
        s = self.structures[int(rng.integers(len(self.structures)))]
        n = len(s.masks)
        present = [j for j in range(n) if s.masks[j].any()]
        if rng.random() < self.cfg["empty_fraction"] and len(present) < n:
            j = int(rng.choice([j for j in range(n) if not s.masks[j].any()]))   # just outside
        else:
            j = int(rng.choice(present))
        i = s.first + j
        neighbours = [s.mask(i + o) for o in (-1, 1) if s.mask(i + o).any()]
        neighbour = neighbours[int(rng.integers(len(neighbours)))] if neighbours else None
        return s.volume, i, s.mask(i), neighbour, None

    def _fewshot_error(self, rng):
        """A slice where the few-shot propagation disagrees with the label (its real errors)."""
        candidates = [s for s in self.structures if s.propagated is not None]
        if not candidates:
            return None
        s = candidates[int(rng.integers(len(candidates)))]
        wrong = [j for j in range(len(s.masks))
                 if s.propagated[j].any() and not torch.equal(s.propagated[j], s.masks[j])]
        if not wrong:
            return None
        j = int(rng.choice(wrong))
        return s.volume, s.first + j, s.masks[j].numpy(), None, s.propagated[j].numpy()

    def sample(self, rng, crop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, clean, coarse) crops [1,S,S]; coarse is never empty."""
        while True:
            vol, i, clean, neighbour, coarse = self._pick(rng)
            if coarse is not None:            # the few-shot model's own mistake, as it made it
                break
            start = clean if clean.any() else neighbour
            if start is None:
                continue
            coarse = degrade_mask(clean, rng, neighbour) if clean.any() else degrade_mask(neighbour, rng)
            if coarse.any():
                break
        lo, hi = self.cfg["margin_px"]
        box = square_box(coarse, rng.uniform(lo, hi))
        top, left, side = box
        jitter = np.round(rng.uniform(-0.06, 0.06, 2) * side).astype(int)
        box = (top + int(jitter[0]), left + int(jitter[1]), side)
        image = crop_resize(self.volumes[vol][i].float(), box, crop, pad="border")
        clean_c = crop_resize(torch.from_numpy(clean).float(), box, crop) > 0.5
        coarse_c = crop_resize(torch.from_numpy(coarse).float(), box, crop) > 0.5
        if rng.random() < 0.5:                                  # intensity jitter
            image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15)
        out = [image, clean_c.float(), coarse_c.float()]
        if rng.random() < 0.5:
            out = [t.flip(-1) for t in out]
        k = int(rng.integers(4)) if rng.random() < 0.3 else 0
        return tuple(torch.rot90(t, k, (-2, -1))[None] for t in out)

    def batch(self, rng, n: int, crop: int):
        items = [self.sample(rng, crop) for _ in range(n)]
        return tuple(torch.stack(parts) for parts in zip(*items))


# ----------------------------------------------------------------------------- loss
def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def training_loss(model, image, clean, coarse, cfg, gen: torch.Generator):
    """x0 prediction from x_t; x_t is noised from a mix of the clean and the coarse mask.

    Our choice: inference starts from the NOISED COARSE mask (SDEdit-like), so training
    noises lambda*clean + (1-lambda)*coarse with lambda = 0 (40%), 1 (30%) or U(0,1) (30%):
    the first step and the later DDIM steps (whose x_t carries a partly corrected mask)
    are both seen.
    """
    core = model.module if hasattr(model, "module") else model
    if not hasattr(core, "q_sample"):          # a supervised refiner (hlfnet, 2 input channels)
        return bce_dice(model(torch.cat([image, coarse * 2 - 1], 1)), clean)
    b = image.shape[0]
    t_hi = max(2, int(cfg["t_max"] * core.timesteps))
    t = torch.randint(1, t_hi, (b,), generator=gen)
    u = torch.rand(b, generator=gen)
    lam = torch.where(u < 0.4, torch.zeros(b), torch.where(u < 0.7, torch.ones(b), torch.rand(b, generator=gen)))
    x0 = lam.view(-1, 1, 1, 1) * (clean * 2 - 1) + (1 - lam.view(-1, 1, 1, 1)) * (coarse * 2 - 1)
    x_t = core.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    logits, anchor_logits = model(x_t, t, image, coarse)
    return bce_dice(logits, clean) + cfg["anchor_weight"] * bce_dice(anchor_logits, clean)


def dice_batch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred * target).sum((-2, -1))
    denom = pred.sum((-2, -1)) + target.sum((-2, -1))
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


@torch.no_grad()
def evaluate(model, val, start_t=0.5, steps=4, samples=2) -> dict:
    """Crop-level Dice of the coarse mask and of the refined mean mask (held-out cases)."""
    model.eval()
    image, clean, coarse = val
    refined = []
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(image), 16):
        if hasattr(model, "sample"):
            p = model.sample(image[s:s + 16], coarse[s:s + 16], samples, steps, start_t, gen).mean(1)
        else:
            p = torch.sigmoid(model(torch.cat([image[s:s + 16], coarse[s:s + 16] * 2 - 1], 1)))[:, 0]
        refined.append(p)
    refined = (torch.cat(refined) >= 0.5).float()
    model.train()
    return {"dice_coarse": float(dice_batch(coarse[:, 0], clean[:, 0]).mean()),
            "dice_refined": float(dice_batch(refined, clean[:, 0]).mean())}


# ----------------------------------------------------------------------------- main
def load_config(path) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    user = json.loads(Path(path).read_text())
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg["device"] == "cuda" \
        else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"] + rank)
    rng = np.random.default_rng(cfg["seed"] + 1000 * rank)
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)

    preprocess = PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), **cfg["preprocess"]})
    model_cfg = dict(cfg["model_config"])
    if cfg["model"] == "hlfnet":
        model_cfg.setdefault("in_channels", 2)
    model = build_refiner(cfg["model"], **model_cfg)
    crop = int(getattr(model, "crop_size", 0) or cfg.get("crop_size", 96))
    data = RefinerData(cfg, preprocess, "train", log)
    val = None
    if rank == 0 and cfg["data"].get("chaos_holdout"):
        val_data = RefinerData(cfg, preprocess, "holdout", log)
        val = val_data.batch(np.random.default_rng(12345), int(cfg["eval_samples"]), crop)
    # multi-scale crops: the network is size-agnostic (convolutions, attention, radial NBP
    # spectrum); small crops make a CPU step cheaper, the inference size keeps a share
    crops = [int(c) for c in cfg["train_crops"]] or [crop]
    crop_p = np.asarray(cfg["train_crop_p"] if len(cfg["train_crop_p"]) == len(crops) else [1] * len(crops), float)
    crop_p = crop_p / crop_p.sum()

    out = ROOT / cfg["out"] if not Path(cfg["out"]).is_absolute() else Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = int(cfg["steps"])
    limit = float(cfg["max_minutes"]) * 60 if cfg["max_minutes"] else float("inf")

    def learning_rate(step: int, elapsed: float) -> float:
        """Warm-up, then cosine to 10% over the steps OR the time budget, whichever ends first."""
        progress = min(1.0, max(step / total, elapsed / limit))
        return cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    step, elapsed, history, best = 0, 0.0, [], None
    if args.resume and (out / "state.pt").is_file():
        state = load_training_state(out / "state.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        history, best = list(state.get("history", [])), state.get("best")
        torch.set_rng_state(state["torch_rng"][rank % len(state["torch_rng"])])
        gen.set_state(state["gen_rng"])
        rng = np.random.default_rng(cfg["seed"] + 1000 * rank + step)
        log(f"[resume] step {step}, {elapsed / 60:.1f} min already spent")
    model.to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def save(tag_best: bool = False):
        if rank != 0:
            return
        save_training_state(out / "state.pt", {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "elapsed": elapsed, "history": history, "best": best,
            "torch_rng": [torch.get_rng_state()], "gen_rng": gen.get_state()})
        provenance = {
            "trainer": "Training/train_refiner.py", "command": " ".join([sys.executable] + sys.argv),
            "config": cfg, "steps": step, "wall_seconds": round(elapsed, 1), "world_size": world,
            "hardware": f"{platform.processor() or platform.machine()}, {cfg['threads']} torch threads x {world}",
            "host": socket.gethostname(), "torch": str(torch.__version__), "git_commit": _git_commit(),
            "data": data.sources, "holdout_cases": list(cfg["data"].get("chaos_holdout", [])),
            "validation": history[-1] if history else None}
        card = {"description": cfg["card"].get("description", f"{cfg['model']} mask refiner"),
                "training": f"{step} steps x batch {cfg['batch_size']} on {', '.join(data.sources)}; "
                            f"{elapsed / 60:.1f} min", **{k: v for k, v in cfg["card"].items() if k != "description"}}
        extra = {"crop_size": crop}
        save_checkpoint(out / "last.pt", model, kind="refiner", preprocess=preprocess,
                        provenance=provenance, card=card, extra=extra)
        if tag_best:
            save_checkpoint(out / "best.pt", model, kind="refiner", preprocess=preprocess,
                            provenance=provenance, card=card, extra=extra)

    t_last, losses = time.perf_counter(), []
    while step < total:
        size = int(rng.choice(crops, p=crop_p))
        image, clean, coarse = (t.to(device) for t in data.batch(rng, int(cfg["batch_size"]), size))
        lr = learning_rate(step, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = training_loss(ddp, image, clean, coarse, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        stop = torch.tensor([1.0 if elapsed >= limit else 0.0])
        if world > 1:
            dist.all_reduce(stop)
        if step % cfg["log_every"] == 0:
            log(f"step {step:6d}  loss {np.mean(losses):.4f}  lr {lr:.2e}  "
                f"{elapsed / 60:.1f} min")
            losses = []
        is_best = False
        last_eval = history[-1]["step"] if history else 0
        if val is not None and (step % cfg["eval_every"] == 0 or
                                ((step == total or stop.item() > 0) and step - last_eval >= cfg["eval_every"] // 2)):
            scores = evaluate(model, tuple(t.to(device) for t in val))
            scores["step"] = step
            history.append(scores)
            gain = scores["dice_refined"] - scores["dice_coarse"]
            is_best = best is None or gain > best["gain"]
            if is_best:
                best = {"gain": gain, "step": step}
            log(f"[eval] step {step}: crop Dice coarse {scores['dice_coarse']:.4f} -> refined "
                f"{scores['dice_refined']:.4f}{'  (best)' if is_best else ''}")
        if step % cfg["save_every"] == 0 or step == total or stop.item() > 0 or is_best:
            save(is_best)
        if stop.item() > 0:
            log(f"[stop] time limit of {cfg['max_minutes']} min reached at step {step}")
            break
    if rank == 0:
        save()
        chosen = out / ("best.pt" if (out / "best.pt").is_file() else "last.pt")
        if cfg.get("release"):
            release = ROOT / cfg["release"]
            release.parent.mkdir(parents=True, exist_ok=True)
            tmp = release.with_suffix(".pt.tmp")
            tmp.write_bytes(chosen.read_bytes())
            os.replace(tmp, release)
            log(f"[release] {chosen.name} -> {release}")
        (out / "history.json").write_text(json.dumps({"history": history, "best": best}, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FewShotSegError as exc:
        print(f"train_refiner: error: {exc}", file=sys.stderr)
        sys.exit(2)
