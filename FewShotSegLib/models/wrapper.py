"""Base of the inference wrappers (multi-scale, support zoom): a model around a trained
``member`` that keeps the model interface and shows the member's identity and options."""
from __future__ import annotations

import torch.nn as nn


class ModelWrapper(nn.Module):
    """``name``, ``config`` (the same dict: the propagation sets inference options on it) and
    ``supports_query_prototypes`` are the member's; subclasses define encode and segment."""

    def __init__(self, member: nn.Module):
        super().__init__()
        self.member = member

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def config(self) -> dict:
        return self.member.config

    @property
    def supports_query_prototypes(self) -> bool:
        return bool(getattr(self.member, "supports_query_prototypes", False))
