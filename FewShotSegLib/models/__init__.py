"""Few-shot segmentation models behind one registry (see docs/ARCHITECTURE.md, models/).

``build_model(name, **config)`` -> :class:`FewShotModel`; ``available_models()`` lists names.
Importing this package registers alpnet, crtpnet and dfdt, and the walk's step network
(slicestep, kind 'propagator').
"""
from .registry import available_models, build_model, register_model
from .base import COMMON_DEFAULTS, FewShotModel
from .backbones import BACKBONES, build_backbone
from . import alpnet, crtpnet, dfdt, slicestep  # noqa: F401  (register the models)

__all__ = ["register_model", "build_model", "available_models", "FewShotModel",
           "COMMON_DEFAULTS", "BACKBONES", "build_backbone"]
