"""Name -> FewShotModel class; checkpoints store the name and rebuild through ``build_model``."""
from __future__ import annotations

from ..errors import FewShotSegError

_MODELS: dict = {}


def register_model(name: str):
    """Class decorator: ``@register_model("alpnet")`` sets ``cls.name`` and makes it buildable."""
    def decorate(cls):
        known = _MODELS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"model name '{name}' is already taken by {known.__qualname__}")
        cls.name = name
        _MODELS[name] = cls
        return cls
    return decorate


def available_models() -> list:
    return sorted(_MODELS)


def model_class(name: str):
    cls = _MODELS.get(name)
    if cls is None:
        raise FewShotSegError(f"unknown model '{name}'; available: {', '.join(available_models())}")
    return cls


def build_model(name: str, **config):
    """A fresh model; ``config`` is any subset of the class's options (the rest default)."""
    return model_class(name)(**config)
