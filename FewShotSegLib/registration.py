"""Non-learned propagation: slice-to-slice deformable registration (demons).

Every table needs a comparator that learned nothing. It works on the same pre-processed
slices as the models (one code path), carries the mask from slice to slice with a
Thirion demons field, and stops where the intensities under the carried mask no longer
look like those under the painted mask.

The demons are ours, in torch, following ITK's `DemonsRegistrationFilter` step for step
(fixed-image gradient forces, the field smoothed before every update, edge-padding and
RMS-change rules); `Testing/test_registration.py` checks them against SimpleITK's filter
on real slices. Why not call SimpleITK's: on 2-D slices its cost is about 1.3 ms of
pipeline overhead per iteration (60-75 ms per slice on 2 cores, half of the default
propagation's time), and the fields of a walk's consecutive slice pairs do not depend on
the masks, so ours estimates them in batches: a few ms per slice.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


DEMONS_ITERATIONS = 40
DEMONS_SMOOTHING = 1.5          # Gaussian sigma of the field, pixels of the shrunk grid
DEMONS_MAX_RMS_CHANGE = 0.02    # ITK's default halt: the mean update fell below this (pixels)
REGISTRATION_SHRINK = 4         # 4 measured better than 2 and 8 on CHAOS-T2 (README ablations)
FIELD_BATCH = 8                 # slice pairs registered together


def _shrunk(images: torch.Tensor, shrink: int) -> torch.Tensor:
    """[B,H,W] -> [B,H/s,W/s] by averaging (the field needs no finer grid)."""
    return F.avg_pool2d(images[:, None].float(), shrink)[:, 0] if shrink > 1 else images.float()


def _smoothing_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n,n] Gaussian smoothing along one axis, edges replicated (ITK's zero-flux
    boundary): a matrix product is far cheaper than a padded convolution at these sizes.
    The kernel is cut where it holds 90 % of the weight, as ITK's GaussianOperator does
    (maximum error 0.1), then renormalised."""
    x = torch.arange(-int(math.ceil(5 * sigma)), int(math.ceil(5 * sigma)) + 1).float()
    full = torch.exp(-0.5 * (x / sigma) ** 2)
    full = full / full.sum()
    centre = x.numel() // 2
    radius = next(r for r in range(1, centre + 1) if float(full[centre - r:centre + r + 1].sum()) >= 0.9)
    offsets = torch.arange(-radius, radius + 1)
    weights = full[centre - radius:centre + radius + 1]
    weights = weights / weights.sum()
    matrix = torch.zeros(n, n)
    rows = torch.arange(n)[:, None].expand(n, offsets.numel())
    cols = (torch.arange(n)[:, None] + offsets[None]).clamp(0, n - 1)
    matrix.index_put_((rows, cols), weights.expand(n, -1).clone(), accumulate=True)
    return matrix


def _gradient(images: torch.Tensor) -> torch.Tensor:
    """Central differences [B,2(y,x),H,W], edges replicated."""
    p = F.pad(images[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return torch.stack([(p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2, (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) / 2], 1)


class _Warper:
    """Samples images at x + u(x) (bilinear, 0 outside) on a fixed [H,W] grid."""

    def __init__(self, shape):
        h, w = shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        self.scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
        self.base = torch.stack([xs, ys], -1) * self.scale - 1      # [H,W,2] in (x, y) order

    def grid(self, field: torch.Tensor) -> torch.Tensor:
        """[B,2(y,x),H,W] displacement -> grid_sample's [B,H,W,2(x,y)] coordinates."""
        return self.base + field.flip(1).permute(0, 2, 3, 1) * self.scale

    def __call__(self, images: torch.Tensor, field: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.grid(field) if grid is None else grid
        return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True)[:, 0]


def demons_fields(fixed: torch.Tensor, moving: torch.Tensor, iterations: int = DEMONS_ITERATIONS,
                  sigma: float = DEMONS_SMOOTHING, init: torch.Tensor | None = None) -> torch.Tensor:
    """Displacements [B,2(y,x),H,W] (pixels) such that ``moving[b](x + u(x))`` matches
    ``fixed[b](x)``, for a batch of [B,H,W] pairs. Pixels whose target falls outside
    ``moving`` get no force (ITK's edge-padding rule). ``init``: a starting field."""
    grad = _gradient(fixed)
    grad_sq = (grad ** 2).sum(1)
    smooth_rows = _smoothing_matrix(fixed.shape[-2], sigma)
    smooth_cols = _smoothing_matrix(fixed.shape[-1], sigma).T
    warp = _Warper(fixed.shape[-2:])
    field = torch.zeros((fixed.shape[0], 2) + tuple(fixed.shape[-2:])) if init is None else init.clone()
    for _ in range(iterations):
        field = smooth_rows @ field @ smooth_cols   # ITK smooths before each update, not after
        grid = warp.grid(field)
        inside = (grid.abs() <= 1.0).all(-1)
        speed = fixed - warp(moving, field, grid)
        denominator = speed ** 2 + grad_sq          # ITK's normaliser is 1 at unit spacing
        active = inside & (speed.abs() >= 1e-3) & (denominator >= 1e-9)
        update = (speed * active / denominator.clamp_min(1e-9))[:, None] * grad
        field = field + update
        # ITK's halt: the RMS of the update over the pixels that received one (all pairs)
        if float((update ** 2).sum()) < DEMONS_MAX_RMS_CHANGE ** 2 * max(1, int(active.sum())):
            break
    return field


def slice_fields(fixed: torch.Tensor, moving: torch.Tensor, shrink: int = REGISTRATION_SHRINK,
                 iterations: int = DEMONS_ITERATIONS, coarse_shrink: int = 0) -> torch.Tensor:
    """Full-resolution fields [B,2,H,W] for [B,H,W] slice pairs, estimated on a grid shrunk
    by ``shrink`` (demons cost follows the pixel count) and brought back bilinearly.
    ``coarse_shrink`` > ``shrink``: a first estimate on that coarser grid starts the fine one
    (larger motions are found before the fine grid's local minima can hold them)."""
    shrink = int(shrink)
    small_fixed, small_moving = _shrunk(fixed, shrink), _shrunk(moving, shrink)
    init = None
    if coarse_shrink and int(coarse_shrink) > shrink:
        coarse = demons_fields(_shrunk(fixed, int(coarse_shrink)), _shrunk(moving, int(coarse_shrink)),
                               int(iterations))
        init = F.interpolate(coarse, size=tuple(small_fixed.shape[-2:]), mode="bilinear",
                             align_corners=False) * (int(coarse_shrink) / shrink)
    field = demons_fields(small_fixed, small_moving, int(iterations), init=init)
    if shrink == 1:
        return field
    return F.interpolate(field, size=tuple(fixed.shape[-2:]), mode="bilinear", align_corners=False) * shrink


@functools.lru_cache(maxsize=4)
def _warper(shape: tuple) -> _Warper:
    return _Warper(shape)


def warp_mask(mask, field: torch.Tensor) -> np.ndarray:
    """Carry a full-resolution [H,W] mask along one [2,H,W] field; a soft mask in [0, 1]."""
    mask = torch.as_tensor(np.ascontiguousarray(mask, dtype=np.float32))
    return _warper(tuple(mask.shape))(mask[None], field[None])[0].numpy()


def carry_mask(fixed: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray,
               shrink: int = REGISTRATION_SHRINK, iterations: int = DEMONS_ITERATIONS) -> np.ndarray:
    """Warp ``moving_mask`` (on ``moving``) onto ``fixed``; returns a soft mask in [0, 1]."""
    images = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None] for a in (fixed, moving)]
    return warp_mask(moving_mask, slice_fields(*images, shrink, iterations)[0])
