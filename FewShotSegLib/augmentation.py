"""SSL-ALPNet's episode augmentation (affine + elastic + gamma), shared by self-supervised
training (Training/episodes.py) and test-time tuning on the painted slices
(`support_tuning`), so that both see the same kind of image pairs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """SSL-ALPNet's augmentation ranges, drawn independently for support and query.

    ``elastic_alpha`` is the PEAK displacement in pixels of a noise field smoothed with
    ``elastic_sigma``. Our choice: SSL-ALPNet's Simard-style code multiplies the smoothed
    noise by alpha without normalising it, so the same numbers move pixels by ~0.3 px
    there (hardly a deformation).
    """

    rotate_deg: float = 5.0
    shift_px: float = 5.0
    shear_deg: float = 5.0
    scale: tuple = (0.9, 1.2)
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0
    gamma: tuple = (0.5, 1.5)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def augment(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """Affine + elastic + gamma; ``image [S,S]`` float, ``mask [S,S]`` float -> same shapes.

    One sampling grid moves image (bilinear) and mask (nearest) together; gamma acts on
    the intensities mapped to [0,1] and back. Deterministic given ``gen``. Should the
    mask leave the field of view, the pair is returned un-augmented (never an empty
    "organ").
    """
    size = image.shape[-1]

    def uniform(lo, hi):
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    angle = math.radians(uniform(-cfg.rotate_deg, cfg.rotate_deg))
    shear = math.radians(uniform(-cfg.shear_deg, cfg.shear_deg))
    scale = uniform(*cfg.scale)
    tx, ty = (uniform(-cfg.shift_px, cfg.shift_px) * 2 / size for _ in range(2))
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shr = torch.tensor([[1.0, math.tan(shear)], [0.0, 1.0]])
    lin = (rot @ shr) / scale  # grid maps output -> input, so the inverse scale
    theta = torch.cat([lin, torch.tensor([[tx], [ty]])], dim=1)[None]
    grid = F.affine_grid(theta, (1, 1, size, size), align_corners=False)
    if cfg.elastic_alpha > 0:
        k = _gaussian_kernel(cfg.elastic_sigma)
        noise = torch.rand((1, 2, size, size), generator=gen) * 2 - 1
        pad = k.numel() // 2
        noise = F.conv2d(F.pad(noise, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(2, 1, 1, 1), groups=2)
        noise = F.conv2d(F.pad(noise, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1).repeat(2, 1, 1, 1), groups=2)
        noise = noise / noise.abs().amax().clamp_min(1e-6)
        grid = grid + (cfg.elastic_alpha * 2 / size) * noise.permute(0, 2, 3, 1)
    fill = float(image.min())
    img = F.grid_sample((image - fill)[None, None], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0, 0] + fill
    msk = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0]
    gamma = uniform(*cfg.gamma)
    if bool(mask.any()) and not bool(msk.any()):
        img, msk = image.clone(), mask.float().clone()
    lo, hi = img.min(), img.max()
    span = (hi - lo).clamp_min(1e-6)
    img = ((img - lo) / span).clamp(0, 1).pow(gamma) * span + lo
    return img, msk
