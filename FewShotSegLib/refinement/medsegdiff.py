"""MedSegDiff-V2 (Wu et al., seed paper 003), sized for a CPU: a diffusion denoiser over a
mask crop, conditioned on the image through an HLF-Net condition network.

The denoiser sees the noisy mask x_t and the coarse mask (the anchor); the condition
network sees the image and the anchor, runs ONCE per slice (`encode_condition`) and its
outputs are reused for every step and every one of the K samples. The denoiser predicts
x0 (as logits), which makes a 4-step DDIM start from the noised coarse mask possible.

Our reading of the paper where it is ambiguous (each changes the weights):
* Anchor condition / U-SA: f_c is the condition network's finest decoder feature; the
  learnable Gaussian is a depthwise 5x5 kernel with one learnable sigma per channel
  (normalised to sum 1); conv1x1(f_anc) gives ONE spatial attention channel that scales all
  denoiser channels (a spatial attention, as its name says); it acts on the denoiser's
  first-level features f_d^0.
* Semantic condition / SS-Former: at the denoiser's bottleneck. Block = (1) the semantic
  embedding (condition decoder feature at that resolution) attends to the NBP-filtered
  noise embedding, (2) the noise embedding attends to the result, (3) an MLP; pre-norm,
  residual. The NBP filter acts on the noise embedding before it is attended to.
* NBP filter: the spectrum is a function of the radial frequency only (8 Gaussian bands on
  [0, 1] x Nyquist, so it does not depend on the crop size), per channel, its band gains
  produced from the step embedding by a linear layer: A(f, t) = 2 sigmoid(sum_b w_b(t) phi_b(f)).
  The layer starts at zero, i.e. the identity filter.
* The anchor network also gets a head (its own rough mask), supervised with the same loss
  at a lower weight: that is what makes its features an "anchor".
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hlfnet import HLFNet, group_norm


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar(t) for t = 0..T-1 (Nichol & Dhariwal cosine schedule)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = (f / f[0])[1:]
    return alpha_bar.clamp(1e-5, 0.9999).float()


class LearnableGaussian(nn.Module):
    """Depthwise Gaussian blur whose per-channel sigma is learned."""

    def __init__(self, channels: int, size: int = 5, sigma: float = 1.0):
        super().__init__()
        self.size = size
        self.log_sigma = nn.Parameter(torch.full((channels,), math.log(sigma)))

    def kernel(self) -> torch.Tensor:
        r = torch.arange(self.size, dtype=torch.float32, device=self.log_sigma.device) - (self.size - 1) / 2
        sigma = self.log_sigma.exp().clamp(0.3, 10.0)[:, None]
        g = torch.exp(-0.5 * (r[None] / sigma) ** 2)
        g = g / g.sum(1, keepdim=True)
        return (g[:, :, None] * g[:, None, :])[:, None]        # [C,1,k,k]

    def forward(self, x):
        return F.conv2d(x, self.kernel(), padding=self.size // 2, groups=x.shape[1])


class USA(nn.Module):
    """Uncertain spatial attention: f_anc = max(G * f_c, f_c); f_d' = sigmoid(conv1x1(f_anc)) f_d + f_d."""

    def __init__(self, cond_channels: int):
        super().__init__()
        self.gauss = LearnableGaussian(cond_channels)
        self.attn = nn.Conv2d(cond_channels, 1, 1)

    def anchor(self, f_c):
        return torch.maximum(self.gauss(f_c), f_c)

    def gate(self, f_c):
        """sigmoid(conv1x1(f_anc)): depends on the condition only, so it is cached per slice."""
        return torch.sigmoid(self.attn(self.anchor(f_c)))

    def forward(self, f_d, f_c):
        return self.gate(f_c) * f_d + f_d


class NBPFilter(nn.Module):
    """Step-dependent radial band-pass filter in the 2D Fourier domain (identity at init)."""

    def __init__(self, channels: int, temb_dim: int, bands: int = 8):
        super().__init__()
        self.channels, self.bands = channels, bands
        self.gain = nn.Linear(temb_dim, channels * bands)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.gain.bias)
        self.register_buffer("centres", torch.linspace(0.0, 1.0, bands), persistent=False)

    def spectrum(self, temb, h: int, w: int) -> torch.Tensor:
        """A(f, t): [B, C, h, w//2+1], values in (0, 2)."""
        fy = torch.fft.fftfreq(h, device=temb.device).abs()[:, None]
        fx = torch.fft.rfftfreq(w, device=temb.device)[None, :]
        radius = torch.sqrt(fy ** 2 + fx ** 2) / math.sqrt(0.5)              # 0 .. 1 (corner)
        width = 1.0 / max(1, self.bands - 1)
        phi = torch.exp(-0.5 * ((radius[None] - self.centres[:, None, None]) / width) ** 2)
        phi = phi / phi.sum(0, keepdim=True)                                  # partition of unity
        weights = self.gain(temb).view(-1, self.channels, self.bands)
        return 2.0 * torch.sigmoid(torch.einsum("bcn,nhw->bchw", weights, phi))

    def forward(self, x, temb):
        h, w = x.shape[-2:]
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        out = torch.fft.irfft2(spec * self.spectrum(temb, h, w), s=(h, w), norm="ortho")
        return out.to(x.dtype)


class SSFormer(nn.Module):
    """Cross-attention between the noise embedding and the semantic embedding, the noise
    side aligned by the NBP filter first. ``forward`` takes the semantic embedding already
    projected by ``sem_proj`` (done once per slice in `MedSegDiffV2.encode_condition`)."""

    def __init__(self, channels: int, sem_channels: int, temb_dim: int, heads: int = 4):
        super().__init__()
        self.sem_proj = nn.Conv2d(sem_channels, channels, 1)
        self.nbp = NBPFilter(channels, temb_dim)
        self.norm_s, self.norm_n1 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.norm_n2, self.norm_s2, self.norm_f = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.sem_from_noise = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.noise_from_sem = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, noise, semantic, temb):
        b, c, h, w = noise.shape
        tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  [B, hw, C]
        sem = tokens(semantic)                 # already projected by sem_proj (cached per slice)
        filt = self.norm_n1(tokens(self.nbp(noise, temb)))
        q = self.norm_s(sem)
        sem = sem + self.sem_from_noise(q, filt, filt, need_weights=False)[0]
        n = tokens(noise)
        kv = self.norm_s2(sem)
        n = n + self.noise_from_sem(self.norm_n2(n), kv, kv, need_weights=False)[0]
        n = n + self.mlp(self.norm_f(n))
        return n.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class MedSegDiffV2(nn.Module):
    """x0-predicting mask denoiser with anchor (U-SA) and semantic (SS-Former) conditions."""

    name = "medsegdiff_v2"

    def __init__(self, crop_size: int = 96, channels=(16, 32, 64, 128),
                 cond_channels=(16, 32, 64, 128, 256), timesteps: int = 1000, heads: int = 4,
                 groups: int = 8, anchor_weight: float = 0.5, **_ignored):
        super().__init__()
        channels, cond_channels = [int(c) for c in channels], [int(c) for c in cond_channels]
        if len(cond_channels) < len(channels):
            raise ValueError("the condition network needs at least as many levels as the denoiser")
        self.config = {"crop_size": int(crop_size), "channels": channels, "cond_channels": cond_channels,
                       "timesteps": int(timesteps), "heads": int(heads), "groups": int(groups),
                       "anchor_weight": float(anchor_weight)}
        divisor = 2 ** (len(cond_channels) - 1)
        if crop_size % divisor:
            raise ValueError(f"crop_size must be a multiple of {divisor}")
        self.crop_size, self.timesteps = int(crop_size), int(timesteps)
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps), persistent=False)
        self.condition = HLFNet(in_channels=2, out_channels=1, channels=cond_channels, groups=groups)
        self.sem_index = len(cond_channels) - len(channels)   # condition level at the bottleneck size
        temb = 4 * channels[0]
        self.temb_dim = temb
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inc = nn.Conv2d(2, channels[0], 3, padding=1)
        self.usa = USA(cond_channels[0])
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            self.enc.append(ResBlock(cin, c, temb, groups))
            self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(channels) - 1 else nn.Identity())
            cin = c
        top = channels[-1]
        self.mid1 = ResBlock(top, top, temb, groups)
        self.ssformer = SSFormer(top, cond_channels[-1 - self.sem_index], temb, heads)
        self.mid2 = ResBlock(top, top, temb, groups)
        self.dec = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.dec.append(ResBlock(channels[i + 1] + channels[i], channels[i], temb, groups))
        self.out = nn.Sequential(group_norm(channels[0], groups), nn.SiLU(), nn.Conv2d(channels[0], 1, 1))

    # -- condition: once per slice ---------------------------------------------------
    def encode_condition(self, image: torch.Tensor, anchor: torch.Tensor) -> dict:
        """image [B,1,S,S] normalised, anchor [B,1,S,S] coarse mask in {0,1}."""
        feats = self.condition.features(torch.cat([image, anchor * 2.0 - 1.0], 1))
        return {"usa_gate": self.usa.gate(feats[-1]), "semantic": self.ssformer.sem_proj(feats[self.sem_index]),
                "anchor_logits": self.condition.head(feats[-1]), "anchor": anchor}

    @staticmethod
    def repeat_condition(cond: dict, k: int) -> dict:
        """The same condition for K samples of each slice (sample-major inside each slice)."""
        return {key: value.repeat_interleave(k, 0) for key, value in cond.items()}

    # -- denoiser: every step ---------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """x0 logits [B,1,S,S] from x_t [B,1,S,S] in [-1,1]-ish and integer steps t [B]."""
        temb = self.time_mlp(timestep_embedding(t, self.config["channels"][0]))
        h = self.inc(torch.cat([x_t, cond["anchor"] * 2.0 - 1.0], 1))
        h = cond["usa_gate"] * h + h                      # U-SA with the cached gate
        skips = []
        for block, down in zip(self.enc, self.down):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, temb)
        h = self.ssformer(h, cond["semantic"], temb)
        h = self.mid2(h, temb)
        for block, skip in zip(self.dec, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), temb)
        return self.out(h)

    def forward(self, x_t, t, image, anchor):
        """Training entry: (x0 logits, the condition network's own anchor logits)."""
        cond = self.encode_condition(image, anchor)
        return self.denoise(x_t, t, cond), cond["anchor_logits"]

    # -- diffusion ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def step_schedule(self, steps: int, start_t: float) -> list[int]:
        """Decreasing integer steps, the first at start_t * T; the last x0 prediction is the output."""
        t0 = max(1, min(self.timesteps - 1, int(round(start_t * (self.timesteps - 1)))))
        return [max(1, int(round(t0 * (steps - i) / steps))) for i in range(steps)]

    @torch.no_grad()
    def sample(self, image: torch.Tensor, anchor: torch.Tensor, samples: int = 4, steps: int = 4,
               start_t: float = 0.5, generator: torch.Generator | None = None, eta: float = 0.0,
               cond: dict | None = None, before_step=None) -> torch.Tensor:
        """K refinements per crop by DDIM from the noised anchor: probabilities [B,K,S,S].
        ``before_step()`` is called before each denoising pass (Cancel is checked there: a
        batch of many samples and steps takes seconds on a CPU)."""
        b = image.shape[0]
        cond = self.repeat_condition(cond or self.encode_condition(image, anchor), samples)
        ts = self.step_schedule(steps, start_t)
        shape = (b * samples, 1) + tuple(image.shape[-2:])
        noise = torch.randn(shape, generator=generator, dtype=image.dtype, device="cpu").to(image.device)
        x0_anchor = cond["anchor"] * 2.0 - 1.0
        x = self.q_sample(x0_anchor, torch.full((shape[0],), ts[0], dtype=torch.long, device=image.device), noise)
        logits = None
        for i, t in enumerate(ts):
            if before_step is not None:
                before_step()
            tt = torch.full((shape[0],), t, dtype=torch.long, device=image.device)
            logits = self.denoise(x, tt, cond)
            if i == len(ts) - 1:
                break
            x0 = torch.tanh(logits / 2)                     # = 2 sigmoid(logits) - 1
            ab, ab_next = self.alpha_bar[t], self.alpha_bar[ts[i + 1]]
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).sqrt()
            x = ab_next.sqrt() * x0 + (1 - ab_next - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0:
                z = torch.randn(shape, generator=generator, dtype=image.dtype, device="cpu").to(image.device)
                x = x + sigma * z
        return torch.sigmoid(logits).view(b, samples, *image.shape[-2:])
