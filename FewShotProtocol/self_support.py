"""Query self-support (the protocol's ``+ss`` option): a second pass in which the query
scan's own slices, labelled by the first pass, are the supports.

Why: across subjects the support slice differs from the query in contrast, size and shape,
while a slice of the query scan resembles its neighbours closely (the product's propagation
relies on this within one scan). EP1's first pass is most reliable near each third's
centre, where the query stands at its support's level in the body, so those slices,
thresholded, become pseudo-labelled supports for the rest of the range. No label of the
query is read: only its images and the model's own predictions (EP1's scored range is the
protocol's oracle already; EP2 takes the first pass's largest 3D region instead).

Chosen on the shipped checkpoint (not on the fold models), EP1 mean Dice over its 5 folds:
first pass 73.8; 3 anchors, mix 0.5: 78.0 (mix 0.7: 78.3, 1.0: 77.9; two rounds: 78.2;
5 anchors at mix 0.7: 77.8; 7 anchors: 77.1). EP2 45.8 -> 47.5."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .thirds import chunk_of, ep1_support_weights

SELF_SUPPORT_MIX = 0.5      # weight of the self-supported pass in the final probabilities
SELF_SUPPORT_ANCHORS = 3  # pseudo-labelled query slices, evenly over the scored range
MIN_PSEUDO_PIXELS = 16      # a pseudo-label smaller than this (model grid) is not used


def pseudo_label(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The largest 8-connected region of ``probs >= threshold`` as a float mask: stray
    blobs of a first pass would otherwise teach the second pass their look."""
    mask = probs.numpy() >= threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n > 1:
        mask = labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)
    return torch.from_numpy(mask.astype(np.float32))


def predicted_extent(probs: torch.Tensor, threshold: float = 0.5) -> list[int]:
    """The slices spanned by the largest 26-connected region of ``probs >= threshold``
    ([slices,S,S]): EP2's stand-in for the organ's range, which it may not read."""
    labels, n = ndimage.label(probs.numpy() >= threshold, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    zs = np.nonzero(labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1))[0]
    return list(range(int(zs.min()), int(zs.max()) + 1))


def anchor_slices(weights: dict) -> dict:
    """{part: query slice} for each part: the slice nearest the centre of the slices the
    part weighs most (its own third, where the query matches the support's level)."""
    own = {}
    for z, w in weights.items():
        own.setdefault(max(w, key=w.get), []).append(z)
    centres = {p: float(np.mean(zs)) for p, zs in own.items()}
    return {p: min(zs, key=lambda z: (abs(z - centres[p]), z)) for p, zs in own.items()}


def self_supported(predictor, q_feats, probs: torch.Tensor, slices, anchors: int = SELF_SUPPORT_ANCHORS,
                   mix: float = SELF_SUPPORT_MIX, rounds: int = 1, threshold: float = 0.5) -> torch.Tensor:
    """``probs`` [slices,S,S] (the first pass) mixed, on the scored ``slices``, with a pass
    whose supports are ``anchors`` slices of the query spread evenly over ``slices``, each
    with its pseudo-label; a slice between two anchors blends their predictions by
    position (`ep1_support_weights`). An anchor whose pseudo-label is too small lends the
    first pass instead. ``rounds`` > 1 labels the anchors again from the mixed result."""
    scored = sorted(int(z) for z in slices)
    lo, hi = scored[0], scored[-1]
    weights = ep1_support_weights({z: chunk_of(z, lo, hi, anchors) for z in scored})
    centres = anchor_slices(weights)
    out = probs
    for _ in range(rounds):
        second = torch.zeros_like(probs)
        for part, anchor in centres.items():
            zs = [z for z, w in weights.items() if part in w]
            w = torch.tensor([weights[z][part] for z in zs])[:, None, None]
            mask = pseudo_label(out[anchor], threshold)
            if mask.sum() < MIN_PSEUDO_PIXELS:
                second[zs] += w * out[zs]
                continue
            second[zs] += w * predictor.predict(q_feats[anchor], mask, q_feats[zs])
        mixed = out.clone()
        mixed[scored] = (1 - mix) * probs[scored] + mix * second[scored]
        out = mixed
    return out
