"""A network trained for one step of a walk: the next slice's mask from the previous one.

Registration carries the previous slice's mask onto the next slice by the slice pair's
demons field; it follows shape and motion, and it carries every leak with it. This
network reads the two slices, the previous mask and the carried mask, in a crop around
the structure, and returns the next mask. Its output starts as the carried mask (the last
layer is zero at initialisation and adds to the carried mask's logit), so training only
learns corrections: where the mask leaked onto a neighbour, where it fell short of an
edge, and where the structure has ended (an empty next mask).

Intensities are made relative to the structure (the previous mask's mean, the crop's
spread), so the same weights read CT and MRI. ``step_inputs`` builds the crop for
training and for inference alike (one pre-processing path).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewShotSegError
from .registry import register_model

CROP = 80            # the crop's side on the network's grid (pixels)
CROP_MARGIN = 0.3    # the crop extends the masks' box by this fraction of its side ...
CROP_PAD = 8         # ... plus this many model-grid pixels
CARRIED_CLAMP = 0.05  # the carried mask's logit is taken at [0.05, 0.95]: +-2.9
IN_CHANNELS = 4      # next slice, previous slice, previous mask, carried mask
LIKELIHOOD_BINS = 24  # histogram bins over [-4, 4] structure-relative intensity (option 'likelihood')
PRESENT_PIXELS = 12   # a training step's target with at least this many crop pixels: the structure goes on


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(inplace=True))


@torch.no_grad()
def intensity_likelihood(inputs: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] in [-1, 1]: how much more often each pixel's intensity in the next
    slice occurs under the previous mask than outside it, in the previous slice (2p - 1,
    p from the two smoothed, normalised histograms; 0 where the mask is empty).

    Why: a convolution sees a neighbourhood; whether a region of the next slice has the
    structure's intensities is a question about the whole previous mask. Read from the
    step's own inputs, so examples made before this option train it unchanged."""
    b = inputs.shape[0]
    edges = torch.linspace(-4.0, 4.0, LIKELIHOOD_BINS + 1, device=inputs.device)[1:-1]
    prev_bins = torch.bucketize(inputs[:, 1].float().clamp(-4, 4).reshape(b, -1), edges)
    next_bins = torch.bucketize(inputs[:, 0].float().clamp(-4, 4).reshape(b, -1), edges)
    inside = (inputs[:, 2] > 0.5).reshape(b, -1).float()
    hist_in = torch.zeros(b, LIKELIHOOD_BINS, device=inputs.device).scatter_add_(1, prev_bins, inside)
    hist_out = torch.zeros(b, LIKELIHOOD_BINS, device=inputs.device).scatter_add_(1, prev_bins, 1.0 - inside)
    kernel = torch.tensor([[[0.25, 0.5, 0.25]]], device=inputs.device)
    hist = F.conv1d(torch.stack([hist_in, hist_out], 1).reshape(2 * b, 1, -1), kernel, padding=1).reshape(b, 2, -1)
    density = hist / hist.sum(-1, keepdim=True).clamp_min(1e-6)
    p = density[:, 0] / (density[:, 0] + density[:, 1]).clamp_min(1e-6)
    p = torch.where(density[:, 0] + density[:, 1] > 0, p, torch.full_like(p, 0.5))
    p = torch.where(inside.sum(1, keepdim=True) > 0, p, torch.full_like(p, 0.5))
    return (2 * torch.gather(p, 1, next_bins) - 1).reshape(b, 1, *inputs.shape[-2:]).to(inputs.dtype)


@register_model("slicestep")
class SliceStepNet(nn.Module):
    """A small U-Net (``widths`` per level) on [B, 4, CROP, CROP]; logits [B, 1, CROP, CROP].
    ``likelihood``: a fifth input channel, ``intensity_likelihood`` of the four.
    ``presence``: a second output, the logit that the structure goes on in the next slice
    (trained with its own loss: the mask's shrinkage alone tells a walk's end poorly)."""

    kind = "propagator"
    defaults = {"widths": [16, 32, 48, 64], "crop": CROP, "likelihood": False, "presence": False}

    def __init__(self, **config):
        super().__init__()
        config.pop("pretrained", None)   # checkpoints pass it to every model; nothing is pretrained here
        unknown = set(config) - set(self.defaults)
        if unknown:
            raise FewShotSegError(f"model 'slicestep': unknown option(s) {', '.join(sorted(unknown))}")
        self.config = {**self.defaults, **config}
        widths = [int(w) for w in self.config["widths"]]
        if len(widths) < 2 or any(w < 4 or w % 4 for w in widths):
            raise FewShotSegError("model 'slicestep': widths must be two or more multiples of 4")
        self.config["widths"] = widths
        self.config["likelihood"] = bool(self.config["likelihood"])
        self.config["presence"] = bool(self.config["presence"])
        self.down = nn.ModuleList()
        cin = IN_CHANNELS + int(self.config["likelihood"])
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        for w_skip, w_deep in zip(widths[-2::-1], widths[:0:-1]):
            self.up.append(_block(w_skip + w_deep, w_skip))
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.config["presence"]:
            self.presence_head = nn.Sequential(nn.Linear(widths[-1] + 2 * widths[0], 32), nn.ReLU(inplace=True),
                                               nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, with_presence: bool = False):
        """The correction [B, 1, c, c]; with ``with_presence`` also the presence logit [B]."""
        correction, deep, top = self.forward_features(x)
        return (correction, self.presence_logit(x, deep, top)) if with_presence else correction

    def presence_logit(self, x: torch.Tensor, deep: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """[B]: the logit that the structure goes on in the next slice, read from the deepest
        features pooled and the last features pooled inside and outside the carried mask."""
        carried = (x[:, 3:4] >= 0.5).to(top.dtype)
        inside = (top * carried).sum((2, 3)) / carried.sum((2, 3)).clamp_min(1)
        outside = (top * (1 - carried)).sum((2, 3)) / (1 - carried).sum((2, 3)).clamp_min(1)
        return self.presence_head(torch.cat([deep.mean((2, 3)), inside, outside], 1))[:, 0]

    def forward_features(self, x: torch.Tensor):
        """(the correction [B, 1, c, c], the deepest features [B, widths[-1], ., .], the
        last features [B, widths[0], c, c]): the presence read-out reads the two."""
        if self.config["likelihood"]:
            x = torch.cat([x, intensity_likelihood(x)], 1)
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        deep = x
        for block, skip in zip(self.up, skips[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], 1))
        return self.head(x), deep, x

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The next mask's logits: the carried mask's logit plus the learned correction."""
        return self.logits_and_features(inputs)[0]

    def logits_and_features(self, inputs: torch.Tensor):
        """(`logits`, and the two feature maps of `forward_features`) from one pass."""
        correction, deep, top = self.forward_features(inputs)
        carried = inputs[:, 3:4].clamp(CARRIED_CLAMP, 1 - CARRIED_CLAMP)
        return torch.logit(carried) + correction, deep, top


def crop_box(prev_mask: torch.Tensor, carried: torch.Tensor, size: int) -> tuple[int, int, int, int] | None:
    """The square box (y0, y1, x0, x1) around the previous and the carried masks, with
    margins, clipped to the slice; None when both are empty."""
    present = (prev_mask > 0.5) | (carried > 0.5)
    rows = torch.nonzero(present.any(1)).flatten()
    cols = torch.nonzero(present.any(0)).flatten()
    if rows.numel() == 0:
        return None
    return _square_box(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1, size)


def _square_box(y0: int, y1: int, x0: int, x1: int, size: int) -> tuple[int, int, int, int]:
    """The crop's square around an extent: its longer side plus margins, clipped to the slice."""
    side = int(max(y1 - y0, x1 - x0) * (1 + 2 * CROP_MARGIN)) + 2 * CROP_PAD
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
    return y0, min(size, y0 + side), x0, min(size, x0 + side)


# parts of a mask lying apart get crops of their own when these together cover under this
# fraction of the one crop around them all
SPLIT_AREA = 0.5


def crop_boxes(prev_mask: torch.Tensor, carried: torch.Tensor, size: int) -> list:
    """The crops of one step: `crop_box`, or one per group of the masks' parts lying apart
    (parts whose crops overlap are one group). Why: a structure seen as several parts in a
    slice (bowel loops, a colon's two sides, both kidneys painted as one segment) fills
    one crop far larger than each part, and an 80-pixel crop of it shrinks every part to
    a few pixels."""
    from scipy import ndimage

    one = crop_box(prev_mask, carried, size)
    if one is None:
        return []
    present = ((prev_mask > 0.5) | (carried > 0.5)).numpy()
    labels, count = ndimage.label(present, np.ones((3, 3), bool))
    if count < 2:
        return [one]
    extents = [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndimage.find_objects(labels)]
    merged = True
    while merged and len(extents) > 1:
        merged = False
        boxes = [_square_box(*e, size) for e in extents]
        for a in range(len(extents)):
            for b in range(a + 1, len(extents)):
                if _overlap(boxes[a], boxes[b]):
                    ea, eb = extents[a], extents.pop(b)
                    extents[a] = (min(ea[0], eb[0]), max(ea[1], eb[1]), min(ea[2], eb[2]), max(ea[3], eb[3]))
                    merged = True
                    break
            if merged:
                break
    if len(extents) < 2:
        return [one]
    boxes = [_square_box(*e, size) for e in extents]
    area = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes)
    return boxes if area < SPLIT_AREA * (one[1] - one[0]) * (one[3] - one[2]) else [one]


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _resize(t: torch.Tensor, shape, mode: str = "bilinear") -> torch.Tensor:
    down = shape[0] < t.shape[-2] or shape[1] < t.shape[-1]
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False, antialias=down and mode == "bilinear")


def crop_resized(slices: torch.Tensor, box: tuple, crop: int = CROP) -> torch.Tensor:
    """[C, H, W] model-grid slices cut out at ``box`` and resized to [C, crop, crop]."""
    y0, y1, x0, x1 = box
    return _resize(slices[None, :, y0:y1, x0:x1].float(), (crop, crop))[0]


def step_inputs(prev_image: torch.Tensor, next_image: torch.Tensor, prev_mask: torch.Tensor,
                carried: torch.Tensor, box: tuple, crop: int = CROP) -> torch.Tensor:
    """[4, crop, crop]: the two slices relative to the structure's intensity, the previous
    mask and the carried mask, cut out at ``box`` from model-grid [H, W] slices."""
    y0, y1, x0, x1 = box
    images = torch.stack([next_image, prev_image])[:, y0:y1, x0:x1]
    inside = prev_mask[y0:y1, x0:x1] > 0.5
    centre = images[1][inside].mean() if bool(inside.any()) else images[1].mean()
    images = (images - centre) / images.std().clamp_min(1e-3)
    masks = torch.stack([prev_mask.float(), carried.float()])[:, y0:y1, x0:x1]
    return _resize(torch.cat([images, masks])[None], (crop, crop))[0]


def paste(probability: torch.Tensor, box: tuple, size: int) -> torch.Tensor:
    """A [crop, crop] probability back onto the [size, size] slice at ``box`` (0 outside)."""
    y0, y1, x0, x1 = box
    full = probability.new_zeros((size, size))
    full[y0:y1, x0:x1] = _resize(probability[None, None], (y1 - y0, x1 - x0))[0, 0]
    return full


def presence_feature_names(net: SliceStepNet) -> tuple:
    """The names of `presence_features`' columns for ``net``'s widths."""
    deep, top = int(net.config["widths"][-1]), int(net.config["widths"][0])
    return (tuple(f"deep_{k}" for k in range(deep)) + tuple(f"inside_{k}" for k in range(top))
            + tuple(f"outside_{k}" for k in range(top)) + ("mean_probability_inside", "log_area_ratio"))


def presence_features(inputs: torch.Tensor, logits: torch.Tensor, deep: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[B, F]: what one step of the network holds about whether the structure goes on
    (its outputs alone tell it poorly: a mask that stopped shrinking looks alike on and
    past the end): the deepest features pooled, the last features pooled inside and
    outside the carried mask, the mean probability inside it and the log mask-area ratio."""
    carried = (inputs[:, 3:4] >= 0.5).float()
    inside_n, outside_n = carried.sum((2, 3)).clamp_min(1), (1 - carried).sum((2, 3)).clamp_min(1)
    mean_p = (torch.sigmoid(logits) * carried).sum((2, 3)) / inside_n
    area = (logits >= 0).float().sum((2, 3))
    previous = (inputs[:, 2:3] >= 0.5).float().sum((2, 3))
    return torch.cat([deep.mean((2, 3)), (top * carried).sum((2, 3)) / inside_n,
                      (top * (1 - carried)).sum((2, 3)) / outside_n, mean_p,
                      torch.log((area + 1) / (previous + 1))], 1).float()


def _crop_logits(net: SliceStepNet, prev_image, next_image, prev_mask, carried, offset: float = 0.0,
                 features: bool = False):
    """(the network's logits [crop, crop] for one step (plus ``offset``), the box they
    cover, {"features": its `presence_features` [F] (for a fitted read-out; None when the
    network has its own presence output), "present": that output's probability or None}
    or None), or None when both masks are empty."""
    box = crop_box(prev_mask, carried, prev_image.shape[-1])
    if box is None:
        return None
    inputs = step_inputs(prev_image, next_image, prev_mask, carried, box, int(net.config["crop"]))
    device = next(net.parameters()).device
    # channels-last: ~30 % faster small convolutions on a CPU (the walk's main cost)
    inputs = inputs[None].to(device).contiguous(memory_format=torch.channels_last)
    logits, deep, top = net.logits_and_features(inputs)
    logits = logits + offset
    found = None
    if features and net.config.get("presence"):
        found = {"features": None, "present": float(torch.sigmoid(net.presence_logit(inputs, deep, top))[0])}
    elif features:
        found = {"features": presence_features(inputs, logits, deep, top)[0].cpu(), "present": None}
    return logits[0, 0].float().cpu(), box, found


OFFSET_LIMIT = 2.0   # the zero-motion offset is kept within +-2 logits


@torch.inference_mode()
def zero_motion_offset(net: SliceStepNet, image: torch.Tensor, mask: torch.Tensor) -> float:
    """The logit offset that makes ``mask`` on ``image`` stepping onto itself (nothing
    moved) come back with its own area: the network, trained on steps where structures
    mostly shrink, trims every mask a little, which compounds over many thin slices."""
    area = int((mask > 0.5).sum())
    found = _crop_logits(net, image, image, mask, mask) if area else None
    if found is None:
        return 0.0
    logits, (y0, y1, x0, x1), _ = found
    pasted = _resize(logits[None, None], (y1 - y0, x1 - x0))[0, 0].flatten()
    if area >= pasted.numel():
        return 0.0
    kth = torch.topk(pasted, area).values[-1]
    return float(min(OFFSET_LIMIT, max(-OFFSET_LIMIT, -kth)))


@torch.inference_mode()
def next_mask_step(net: SliceStepNet, prev_image, next_image, prev_mask, carried, offset: float = 0.0,
                   features: bool = False, split: bool = False):
    """The walk's step: ([H, W] probability of the next slice's mask (model grid), what it
    tells of the structure's presence (`_crop_logits`) or None). ``offset``: added to the
    logits (`zero_motion_offset`). ``split``: parts lying apart get crops of their own
    (`crop_boxes`), one batch."""
    boxes = crop_boxes(prev_mask, carried, prev_image.shape[-1]) if split else []
    if len(boxes) > 1:
        return _split_step(net, prev_image, next_image, prev_mask, carried, boxes, offset, features)
    found = _crop_logits(net, prev_image, next_image, prev_mask, carried, offset, features)
    if found is None:
        return torch.zeros_like(prev_image), None
    logits, box, feats = found
    return paste(torch.sigmoid(logits), box, prev_image.shape[-1]), feats


def _split_step(net: SliceStepNet, prev_image, next_image, prev_mask, carried, boxes: list, offset: float,
                features: bool):
    """`next_mask_step` over crops that do not overlap; the presence read-out from the crop
    holding most of the masks."""
    crop = int(net.config["crop"])
    inputs = torch.stack([step_inputs(prev_image, next_image, prev_mask, carried, box, crop) for box in boxes])
    inputs = inputs.to(next(net.parameters()).device).contiguous(memory_format=torch.channels_last)
    logits, deep, top = net.logits_and_features(inputs)
    logits = (logits + offset).float().cpu()
    size = prev_image.shape[-1]
    full = prev_image.new_zeros((size, size))
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        full[y0:y1, x0:x1] = _resize(torch.sigmoid(logits[k:k + 1]), (y1 - y0, x1 - x0))[0, 0]
    found = None
    if features:
        k = int(torch.argmax(inputs[:, 2:4].sum((1, 2, 3))))
        row = (slice(k, k + 1),)
        if net.config.get("presence"):
            found = {"features": None,
                     "present": float(torch.sigmoid(net.presence_logit(inputs[row], deep[row], top[row]))[0])}
        else:
            found = {"features": presence_features(inputs[row], logits[row].to(inputs.device), deep[row],
                                                   top[row])[0].cpu(), "present": None}
    return full, found


def next_mask_probability(net: SliceStepNet, prev_image, next_image, prev_mask, carried,
                          offset: float = 0.0) -> torch.Tensor:
    """`next_mask_step`'s probability alone."""
    return next_mask_step(net, prev_image, next_image, prev_mask, carried, offset)[0]
