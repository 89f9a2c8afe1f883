"""What the user gave: which axis the slices are along, which slices are anchors, and the
spans between them that the engine has to fill.

* The axis comes from the painting: the array axis across which the painted voxels lie
  in the fewest slices (the slice view the user painted in), whatever the volume's
  orientation (oblique, flipped, re-oriented stacks included).
* Every slice holding painted voxels is a *positive anchor*: it comes back exactly as
  painted. A slice holding excluded voxels and no painted one is an *end anchor*: the
  structure is absent there, and no walk crosses it.
* Between two positive anchors the structure is carried from both sides ("between"
  span); from a positive anchor towards an end anchor or the volume's end it is carried
  outward until the stop rule says the structure has ended ("outward" span).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import FewShotSegError

ANATOMICAL_AXES = ("axial", "coronal", "sagittal")


def slices_holding(mask: np.ndarray, axis_index: int) -> np.ndarray:
    """Indices of the slices across ``axis_index`` that hold any voxel of ``mask``."""
    other = tuple(a for a in range(mask.ndim) if a != axis_index)
    return np.flatnonzero(np.asarray(mask, bool).any(axis=other))


def axis_name(image: sitk.Image, axis_index: int) -> str:
    """'axial slices (array axis 0)': the anatomical plane closest to the slices, for messages."""
    from .imageio import array_axis_for

    for name in ANATOMICAL_AXES:
        if array_axis_for(image, name) == axis_index:
            return f"{name} slices (array axis {axis_index})"
    return f"array axis {axis_index}"


def _second_plane(support: np.ndarray, best: int, counts: list[int]) -> Optional[tuple[int, int]]:
    """(axis, index) of a plane across another axis that alone accounts for two or more of
    the slices painted across ``best``: the painting lies in two planes (an axial slice and
    a coronal one, say). A painting in one plane never has this: removing one row of it
    does not empty whole slices.

    One pass: for each other axis, the voxels counted per (slice across ``best``, slice
    across that axis); a plane empties the ``best`` slices whose whole count it holds."""
    if counts[best] < 3:
        return None
    box = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in (slices_holding(support, a) for a in range(3)))
    inner = support[box]
    per_slice = inner.sum(axis=tuple(a for a in range(3) if a != best))
    for other in range(3):
        if other == best:
            continue
        third = 3 - best - other
        matrix = inner.sum(axis=third)                       # axes (best, other) in array order
        if other < best:
            matrix = matrix.T
        touched = (matrix > 0).sum(axis=0)
        emptied = ((matrix == per_slice[:, None]) & (per_slice[:, None] > 0)).sum(axis=0)
        hits = np.flatnonzero((touched >= 3) & (emptied >= 2))
        if hits.size:
            return other, int(hits[0]) + box[other].start
    return None


# adjacent painted slices "fit together edge to edge" when they share at most this fraction
# of the smaller one's voxels and touch: strips of one stroke cut by the volume's slices
STRIP_OVERLAP = 0.05
# ... or, four or more slices in a row, at most this fraction in the median pair: a stroke
# resampled onto a grid rotated against it (nearest neighbour) gives strips that overlap a
# little, small ones at the stroke's ends; slices painted on purpose in a row overlap more
STRIP_OVERLAP_ROW = 0.25
# smaller paintings are left alone: a thin vessel painted on two adjacent slices may move by
# its own width between them
MIN_STRIP_VOXELS = 20


def _strips(support: np.ndarray, axis_index: int) -> list[int]:
    """The painted slices, when two or more of them are adjacent and every adjacent pair
    fits together edge to edge, or four or more in a row mostly do (else []): a stroke
    painted in a slice view that is not aligned with the volume's slices falls into several
    slices as strips side by side, where slices painted on purpose overlap their painted
    neighbours."""
    from scipy import ndimage

    painted = slices_holding(support, axis_index)
    pairs = [(int(a), int(b)) for a, b in zip(painted, painted[1:]) if b == a + 1]
    if not pairs:
        return []
    moved = np.moveaxis(support, axis_index, 0)
    overlaps, small = [], False
    for a, b in pairs:
        first, second = moved[a], moved[b]
        smaller = min(int(first.sum()), int(second.sum()))
        if not (ndimage.binary_dilation(first, np.ones((3, 3), bool)) & second).any():
            return []
        if smaller < MIN_STRIP_VOXELS:
            small = True
        else:
            overlaps.append(int((first & second).sum()) / smaller)
    if not overlaps:
        return []
    if not small and max(overlaps) <= STRIP_OVERLAP:
        return [int(i) for i in painted]
    longest = run = 1
    for (_, b), (c, _) in zip(pairs, pairs[1:]):
        run = run + 1 if b == c else 1
        longest = max(longest, run)
    if longest >= 3 and len(overlaps) >= 3 and float(np.median(overlaps)) <= STRIP_OVERLAP_ROW:
        return [int(i) for i in painted]
    return []


def resolve_axis(image: sitk.Image, support: np.ndarray, axis: Union[str, int, None] = "auto",
                 exclude: Optional[np.ndarray] = None) -> int:
    """The array axis the slices are taken across.

    ``axis`` 'auto' (or None): the axis across which the painted voxels lie in the fewest
    slices; ties go to the axis with the thickest slices. A name ('axial', ...) or an
    array index is checked against the painting: if the painting lies in fewer slices
    across another axis, the two disagree and that is an error, not a guess.
    """
    from .imageio import array_axis_for

    support = np.asarray(support, bool)
    if support.ndim != 3:
        raise FewShotSegError(f"a 3D painting is needed, not {support.ndim}D")
    if not support.any():
        if exclude is not None and np.asarray(exclude, bool).any():
            raise FewShotSegError("there are exclusions but no painted voxel: paint the structure on at least one slice")
        raise FewShotSegError("support mask is empty: paint the structure on at least one slice")
    counts = [int(slices_holding(support, a).size) for a in range(3)]
    spacing = np.array(image.GetSpacing(), float)[::-1]           # array order
    best = min(range(3), key=lambda a: (counts[a], -spacing[a], a))
    key = "auto" if axis is None else axis
    strips = _strips(support, best)
    if strips:
        raise FewShotSegError(
            f"the painting falls into {len(strips)} {axis_name(image, best)}, {_brief(strips)}, as strips side "
            "by side: it was painted in a view not aligned with the volume's slices; align the slice view with "
            "the volume (in 3D Slicer: 'Rotate to volume plane') and paint again")
    if isinstance(key, str) and key.strip().lower() == "auto":
        other = _second_plane(support, best, counts)
        if other is not None:
            first = slices_holding(support, best)
            raise FewShotSegError(
                f"the painting lies in two planes: {axis_name(image, best)} {_brief(first)} and "
                f"{axis_name(image, other[0])} {other[1]}; paint in one slice view, or give the axis")
        return best
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if int(key) not in (0, 1, 2):
            raise FewShotSegError(f"array axis must be 0, 1 or 2, not {key}")
        chosen = int(key)
    else:
        chosen = array_axis_for(image, str(key))
    if counts[chosen] > counts[best]:
        raise FewShotSegError(
            f"axis '{axis_name(image, chosen).split(' slices')[0]}' disagrees with the painting: it lies in {counts[best]} "
            f"{axis_name(image, best)} but in {counts[chosen]} {axis_name(image, chosen)}; "
            "leave the axis out (auto) or paint in that view")
    return chosen


def _brief(indices) -> str:
    indices = [int(i) for i in indices]
    return ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")


def _on_image_grid(mask: np.ndarray, support: np.ndarray, what: str) -> np.ndarray:
    """``mask`` as bool, checked to have the painting's (the image's) shape."""
    mask = np.asarray(mask, bool)
    if mask.shape != support.shape:
        raise FewShotSegError(f"{what} shape {mask.shape} differs from the image {support.shape}; "
                              "resample it onto the image first")
    return mask


def check_exclusion(support: np.ndarray, exclude: Optional[np.ndarray], axis_index: int) -> Optional[np.ndarray]:
    """The exclusion as bool, or None; overlapping the painting is an error naming the slice."""
    if exclude is None:
        return None
    exclude = _on_image_grid(exclude, support, "exclusion mask")
    overlap = exclude & support
    if overlap.any():
        where = slices_holding(overlap, axis_index)
        raise FewShotSegError(f"the exclusion overlaps the painting on slice {_brief(where)} "
                              f"({int(overlap.sum())} voxels are both painted and excluded)")
    return exclude if exclude.any() else None


def check_editable(support: np.ndarray, editable: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The voxels outside the editable area and not painted (the painting wins) as bool,
    or None when nothing is outside it; an area with no voxel is an error."""
    if editable is None:
        return None
    editable = _on_image_grid(editable, support, "editable area")
    if not editable.any():
        raise FewShotSegError("the editable area holds no voxel: nothing could be filled")
    outside = ~editable & ~support
    return outside if outside.any() else None


@dataclass(frozen=True)
class Span:
    """Slices the engine fills from one or two anchors.

    kind 'between': ``start`` < ``end`` are positive anchors; ``slices`` lie strictly
    between them, carried from both sides. kind 'outward': carried from the positive
    anchor ``start`` in the order of ``slices`` (away from it) up to, not including,
    ``end`` (an end anchor, or -1 / n for the volume's ends), with the stop rule."""

    kind: str
    start: int
    end: int
    slices: tuple

    @property
    def direction(self) -> str:
        return "down" if self.end < self.start else "up"


def plan_spans(positive: list[int], ends: list[int], n: int) -> list[Span]:
    """The spans between sorted anchors (positive: painted slices; ends: absent slices)."""
    anchors = sorted([(p, True) for p in positive] + [(e, False) for e in ends])
    spans = []
    for k, (index, is_positive) in enumerate(anchors):
        if not is_positive:
            continue
        below = anchors[k - 1] if k > 0 else (-1, False)
        above = anchors[k + 1] if k + 1 < len(anchors) else (n, False)
        if not below[1] and index - below[0] > 1:
            spans.append(Span("outward", index, below[0], tuple(range(index - 1, below[0], -1))))
        if above[1]:
            if above[0] - index > 1:
                spans.append(Span("between", index, above[0], tuple(range(index + 1, above[0]))))
        elif above[0] - index > 1:
            spans.append(Span("outward", index, above[0], tuple(range(index + 1, above[0]))))
    return spans
