"""Mask refiners: models that take a coarse mask (e.g. a propagation) and the image and
return a better mask, plus, for the diffusion refiner, a per-voxel uncertainty.

Registry kept separate from the few-shot one (`FewShotSegLib.models`) because a refiner
has a different interface; checkpoints say which kind they hold (`kind='refiner'`).
"""
from __future__ import annotations

import torch.nn as nn

from .hlfnet import HLFNet
from .medsegdiff import MedSegDiffV2

_REGISTRY: dict[str, type] = {"hlfnet": HLFNet, "medsegdiff_v2": MedSegDiffV2}


def available_refiners() -> list[str]:
    return sorted(_REGISTRY)


def build_refiner(name: str, **config) -> nn.Module:
    """Build a refiner from its name and ``model.config`` (a ``pretrained`` key is ignored:
    refiners have no pre-trained backbone, their checkpoint holds every weight)."""
    if name not in _REGISTRY:
        from ..errors import FewShotSegError
        raise FewShotSegError(f"unknown refiner '{name}' (known: {', '.join(available_refiners())})")
    config.pop("pretrained", None)
    return _REGISTRY[name](**config)


def __getattr__(attr):  # the sampling API imports preprocessing/SimpleITK: load it lazily
    if attr in ("refine", "RefineOptions", "RefineResult", "RefineCancelled"):
        from . import sampling
        return getattr(sampling, attr)
    raise AttributeError(attr)


__all__ = ["available_refiners", "build_refiner", "HLFNet", "MedSegDiffV2",
           "refine", "RefineOptions", "RefineResult", "RefineCancelled"]
