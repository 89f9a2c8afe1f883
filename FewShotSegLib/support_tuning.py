"""Test-time tuning: a few SGD steps of the training episode loss on the labelled slices a
test already holds, before the model is used on the queries.

Why: a self-supervised model has never seen the organ it is asked for; the support scan's
labelled slices are real examples of it. Each episode pairs two of one organ's labelled
slices (support -> query; the same slice twice where there is one), each augmented as in
self-supervised training (`augmentation.augment`), and the model is tuned on the loss it was
trained with (`episode_loss.EpisodeLoss`: cross-entropy + prototype alignment). No query label
and no other scan is read; the tuned model is a copy (the checkpoint's is kept).
"""
from __future__ import annotations

import copy
import random

import torch

from .augmentation import AugmentConfig, augment
from .episode_loss import EpisodeLoss
from .errors import FewShotSegError

TUNE_LR = 1e-3           # the self-supervised training's own SGD learning rate
TUNE_MOMENTUM, TUNE_WEIGHT_DECAY = 0.9, 5e-4
CLASS_WEIGHTS = (0.05, 1.0)   # background, foreground: the training's weights


def tuned_on_support(model: torch.nn.Module, examples: dict, steps: int, lr: float = TUNE_LR, seed: int = 0,
                     on_step=None, augment_cfg: AugmentConfig | None = None) -> torch.nn.Module:
    """A copy of ``model`` tuned on ``examples``: ``{class: (images [N,S,S], masks [N,S,S])}``
    on the model grid (several slices of one organ make cross-slice episodes).

    Deterministic given ``seed``; parameters the checkpoint keeps frozen stay frozen; runs
    where the model's parameters are. ``on_step(done, steps)`` after each step (progress;
    it may raise to cancel). ``augment_cfg``: the training's augmentation unless given."""
    usable = {c: (imgs, masks) for c, (imgs, masks) in examples.items() if len(imgs) and bool((masks > 0.5).any())}
    if not usable:
        raise FewShotSegError("test-time tuning needs at least one labelled support slice with the organ in it")
    if steps < 0 or lr <= 0:
        raise FewShotSegError(f"test-time tuning: steps must be >= 0 and lr > 0 (got {steps}, {lr})")
    tuned = copy.deepcopy(model)
    device = next(tuned.parameters()).device
    if steps == 0:
        return tuned.eval()
    loss_fn = EpisodeLoss(tuned, list(CLASS_WEIGHTS), align_weight=1.0).to(device)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=TUNE_MOMENTUM, weight_decay=TUNE_WEIGHT_DECAY)
    gen, pick = torch.Generator().manual_seed(seed), random.Random(seed)   # augmentation on the CPU
    cfg, classes = augment_cfg or AugmentConfig(), sorted(usable)
    tuned.train()
    with torch.enable_grad():
        for step in range(steps):
            images, masks = usable[pick.choice(classes)]
            i, j = pick.randrange(len(images)), pick.randrange(len(images))
            s_img, s_mask = augment(images[i].cpu(), masks[i].cpu(), cfg, gen)
            q_img, q_mask = augment(images[j].cpu(), masks[j].cpu(), cfg, gen)
            seg, align = loss_fn(*(t[None].to(device) for t in (s_img, (s_mask > 0.5).float(),
                                                                   q_img, (q_mask > 0.5).float())))
            optimizer.zero_grad()
            (seg + align).backward()
            optimizer.step()
            if on_step is not None:
                on_step(step + 1, steps)
    return tuned.eval()
