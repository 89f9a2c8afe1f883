"""Query self-support (FewShotProtocol/self_support.py, protocol row ``+ss``): the pseudo-label,
the anchors, EP2's predicted extent, and the second pass pulling the probabilities towards
the query's own look."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotProtocol import protocol as P
from FewShotProtocol.self_support import (MIN_PSEUDO_PIXELS, anchor_slices, predicted_extent, pseudo_label,
                                        self_supported)


class IntensityPrototype:
    """A non-learned one-prototype segmenter: a pixel's foreground probability falls with
    its distance from the support's mean intensity under the mask (what a prototype
    network does with features, here with raw intensities)."""

    def __init__(self, width: float = 0.25):
        self.width, self.calls = width, []

    def predict(self, support, support_mask, queries):
        self.calls.append(support_mask.clone())
        prototype = support[support_mask > 0].mean()
        return torch.exp(-((queries - prototype) / self.width) ** 2)


def test_pseudo_label_keeps_the_largest_region():
    probs = torch.zeros(16, 16)
    probs[2:8, 2:8] = 0.9
    probs[12:14, 12:14] = 0.8    # a stray blob
    probs[10, 2] = 0.4           # below the threshold
    mask = pseudo_label(probs)
    assert mask.sum() == 36 and mask[2:8, 2:8].all() and mask[12:14, 12:14].sum() == 0
    assert pseudo_label(torch.zeros(4, 4)).sum() == 0


def test_anchors_stand_at_the_centre_of_the_slices_each_part_owns():
    weights = P.ep1_support_weights({z: P.chunk_of(z, 10, 27) for z in range(10, 28)})
    assert anchor_slices(weights) == {0: 12, 1: 18, 2: 24}   # centres 12.5, 18.5, 24.5: the lower slice
    assert anchor_slices({4: {0: 1.0}}) == {0: 4}


def test_ep2_extent_spans_the_largest_3d_region():
    probs = torch.zeros(12, 8, 8)
    probs[3:8, 2:5, 2:5] = 0.9
    probs[10, 0, 0] = 0.9        # a one-voxel blob elsewhere: not the organ
    assert predicted_extent(probs) == [3, 4, 5, 6, 7]
    assert predicted_extent(torch.zeros(3, 4, 4)) == []


def test_self_support_pulls_the_query_towards_its_own_look():
    """The query's organ is darker than the support's: the first pass finds its brighter
    part only. Labelled by that pass, the query's own slices teach the darker part's look,
    so the organ's probability rises there; the background stays low, slices outside the
    scored range are untouched, and the input is not modified."""
    n, side = 9, 24
    queries = torch.zeros(n, side, side)
    queries[:, 6:18, 6:12] = 0.8            # the organ's bright half
    queries[:, 6:18, 12:18] = 0.6           # its dark half
    support = torch.zeros(side, side)
    support[6:18, 6:18] = 0.9
    support_mask = (support > 0).float()
    predictor = IntensityPrototype()
    first = predictor.predict(support, support_mask, queries)
    first[0] = 0.3                          # slice 0 is outside the scored range below
    before = first.clone()
    out = self_supported(predictor, queries, first, range(1, n))
    assert torch.equal(first, before) and torch.equal(out[0], first[0])
    assert (first[1:, 6:18, 12:18] < 0.5).all()                   # the first pass misses the dark half
    assert (out[1:, 6:18, 12:18] > first[1:, 6:18, 12:18] + 0.1).all()
    assert (out[1:, :6] < 0.05).all() and (out[1:, :, 18:] < 0.05).all()
    # three anchors, each pseudo-labelled with the bright half: what the first pass found
    assert len(predictor.calls) == 4 and all(m.sum() == 12 * 6 for m in predictor.calls[1:])
    # mix 1 with one anchor is the second pass alone, from the anchor's pseudo-label
    alone = self_supported(IntensityPrototype(), queries, first, range(1, n), anchors=1, mix=1.0)
    assert alone[1:, 6:18, 12:18] == pytest.approx(torch.full((n - 1, 12, 6), float(np.exp(-0.64))), abs=1e-5)


def test_an_empty_pseudo_label_keeps_the_first_pass():
    predictor = IntensityPrototype()
    first = torch.full((5, 8, 8), 0.2)
    first[1, :2, :2] = 0.9                 # anchors' pseudo-labels: 4 pixels, below the minimum
    assert 4 < MIN_PSEUDO_PIXELS
    out = self_supported(predictor, torch.rand(5, 8, 8), first, range(5))
    assert torch.allclose(out, first) and predictor.calls == []


def test_self_support_option_is_a_row_switch():
    option = P.test_time_option("blend+zs+ss")
    assert option.self_support and option.blended and not P.test_time_option("blend").self_support
    assert "query self-support" in P.describe("crtpnet+ss")
