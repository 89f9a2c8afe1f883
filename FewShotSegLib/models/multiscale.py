"""Multi-scale inference: a trained model run on the slices at several grid sizes, its
foreground probabilities averaged on the model grid.

A fully convolutional network sees an enlarged slice with finer features per organ, and
the scales err differently (protocol row ``+ms``: EP1 +1.2 on every crtpnet row, docs/PROTOCOL.md).
`MultiScaleModel` keeps the model interface (``encode`` once per slice, ``segment``
support vs. queries), so the propagation's feature cache, batching and support stacking
work unchanged: the features of one slice at every scale travel packed as one tensor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FewShotSegError
from .wrapper import ModelWrapper

# the scales averaged, as multiples of the grid; chosen on the shipped checkpoint, not on
# the protocol's fold models (docs/PROTOCOL.md, row +ms)
MULTI_SCALES = (1.0, 1.5)


def resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """The last two dims bilinearly resampled to ``side`` x ``side`` (any leading dims)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    return F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False).reshape(
        *x.shape[:-2], side, side)


def scaled_side(size: int, scale: float) -> int:
    return max(16, round(size * scale))


class MultiScaleModel(ModelWrapper):
    """``member`` at each of ``scales`` x its grid ``size``.

    ``encode`` returns ``[N,C,sum(h*w)]``: each scale's feature map flattened and
    concatenated (one tensor per slice, whatever the scales); ``segment`` unpacks them,
    scores each scale on its own grid and returns the log of the averaged probabilities
    as logits, so a softmax gives the average back."""

    def __init__(self, member: nn.Module, size: int, scales=MULTI_SCALES):
        super().__init__(member)
        if not scales or min(scales) <= 0:
            raise FewShotSegError(f"multi-scale: scales must be positive, not {tuple(scales)}")
        self.size = int(size)
        self.scales = tuple(float(s) for s in scales)
        self.shapes: list[tuple[int, int]] = []   # feature map (h, w) per scale, set by encode

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images[:, None]
        packed, shapes = [], []
        for scale in self.scales:
            feats = self.member.encode(resized(images, scaled_side(self.size, scale)))
            shapes.append(tuple(feats.shape[-2:]))
            packed.append(feats.flatten(2))
        self.shapes = shapes
        return torch.cat(packed, dim=2)

    def _unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        if not self.shapes:
            raise FewShotSegError("multi-scale: segment() before encode()")
        if sum(h * w for h, w in self.shapes) != packed.shape[-1]:
            raise FewShotSegError("multi-scale: these features were not packed by this model's encode()")
        out, start = [], 0
        for h, w in self.shapes:
            out.append(packed[..., start:start + h * w].unflatten(-1, (h, w)))
            start += h * w
        return out

    def segment(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                query_feats: torch.Tensor) -> torch.Tensor:
        """``[S,C,n]``, ``[S,H,W]``, ``[Q,C,n]`` -> logits ``[Q,2,H,W]`` (log of the mean probability)."""
        side = support_masks.shape[-1]
        total = 0.0
        for scale, sup, qry in zip(self.scales, self._unpack(support_feats), self._unpack(query_feats)):
            masks = resized(support_masks, scaled_side(self.size, scale))
            probs = torch.softmax(self.member.segment(sup, masks, qry).float(), dim=1)
            total = total + resized(probs, side)
        return torch.log((total / len(self.scales)).clamp_min(1e-12))
