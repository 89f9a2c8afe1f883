"""Small attention layers shared by crtpnet and dfdt.

Attention runs in a reduced inner width (``inner_dim`` < feature width): on a 2-core CPU
the projections, not the softmax, dominate, and these layers only steer the prototypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of ``x [B,Nq,C]`` over ``ctx [B,Nk,C]`` (no residual, no norm).

    ``project_out=False`` returns the heads concatenated (``[B,Nq,inner_dim]``): a caller
    that averages over tokens applies ``out`` after pooling, which is the same linear map
    on far fewer vectors.
    """

    def __init__(self, dim: int, inner_dim: int = 64, heads: int = 4, zero_out: bool = False):
        super().__init__()
        if inner_dim % heads:
            raise ValueError("inner_dim must be a multiple of heads")
        self.heads = heads
        self.q = nn.Linear(dim, inner_dim)
        self.kv = nn.Linear(dim, 2 * inner_dim)
        self.out = nn.Linear(inner_dim, dim)
        if zero_out:  # residual branch starts as identity (keeps pretrained features intact)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, ctx: torch.Tensor):
        """Projected keys/values of a context; compute once and reuse over rounds or queries."""
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x, ctx=None, *, kv=None, bias=None, project_out: bool = True):
        k, v = kv if kv is not None else self.keys_values(ctx)
        q = self.split(self.q(x))
        b = max(q.shape[0], k.shape[0])  # a batch of 1 on either side is shared by all
        q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.out(y) if project_out else y


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, zero_out: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))
        if zero_out:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


class ChannelGate(nn.Module):
    """FC-ReLU-FC-sigmoid on a pooled vector (squeeze-excitation style): ``[B,C] -> [B,C]``."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, max(dim // reduction, 8))
        self.fc2 = nn.Linear(max(dim // reduction, 8), dim)

    def forward(self, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))
