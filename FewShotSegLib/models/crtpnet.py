"""CRTPNet (Huang & Liu, seed paper 000): ALPNet + a Cross-Reference Transformer block.

Before the prototypes are pooled, support and query features are compared by two-way
cross multi-head attention (support tokens attend query keys/values, query tokens attend
support keys/values). Each branch is averaged over its tokens and turned into a channel
weight by FC-ReLU-FC-sigmoid; the two weights are multiplied and scale BOTH original
feature maps, so channels that the support organ and the query share are enhanced.

Choices of ours (the paper has no code and leaves these open):
* the support features are multiplied by the support mask (coverage at feature size)
  only as attention input; the weights then scale the *unmasked* support features, from
  which ALP pools the prototypes as in ALPNet;
* the two directions have their own attention and FC blocks; attention runs in an inner
  width ``attn_dim`` (64, 4 heads) and the output projection is applied after pooling
  (the same linear map, cheaper);
* K-shot: the tokens of all S support slices form one sequence;
* each query gets its own channel weight, hence its own scaled prototypes. Because the
  weight is per channel, scaling the pooled prototypes equals pooling scaled features;
* at output_stride 4 the tokens are average-pooled to at most ``attn_max_side`` per side
  (32) before attention, which keeps the cost of stride 8; the weights only need a summary.

The paper's ablation (its Table 2) has two switches, kept here as options so the
protocol can train each row: ``cross_reference_mask=False`` feeds the *unmasked* support
features to the cross-reference ("Base" has no support-mask input), and
``cross_reference_attention=False`` replaces the two attention branches by CRNet's plain
cross-reference: each side's features averaged over their tokens (the support's over the
mask when it is used), then the same FC gates ("Base" and "Base + Support Mask").
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from .base import FewShotModel
from .layers import ChannelGate, CrossAttention
from .prototypes import PrototypeSet
from .registry import register_model


def _tokens(x):
    """``[B,C,h,w]`` -> ``[B,h*w,C]``."""
    return x.flatten(2).transpose(1, 2)


@register_model("crtpnet")
class CRTPNet(FewShotModel):
    extra_defaults = {"attn_dim": 64, "attn_heads": 4, "attn_max_side": 32, "gate_reduction": 4,
                      "cross_reference_mask": True, "cross_reference_attention": True}

    def __init__(self, **config):
        super().__init__(**config)
        c, d = self.config, self.feature_dim
        if c["cross_reference_attention"]:  # absent in the ablation, so no unused parameters
            self.support_attends_query = CrossAttention(d, c["attn_dim"], c["attn_heads"])
            self.query_attends_support = CrossAttention(d, c["attn_dim"], c["attn_heads"])
        self.support_gate = ChannelGate(d, c["gate_reduction"])
        self.query_gate = ChannelGate(d, c["gate_reduction"])

    def check_extra(self, c):
        self.check_divisible(c, "attn_dim", "attn_heads")
        for key in ("cross_reference_mask", "cross_reference_attention"):
            self.check_bool(c, key)
        return c

    def channel_weights(self, support_feats, mask, query_feats):
        """The Cross-Reference Transformer: ``[Q,C]`` channel weights, one row per query."""
        c = self.config
        if not c["cross_reference_attention"]:
            return self.pooled_channel_weights(support_feats, mask if c["cross_reference_mask"] else None,
                                               query_feats)
        side = max(query_feats.shape[-2:])
        pool = max(1, math.ceil(side / c["attn_max_side"]))
        s_feats, q_feats = (support_feats * mask if c["cross_reference_mask"] else support_feats), query_feats
        if pool > 1:
            s_feats, q_feats = F.avg_pool2d(s_feats, pool, ceil_mode=True), F.avg_pool2d(
                q_feats, pool, ceil_mode=True)
        s_tok = _tokens(s_feats).reshape(1, -1, support_feats.shape[1])  # all shots, one sequence
        q_tok = _tokens(q_feats)
        a_s = self.support_attends_query(s_tok, q_tok, project_out=False).mean(dim=1)
        a_q = self.query_attends_support(q_tok, s_tok, project_out=False).mean(dim=1)
        w_s = self.support_gate(self.support_attends_query.out(a_s))
        w_q = self.query_gate(self.query_attends_support.out(a_q))
        return w_s * w_q

    def pooled_channel_weights(self, support_feats, mask, query_feats):
        """The ablation's cross-reference without attention: pooled vectors -> gates."""
        if mask is None:
            s_vec = support_feats.mean(dim=(0, 2, 3))
        else:
            s_vec = (support_feats * mask).sum(dim=(0, 2, 3)) / mask.sum().clamp_min(1e-5)
        return self.support_gate(s_vec[None]) * self.query_gate(query_feats.mean(dim=(2, 3)))

    def segment(self, support_feats, support_masks, query_feats):
        mask = self.support_mask(support_masks, support_feats)
        w = self.channel_weights(support_feats, mask, query_feats)  # [Q,C]
        fg, bg = self.prototypes(support_feats, mask)
        fg = PrototypeSet(fg.protos[None] * w[:, None], fg.logw)
        bg = PrototypeSet(bg.protos[None] * w[:, None], bg.logw)
        return self.upsample(self.score(query_feats * w[:, :, None, None], fg, bg), support_masks)
