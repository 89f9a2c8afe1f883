"""SSL-ALPNet's episode augmentation (affine + elastic + gamma), shared by self-supervised
training (Training/episodes.py) and test-time tuning on the painted slices
(`support_tuning`), so that both see the same kind of image pairs. An optional random
intensity curve (off by default) teaches that an organ need not keep its brightness from
one scan to the next."""
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
    intensity_remap: float = 0.0   # probability of a random non-monotonic intensity curve (ours)

    def __post_init__(self):
        value = self.intensity_remap
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"intensity_remap must be a probability in [0, 1] (got {value!r})")


REMAP_KNOTS = 6   # knots of the random curve over the image's [0, 1] range


def remap_intensities(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``image`` through a random piecewise-linear curve (``REMAP_KNOTS`` knots, each level
    drawn in [0, 1], so not monotonic), mixed with the identity by a random weight.

    Why: in one scan the spleen is twice as bright as the liver, in another as dark; a
    prototype matched on brightness alone misses it (CHAOS-T2 case 15). Independent curves on
    support and query make an episode whose organ changed brightness but kept its shape, place
    and texture. The result stays within the image's [min, max]."""
    lo, hi = image.min(), image.max()
    span = (hi - lo).clamp_min(1e-6)
    x = ((image - lo) / span).clamp(0, 1) * (REMAP_KNOTS - 1)
    levels = torch.rand(REMAP_KNOTS, generator=gen)
    left = x.floor().long().clamp(max=REMAP_KNOTS - 2)
    curve = levels[left] + (x - left) * (levels[left + 1] - levels[left])
    keep = float(torch.rand((), generator=gen))
    return (keep * x / (REMAP_KNOTS - 1) + (1 - keep) * curve) * span + lo


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def augment(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator):
    """Affine + elastic + gamma (+ the random intensity curve, with probability
    ``cfg.intensity_remap``); ``image [S,S]`` float, ``mask [S,S]`` float -> same shapes.

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
    if cfg.intensity_remap > 0 and float(torch.rand((), generator=gen)) < cfg.intensity_remap:
        img = remap_intensities(img, gen)
    return img, msk
