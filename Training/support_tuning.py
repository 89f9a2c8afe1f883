"""Test-time tuning: a few SGD steps of the training episode loss on the labelled slices a
test already holds, before the model is used on the queries.

Why: a self-supervised model has never seen the organ it is asked for; the support scan's
labelled slices are real examples of it. Each episode pairs two of one organ's labelled
slices (support -> query; the same slice twice where there is one), each augmented as in
self-supervised training (`episodes.augment`), and the model is tuned on the loss it was
trained with (`train.EpisodeLoss`: cross-entropy + prototype alignment). No query label
and no other scan is read; the tuned model is a copy (the checkpoint's is kept).
"""
from __future__ import annotations

import copy
import random

import torch

from FewShotSegLib.errors import FewShotSegError

from .episodes import AugmentConfig, augment
from .train import EpisodeLoss

TUNE_STEPS = 30          # chosen on the shipped checkpoint (README, protocol section)
TUNE_LR = 1e-3           # the self-supervised training's own SGD learning rate
TUNE_MOMENTUM, TUNE_WEIGHT_DECAY = 0.9, 5e-4
CLASS_WEIGHTS = (0.05, 1.0)   # background, foreground: the training's weights


def tuned_on_support(model: torch.nn.Module, examples: dict, steps: int = TUNE_STEPS, lr: float = TUNE_LR,
                     seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` tuned on ``examples``: ``{class: (images [N,S,S], masks [N,S,S])}``
    on the model grid (several slices of one organ make cross-slice episodes).

    Deterministic given ``seed``; parameters the checkpoint keeps frozen stay frozen."""
    usable = {c: (imgs, masks) for c, (imgs, masks) in examples.items() if len(imgs) and bool((masks > 0.5).any())}
    if not usable:
        raise FewShotSegError("test-time tuning needs at least one labelled support slice with the organ in it")
    if steps < 0 or lr <= 0:
        raise FewShotSegError(f"test-time tuning: steps must be >= 0 and lr > 0 (got {steps}, {lr})")
    tuned = copy.deepcopy(model)
    if steps == 0:
        return tuned.eval()
    loss_fn = EpisodeLoss(tuned, list(CLASS_WEIGHTS), align_weight=1.0)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=TUNE_MOMENTUM, weight_decay=TUNE_WEIGHT_DECAY)
    gen, pick = torch.Generator().manual_seed(seed), random.Random(seed)
    cfg, classes = AugmentConfig(), sorted(usable)
    tuned.train()
    with torch.enable_grad():
        for _ in range(steps):
            images, masks = usable[pick.choice(classes)]
            i, j = pick.randrange(len(images)), pick.randrange(len(images))
            s_img, s_mask = augment(images[i], masks[i], cfg, gen)
            q_img, q_mask = augment(images[j], masks[j], cfg, gen)
            seg, align = loss_fn(s_img[None], (s_mask > 0.5).float()[None], q_img[None], (q_mask > 0.5).float()[None])
            optimizer.zero_grad()
            (seg + align).backward()
            optimizer.step()
    return tuned.eval()
