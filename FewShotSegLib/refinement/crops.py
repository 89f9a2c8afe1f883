"""Square crops around a structure, resized to the refiner's input size, and back.

Training and inference cut crops with the same code so the refiner sees at inference
exactly the kind of input it was trained on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_resize(plane: torch.Tensor, box, size: int, pad: str = "zeros") -> torch.Tensor:
    """plane [H,W] -> [size,size]; ``box`` = (top, left, side) may reach outside the plane
    (``pad='border'`` repeats the edge, for images; ``'zeros'`` for masks)."""
    top, left, side = (int(v) for v in box)
    h, w = plane.shape[-2:]
    pt, pl = max(0, -top), max(0, -left)
    pb, pr = max(0, top + side - h), max(0, left + side - w)
    x = plane[None, None].float()
    if pt or pl or pb or pr:
        x = F.pad(x, (pl, pr, pt, pb), mode="replicate" if pad == "border" else "constant")
    region = x[..., top + pt: top + pt + side, left + pl: left + pl + side]
    if side == size:
        return region[0, 0]
    return F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=side > size)[0, 0]


def paste(crop: torch.Tensor, box, shape) -> torch.Tensor:
    """Inverse of `crop_resize`: a [H,W] plane, zero outside the box."""
    top, left, side = (int(v) for v in box)
    h, w = shape
    region = crop[None, None].float()
    if crop.shape[-1] != side:
        region = F.interpolate(region, size=(side, side), mode="bilinear", align_corners=False)
    out = torch.zeros((h, w), dtype=torch.float32, device=crop.device)
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(h, top + side), min(w, left + side)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = region[0, 0, r0 - top: r1 - top, c0 - left: c1 - left]
    return out
