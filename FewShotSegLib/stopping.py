"""Where an outward walk ends: a small learned decision instead of fixed thresholds.

The fixed rules (``extent.py``: the mask's intensities leave the painted band, the area
falls below 5 % of the painted one, a narrowing end grows again) fail both ways: a walk
from a slice painted near the structure's tip slides on over a neighbour of the same
intensity, and a walk through a dark patch stops while the structure goes on. Each step
of a walk gives a few numbers that tell the two apart (the intensities against the
painted band; the area against the painted, the previous and the smallest slice; how far
the network moved the carried mask's edge); a logistic regression fitted on walks over
labelled training structures (``Training/fit_stop.py``) weighs them. It stops a walk at
the first slice where it judges the mask mostly wrong. The network's mean confidence and
its disagreement per mask pixel were tried and dropped: both read every small structure
(a vein, a duct) as wrong, whose edge is a large part of its area.

The fitted weights are data (``Resources/Models/fewshotseg-propagator.stop.json``, beside
the step network they were fitted for), with what they were fitted on; ``PropagationOptions.stop = 'learned'`` (CLI ``--stop learned``) uses them. It
is opt-in: chosen on development data (CHAOS cases it was not fitted on, unscored CT
structures) it gained there, but on the held-out sets it gained on CHAOS-T2 at one
painted slice and lost on the TotalSegmentator CT and MR structures, stopping veins and
large organs early (docs/RESULTS.md).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import FewShotSegError

# beside the step network it was fitted for, in the folders checkpoints are searched in
STOP_MODEL_NAME = "fewshotseg-propagator.stop.json"
FEATURES = ("agreement", "log_area_vs_reference", "log_area_vs_previous", "log_area_vs_smallest",
            "narrowing", "disagreement_per_edge")


def step_features(agreement: float, area: float, reference_area: float, previous_area: float,
                  smallest: float, disagreement: Optional[float], narrowing: bool, edge: float) -> np.ndarray:
    """The numbers one step of an outward walk gives (``FEATURES``, in order). None
    depends on the slice spacing or the count of steps: the same model reads a 1 mm CT
    and a 8 mm MRI."""
    return np.array([
        agreement,
        math.log((area + 1.0) / (reference_area + 1.0)),
        math.log((area + 1.0) / (previous_area + 1.0)),
        math.log((area + 1.0) / (smallest + 1.0)) if narrowing else 0.0,
        1.0 if narrowing else 0.0,
        (disagreement or 0.0) / (edge + 1.0),
    ], dtype=np.float64)


def edge_pixels(mask) -> float:
    """Pixels of the mask with a 4-neighbour outside it: a small structure has relatively
    more of them, so disagreement per edge pixel reads alike at every size."""
    m = np.asarray(mask, bool)
    if not m.any():
        return 0.0
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return float((m & ~inner).sum())


@dataclass
class StopModel:
    """P(the mask at this step is mostly wrong) = sigmoid(w . (f - mean) / scale + b)."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float = 0.5
    info: Optional[dict] = None

    def probability(self, features: np.ndarray) -> float:
        z = float(np.dot(self.weights, (features - self.mean) / self.scale) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def stops(self, features: np.ndarray) -> bool:
        return self.probability(features) >= self.threshold

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "threshold": self.threshold,
                "info": self.info or {}}

    @classmethod
    def from_dict(cls, data: dict) -> "StopModel":
        if list(data.get("features", [])) != list(FEATURES):
            raise FewShotSegError("stop model: its features are not this version's "
                                  f"({', '.join(FEATURES)}); fit it again with Training/fit_stop.py")
        arrays = [np.asarray(data[k], np.float64) for k in ("weights", "mean", "scale")]
        if any(a.shape != (len(FEATURES),) for a in arrays) or not np.all(arrays[2] > 0):
            raise FewShotSegError("stop model: weights, mean and scale must hold one value per feature")
        return cls(*arrays[:1], float(data["bias"]), arrays[1], arrays[2], float(data.get("threshold", 0.5)),
                   data.get("info"))


def fit_stop_model(features: np.ndarray, wrong: np.ndarray, l2: float = 1e-2, iterations: int = 50,
                   info: Optional[dict] = None, use: Optional[list] = None) -> StopModel:
    """Logistic regression (Newton steps, L2 on the weights) of ``wrong`` on ``features``
    (only the columns named in ``use``: the others get weight 0); the two classes weighted
    equally (a walk has far more right steps than wrong ones)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(wrong, np.float64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or x.shape[0] != y.shape[0]:
        raise FewShotSegError(f"stop model: need [N, {len(FEATURES)}] features and N labels")
    unknown = sorted(set(use or ()) - set(FEATURES))
    if unknown:
        raise FewShotSegError(f"stop model: unknown feature(s) {', '.join(unknown)}")
    columns = [FEATURES.index(f) for f in use] if use else list(range(len(FEATURES)))
    x = x[:, columns]
    if y.min() == y.max():
        raise FewShotSegError("stop model: the examples hold only one class (no walk ran off its structure)")
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
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
    weights, full_mean, full_scale = np.zeros(len(FEATURES)), np.zeros(len(FEATURES)), np.ones(len(FEATURES))
    weights[columns], full_mean[columns], full_scale[columns] = theta[:-1], mean, scale
    return StopModel(weights, float(theta[-1]), full_mean, full_scale, 0.5, info)


def stop_model_path() -> Optional[Path]:
    """The first ``STOP_MODEL_NAME`` in the model folders (model_store.model_dirs)."""
    from .model_store import model_dirs
    return next((d / STOP_MODEL_NAME for d in model_dirs() if (d / STOP_MODEL_NAME).is_file()), None)


def load_stop_model(path=None) -> Optional[StopModel]:
    """The fitted stop model (``path``, else the installed one), or None when there is none."""
    path = Path(path) if path is not None else stop_model_path()
    if path is None or not path.is_file():
        return None
    try:
        return StopModel.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise FewShotSegError(f"stop model {path.name} is unreadable: {exc}") from None
