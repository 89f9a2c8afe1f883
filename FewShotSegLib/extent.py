"""Where does the structure end? Rules shared by every propagation mode.

Propagation has no oracle range: walking away from the painted slice, it must decide
by itself when the structure is gone. A network's mask does not shrink to nothing at
the end of an organ; it slides onto the neighbouring tissue. What does change is the
intensity under the mask, so the painted region's intensity band is the reference.
"""
from __future__ import annotations

import numpy as np

BAND_PERCENTILES = (5.0, 95.0)


def intensity_band(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The 5-95 % intensity range under the painted ``mask`` of ``image``."""
    inside = np.asarray(image)[np.asarray(mask, bool)]
    if inside.size == 0:
        return -np.inf, np.inf
    low, high = np.percentile(inside, BAND_PERCENTILES)
    return float(low), float(high)


def intensity_agreement(image: np.ndarray, mask: np.ndarray, band: tuple[float, float]) -> float:
    """Fraction of ``mask`` pixels whose intensity lies inside ``band`` (0 for an empty mask)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    values = np.asarray(image)[mask]
    return float(((values >= band[0]) & (values <= band[1])).mean())
