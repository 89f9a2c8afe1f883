"""Small fitted models the engine reads as data: a linear function of a few named numbers.

Two decisions of a propagation are fitted on labelled training structures rather than set
by hand: where an outward walk ends (`stopping.py`, a logistic regression) and which
filled slice to show the user next (`suggestions.py`, a ridge regression of the slice's
wrong pixels). Both are a handful of weights in a JSON file beside the step network they
were fitted for, with what they were fitted on (``info``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import FewShotSegError


@dataclass
class LinearModel:
    """``w . (f - mean) / scale + b`` over the named ``features``."""

    features: tuple
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float = 0.5
    info: Optional[dict] = None

    def predict(self, x: np.ndarray) -> float:
        return float(np.dot(self.weights, (np.asarray(x, np.float64) - self.mean) / self.scale) + self.bias)

    def probability(self, x: np.ndarray) -> float:
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, self.predict(x)))))

    def stops(self, x: np.ndarray) -> bool:
        return self.probability(x) >= self.threshold

    def to_dict(self) -> dict:
        return {"features": list(self.features), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "threshold": self.threshold,
                "info": self.info or {}}

    @classmethod
    def from_dict(cls, data: dict, features: tuple) -> "LinearModel":
        """A model over ``features`` or over some of them: one fitted before a version added
        a feature still loads (the new feature weighs nothing), so a user's own fit keeps
        working; a feature this version does not know is an error."""
        names = list(data.get("features", []))
        if not names or len(set(names)) != len(names) or set(names) - set(features):
            raise FewShotSegError(f"fitted model: its features are not this version's ({', '.join(features)}); "
                                  "fit it again")
        arrays = [np.asarray(data[k], np.float64) for k in ("weights", "mean", "scale")]
        if any(a.shape != (len(names),) for a in arrays) or not np.all(arrays[2] > 0):
            raise FewShotSegError("fitted model: weights, mean and scale must hold one value per feature")
        weights, mean, scale = np.zeros(len(features)), np.zeros(len(features)), np.ones(len(features))
        at = [features.index(f) for f in names]
        weights[at], mean[at], scale[at] = arrays
        return cls(tuple(features), weights, float(data["bias"]), mean, scale,
                   float(data.get("threshold", 0.5)), data.get("info"))


def _columns(x, y, features: tuple, use):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or x.shape[1] != len(features) or x.shape[0] != y.shape[0]:
        raise FewShotSegError(f"fitted model: need [N, {len(features)}] features and N targets")
    unknown = sorted(set(use or ()) - set(features))
    if unknown:
        raise FewShotSegError(f"fitted model: unknown feature(s) {', '.join(unknown)}")
    columns = [features.index(f) for f in use] if use else list(range(len(features)))
    x = x[:, columns]
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    return np.hstack([(x - mean) / scale, np.ones((len(x), 1))]), y, columns, mean, scale


def _expanded(theta, columns, mean, scale, features, info) -> LinearModel:
    weights, full_mean, full_scale = np.zeros(len(features)), np.zeros(len(features)), np.ones(len(features))
    weights[columns], full_mean[columns], full_scale[columns] = theta[:-1], mean, scale
    return LinearModel(tuple(features), weights, float(theta[-1]), full_mean, full_scale, 0.5, info)


def fit_logistic(x, y, features: tuple, l2: float = 1e-2, info: Optional[dict] = None, use=None,
                 iterations: int = 50) -> LinearModel:
    """Logistic regression (Newton steps, L2 on the weights), the two classes weighted
    equally; only the ``use`` columns get weights."""
    z, y, columns, mean, scale = _columns(x, y, features, use)
    if y.min() == y.max():
        raise FewShotSegError("fitted model: the examples hold only one class")
    sample = np.where(y > 0.5, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    theta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ theta, -50, 50)))
        grad = z.T @ (sample * (p - y)) / len(y) + penalty * theta
        hess = (z * (sample * p * (1 - p))[:, None]).T @ z / len(y) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return _expanded(theta, columns, mean, scale, features, info)


def fit_ridge(x, y, features: tuple, l2: float = 1e-2, info: Optional[dict] = None, use=None) -> LinearModel:
    """Least squares with an L2 penalty on the (standardised) weights."""
    z, y, columns, mean, scale = _columns(x, y, features, use)
    penalty = np.full(z.shape[1], l2 * len(y))
    penalty[-1] = 0.0
    theta = np.linalg.solve(z.T @ z + np.diag(penalty), z.T @ y)
    return _expanded(theta, columns, mean, scale, features, info)


def resource_path(name: str) -> Optional[Path]:
    """The first file ``name`` in the model folders (model_store.model_dirs)."""
    from .model_store import model_dirs
    return next((d / name for d in model_dirs() if (d / name).is_file()), None)


def fitted_path(what: str, beside=None) -> Optional[Path]:
    """``<checkpoint>.<what>.json`` beside the checkpoint ``beside`` (fitted to that step
    network's runs), else the shipped ``fewshotseg-propagator.<what>.json``; None if neither."""
    if beside is not None:
        own = Path(beside).with_suffix(f".{what}.json")
        if own.is_file():
            return own
    return resource_path(f"fewshotseg-propagator.{what}.json")


def load_fitted(path, features: tuple) -> Optional[LinearModel]:
    """The model at ``path`` (None when there is none)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return LinearModel.from_dict(json.loads(Path(path).read_text()), features)
    except (ValueError, KeyError, TypeError) as exc:
        raise FewShotSegError(f"fitted model {Path(path).name} is unreadable: {exc}") from None
