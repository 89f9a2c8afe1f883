"""One walk: the structure carried slice by slice away from one painted slice.

At each step the previous mask is carried over by the slice pair's demons field. With a
step network (learned mode, `models/slicestep.py`) the network reads the two slices, the
previous mask and the carried one and returns the next mask. With a few-shot model
(chained mode) the model segments the next slice with the painted slice and the previous
prediction as supports, and it is averaged with the carried mask (``registration_weight``).
With neither, the carried mask alone is the prediction (registration mode). An outward walk stops by itself where the
structure ends (`extent.py`); a walk between two painted slices runs to the other one.

What a walk reads is cached per session (`session.py`): the model-grid slices, their
encoded features and the slice pairs' fields depend on the images only, so a
re-propagation after a correction pays only for the masks.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .extent import intensity_agreement, intensity_band
from .models.slicestep import next_mask_step, zero_motion_offset
from .stopping import edge_pixels, step_features
from .registration import FIELD_BATCH, slice_fields, warp_mask


class SliceImages:
    """Each slice normalised and resized once: the network, the registration and the stop
    rule all read it (a 512x512 CT slice costs more to resample than to compare)."""

    def __init__(self, prepared, keep: int = 512):
        self.prepared, self.keep = prepared, keep
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __call__(self, indices: list[int]) -> torch.Tensor:
        """Tensor[len(indices), size, size] float32."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        if missing:
            for i, t in zip(missing, self.prepared.model_slices(missing)):
                self.cache[i] = t
        for i in indices:
            self.cache.move_to_end(i)
        out = torch.stack([self.cache[i] for i in indices])
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return out

    def one(self, index: int) -> np.ndarray:
        return self([index])[0].numpy()


class FeatureCache:
    """Encodes slices in batches on demand; keeps the most recent ``keep`` (about 1 MB each
    for the shipped model) so that a re-propagation does not encode them again."""

    def __init__(self, net, slices: SliceImages, device, batch_size: int, keep: int = 96):
        self.net, self.slices, self.device = net, slices, device
        self.batch_size, self.keep = batch_size, keep
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.seconds = 0.0

    def images(self, indices: list[int]) -> torch.Tensor:
        return self.slices(indices).to(self.device).unsqueeze(1)

    def get(self, index: int, upcoming: list[int]) -> torch.Tensor:
        if index not in self.cache:
            todo = [index] + [i for i in upcoming if i not in self.cache][: self.batch_size - 1]
            start = time.perf_counter()
            feats = self.net.encode(self.images(todo))
            self.seconds += time.perf_counter() - start
            for i, f in zip(todo, feats):
                self.cache[i] = f
        self.cache.move_to_end(index)
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return self.cache[index]


class FieldCache:
    """Demons fields of slice pairs (from, to), estimated ``FIELD_BATCH`` pairs of a walk
    at a time ahead of need; they depend on the images only, never on the masks."""

    def __init__(self, slices: SliceImages, shrink: int, iterations: int, coarse_shrink: int = 0):
        self.slices, self.shrink, self.iterations, self.coarse_shrink = slices, shrink, iterations, coarse_shrink
        self.fields: dict[tuple[int, int], torch.Tensor] = {}

    def carry(self, chain: list[int], step: int, mask) -> np.ndarray:
        """The mask of slice ``chain[step]`` carried onto ``chain[step + 1]``."""
        pair = (chain[step], chain[step + 1])
        if pair not in self.fields:
            todo = [(chain[k], chain[k + 1]) for k in range(step, min(step + FIELD_BATCH, len(chain) - 1))]
            todo = [p for p in todo if p not in self.fields]
            fixed = self.slices([b for _, b in todo])
            moving = self.slices([a for a, _ in todo])
            self.fields.update(zip(todo, slice_fields(fixed, moving, self.shrink, self.iterations,
                                                      self.coarse_shrink)))
        return warp_mask(mask, self.fields[pair])


@dataclass
class Walk:
    """What one walk produced, on the model grid."""

    probs: dict = field(default_factory=dict)       # slice -> foreground probability
    disagreement: dict = field(default_factory=dict)  # slice -> pixels where network and registration differ
    areas: dict = field(default_factory=dict)       # slice -> mask area (pixels)
    agreement: dict = field(default_factory=dict)   # slice -> fraction of the mask inside the intensity band
    features: dict = field(default_factory=dict)    # slice -> the stop model's numbers (stop 'learned' / 'none')
    presence: dict = field(default_factory=dict)    # slice -> the presence model's numbers (stop features + network's)
    present: dict = field(default_factory=dict)     # slice -> the step network's presence output (if it has one)
    stop: Optional[dict] = None                     # {"slice", "reason", "area_fraction"} where it ended early
    steps: int = 0
    painted_area: float = 0.0
    start: int = -1                                 # the painted slice it walked from


@dataclass
class WalkContext:
    """Everything a walk reads, shared by the walks of one propagation."""

    net: Optional[object]             # None: registration alone
    features: Optional[FeatureCache]
    slices: SliceImages
    fields: Optional[FieldCache]
    painted_masks: Callable[[int], torch.Tensor]   # slice -> painted mask on the model grid
    excluded: Callable[[int], Optional[torch.Tensor]]  # slice -> excluded pixels (bool) or None
    exclusion_key: Callable[[int], Optional[str]]      # slice -> digest of its exclusion, or None
    options: object
    radius: Optional[int]
    min_area: Callable[[float], float]
    check_cancel: Callable[[], None]
    on_step: Callable[[], None]
    stepper: Optional[torch.nn.Module] = None     # learned mode: the step network
    stop_model: Optional[object] = None           # stopping.StopModel: replaces the intensity and growth rules
    never_stop: bool = False                      # walks run on until the mask vanishes (fitting a stop model)
    presence_model: Optional[object] = None       # stopping.load_presence_model: also ends outward walks
    stride: int = 1                               # slices per step (`walk_stride`; 1 for a stop model)
    network_seconds: float = 0.0
    spacing_mm: float = 0.0                      # between the slices a walk steps across
    offsets: dict = field(default_factory=dict)   # painted slice -> the network's zero-motion offset

    def offset(self, start: int, outward: bool = False) -> float:
        """The step network's logit offset for walks from the painted slice ``start``
        (0 unless the slices are at most options.zero_motion_max_mm apart). An outward
        walk's shrinkage is how it ends, so it keeps it unless the presence read-out ends
        it (options.presence, or fitting that read-out: stop 'none')."""
        limit = self.options.zero_motion_max_mm
        if outward and not (self.options.presence or self.options.stop == "none"):
            return 0.0
        if self.stepper is None or limit <= 0 or self.spacing_mm * self.stride > limit:
            return 0.0
        if start not in self.offsets:
            self.offsets[start] = zero_motion_offset(self.stepper, self.slices([start])[0], self.painted_masks(start))
        return self.offsets[start]

    def foreground(self, sup_feats, sup_masks, query_feats) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.net.segment(sup_feats, sup_masks, query_feats)
        self.network_seconds += time.perf_counter() - start
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu()


# an outward walk from a painted slice smaller than the next painted slice inward (the
# structure narrows towards this end) has ended when its mask grows past this multiple of
# the smallest mask so far: it has slid onto a neighbour
TAPER_GROWTH = 1.3
TAPER_RATIO = 0.8
# a walk that ran into a slice marked absent is cut where its mean intensity agreement
# falls by at least this much
CUT_DROP = 0.1


def walk_stride(step_mm: float, spacing_mm: float) -> int:
    """Slices per step for steps of at least ``step_mm`` across slices ``spacing_mm`` apart
    (options.walk_step_mm): across thin slices (a coronal MRI of 1.5 mm pixels, a CT's
    0.7 mm) one step per slice is slow, and finer than the 3-9 mm steps the network trained
    on; the slices stepped over are filled from the two steps around them."""
    return max(1, int(float(step_mm) / max(float(spacing_mm), 1e-6) + 1e-6))


def _stepped(slices: list[int], stride: int) -> list[int]:
    """The slices a walk steps on: every ``stride``-th, and always the last."""
    visited = list(slices[stride - 1::stride])
    if slices and (not visited or visited[-1] != slices[-1]):
        visited.append(slices[-1])
    return visited


def _step(ctx: WalkContext, chain: list[int], k: int, prev_mask: torch.Tensor, fuse: float, offset: float = 0.0,
          features: bool = False):
    """The probability of ``chain[k + 1]`` from the painted slice ``chain[0]`` and the
    previous slice ``chain[k]`` with its mask; the pixels where the network and the
    registration disagree (None without both); the step network's presence features
    (``features``; else None)."""
    opts, i = ctx.options, chain[k + 1]
    carried = torch.from_numpy(ctx.fields.carry(chain, k, prev_mask.numpy())) if fuse else None
    disagreement, net_features = None, None
    if ctx.stepper is not None:
        start = time.perf_counter()
        prev_image, next_image = ctx.slices([chain[k], i])
        fg, net_features = next_mask_step(ctx.stepper, prev_image, next_image, prev_mask, carried, offset, features,
                                          split=opts.split_crops)
        ctx.network_seconds += time.perf_counter() - start
        disagreement = float(((fg >= opts.threshold) != (carried >= opts.threshold)).sum())
        if opts.step_registration_weight:
            fg = (1 - opts.step_registration_weight) * fg + opts.step_registration_weight * carried
    elif ctx.net is None:
        fg = carried
    else:
        device = ctx.features.device
        p_feat = ctx.features.get(chain[0], chain[1:])
        p_mask = ctx.painted_masks(chain[0]).to(device)
        q_feat = ctx.features.get(i, chain[k + 2:])
        if k == 0:
            sup_feats, sup_masks = p_feat[None], p_mask[None]
        else:
            sup_feats = torch.stack([p_feat, ctx.features.get(chain[k], chain[k + 1:])])
            sup_masks = torch.stack([p_mask, prev_mask.to(device)])
        network = ctx.foreground(sup_feats, sup_masks, q_feat[None])[0]
        fg = network if carried is None else (1 - fuse) * network + fuse * carried
        if carried is not None:
            disagreement = float(((network >= opts.threshold) != (carried >= opts.threshold)).sum())
        if ctx.radius is not None:
            fg = fg * _dilate(prev_mask > 0.5, ctx.radius)
    excluded = ctx.excluded(i)
    return (fg if excluded is None else fg.masked_fill(excluded, 0.0)), disagreement, net_features


def walk(ctx: WalkContext, start: int, slices: list[int], stop_rule: bool,
         inward: Optional[int] = None, towards_absent: bool = False, memory: Optional[list] = None) -> Walk:
    """Carry the painted mask of ``start`` through ``slices`` in order.

    ``inward``: the next painted slice on the other side of ``start``, if any. The area
    rules then read both painted slices: the minimum area from the larger one (an end
    slice painted small is a poor reference alone), and whether the structure narrows
    towards this end. The intensity band stays that of ``start``'s own painting: pooled
    with the other slice's it let walks run on past the structure.

    ``towards_absent``: the slice after ``slices`` is marked absent. A walk that reaches it
    without stopping has run past the structure unnoticed, so it ends just after its
    narrowest mask when the mask widens again from there (it slid onto a neighbour), else
    where its masks stop looking like the painted intensities.

    ``memory``: the steps of earlier walks from the same painted slice in the same
    direction (kept by the session); its matching prefix is reused, so a walk that now
    runs further (a stop rule lifted, an anchor moved away) only computes what is new."""
    opts = ctx.options
    fuse = opts.registration_weight if ctx.net is not None and ctx.stepper is None else 1.0
    p_mask = ctx.painted_masks(start)
    result = Walk(painted_area=float(p_mask.sum()), start=int(start))
    references = [start] + ([inward] if inward is not None else [])
    band = intensity_band(ctx.slices.one(start), p_mask.numpy() > 0.5)
    reference_area = max(float(ctx.painted_masks(i).sum()) for i in references)
    min_area = ctx.min_area(reference_area)
    narrowing = inward is not None and result.painted_area < TAPER_RATIO * float(ctx.painted_masks(inward).sum())
    smallest = result.painted_area
    stride = ctx.stride
    visited = _stepped(list(slices), stride)
    chain = [start] + visited
    steps = memory if memory is not None else []
    prev_mask = p_mask
    offset = ctx.offset(start, outward=stop_rule)
    read_presence = stop_rule and ctx.stepper is not None and (ctx.options.presence or ctx.never_stop)
    for k, i in enumerate(visited):
        ctx.check_cancel()
        excluded_key = ctx.exclusion_key(i)
        if k < len(steps) and steps[k][0] == i and steps[k][1] == excluded_key and (steps[k][4] is not None
                                                                                   or not read_presence):
            fg, disagreement, net_features = steps[k][2:]      # the same step of an earlier walk
        else:
            del steps[k:]
            fg, disagreement, net_features = _step(ctx, chain, k, prev_mask, fuse, offset, read_presence)
            steps.append((i, excluded_key, fg, disagreement, net_features))
            result.steps += 1
            ctx.on_step()
        if disagreement is not None:
            result.disagreement[i] = disagreement
        mask = fg >= opts.threshold
        area = float(mask.sum())
        if stop_rule:
            agreement = intensity_agreement(ctx.slices.one(i), mask.numpy(), band)
            result.agreement[i] = agreement
            last = result.areas[visited[k - 1]] if k else result.painted_area
            if ctx.stop_model is not None or ctx.never_stop or read_presence:
                result.features[i] = step_features(agreement, area, reference_area, last, smallest,
                                                   disagreement, narrowing, edge_pixels(mask.numpy()))
            if read_presence:
                own = net_features["features"] if net_features is not None else None
                result.presence[i] = np.concatenate([result.features[i], own.numpy()]) if own is not None else None
                if net_features is not None and net_features["present"] is not None:
                    result.present[i] = net_features["present"]
            if ctx.never_stop:
                ended, reason = area < 4.0, "area"
            elif ctx.stop_model is not None:
                ended = area < min_area or ctx.stop_model.stops(result.features[i])
                reason = "area" if area < min_area else "learned"
            else:
                grew = narrowing and area > TAPER_GROWTH * smallest
                ended = area < min_area or agreement < opts.min_intensity_agreement or grew
                reason = "area" if area < min_area else ("growth" if grew else "intensity")
            if ended or ctx.never_stop or not read_presence:
                pass
            elif i in result.present:
                ended, reason = result.present[i] < 0.5, "presence"     # the network's own presence output
            elif ctx.presence_model is not None and result.presence[i] is not None:
                ended, reason = ctx.presence_model.stops(result.presence[i]), "presence"
            if ended:
                result.stop = {"slice": int(i), "reason": reason,
                               "area_fraction": last / max(reference_area, 1.0)}
                result.disagreement.pop(i, None)
                break
            smallest = min(smallest, area)
        result.probs[i] = fg
        result.areas[i] = area
        prev_mask = mask.float()
    if stride > 1:
        _fill_stepped_over(ctx, result, start, p_mask, list(slices))
    if stop_rule and towards_absent and result.stop is None and result.agreement:
        _end_at_waist(result, list(slices), reference_area)
        if result.stop is None:
            _end_at_least_agreement(result, list(slices), reference_area)
    return result


def _end_at_waist(result: Walk, slices: list[int], reference_area: float) -> None:
    """Cut a walk that ran into an absent slice just after its smallest mask, when the
    mask grows again past ``TAPER_GROWTH`` times that: the structure ends before the
    absent slice, so a mask that narrows and widens again has slid onto a neighbour (a
    vena cava painted in a sagittal slice carried onto the liver). Checked before the
    agreement cut, which can end a walk over an uneven organ (a stomach) far too early."""
    walked = [i for i in slices if i in result.areas]
    areas = [result.areas[i] for i in walked]
    k = int(np.argmin(areas)) if areas else 0
    if k + 1 >= len(walked) or max(areas[k + 1:]) <= TAPER_GROWTH * max(areas[k], 1.0):
        return
    _cut(result, walked[k:], areas[k] / max(reference_area, 1.0))


def _fill_stepped_over(ctx: WalkContext, result: Walk, start: int, painted: torch.Tensor, slices: list[int]) -> None:
    """The slices a strided walk stepped over: each a distance-weighted mean of the two
    steps around it (the painted slice first; the slice where the walk ended counts as
    empty, so the mask fades out towards it)."""
    order = {i: n for n, i in enumerate(slices)}
    ends = [(-1, painted.float())] + [(order[i], result.probs[i]) for i in slices if i in result.probs]
    if result.stop is not None:
        ends.append((order[result.stop["slice"]], torch.zeros_like(painted, dtype=torch.float32)))
    threshold = ctx.options.threshold
    for (a, p_a), (b, p_b) in zip(ends, ends[1:]):
        for n in range(a + 1, b):
            t = (n - a) / (b - a)
            p = (1 - t) * p_a + t * p_b
            excluded = ctx.excluded(slices[n])
            p = p if excluded is None else p.masked_fill(excluded, 0.0)
            result.probs[slices[n]] = p
            result.areas[slices[n]] = float((p >= threshold).sum())


def _end_at_least_agreement(result: Walk, slices: list[int], reference_area: float) -> None:
    """Cut a walk that ran into an absent slice where its intensity agreement drops: the
    split of the walk (at the slices it stepped on) with the largest fall in mean
    agreement (at least ``CUT_DROP``); no such fall, no cut."""
    stepped = [i for i in slices if i in result.agreement]
    values = [result.agreement[i] for i in stepped]
    best, cut = CUT_DROP, None
    for k in range(1, len(values)):
        drop = float(np.mean(values[:k]) - np.mean(values[k:]))
        if drop > best:
            best, cut = drop, k
    if cut is None:
        return
    kept = stepped[cut - 1]
    _cut(result, slices[slices.index(kept):], result.areas[kept] / max(reference_area, 1.0))


def _cut(result: Walk, tail: list[int], area_fraction: float) -> None:
    """End the walk after ``tail[0]``: the slices after it are dropped."""
    result.stop = {"slice": int(tail[1]), "reason": "absent", "area_fraction": area_fraction}
    for i in tail[1:]:
        result.probs.pop(i, None)
        result.areas.pop(i, None)
        result.disagreement.pop(i, None)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a square of half-width ``radius``.

    A square is separable, and along each axis "any pixel within r" is a window sum > 0,
    read off a cumulative sum: the cost does not grow with the radius (a (2r+1)^2
    max-pool took 0.3 s per 256x256 slice on CPU at the usual 25 mm radius).
    """
    out = mask.float()
    for dim in (0, 1):
        n = out.shape[dim]
        csum = F.pad(out.cumsum(dim), (0, 0, 1, 0) if dim == 0 else (1, 0, 0, 0))
        upper = torch.clamp(torch.arange(n) + radius + 1, max=n)
        lower = torch.clamp(torch.arange(n) - radius, min=0)
        out = (csum.index_select(dim, upper) - csum.index_select(dim, lower) > 0).float()
    return out
