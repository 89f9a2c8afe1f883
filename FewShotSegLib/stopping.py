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

import math
from pathlib import Path
from typing import Optional

import numpy as np

from .fitted import LinearModel, fit_logistic, fitted_path, load_fitted, resource_path

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


StopModel = LinearModel


def fit_stop_model(features: np.ndarray, wrong: np.ndarray, l2: float = 1e-2, info: Optional[dict] = None,
                   use: Optional[list] = None) -> LinearModel:
    """P(the step's mask is mostly wrong): a logistic regression of ``wrong`` on ``features``
    (only the columns named in ``use``), the two classes weighted equally (a walk has far
    more right steps than wrong ones)."""
    return fit_logistic(features, wrong, FEATURES, l2=l2, info=info, use=use)


def stop_model_path(beside=None) -> Optional[Path]:
    return fitted_path("stop", beside)


def load_stop_model(path=None, beside=None) -> Optional[LinearModel]:
    """The fitted stop model: ``path``, else the one fitted for the checkpoint ``beside``,
    else the installed one; None when there is none."""
    return load_fitted(path if path is not None else stop_model_path(beside), FEATURES)


# -- the presence read-out ---------------------------------------------------------------
# The step network's own outputs tell a step past the structure's end poorly (a mask that
# no longer shrinks looks alike on and past it); its features tell it better. A logistic
# regression of "the step's mask is mostly wrong" on the stop features and the network's
# pooled features (models.slicestep.presence_features), fitted on the network's own walks
# over labelled training structures in all three planes (Training/fit_presence.py), is
# data beside the network: ``<checkpoint>.presence.json``.

def presence_features_of(net) -> tuple:
    """The presence model's feature names for step network ``net``."""
    from .models.slicestep import presence_feature_names
    return FEATURES + presence_feature_names(net)


def load_presence_model(net, path=None, beside=None) -> Optional[LinearModel]:
    """The presence model fitted for ``net``: ``path``, else the one beside its checkpoint
    ``beside`` (never another network's: it reads that network's features), else, for the
    shipped network (no ``beside``), the installed one; None when there is none."""
    if path is None:
        path = (Path(beside).with_suffix(".presence.json") if beside is not None
                else resource_path("fewshotseg-propagator.presence.json"))
    return load_fitted(path, presence_features_of(net))
