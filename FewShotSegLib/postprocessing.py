"""3D clean-up of a propagated mask: what a user would otherwise erase by hand.

Propagation decides slice by slice; a false positive in a far slice, or a blob that is
not connected to what the user painted, is never what they meant.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_components_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Keep only the 3D connected components (26-connectivity) that overlap ``seeds``."""
    mask = np.asarray(mask, bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return mask
    touching = np.unique(labels[np.asarray(seeds, bool) & mask])
    touching = touching[touching != 0]
    return np.isin(labels, touching)


def fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill enclosed holes in each slice along ``axis`` (organs have no holes in 2D cuts)."""
    mask = np.asarray(mask, bool)
    out = np.moveaxis(mask.copy(), axis, 0)
    for i in range(out.shape[0]):
        if out[i].any():
            out[i] = ndimage.binary_fill_holes(out[i])
    return np.moveaxis(out, 0, axis)


def _bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the smallest box holding every True voxel (the whole array if none)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def clean_mask(mask: np.ndarray, painted: np.ndarray, axis: int) -> np.ndarray:
    """Connected components touching the painted voxels, holes filled, painted slices exact.

    ``painted`` is the user's support (bool); slices that contain painting are returned
    exactly as painted. The work happens inside the mask's bounding box: a structure
    fills a small part of a CT, and labelling the whole volume would dominate the time.
    """
    painted = np.asarray(painted, bool)
    union = np.asarray(mask, bool) | painted
    box = _bounding_box(union)
    seeds = painted[box] if painted.any() else union[box]
    inner = keep_components_touching(union[box], seeds)
    inner = fill_holes_per_slice(inner, axis)
    mask = np.zeros_like(union)
    mask[box] = inner
    painted_slices = np.flatnonzero(np.moveaxis(painted, axis, 0).reshape(painted.shape[axis], -1).any(1))
    view, pview = np.moveaxis(mask, axis, 0), np.moveaxis(painted, axis, 0)
    view[painted_slices] = pview[painted_slices]
    return mask
