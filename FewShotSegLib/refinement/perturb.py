"""Synthetic degradations of a clean 2D mask: what a propagation gets wrong.

Training pairs for the refiner are (degraded mask, clean mask); the degradations imitate
propagation errors seen on CHAOS: a boundary a few pixels off (erosion/dilation), a drift
(shift), a ragged contour, a lobe missed, a leak into a neighbour, the adjacent slice's
mask used as is. Sizes scale with the structure (equivalent radius), so a kidney and a
liver are damaged alike.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Negative inside, positive outside, in pixels."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.full(mask.shape, 1e3, np.float32)
    return (ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)).astype(np.float32)


def smooth_noise(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / (noise.std() + 1e-6)


def _random_disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _boundary_point(mask: np.ndarray, rng: np.random.Generator):
    edge = mask & ~ndimage.binary_erosion(mask)
    ys, xs = np.nonzero(edge if edge.any() else mask)
    k = rng.integers(len(ys))
    return ys[k], xs[k]


def degrade_mask(mask: np.ndarray, rng: np.random.Generator, neighbour: np.ndarray | None = None,
                 strength: float = 1.0, p_identity: float = 0.08) -> np.ndarray:
    """A plausible wrong version of ``mask`` (2D bool); never empty when the input is not.

    ``neighbour``: the structure on an adjacent slice; with some probability it replaces
    the mask as the starting point (propagation's most common error near the ends).
    """
    mask = np.asarray(mask, bool)
    start = mask
    if neighbour is not None and np.asarray(neighbour).any() and rng.random() < 0.3:
        start = np.asarray(neighbour, bool)
    if not start.any():
        return start.copy()
    if start is mask and rng.random() < p_identity:
        return mask.copy()
    radius = float(np.sqrt(start.sum() / np.pi))
    scale = strength * float(np.clip(radius, 4.0, 60.0))
    d = signed_distance(start)
    level = 0.0
    if rng.random() < 0.7:                       # erosion / dilation
        level += rng.uniform(-0.12, 0.12) * scale
    if rng.random() < 0.6:                       # ragged contour
        d = d + rng.uniform(0.02, 0.10) * scale * smooth_noise(d.shape, rng, rng.uniform(2.0, 6.0))
    out = d < level
    if rng.random() < 0.4:                       # drift
        shift = np.round(rng.uniform(-0.12, 0.12, 2) * scale).astype(int)
        out = np.roll(out, tuple(shift), axis=(0, 1))
    if rng.random() < 0.3 and out.sum() > 30:    # a missed part
        centre = _boundary_point(out, rng)
        out &= ~_random_disk(out.shape, centre, rng.uniform(0.2, 0.5) * scale)
    if rng.random() < 0.3:                       # a leak into the neighbourhood
        centre = _boundary_point(out if out.any() else start, rng)
        blob = _random_disk(out.shape, centre, rng.uniform(0.15, 0.4) * scale)
        blob_d = signed_distance(blob) + 0.1 * scale * smooth_noise(d.shape, rng, 3.0)
        out |= blob_d < 0
    if not out.any():
        out = start.copy()
    return out


def bounding_box(mask: np.ndarray):
    """(r0, r1, c0, c1), end-exclusive, of a non-empty 2D mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def square_box(mask: np.ndarray, margin: float, min_side: int = 32):
    """A square box around the mask plus ``margin`` pixels; may reach outside the slice."""
    r0, r1, c0, c1 = bounding_box(mask)
    side = int(np.ceil(max(r1 - r0, c1 - c0) + 2 * margin))
    side = max(side, min_side)
    cr, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    top, left = int(np.floor(cr - side / 2.0)), int(np.floor(cc - side / 2.0))
    return top, left, side
