"""DFDT (seed paper 001): dual-stream features (DVFF) + iterative prototype refinement (PDET).

Only the abstract and a non-running public repository exist, so the structure below is
ours, following REFERENCE.md section 3:

* DVFF (in ``encode``, per slice): the projected backbone features are reduced to
  ``dvff_dim`` channels and go through a CNN stream (two 3x3 convs, GroupNorm, residual)
  and a window-attention stream (two Swin-style blocks, the second with windows shifted
  by half a window; shifted windows are realised by padding plus a key mask, not by a
  cyclic roll, so nothing wraps around the image border; no relative position bias: the
  CNN stream carries the local layout). A learned per-pixel, per-channel sigmoid gate
  mixes the streams; the mix is expanded back and ADDED to the input. The expansion is
  zero-initialised, so an untrained DVFF leaves pretrained features untouched.
* PDET (in ``segment``, per query): regional prototypes = ALP local + global prototypes
  of both classes. Round 0 predicts the query as ALPNet does; each of ``pdet_rounds`` (3)
  rounds lets every prototype attend the query's features, the attention biased by
  log p(its class) of the previous prediction (so foreground prototypes read what the
  query currently believes is foreground: bias correction towards the query), then an
  FFN (detail enhancement), and re-predicts. Keys/values of the query are projected once
  and shared by the rounds; queries, outputs and FFNs are per round and zero-initialised
  (identity at start). The previous prediction is detached inside the bias.
* Learned threshold: the foreground logit is lowered by t = MLP(mean query feature),
  initialised to 0 (query-adaptive like Q-Net/ADNet).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewShotSegError
from .base import FewShotModel
from .layers import FeedForward
from .prototypes import class_score, cosine_distances
from .registry import register_model


def _heads(x, heads):  # [B,N,D] -> [B,heads,N,D/heads]
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _merge(x):  # [B,heads,N,dh] -> [B,N,D]
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class WindowBlock(nn.Module):
    """Swin-style block on ``[B,H,W,C]``: (shifted) window self-attention + MLP, pre-norm."""

    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)  # the MLP has its own pre-norm
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = FeedForward(dim, 2 * dim)

    def attend(self, x):
        b, h, w, c = x.shape
        ws = min(self.window, h, w)
        shift = self.shift * ws // self.window
        hp, wp = math.ceil((h + shift) / ws) * ws, math.ceil((w + shift) / ws) * ws
        pads = (0, 0, shift, wp - w - shift, shift, hp - h - shift)
        mask = None
        if any(pads):
            x = F.pad(x, pads)
            valid = F.pad(x.new_ones(1, h, w, 1), pads)[0, ..., 0]  # [hp,wp]
            mask = valid.reshape(hp // ws, ws, wp // ws, ws).transpose(1, 2).reshape(-1, 1, 1, ws * ws)
            mask = mask.bool().repeat(b, 1, 1, 1)
        nh, nw = hp // ws, wp // ws
        win = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(win).chunk(3, dim=-1))
        y = self.proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        y = y.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return y[:, shift:shift + h, shift:shift + w]

    def forward(self, x):
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(x)


class DVFF(nn.Module):
    """Dual-stream visual feature fusion: CNN stream and window-attention stream, gated."""

    def __init__(self, dim, inner=64, heads=4, window=8):
        super().__init__()
        self.reduce = nn.Conv2d(dim, inner, 1)
        self.cnn = nn.Sequential(nn.Conv2d(inner, inner, 3, padding=1),
                                 nn.GroupNorm(math.gcd(8, inner), inner), nn.ReLU(inplace=True),
                                 nn.Conv2d(inner, inner, 3, padding=1))
        self.swin = nn.ModuleList([WindowBlock(inner, heads, window, 0),
                                   WindowBlock(inner, heads, window, window // 2)])
        self.gate = nn.Conv2d(2 * inner, inner, 1)
        self.expand = nn.Conv2d(inner, dim, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x):
        r = self.reduce(x)
        local = r + self.cnn(r)
        glob = r.permute(0, 2, 3, 1)
        for block in self.swin:
            glob = block(glob)
        glob = glob.permute(0, 3, 1, 2)
        g = torch.sigmoid(self.gate(torch.cat([local, glob], dim=1)))
        return x + self.expand(g * local + (1 - g) * glob)


class PDETRound(nn.Module):
    """Prototypes attend the (class-biased) query features, then an FFN; both residual."""

    def __init__(self, dim, inner, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.ffn = FeedForward(dim, 2 * dim, zero_out=True)

    def forward(self, protos, k, v, bias):
        q = _heads(self.q(self.norm(protos)), self.heads)
        k, v, bias = k.to(q.dtype), v.to(q.dtype), bias.to(q.dtype)  # autocast-safe
        protos = protos + self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))
        return protos + self.ffn(protos)


@register_model("dfdt")
class DFDT(FewShotModel):
    extra_defaults = {"dvff_dim": 64, "dvff_heads": 4, "window_size": 8,
                      "pdet_rounds": 3, "pdet_dim": 64, "pdet_heads": 4}
    zero_ok = FewShotModel.zero_ok | {"pdet_rounds"}  # 0 rounds: the ablation without PDET

    def __init__(self, **config):
        super().__init__(**config)
        c, d = self.config, self.feature_dim
        self.dvff = DVFF(d, c["dvff_dim"], c["dvff_heads"], c["window_size"])
        self.kv_norm = nn.LayerNorm(d)
        self.kv = nn.Linear(d, 2 * c["pdet_dim"])
        self.rounds = nn.ModuleList([PDETRound(d, c["pdet_dim"], c["pdet_heads"])
                                     for _ in range(c["pdet_rounds"])])
        self.threshold = nn.Sequential(nn.Linear(d, d // 4), nn.ReLU(inplace=True), nn.Linear(d // 4, 1))
        nn.init.zeros_(self.threshold[-1].weight)
        nn.init.zeros_(self.threshold[-1].bias)

    supports_query_prototypes = False

    def check_extra(self, c):
        if c["query_prototypes"]:
            raise FewShotSegError("model 'dfdt' refines its prototypes with the query already (PDET); "
                                  "query_prototypes applies to alpnet and crtpnet")
        self.check_divisible(c, "dvff_dim", "dvff_heads")
        self.check_divisible(c, "pdet_dim", "pdet_heads")
        return c

    def refine_features(self, feats):
        return self.dvff(feats)

    def predict(self, query_feats, protos, logw, n_fg, t):
        """Logits ``[Q,2,h,w]`` from per-query prototypes ``[Q,N,C]`` (first ``n_fg`` foreground)."""
        d = cosine_distances(query_feats, protos, self.config["scale"])
        fg = class_score(d[:, :n_fg], logw[:n_fg]) - t[:, :, None]
        bg = class_score(d[:, n_fg:], logw[n_fg:])
        return torch.stack([bg, fg], dim=1)

    def segment(self, support_feats, support_masks, query_feats):
        mask = self.support_mask(support_masks, support_feats)
        fg, bg = self.prototypes(support_feats, mask)
        n_q, n_fg = query_feats.shape[0], len(fg)
        protos = torch.cat([fg.protos, bg.protos])[None].expand(n_q, -1, -1)
        logw = torch.cat([fg.logw, bg.logw])
        t = self.threshold(query_feats.mean(dim=(2, 3)))  # [Q,1]
        logits = self.predict(query_feats, protos, logw, n_fg, t)
        if self.rounds:
            tokens = self.kv_norm(query_feats.flatten(2).transpose(1, 2))
            k, v = (_heads(x, self.config["pdet_heads"]) for x in self.kv(tokens).chunk(2, dim=-1))
            is_fg = torch.arange(protos.shape[1], device=protos.device) < n_fg
        for layer in self.rounds:
            logp = torch.log_softmax(logits.detach(), dim=1).flatten(2)  # [Q,2,hw]
            bias = torch.where(is_fg[None, :, None], logp[:, 1:2], logp[:, 0:1])[:, None]
            protos = layer(protos, k, v, bias)
            logits = self.predict(query_feats, protos, logw, n_fg, t)
        return self.upsample(logits, support_masks)
