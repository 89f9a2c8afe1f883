"""The interface every few-shot model implements (docs/ARCHITECTURE.md, models/).

``encode`` runs once per slice and its output can be cached (propagation encodes the
support once and each query slice once); ``segment`` is the cheap part that compares
them. ``config`` is a JSON-able dict: ``build_model(model.name, **model.config)`` rebuilds
the same architecture (pass ``pretrained=False`` when the weights come from a checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewShotSegError
from .backbones import build_backbone
from .prototypes import alp_prototypes, mask_to_features, refined_on_support, score_map, with_query_prototypes

COMMON_DEFAULTS = {
    "backbone": "effnet-lite0",
    "pretrained": True,          # start the backbone from ImageNet (or backbone_weights)
    "backbone_weights": None,    # file with a state dict for the backbone (read only if pretrained)
    "output_stride": 8,          # 8: 32x32 features for 256x256 slices; 4: 64x64
    "feature_dim": 256,          # width of the 1x1 projection after the backbone (0: none)
    "local_window_train": 4,     # ALP window (cells of a stride-8 map) in train mode
    "local_window_test": 2,      # ... and in eval mode, as SSL-ALPNet
    "fg_threshold": 0.95,        # local prototype kept when its window is this much class
    "scale": 20.0,               # cosine similarity multiplier
    "soft_local": False,         # coverage-weighted local prototypes instead of the threshold
    "soft_local_background": True,  # ... for the background too (False: foreground only)
    "query_prototypes": False,   # inference: a second pass adds each query's own prototypes
    "support_refinement_steps": 0,  # inference: Adam steps fitting the prototypes to their support
    "freeze_bn": None,           # backbone BN in eval mode while training; None: iff pretrained
}


def _check(name: str, key: str, value, ok: bool, want: str):
    if not ok:
        raise FewShotSegError(f"model '{name}': option {key}={value!r} is invalid ({want})")


class FewShotModel(nn.Module):
    """Backbone + 1x1 projection + a prototype head. Subclasses define ``segment``.

    Subclasses list their own options in ``extra_defaults``; an option no class knows is
    an error, so a typo in a training config or a checkpoint from a newer FewShotSeg fails
    loudly instead of being ignored.
    """

    name = "base"
    supports_query_prototypes = True   # its segment() scores through self.score()
    extra_defaults: dict = {}
    zero_ok = frozenset({"feature_dim", "support_refinement_steps"})  # integer options that may be 0

    def __init__(self, **config):
        super().__init__()
        self.config = self._resolve(config)
        c = self.config
        self.backbone = build_backbone(c["backbone"], c["pretrained"], c["backbone_weights"],
                                       c["output_stride"])
        dim = c["feature_dim"] or self.backbone.out_channels
        # No bias, no activation: as SSL-ALPNet's reduction of layer4 to 256 channels.
        self.project = (nn.Conv2d(self.backbone.out_channels, dim, 1, bias=False)
                        if c["feature_dim"] else nn.Identity())
        self.feature_dim = dim

    # ------------------------------------------------------------------ configuration
    @classmethod
    def defaults(cls) -> dict:
        return {**COMMON_DEFAULTS, **cls.extra_defaults}

    def _resolve(self, config: dict) -> dict:
        defaults = self.defaults()
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise FewShotSegError(f"model '{self.name}' has no option {', '.join(unknown)}; "
                                  f"known: {', '.join(sorted(defaults))}")
        c = {**defaults, **config}
        n = self.name
        if isinstance(c["backbone_weights"], Path):
            c["backbone_weights"] = str(c["backbone_weights"])
        _check(n, "backbone", c["backbone"], isinstance(c["backbone"], str), "a backbone name")
        _check(n, "backbone_weights", c["backbone_weights"],
               c["backbone_weights"] is None or isinstance(c["backbone_weights"], str), "a file path")
        for key in ("pretrained", "soft_local", "soft_local_background", "query_prototypes"):
            c[key] = bool(c[key])
        if c["freeze_bn"] is None:  # small batches would wreck pretrained BN statistics
            c["freeze_bn"] = bool(c["pretrained"] and (c["backbone"] == "effnet-lite0"
                                                       or c["backbone_weights"]))
        c["freeze_bn"] = bool(c["freeze_bn"])
        ints = ["output_stride", "feature_dim", "local_window_train", "local_window_test",
                "support_refinement_steps"]
        ints += [k for k, v in self.extra_defaults.items() if type(v) is int]
        for key in ints:
            ok = isinstance(c[key], (int, float)) and not isinstance(c[key], bool) \
                and int(c[key]) == c[key] and c[key] >= (0 if key in self.zero_ok else 1)
            _check(n, key, c[key], ok, "a positive integer")
            c[key] = int(c[key])
        for key in ("fg_threshold", "scale"):
            ok = isinstance(c[key], (int, float)) and 0 < c[key] and (key == "scale" or c[key] <= 1)
            _check(n, key, c[key], ok, "a number in (0, 1]" if key == "fg_threshold" else "> 0")
            c[key] = float(c[key])
        return self.check_extra(c)

    def check_extra(self, c: dict) -> dict:
        """Further checks of the subclass's own options (integer ones are already checked)."""
        return c

    def check_divisible(self, c: dict, key: str, heads_key: str) -> None:
        _check(self.name, key, c[key], c[key] % c[heads_key] == 0, f"a multiple of {heads_key}")

    def check_bool(self, c: dict, key: str) -> None:
        _check(self.name, key, c[key], isinstance(c[key], bool), "true or false")

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.config["freeze_bn"]:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ the interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[N,1,H,W]`` z-scored slices -> ``[N,C,h,w]`` features."""
        if images.dim() == 3:
            images = images[:, None]
        return self.refine_features(self.project(self.backbone(images.float())))

    def refine_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-slice feature refinement after the projection (hook; identity here)."""
        return feats

    def segment(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                query_feats: torch.Tensor) -> torch.Tensor:
        """``[S,C,h,w]``, ``[S,H,W]`` in [0,1], ``[Q,C,h,w]`` -> logits ``[Q,2,H,W]``."""
        raise NotImplementedError

    def forward(self, support_images, support_masks, query_images):
        """One encoder pass over support and query slices together, then ``segment``."""
        feats = self.encode(torch.cat([support_images, query_images], dim=0))
        s = support_images.shape[0]
        return self.segment(feats[:s], support_masks, feats[s:])

    # ------------------------------------------------------------------ helpers
    @property
    def local_window(self) -> int:
        """ALP window in feature cells. The options count cells of a stride-8 map (ALPNet's
        32x32 for 256x256); at stride 4 the window doubles so that a local prototype covers
        the same image area and their number (and the cost of comparing) stays that of
        stride 8. Our choice: finer stride then sharpens the query map, not the prototypes."""
        cells = self.config["local_window_train" if self.training else "local_window_test"]
        return cells * 8 // self.config["output_stride"]

    def support_mask(self, support_masks: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``[S,H,W]`` -> ``[S,1,h,w]`` coverage at feature resolution."""
        if support_masks.dim() == 4:
            support_masks = support_masks[:, 0]
        return mask_to_features(support_masks.to(feats.dtype), feats.shape[-2:])

    def prototypes(self, support_feats, mask_small):
        """ALP prototypes; with ``support_refinement_steps`` (not while training) fitted to
        their own support slice first."""
        c = self.config
        fg, bg = alp_prototypes(support_feats, mask_small, self.local_window, c["fg_threshold"],
                                c["soft_local"], c["soft_local_background"])
        if c["support_refinement_steps"] and not self.training:
            fg, bg = refined_on_support(support_feats, mask_small, fg, bg, c["scale"],
                                        c["support_refinement_steps"])
        return fg, bg

    def score(self, query_feats, fg, bg):
        """Logits at feature size; with ``query_prototypes`` (not while training) a second
        pass also compares with the query's own confident prototypes."""
        logits = score_map(query_feats, fg, bg, self.config["scale"])
        if self.config["query_prototypes"] and not self.training:
            fg, bg = with_query_prototypes(query_feats, logits, fg, bg)
            logits = score_map(query_feats, fg, bg, self.config["scale"])
        return logits

    @staticmethod
    def upsample(logits: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, size=support_masks.shape[-2:], mode="bilinear",
                             align_corners=False)
