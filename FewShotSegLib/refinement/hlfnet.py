"""HLF-Net (Wang et al., seed paper 002): a U-Net whose encoder blocks are LFE and whose
decoder fuses skips with HFE.

It serves twice: alone as a supervised 2D segmenter (`hlfnet` in the refiner registry) and
as the condition network of `medsegdiff_v2`, which reads its decoder features.

Choices where the paper is silent (recorded here because they change the weights):
* conv block = 3x3 conv + GroupNorm + ReLU, twice per level (U-Net habit; the paper shows
  one block per box in Fig. 3).
* LFE's semantic branch works at half the block's width (min 8 channels), two max-pool
  down-samplings and two bilinear up-samplings with additive skips, as Fig. 2.
* HFE: the high-level input U is bilinearly up-sampled and projected (1x1) to the skip's
  width before the concatenation Y = [X, U]; channel reduction ratio 4 in the squeeze MLP.
* The network returns logits; the paper's final Sigmoid lives in the loss / the caller.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    g = groups
    while channels % g:
        g //= 2
    return nn.GroupNorm(max(1, g), channels)


class ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm -> ReLU, ``n`` times."""

    def __init__(self, cin: int, cout: int, n: int = 2, groups: int = 8):
        super().__init__()
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                       group_norm(cout, groups), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class LFE(nn.Module):
    """Low-level feature enhancement: out = (1 + sigmoid(s')) * trunk(x).

    s' comes from a mini encoder-decoder over x, so every encoder level sees a wider,
    more semantic context than its own receptive field.
    """

    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.trunk = ConvBlock(cin, cout, 2, groups)
        mid = max(8, cout // 2)
        self.enc0 = ConvBlock(cin, mid, 1, groups)
        self.enc1 = ConvBlock(mid, mid, 1, groups)
        self.enc2 = ConvBlock(mid, mid, 1, groups)
        self.dec1 = ConvBlock(mid, mid, 1, groups)
        self.dec0 = ConvBlock(mid, mid, 1, groups)
        self.project = nn.Conv2d(mid, 1, 1)
        self.last_map = None  # the semantic embedded map, kept for inspection / figures

    def semantic_map(self, x):
        e0 = self.enc0(x)
        e1 = self.enc1(F.max_pool2d(e0, 2, ceil_mode=True))
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        d1 = self.dec1(F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False) + e1)
        d0 = self.dec0(F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False) + e0)
        return torch.sigmoid(self.project(d0))

    def forward(self, x):
        s = self.semantic_map(x)
        self.last_map = s.detach()
        return (1.0 + s) * self.trunk(x)


class HFE(nn.Module):
    """High-level feature enhancement: channel and spatial recalibration of Y = [X, U]
    with residual (1 + z) weights, concatenated and fused by a 3x3 conv."""

    def __init__(self, skip_ch: int, high_ch: int, cout: int, groups: int = 8, reduction: int = 4):
        super().__init__()
        self.up_proj = nn.Conv2d(high_ch, skip_ch, 1, bias=False)
        c2 = 2 * skip_ch
        self.channel = nn.Sequential(nn.Conv2d(c2, max(4, c2 // reduction), 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(max(4, c2 // reduction), c2, 1), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(c2, 1, 1), nn.Sigmoid())
        self.fuse = nn.Sequential(nn.Conv2d(2 * c2, cout, 3, padding=1, bias=False),
                                  group_norm(cout, groups), nn.ReLU(inplace=True))
        self.refine = ConvBlock(cout, cout, 1, groups)

    def forward(self, skip, high):
        up = self.up_proj(F.interpolate(high, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        y = torch.cat([skip, up], 1)
        z = self.channel(F.adaptive_avg_pool2d(y, 1))
        s = self.spatial(y)
        return self.refine(self.fuse(torch.cat([(1.0 + z) * y, (1.0 + s) * y], 1)))


class HLFNet(nn.Module):
    """Encoder of LFE blocks (4 down-samplings), decoder of HFE fusions, 1x1 head (logits)."""

    name = "hlfnet"

    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 channels=(16, 32, 64, 128, 256), groups: int = 8, **_ignored):
        super().__init__()
        channels = [int(c) for c in channels]
        self.config = {"in_channels": int(in_channels), "out_channels": int(out_channels),
                       "channels": channels, "groups": int(groups)}
        self.encoder = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.encoder.append(LFE(cin, c, groups))
            cin = c
        self.decoder = nn.ModuleList(HFE(channels[i], channels[i + 1], channels[i], groups)
                                     for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    @property
    def divisor(self) -> int:
        """Input sides must be a multiple of this (one halving per encoder level)."""
        return 2 ** (len(self.encoder) - 1)

    def features(self, x) -> list[torch.Tensor]:
        """Decoder outputs from the coarsest to the finest (full resolution) level."""
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        feats = [x]
        for j, fuse in enumerate(self.decoder):
            x = fuse(skips[-2 - j], x)
            feats.append(x)
        return feats

    def forward(self, x):
        return self.head(self.features(x)[-1])
