"""What scores a protocol episode: one support slice and its mask against query slices,
as foreground probabilities on the model grid. `protocol.evaluate` takes any of these:
a trained few-shot model, the non-learned registration comparator, an ensemble, or a
test-time augmentation of another predictor (mirrored, multi-scale). Each has
``preprocess``, ``name``, ``prepare(images) -> features`` (once per slice) and
``predict(support, mask, queries)``."""
from __future__ import annotations

import numpy as np
import torch

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models.multiscale import MULTI_SCALES, resized, scaled_side
from FewShotSegLib.preprocessing import PreprocessConfig


class ModelPredictor:
    """A FewShotModel: each slice encoded once, then support vs. queries by ``segment``."""

    def __init__(self, model: torch.nn.Module, preprocess: PreprocessConfig, device: str = "cpu",
                 batch_size: int = 8, name: str = ""):
        self.model, self.preprocess, self.batch_size = model, preprocess, batch_size
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.name = name or getattr(model, "name", "model")

    @torch.inference_mode()
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        feats = [self.model.encode(images[i:i + self.batch_size, None].to(self.device))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat(feats)

    @torch.inference_mode()
    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        """Foreground probability ``[Q,S,S]`` of each query against one support slice."""
        mask = support_mask[None].to(self.device)
        out = [torch.softmax(self.model.segment(support[None], mask, queries[i:i + self.batch_size]).float(),
                             1)[:, 1].cpu() for i in range(0, len(queries), self.batch_size)]
        return torch.cat(out)


class RegistrationPredictor:
    """The non-learned comparator: cross-subject 2D demons registration of the support
    slice onto each query slice (`registration.slice_fields`) carries the support mask."""

    name = "registration"

    def __init__(self, preprocess: PreprocessConfig):
        self.preprocess = preprocess

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        return images.numpy()

    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        from FewShotSegLib.registration import FIELD_BATCH, slice_fields, warp_mask
        moving = torch.from_numpy(np.ascontiguousarray(support, dtype=np.float32))
        out = []
        for start in range(0, len(queries), FIELD_BATCH):
            fixed = torch.from_numpy(np.ascontiguousarray(np.stack(queries[start:start + FIELD_BATCH]),
                                                          dtype=np.float32))
            for field in slice_fields(fixed, moving.expand_as(fixed)):
                out.append(torch.from_numpy(warp_mask(support_mask.numpy(), field)))
        return torch.stack(out)


class EnsemblePredictor:
    """Several predictors on the same grid, their foreground probabilities averaged; a
    slice's features are one entry per member (members may differ in architecture)."""

    def __init__(self, members: list, name: str = "ensemble"):
        if not members or any(m.preprocess != members[0].preprocess for m in members):
            raise FewShotSegError("ensemble members must share one pre-processing (grid size, intensities)")
        self.members, self.name, self.preprocess = members, name, members[0].preprocess

    def prepare(self, images: torch.Tensor) -> "_Stacked":
        return _Stacked([m.prepare(images) for m in self.members])

    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        return sum(m.predict(support.parts[k], support_mask, queries.parts[k])
                   for k, m in enumerate(self.members)) / len(self.members)


class MirrorAveragePredictor:
    """Test-time augmentation: a predictor's probabilities averaged with those it gives for
    the left-right mirrored support, support mask and queries (mirrored back). The
    networks are not mirror-invariant, so the two views err differently."""

    def __init__(self, member):
        self.member, self.name, self.preprocess = member, f"{member.name} mirrored", member.preprocess

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.member.prepare(images), self.member.prepare(images.flip(-1))], 1)

    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        mirrored = self.member.predict(support[1], support_mask.flip(-1), queries[:, 1]).flip(-1)
        return (self.member.predict(support[0], support_mask, queries[:, 0]) + mirrored) / 2


class _Stacked:
    """Prepared features of the same slices in several forms (one per scale, one per
    ensemble member), indexed like one tensor."""

    def __init__(self, parts: list):
        self.parts = parts

    def __getitem__(self, index):
        return _Stacked([f[index] for f in self.parts])

    def __len__(self) -> int:
        return len(self.parts[0])


class MultiScalePredictor:
    """Test-time augmentation: a predictor's probabilities averaged over the episode
    resampled to several grid sizes (support, support mask and queries alike; bilinear),
    each resampled back. A fully convolutional network sees an enlarged slice with finer
    features per organ, and the scales err differently."""

    def __init__(self, member, scales=MULTI_SCALES):
        if not scales or min(scales) <= 0:
            raise FewShotSegError(f"multi-scale: scales must be positive, not {scales}")
        self.member, self.scales = member, tuple(float(s) for s in scales)
        self.name, self.preprocess = f"{member.name} multi-scale", member.preprocess

    def _side(self, scale: float) -> int:
        return scaled_side(self.preprocess.size, scale)

    def prepare(self, images: torch.Tensor) -> _Stacked:
        return _Stacked([self.member.prepare(resized(images, self._side(s))) for s in self.scales])

    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        side = support_mask.shape[-1]
        total = 0
        for k, scale in enumerate(self.scales):
            mask = resized(support_mask, self._side(scale))
            probs = self.member.predict(support.parts[k], mask, queries.parts[k])
            total = total + resized(probs, side)
        return total / len(self.scales)


class _WithBoxes:
    """Prepared features of slices with their body boxes, indexed like one tensor."""

    def __init__(self, feats, boxes: torch.Tensor):
        self.feats, self.boxes = feats, boxes

    def __getitem__(self, index):
        return _WithBoxes(self.feats[index], self.boxes[index])

    def __len__(self) -> int:
        return len(self.boxes)


class LocationPriorPredictor:
    """A predictor's probabilities times a location prior (`location_prior`): the support
    mask carried into each query's body box, so look-alikes far from where the organ
    sits (the other kidney) lose their score. Wraps any predictor, outermost."""

    def __init__(self, member, margin: float | None = None, sigma: float | None = None):
        from .location_prior import PRIOR_MARGIN, PRIOR_SIGMA
        self.margin = PRIOR_MARGIN if margin is None else float(margin)
        self.sigma = PRIOR_SIGMA if sigma is None else float(sigma)
        if self.margin < 0 or self.sigma <= 0:
            raise FewShotSegError(f"location prior: margin must be >= 0 and sigma > 0, not {margin}, {sigma}")
        self.member, self.name, self.preprocess = member, f"{member.name} location prior", member.preprocess

    def prepare(self, images: torch.Tensor) -> _WithBoxes:
        from .location_prior import body_boxes
        return _WithBoxes(self.member.prepare(images), body_boxes(images))

    def predict(self, support, support_mask: torch.Tensor, queries) -> torch.Tensor:
        from .location_prior import location_prior
        probs = self.member.predict(support.feats, support_mask, queries.feats)
        return probs * location_prior(support_mask, support.boxes, queries.boxes, self.margin, self.sigma)
