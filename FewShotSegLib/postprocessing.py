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
    keep = np.zeros(count + 1, bool)             # label -> kept? (a lookup beats np.isin)
    keep[labels[np.asarray(seeds, bool) & mask]] = True
    keep[0] = False
    return keep[labels]


def fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill enclosed holes in each slice along ``axis`` (organs have no holes in 2D cuts).

    One labelling of the background with in-plane 4-connectivity serves every slice: a
    background region is a hole when it touches no edge of its slice (what
    ``binary_fill_holes`` does slice by slice, ~3x faster than looping over slices)."""
    mask = np.moveaxis(np.asarray(mask, bool), axis, 0)
    if mask.size == 0:
        return np.moveaxis(mask.copy(), 0, axis)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~mask, structure=in_plane)
    open_to_edge = np.zeros(count + 1, bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        open_to_edge[edge.ravel()] = True
    open_to_edge[0] = True                        # label 0 is the foreground itself
    return np.moveaxis(mask | ~open_to_edge[background], 0, axis)


def bounding_box(mask: np.ndarray) -> tuple | None:
    """Slices of the smallest box holding every True voxel, or None if there is none.

    The first axis is read as contiguous rows; the others only inside that slab, which
    for a structure in a CT is a small part of the volume."""
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
    if rows.size == 0:
        return None
    box = [slice(int(rows[0]), int(rows[-1]) + 1)]
    slab = mask[box[0]]
    for axis in range(1, mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(slab.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


# painted holes larger than this fraction of the painted area are meant: a ring of muscle
# round a cavity, a vessel wall, a bladder wall (a sloppy brush leaves far smaller ones)
RING_HOLE_FRACTION = 0.05


def painted_as_ring(painted: np.ndarray, axis: int) -> bool:
    """Whether the user's painting encloses holes of its own (then holes are kept)."""
    painted = np.moveaxis(np.asarray(painted, bool), axis, 0)
    painted = painted[np.flatnonzero(painted.reshape(painted.shape[0], -1).any(1))]  # the painted slices only
    area = int(painted.sum())
    if area == 0:
        return False
    holes = int((fill_holes_per_slice(painted, 0) & ~painted).sum())
    return holes > RING_HOLE_FRACTION * area


def clean_mask(mask: np.ndarray, painted: np.ndarray, axis: int) -> np.ndarray:
    """Connected components touching the painted voxels, holes filled unless the painting
    itself encloses holes (a ring), painted slices exact.

    ``painted`` is the user's support (bool); slices that contain painting are returned
    exactly as painted. All the work happens inside the bounding box of mask and
    painting: a structure fills a small part of a CT, and whole-volume passes (labelling,
    even a logical or) would dominate the time.
    """
    mask, painted = np.asarray(mask, bool), np.asarray(painted, bool)
    painted_box = bounding_box(painted)
    boxes = [b for b in (bounding_box(mask), painted_box) if b is not None]
    out = np.zeros(mask.shape, bool)            # calloc: untouched pages cost nothing
    if not boxes:
        return out
    box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(mask.ndim))
    union = mask[box] | painted[box]
    seeds = painted[box] if painted_box is not None else union
    inner = keep_components_touching(union, seeds)
    if not painted_as_ring(painted[box], axis):
        inner = fill_holes_per_slice(inner, axis)
    out[box] = inner
    other = tuple(a for a in range(mask.ndim) if a != axis)
    painted_slices = np.flatnonzero(painted[box].any(axis=other)) + box[axis].start
    view, pview = np.moveaxis(out, axis, 0), np.moveaxis(painted, axis, 0)
    view[painted_slices] = pview[painted_slices]
    return out


# The intensity gate (on by default in propagation; protocol rows +ig, +igw): where the
# prediction is confident, and how far off.
GATE_CORE_PROBABILITY = 0.8
GATE_ROBUST_SDS = 3.0
GATE_SAMPLE = 200_000        # at most this many confident voxels give the statistics


def intensity_gated(mask: np.ndarray, image: np.ndarray, probs: np.ndarray,
                    core_probability: float = GATE_CORE_PROBABILITY, robust_sds: float = GATE_ROBUST_SDS,
                    within: np.ndarray | None = None) -> np.ndarray:
    """``mask`` without the voxels whose intensity lies more than ``robust_sds`` robust
    standard deviations (1.4826 MAD) from the median of the confident voxels
    (``probs >= core_probability`` inside the mask; the whole mask when under 50 voxels).

    Why: an organ is one tissue, and the network's confident centre tells its intensity
    in THIS scan (no support label and no other scan's intensities are read). What the
    network adds at a blurred edge (dark fat and muscle round a bright kidney or spleen,
    vessels and bowel beside the liver) lies far from it. ``within``: only those voxels
    (bool, e.g. EP1's scored slices) give the statistics; nothing outside the mask is added."""
    mask = np.asarray(mask, bool)
    box = bounding_box(mask)
    if box is None:
        return mask.copy()
    inner, image, probs = mask[box], np.asarray(image)[box], np.asarray(probs)[box]   # a CT organ: a small box
    counted = inner if within is None else inner & np.asarray(within, bool)[box]
    core = counted & (probs >= core_probability)
    if np.count_nonzero(core) < 50:
        core = counted
    out = mask.copy()
    if not core.any():
        return out
    values = image[core]
    if values.size > GATE_SAMPLE:                   # a CT liver: a fixed stride is as good a median
        values = values[::values.size // GATE_SAMPLE + 1]
    values = values.astype(np.float32)
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median))) + 1e-6
    kept = np.zeros_like(inner)
    kept[inner] = np.abs(image[inner].astype(np.float32) - median) <= robust_sds * spread
    out[box] = kept
    return out


# Trimming what the walk carried onto other tissue (learned mode; options.trim_unlike)
TRIM_OPENING_MM = 2.5        # narrower runs of unlike pixels are a partial-volume rim, kept
TRIM_PERCENTILES = (5, 95)   # the painted structure's intensity band


def trimmed_unlike(mask: np.ndarray, image: np.ndarray, support: np.ndarray, spacing_mm: float) -> np.ndarray:
    """``mask`` (slices first) without, on each slice not painted, the regions at its edge
    whose intensities lie outside the painted voxels' 5-95 % band. Holes are left as they
    are: the clean-up fills them, unless the painting is a ring (a cavity is meant).

    Why: a walk carries part of the mask onto a neighbour where the structure ends beside
    it (a liver's left lobe ends and the carried mask stays on the stomach next to it);
    the neighbour is another tissue, so its intensities leave the band. Only regions that
    reach the mask's edge are cut, and only those wider than ``TRIM_OPENING_MM``: vessels
    inside an organ are holes, and the dark rim of partial volume at every edge is thin.
    Intensities are smoothed in-plane (one pixel) so that noise does not break regions."""
    mask, support = np.asarray(mask, bool), np.asarray(support, bool)
    painted = support.any(axis=(1, 2))
    if not painted.any() or not mask.any():
        return mask
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), (0, 1, 1))
    low, high = np.percentile(smooth[support], TRIM_PERCENTILES)
    radius = max(1, int(round(TRIM_OPENING_MM / max(float(spacing_mm), 1e-6))))
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = xx * xx + yy * yy <= radius * radius
    out = mask.copy()
    for z in np.flatnonzero(mask.any(axis=(1, 2)) & ~painted):
        m = mask[z]
        unlike = m & ((smooth[z] < low) | (smooth[z] > high))
        if not unlike.any():
            continue
        unlike = ndimage.binary_opening(unlike, disk)
        labels, count = ndimage.label(unlike)
        if not count:
            continue
        edge = m & ~ndimage.binary_erosion(m, border_value=0)
        at_edge = np.unique(labels[edge])
        at_edge = at_edge[at_edge > 0]
        if not at_edge.size:
            continue
        kept = m & ~np.isin(labels, at_edge)
        parts, n = ndimage.label(kept)
        if n > 1:                                   # what the cut split off is not the structure
            sizes = ndimage.sum(kept, parts, range(1, n + 1))
            kept = parts == 1 + int(np.argmax(sizes))
        out[z] = kept
    return out
