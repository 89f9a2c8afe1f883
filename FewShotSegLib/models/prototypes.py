"""Prototype pieces shared by every model (SSL-ALPNet's adaptive local prototype pooling).

A class is represented by a *set* of prototypes: the masked-average (global) prototype
plus local prototypes average-pooled in LxL windows of the feature map. A query pixel's
score for the class is ``sum_j softmax_j(d_j) * d_j`` with ``d_j`` = 20 x cosine to
prototype j: a soft maximum, so the closest part of the organ decides.

Choices of ours (the paper leaves them open or we deviate knowingly):
* the mask is brought to feature size by area averaging (exact coverage fractions)
  rather than ALPNet's bilinear sampling, which skips pixels when shrinking 8x;
* all S support slices pool into one prototype set (K-shot);
* ``soft_local=True``: every window with some foreground gives a masked-average local
  prototype, weighted by its coverage w through ``softmax(d + log w)``, instead of
  the hard ``coverage >= 0.95`` rule that starves small organs;
* a class without any kept local window falls back to its global prototype (ALPNet keeps
  no global background prototype; we add it only in that fall-back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOFT_MIN_COVERAGE = 0.05  # soft local prototypes: windows with less foreground are ignored
QUERY_CONFIDENCE = 0.7    # query prototypes: pixels the first pass gives at least this probability
REFINE_LR = 0.01          # support refinement: Adam step on unit-length prototypes


@dataclass
class PrototypeSet:
    """Prototypes of one class: ``protos [N,C]`` (or per query ``[Q,N,C]``), ``logw [N]``."""

    protos: torch.Tensor
    logw: torch.Tensor

    def __len__(self) -> int:
        return self.protos.shape[-2]


def mask_to_features(masks: torch.Tensor, size) -> torch.Tensor:
    """``[S,H,W]`` (or ``[S,1,H,W]``) mask in [0,1] -> ``[S,1,h,w]`` coverage fractions."""
    if masks.dim() == 3:
        masks = masks[:, None]
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks, size)


def global_prototype(feats: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Masked average over all shots: ``[S,C,h,w] x [S,1,h,w] -> [1,C]``."""
    return (feats * mask).sum(dim=(0, 2, 3))[None] / (mask.sum() + eps)


def local_prototypes(feats, mask, window: int, fg_threshold: float = 0.95, soft: bool = False,
                     eps: float = 1e-5):
    """ALP local prototypes ``[N,C]`` and their coverages ``[N]`` over all shots.

    Hard (ALPNet): plain window averages of the features, kept where the window's mask
    coverage is >= ``fg_threshold``. Soft: masked window averages, kept where coverage
    >= ``SOFT_MIN_COVERAGE``.
    """
    window = max(1, min(window, feats.shape[-2], feats.shape[-1]))
    cover = F.avg_pool2d(mask, window)  # [S,1,h',w']
    if soft:
        pooled = F.avg_pool2d(feats * mask, window) / (cover + eps)
        keep = cover >= SOFT_MIN_COVERAGE
    else:
        pooled = F.avg_pool2d(feats, window)
        keep = cover >= fg_threshold
    c = feats.shape[1]
    pooled = pooled.permute(0, 2, 3, 1).reshape(-1, c)
    keep, cover = keep.reshape(-1), cover.reshape(-1)
    return pooled[keep], cover[keep]


def class_prototypes(feats, mask, window: int, fg_threshold: float, soft: bool,
                     with_global: bool) -> PrototypeSet:
    """Local prototypes (+ the global one when ``with_global`` or when no window is kept)."""
    protos, cover = local_prototypes(feats, mask, window, fg_threshold, soft)
    logw = cover.clamp_min(1e-6).log() if soft else torch.zeros_like(cover)
    if with_global or protos.shape[0] == 0:
        protos = torch.cat([protos, global_prototype(feats, mask)], dim=0)
        logw = torch.cat([logw, logw.new_zeros(1)])
    return PrototypeSet(protos, logw)


def alp_prototypes(feats, mask, window: int, fg_threshold: float = 0.95, soft: bool = False,
                   soft_background: bool = True):
    """(foreground, background) sets from support ``feats [S,C,h,w]`` and ``mask [S,1,h,w]``.

    As SSL-ALPNet: foreground = local + global, background = local only (from 1 - mask).
    ``soft_background=False`` keeps the hard rule for the background: its soft windows
    along the organ's border average background pixels next to the organ.
    """
    fg = class_prototypes(feats, mask, window, fg_threshold, soft, with_global=True)
    bg = class_prototypes(feats, 1.0 - mask, window, fg_threshold, soft and soft_background, with_global=False)
    return fg, bg


def safe_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unit vectors; an all-zero vector (empty mask) stays zero instead of becoming NaN."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-4)


def cosine_distances(query: torch.Tensor, protos: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale x cos``: ``query [Q,C,h,w]``, ``protos [N,C]`` or ``[Q,N,C]`` -> ``[Q,N,h,w]``."""
    q = safe_normalize(query, 1)
    p = safe_normalize(protos, -1)
    if p.dim() == 2:
        return scale * torch.einsum("qchw,nc->qnhw", q, p)
    return scale * torch.einsum("qchw,qnc->qnhw", q, p)


def class_score(dists: torch.Tensor, logw: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j softmax_j(d_j + log w_j) * d_j`` over a class's prototypes: ``[Q,N,h,w] -> [Q,h,w]``;
    ``logw`` is ``[N]`` or per query ``[Q,N]``."""
    if logw is not None:
        logw = logw.reshape(1, -1, 1, 1) if logw.dim() == 1 else logw[:, :, None, None]
    logits = dists if logw is None else dists + logw
    return (torch.softmax(logits, dim=1) * dists).sum(dim=1)


def score_map(query: torch.Tensor, fg: PrototypeSet, bg: PrototypeSet, scale: float) -> torch.Tensor:
    """Logits ``[Q,2,h,w]`` (background, foreground) at feature resolution.

    One similarity pass over both sets (same layout: both ``[N,C]`` or both ``[Q,N,C]``).
    """
    n_fg = fg.protos.shape[-2]
    d = cosine_distances(query, torch.cat([fg.protos, bg.protos], dim=-2), scale)
    return torch.stack([class_score(d[:, n_fg:], bg.logw), class_score(d[:, :n_fg], fg.logw)], dim=1)


def with_query_prototypes(query: torch.Tensor, logits: torch.Tensor, fg: PrototypeSet,
                          bg: PrototypeSet) -> tuple[PrototypeSet, PrototypeSet]:
    """Test-time self-support: each query adds its own foreground and background prototypes.

    A support slice from another scan (or a few slices away) differs in contrast and
    texture from the query; the query pixels the first pass is confident about
    (probability >= ``QUERY_CONFIDENCE``) average into one prototype per class that looks
    like the query itself, and a second pass scores with support + query prototypes (the
    self-support idea of Fan et al., CVPR 2022). A query without confident pixels of a
    class gets no prototype for it (log-weight -inf).
    """
    prob = torch.softmax(logits.float(), dim=1).to(query.dtype)
    n_q = query.shape[0]
    out = []
    for cls, base in ((1, fg), (0, bg)):
        weight = (prob[:, cls:cls + 1] >= QUERY_CONFIDENCE).to(query.dtype)      # [Q,1,h,w]
        count = weight.sum(dim=(2, 3))                                              # [Q,1]
        proto = (query * weight).sum(dim=(2, 3)) / count.clamp_min(1.0)             # [Q,C]
        protos = base.protos if base.protos.dim() == 3 else base.protos[None].expand(n_q, -1, -1)
        logw = base.logw if base.logw.dim() == 2 else base.logw[None].expand(n_q, -1)
        extra = torch.where(count > 0, torch.zeros_like(count), torch.full_like(count, float("-inf")))
        out.append(PrototypeSet(torch.cat([protos, proto[:, None]], dim=1), torch.cat([logw, extra], dim=1)))
    return out[0], out[1]


def refined_on_support(feats: torch.Tensor, mask: torch.Tensor, fg: PrototypeSet, bg: PrototypeSet,
                       scale: float, steps: int, lr: float = REFINE_LR) -> tuple[PrototypeSet, PrototypeSet]:
    """Test-time prototype refinement: a few Adam steps move the prototypes so that they
    segment their own support slice (soft cross-entropy against the mask coverage).

    Pooled prototypes score the support they came from imperfectly (window averages mix
    organ and surroundings); fitting them to the support, with the encoder fixed, is the
    cheapest adaptation to one new organ. Prototypes start at unit length (cosine ignores
    the norm), so ``lr`` is a step relative to a prototype."""
    with torch.inference_mode(False), torch.enable_grad():
        f = feats.detach().float().clone()
        target = mask.detach().float().clone()[:, 0]                                # [S,h,w]
        params = [safe_normalize(s.protos.detach().float().clone(), -1).requires_grad_(True) for s in (fg, bg)]
        logw = [s.logw.detach().float().clone() for s in (fg, bg)]
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            logits = score_map(f, PrototypeSet(params[0], logw[0]), PrototypeSet(params[1], logw[1]), scale)
            logp = torch.log_softmax(logits, dim=1)
            loss = -(target * logp[:, 1] + (1 - target) * logp[:, 0]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    dtype = fg.protos.dtype
    return (PrototypeSet(params[0].detach().to(dtype), fg.logw), PrototypeSet(params[1].detach().to(dtype), bg.logw))
