"""How EP1 cuts a class's slice range into thirds, each matched with one support slice.

Its own module because both the protocol and the query self-support (`self_support`)
need it, and neither should import the other for it.
"""
from __future__ import annotations

import numpy as np

PARTS = 3                                   # EP1: thirds of the class range


def chunk_of(z: int, z_min: int, z_max: int, parts: int = PARTS) -> int:
    """Which third of the inclusive range [z_min, z_max] slice ``z`` falls in."""
    return min(parts - 1, (z - z_min) * parts // (z_max - z_min + 1))


def ep1_support_weights(assignment: dict) -> dict:
    """{query slice: {support index: weight}} for the blended-supports option, from an
    `ep1_assignment`.

    Why: a slice near the border of two thirds resembles both thirds' support slices about
    equally, yet the protocol matches it with one. Each support stands at the centre of its
    third (as it stands at (2p+1)/6 of its own scan's range); a slice's weight moves linearly
    from its own third's centre to the neighbouring one's, and slices beyond the outermost
    centres keep their own support. Its own third weighs at least half (thirds are
    contiguous and differ in size by one slice at most)."""
    centres = {}
    for z, p in assignment.items():
        centres.setdefault(p, []).append(z)
    centres = {p: float(np.mean(zs)) for p, zs in centres.items()}
    weights = {}
    for z, p in assignment.items():
        side = p - 1 if z < centres[p] else p + 1
        if side not in centres or z == centres[p]:
            weights[z] = {p: 1.0}
            continue
        other = abs(z - centres[p]) / abs(centres[side] - centres[p])
        weights[z] = {p: 1.0 - other, side: other}
    return weights
