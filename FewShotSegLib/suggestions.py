"""Where to look next: the engine-filled slices most likely to be wrong, and the walks that
ended while the structure was still large.

Each slice gets an estimate of its wrong pixels (model grid) from what the run itself
saw, the largest first:
  * between two painted slices, the pixels where the two sides' masks disagree;
  * on an outward walk, half the pixels where the network and the registration disagree,
    and the mask's pixels outside the painted structure's intensity band;
  * at the walk's ends, a quarter of the last mask's area: both failures (running past the
    structure, stopping early) happen there;
  * the first slice a walk refused, when it stopped with much of the structure left, the
    area it left behind;
  * area jumps between neighbours (a leak or a lost part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# a walk that stops with more than this fraction of the painted area in its last mask
# "stopped while the structure was still large"
LARGE_STOP_FRACTION = 0.25
TOP_SUGGESTIONS = 10
# what a fitted ranking reads of a slice (log(1 + pixels), the distance in slices to the
# nearest painted or absent slice first): the parts above, one by one
SUGGEST_FEATURES = ("distance", "sides_disagree", "network_vs_registration", "outside_band", "walk_end",
                    "left_behind", "area_jump", "area")


@dataclass(frozen=True)
class SliceSuggestion:
    slice: int
    score: float        # estimated wrong pixels (model grid)
    reason: str

    def describe(self) -> str:
        return f"slice {self.slice}: {self.reason}"


def _add(scores: dict, index: int, value: float, reason: str, feats: Optional[dict] = None,
         feature: Optional[str] = None) -> None:
    total, reasons = scores.get(index, (0.0, []))
    reasons.append((value, reason))
    scores[index] = (total + value, reasons)
    if feats is not None and feature is not None:
        row = feats.setdefault(index, {})
        row[feature] = row.get(feature, 0.0) + value


def slice_feature_vector(row: dict, distance: int) -> np.ndarray:
    """``SUGGEST_FEATURES`` of one slice from its heuristic parts (pixels, model grid)."""
    return np.array([math.log1p(distance)] + [math.log1p(max(0.0, row.get(f, 0.0))) for f in SUGGEST_FEATURES[1:]])


def rank_slices(spans, walks: dict, painted: set, ends: set, n: int, top: int = TOP_SUGGESTIONS,
                model=None, features_out: Optional[dict] = None):
    """``walks``: span -> list of `walks.Walk` (two for a 'between' span, one otherwise).
    ``model``: a `fitted.LinearModel` predicting log(1 + wrong pixels) from
    ``SUGGEST_FEATURES`` (None: the parts' plain sum). ``features_out``: filled with
    slice -> feature vector (fitting such a model).

    Returns (suggestions best first, warnings)."""
    scores: dict = {}
    feats: dict = {}
    warnings = []
    areas: dict = {}
    for span in spans:
        pair = walks[span]
        if span.kind == "between":
            down, up = pair
            for i in span.slices:
                a, b = down.probs.get(i), up.probs.get(i)
                if a is not None and b is not None:
                    differ = float(((a >= 0.5) != (b >= 0.5)).sum())
                    _add(scores, i, differ, f"the walks from slices {span.start} and {span.end} disagree here",
                         feats, "sides_disagree")
                areas[i] = 0.5 * (down.areas.get(i, 0.0) + up.areas.get(i, 0.0))
            continue
        w = pair[0]
        for i, d in w.disagreement.items():
            _add(scores, i, 0.5 * d, "the network and the registration disagree here", feats, "network_vs_registration")
        for i, agreement in w.agreement.items():
            if i in w.areas:
                _add(scores, i, (1.0 - agreement) * w.areas[i],
                     "part of the mask does not look like the painted structure", feats, "outside_band")
        areas.update(w.areas)
        kept = [i for i in span.slices if i in w.probs]
        if kept:
            last = kept[-1]
            _add(scores, last, 0.25 * w.areas[last], f"the structure ends here (walk from slice {span.start})",
                 feats, "walk_end")
        if w.stop is not None:
            fraction = w.stop["area_fraction"]
            if fraction >= LARGE_STOP_FRACTION:
                left = fraction * w.painted_area
                why = {"intensity": "its intensities no longer match the painted ones",
                       "growth": "the mask grew where the painted slices say the structure narrows",
                       "learned": "the stop model judged the mask there to have left the structure",
                       }.get(w.stop["reason"], "its area fell below the limit")
                _add(scores, w.stop["slice"], left,
                     f"the walk from slice {span.start} stopped here with {fraction:.0%} of the painted area",
                     feats, "left_behind")
                warnings.append(f"the walk {span.direction} from slice {span.start} stopped at slice "
                                f"{w.stop['slice']} while the structure was still large ({fraction:.0%} of the "
                                f"painted area): {why}; check there and paint that slice if the structure goes on")
    for i, a in areas.items():
        neighbours = [areas[j] for j in (i - 1, i + 1) if j in areas]
        if neighbours:
            jump = abs(a - sum(neighbours) / len(neighbours))
            if jump > 0.2 * max(a, 1.0):
                _add(scores, i, 0.5 * jump, "its area jumps from its neighbours'", feats, "area_jump")
    anchors = sorted(painted | ends)
    ranked = []
    for i, (total, reasons) in scores.items():
        if i in painted or i in ends or not 0 <= i < n or total <= 0:
            continue
        row = dict(feats.get(i, {}), area=areas.get(i, 0.0))
        vector = slice_feature_vector(row, min((abs(i - a) for a in anchors), default=n))
        if features_out is not None:
            features_out[int(i)] = vector
        if model is not None:
            total = math.expm1(model.predict(vector))
        ranked.append(SliceSuggestion(int(i), float(total), max(reasons)[1]))
    ranked.sort(key=lambda s: (-s.score, s.slice))
    return ranked[:top], warnings


def load_suggestion_model(path=None, beside=None):
    """The fitted ranking: ``path``, else the one fitted for the checkpoint ``beside``
    (``<checkpoint>.suggest.json``), else the installed one; None when there is none."""
    from .fitted import fitted_path, load_fitted
    return load_fitted(path if path is not None else fitted_path("suggest", beside), SUGGEST_FEATURES)
