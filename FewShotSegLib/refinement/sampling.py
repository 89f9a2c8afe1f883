"""refine(): a coarse 3D mask -> a refined mask and a per-voxel uncertainty.

Fast-sampling recipe (REFERENCE.md section 3): only the slices that hold the coarse mask
(and one neighbour each side) are processed; each is cropped to the mask's bounding box
plus a margin and resized to the refiner's crop size; the condition network runs once per
slice; K samples start from the coarse mask noised to start_t*T and take a few DDIM steps
predicting x0; the mean of the K probabilities is the refined mask, their spread the
uncertainty. Intensities and slice geometry go through `FewShotSegLib.preprocessing`,
the same code path as the few-shot models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import FewShotSegError
from ..imageio import array_axis_for
from ..preprocessing import prepare_volume
from .crops import crop_resize, paste
from .perturb import square_box

MAX_SAMPLES, MAX_STEPS = 32, 50
UNCERTAINTIES = ("variance", "entropy")


class RefineCancelled(FewShotSegError):
    """The user pressed Cancel; nothing was changed."""


@dataclass
class RefineOptions:
    samples: int = 4              # K: ensemble size (uncertainty needs >= 2)
    steps: int = 4                # DDIM steps per sample
    start_t: float = 0.5          # the coarse mask is noised to start_t * T
    seed: Optional[int] = 0       # None: not reproducible
    axis: Union[str, int] = "axial"   # an anatomical name or a numpy axis index
    margin_mm: float = 10.0       # crop = bounding box of the coarse mask + this margin
    device: str = "cpu"
    batch_slices: int = 4         # slices per forward pass (x K samples)
    eta: float = 0.0              # DDIM stochasticity (0 = deterministic steps)
    uncertainty: str = "variance"  # variance of the K sample probabilities, or entropy of their mean
    threshold: float = 0.5
    crop_size: Optional[int] = None  # None: the refiner's own (multiple of 16; 64 is ~1.7x faster)
    neighbours: bool = True       # also refine the empty slice next to each end (may grow the mask by one slice)
    num_threads: Optional[int] = None

    def validate(self) -> None:
        if not isinstance(self.samples, int) or not 1 <= self.samples <= MAX_SAMPLES:
            raise FewShotSegError(f"samples must be an integer from 1 to {MAX_SAMPLES} (got {self.samples})")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise FewShotSegError(f"steps must be an integer from 1 to {MAX_STEPS} (got {self.steps})")
        if self.num_threads is not None and self.num_threads < 1:
            raise FewShotSegError(f"threads must be at least 1 (got {self.num_threads})")
        if not 0.0 < float(self.start_t) <= 1.0:
            raise FewShotSegError(f"start_t must lie in (0, 1] (got {self.start_t})")
        if self.margin_mm < 0:
            raise FewShotSegError("margin_mm must not be negative")
        if self.batch_slices < 1:
            raise FewShotSegError("batch_slices must be at least 1")
        if self.eta < 0:
            raise FewShotSegError("eta must not be negative")
        if self.uncertainty not in UNCERTAINTIES:
            raise FewShotSegError(f"uncertainty must be one of {', '.join(UNCERTAINTIES)}")
        if not 0.0 < self.threshold < 1.0:
            raise FewShotSegError("threshold must lie strictly between 0 and 1")
        if self.crop_size is not None and (self.crop_size < 32 or self.crop_size % 16):
            raise FewShotSegError(f"crop_size must be a multiple of 16, at least 32 (got {self.crop_size})")


@dataclass
class RefineResult:
    mask: np.ndarray          # uint8, image array order, 1 = structure
    uncertainty: np.ndarray   # float32, image array order, 0 where the samples agree
    probability: np.ndarray   # float32 mean foreground probability of the K samples
    seconds: float
    slices_done: int
    network_seconds: float = 0.0

    @property
    def seconds_per_slice(self) -> float:
        return self.seconds / max(1, self.slices_done)


def _device(name: str) -> torch.device:
    from ..propagation import resolve_device
    return resolve_device(name)


def model_pixel_mm(image: sitk.Image, axis_index: int, prepared, model_size: int) -> float:
    """Size in mm of one model-space pixel (the sampler keeps the physical aspect, so the
    longer physical side of the slice spans the model's size)."""
    sampler = getattr(prepared, "sampler", None)
    for attr in ("pixel_mm", "model_spacing"):
        value = getattr(sampler, attr, None)
        if value is not None:
            return float(np.max(value))
    shape = [s for a, s in enumerate(sitk.GetArrayViewFromImage(image).shape) if a != axis_index]
    spacing = [s for a, s in enumerate(image.GetSpacing()[::-1]) if a != axis_index]
    return max(n * s for n, s in zip(shape, spacing)) / model_size


def slice_plan(coarse_moved: np.ndarray, neighbours: bool = True) -> list[tuple[int, list[int]]]:
    """[(slice, anchor slices)]: every slice with the coarse mask (its own anchor) and the
    empty neighbours of those slices (anchored on the adjacent masked slice(s))."""
    present = coarse_moved.reshape(coarse_moved.shape[0], -1).any(1)
    plan = []
    for i in range(len(present)):
        if present[i]:
            plan.append((i, [i]))
        elif neighbours:
            near = [j for j in (i - 1, i + 1) if 0 <= j < len(present) and present[j]]
            if near:
                plan.append((i, near))
    return plan


def _crop_size(refiner) -> int:
    model = refiner.model
    return int(getattr(model, "crop_size", 0) or refiner.extra.get("crop_size", 96))


def _run_batch(model, images, anchors, options, generator, check_cancel=None):
    """[B,1,S,S] crops -> per-sample probabilities [B,K,S,S]."""
    if hasattr(model, "sample"):
        import inspect
        # Cancel between denoising passes where the sampler offers it (ours does)
        extra = {"before_step": check_cancel} if "before_step" in inspect.signature(model.sample).parameters else {}
        return model.sample(images, anchors, samples=options.samples, steps=options.steps,
                            start_t=options.start_t, generator=generator, eta=options.eta, **extra)
    # a supervised refiner (hlfnet with 2 input channels): one deterministic answer
    logits = model(torch.cat([images, anchors * 2.0 - 1.0], 1))
    return torch.sigmoid(logits).expand(-1, options.samples, -1, -1)


def refine(image: sitk.Image, coarse: np.ndarray, refiner, options: RefineOptions | None = None,
           progress: Optional[Callable[[float, str], None]] = None,
           cancel: Optional[Callable[[], bool]] = None, keep: Optional[np.ndarray] = None) -> RefineResult:
    """Refine ``coarse`` (bool, image array order) with a loaded refiner checkpoint.

    ``keep`` (optional, bool, same shape): on every slice where it has voxels the result is
    ``keep`` itself with zero uncertainty -- pass the user's painted slices, which are the
    truth and which the refiner would otherwise redraw.
    """
    options = options or RefineOptions()
    options.validate()
    start = time.perf_counter()
    progress = progress or (lambda fraction, message: None)
    cancel = cancel or (lambda: False)
    coarse = np.asarray(coarse).astype(bool)
    shape = sitk.GetArrayViewFromImage(image).shape
    if coarse.shape != tuple(shape):
        raise FewShotSegError(f"coarse mask shape {coarse.shape} differs from the image {tuple(shape)}; "
                              "resample it onto the image first")
    if not coarse.any():
        raise FewShotSegError("the coarse mask is empty: nothing to refine")
    if keep is not None:
        keep = np.asarray(keep).astype(bool)
        if keep.shape != coarse.shape:
            raise FewShotSegError(f"keep mask shape {keep.shape} differs from the image {coarse.shape}")
    if getattr(refiner, "kind", "refiner") != "refiner":
        raise FewShotSegError(f"{getattr(refiner, 'path', 'this model')} is not a refiner")
    if options.num_threads:
        torch.set_num_threads(int(options.num_threads))
    device = _device(options.device)
    model = refiner.model.to(device).eval()
    size = int(options.crop_size or _crop_size(refiner))

    progress(0.0, "preparing the volume")
    axis = options.axis
    is_index = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
    axis_index = int(axis) if is_index else array_axis_for(image, axis)
    prepared = prepare_volume(image, axis_index, refiner.preprocess)
    anchors_model = prepared.mask_to_model(coarse) > 0.5          # [N, M, M] bool tensor
    margin_px = options.margin_mm / model_pixel_mm(image, axis_index, prepared, anchors_model.shape[-1])
    plan = slice_plan(np.moveaxis(coarse, axis_index, 0), options.neighbours)
    plan = [(i, a) for i, a in plan if bool(anchors_model[a].any())]  # masks lost in resampling
    if not plan:
        raise FewShotSegError("the coarse mask is too small to refine at the model's resolution")
    n, m_rows, m_cols = anchors_model.shape
    prob_full = torch.zeros((n, m_rows, m_cols), dtype=torch.float32)
    unc_full = torch.zeros_like(prob_full)
    generator = torch.Generator().manual_seed(int(options.seed)) if options.seed is not None else None
    network = 0.0

    def check_cancel():
        if cancel():
            raise RefineCancelled("refinement cancelled; the segmentation was not changed")

    with torch.inference_mode():
        for b0 in range(0, len(plan), options.batch_slices):
            check_cancel()
            batch = plan[b0:b0 + options.batch_slices]
            idx = [i for i, _ in batch]
            slices = prepared.model_slices(idx)
            boxes, imgs, ancs = [], [], []
            for k, (i, near) in enumerate(batch):
                anchor = anchors_model[near].any(0)
                box = square_box(anchor.numpy(), margin_px)
                boxes.append(box)
                imgs.append(crop_resize(slices[k], box, size, pad="border"))
                ancs.append(crop_resize(anchor.float(), box, size))
            imgs = torch.stack(imgs)[:, None].to(device)
            ancs = (torch.stack(ancs)[:, None] > 0.5).float().to(device)
            t0 = time.perf_counter()
            probs = _run_batch(model, imgs, ancs, options, generator, check_cancel).float().cpu()   # [B,K,S,S]
            network += time.perf_counter() - t0
            mean = probs.mean(1)
            if options.uncertainty == "variance":
                unc = probs.var(1, unbiased=False) if options.samples > 1 else torch.zeros_like(mean)
            else:
                p = mean.clamp(1e-6, 1 - 1e-6)
                unc = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            for k, (i, _) in enumerate(batch):
                prob_full[i] = paste(mean[k], boxes[k], (m_rows, m_cols))
                unc_full[i] = paste(unc[k], boxes[k], (m_rows, m_cols))
            progress(0.05 + 0.9 * (b0 + len(batch)) / len(plan), f"{b0 + len(batch)} of {len(plan)} slices")
    progress(0.97, "resampling to the image grid")
    prob_vol = np.clip(prepared.probs_to_volume(prob_full), 0.0, 1.0).astype(np.float32)
    unc_vol = np.clip(prepared.probs_to_volume(unc_full), 0.0, None).astype(np.float32)
    if keep is not None:
        kept = np.moveaxis(keep, axis_index, 0)
        rows = kept.reshape(kept.shape[0], -1).any(1)
        np.moveaxis(prob_vol, axis_index, 0)[rows] = kept[rows]
        np.moveaxis(unc_vol, axis_index, 0)[rows] = 0.0
    mask = (prob_vol >= options.threshold).astype(np.uint8)
    progress(1.0, f"{len(plan)} slices refined")
    return RefineResult(mask=mask, uncertainty=unc_vol, probability=prob_vol,
                        seconds=time.perf_counter() - start, slices_done=len(plan), network_seconds=network)

