"""Support zoom: more supports from the one labelled slice, the slice and its mask zoomed
about the organ's centre.

Organs differ in size between subjects by tens of percent, and a prototype model matches
local parts of the support organ to the query's; zoomed copies of the support give it
parts at the sizes the query may show. Enlarged copies help, shrunk ones were measured to
hurt (docs/PROTOCOL.md), so the default zooms only enlarge. Still one labelled slice (1-shot): the extra
supports are made from it, as SSL-ALPNet's training episodes are made from one slice.

`SupportZoomModel` keeps the model interface. Its ``encode`` packs each slice's features
with the slice itself (``[N, C*h*w + H*W]``) because ``segment`` needs the support's
pixels to zoom; the queries' pixels travel along unused.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FewShotSegError
from .wrapper import ModelWrapper

# zoom factors of the extra supports (>1 enlarges the organ); chosen on the shipped
# checkpoint's protocol folds 0-2, not on the fold models (docs/PROTOCOL.md, row +sz)
SUPPORT_ZOOMS = (1.12, 1.25)


def zoom_about(x: torch.Tensor, factor: float, centre: tuple[float, float], padding: str) -> torch.Tensor:
    """``[N,H,W]`` zoomed by ``factor`` about ``centre`` (y, x in [-1, 1]): output pixel p
    shows input pixel c + (p - c) / factor; outside the slice ``padding`` ('border' or 'zeros')."""
    n, h, w = x.shape
    cy, cx = centre
    s = 1.0 / factor
    theta = torch.tensor([[s, 0.0, cx * (1 - s)], [0.0, s, cy * (1 - s)]], dtype=torch.float32, device=x.device)
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    return F.grid_sample(x[:, None].float(), grid, mode="bilinear", padding_mode=padding,
                         align_corners=False)[:, 0]


def mask_centre(mask: torch.Tensor) -> tuple[float, float]:
    """Centroid of a ``[H,W]`` mask in normalised (y, x); the slice centre when it is empty."""
    h, w = mask.shape
    weight = mask.float().clamp(0, 1)
    total = float(weight.sum())
    if total <= 0:
        return 0.0, 0.0
    ys = (torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5) / w * 2 - 1
    return float((weight.sum(1) * ys).sum()) / total, float((weight.sum(0) * xs).sum()) / total


class SupportZoomModel(ModelWrapper):
    """``member`` with each support slice joined by its copies zoomed by ``zooms``."""

    def __init__(self, member: nn.Module, zooms=SUPPORT_ZOOMS):
        super().__init__(member)
        if not zooms or min(zooms) <= 0:
            raise FewShotSegError(f"support zoom: factors must be positive, not {tuple(zooms)}")
        self.zooms = tuple(float(z) for z in zooms)
        self.channels = 0   # of the member's features, set by encode (their h, w follow the grid)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images[:, None]
        feats = self.member.encode(images)
        if feats.shape[-1] != feats.shape[-2] or images.shape[-1] != images.shape[-2]:
            raise FewShotSegError("support zoom: needs square slices and feature maps (the model grid)")
        self.channels = feats.shape[1]
        return torch.cat([feats.flatten(1), images.flatten(1).to(feats.dtype)], dim=1)

    def _unpack(self, packed: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[N,C,h,h]`` and slices ``[N,side,side]``; ``h`` follows from the length,
        so slices encoded at another grid size (multi-scale) unpack as well."""
        cells = packed.shape[-1] - side * side
        h = math.isqrt(max(cells, 0) // max(self.channels, 1))
        if not self.channels or h < 1 or self.channels * h * h != cells:
            raise FewShotSegError("support zoom: these features were not packed by this model's encode()")
        return (packed[:, :cells].reshape(-1, self.channels, h, h),
                packed[:, cells:].reshape(-1, side, side))

    def segment(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                query_feats: torch.Tensor) -> torch.Tensor:
        """Packed ``[S,L]``, ``[S,H,W]``, packed ``[Q,L]`` -> the member's logits ``[Q,2,H,W]``."""
        side = support_masks.shape[-1]
        feats, images = self._unpack(support_feats, side)
        q_feats, _ = self._unpack(query_feats, side)
        masks = support_masks.float()
        extra_images, extra_masks = [], []
        for image, mask in zip(images, masks):
            centre = mask_centre(mask)
            for factor in self.zooms:
                extra_images.append(zoom_about(image[None], factor, centre, "border")[0])
                extra_masks.append(zoom_about(mask[None], factor, centre, "zeros")[0])
        extra = self.member.encode(torch.stack(extra_images)[:, None])
        return self.member.segment(torch.cat([feats, extra.to(feats.dtype)]),
                                   torch.cat([masks, torch.stack(extra_masks).to(masks.dtype)]), q_feats)
