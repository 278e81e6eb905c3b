"""Backbone trunks that give a mid-level and a high-level feature map.

Both trunks keep torchvision's module names, so torchvision's ImageNet state dicts load into
them key for key.

| trunk        | mid level (stride 8)        | high level (stride 16)       | top (stride 32, classifier)   |
|--------------|-----------------------------|------------------------------|-------------------------------|
| resnet50     | layer2: 512 x 28 x 28       | layer3: 1024 x 14 x 14       | layer4: 2048 x 7 x 7          |
| mobilenet_v2 | features[0:7]: 32 x 28 x 28 | features[7:14]: 96 x 14 x 14 | features[14:19]: 1280 x 7 x 7 |

(for MobileNetV2: the ends of its 32-channel and 96-channel stages)

Sizes are for a 224 input; any input size works (every map is ceil-halved per stride).

Those are the paper's tap points (``taps="paper"``). The product recipe taps one stage later
(``taps="late"``, no top stage, no classification branch): the head sees the trunk's best maps.

| trunk        | mid level (stride 16, frozen + cached)  | high level (stride 32, fine-tuned) |
|--------------|-----------------------------------------|------------------------------------|
| resnet50     | stem..layer3: 1024 x 14 x 14            | layer4: 2048 x 7 x 7               |
| mobilenet_v2 | features[0:14]: 96 x 14 x 14            | features[14:19]: 1280 x 7 x 7      |

EfficientNet-Lite trunks (``efficientnet_lite0/1/2``, see :mod:`.efficientnet_lite`) cut at the
same stage boundaries: paper taps at the ends of the stride-8 (40 channels for Lite0) and
stride-16 (112) stages, the rest plus the 1x1 head (1,280) as the top; late taps at the end of
the stride-16 stage and the whole rest including the head.

``taps="late_fine"`` is ``late`` plus a **fine** level: the end of the stride-8 stage (resnet50
layer2, 512 x 28 x 28; mobilenet_v2 ``features[0:7]``, 32; Lite0 ``_blocks[0:5]``, 40), which
AG-MAN's multi-level fusion adds to the high map as the paper adds layer2 to layer3
(:class:`MultiLevelFusion`). It lies inside the frozen part of the mid level, so a feature cache
holds it beside the mid maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2, resnet50

from agman_milvus.core.model.efficientnet_lite import (
    BN_EPS,
    HEAD_CHANNELS,
    LITE_MEAN,
    LITE_STD,
    STEM_CHANNELS,
    VARIANTS,
    SamePadConv2d,
    build_blocks,
)
from agman_milvus.core.model.transforms import IMAGENET_MEAN, IMAGENET_STD
from agman_milvus.core.model.weights import load_imagenet_state_dict

BACKBONES = ("resnet50", "mobilenet_v2", *VARIANTS)
#: ``(fine map or None, mid map)`` from one pass over the lower stages
Levels = tuple[torch.Tensor | None, torch.Tensor]
TAPS = ("paper", "late", "late_fine")
#: tap points whose mid level ends at the stride-16 stage (no top stage)
LATE_TAPS = ("late", "late_fine")


class Trunk(nn.Module):
    """A CNN cut into ``mid`` -> ``high`` -> ``top`` stages."""

    name: str
    mid_channels: int
    high_channels: int
    top_channels: int
    has_top: bool
    taps: str = "paper"
    #: channels of the fine (stride-8) level: 0 unless ``taps="late_fine"``
    fine_channels: int = 0
    #: a sequential trunk's block the fine level ends at: None without one
    _fine_end: int | None = None
    #: the input normalisation the trunk's ImageNet weights were trained with (0-1 scale)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def forward_mid(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[1]

    def forward_levels(self, x: torch.Tensor, tail_blocks: int = 0) -> Levels:
        """``(fine map or None, the mid level without its last tail_blocks blocks)`` in one pass:
        what a feature cache holds."""
        raise NotImplementedError

    def forward_high(self, mid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_top(self, high: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def high_stage(self) -> nn.Module:
        """The modules of the high level (what the product recipe fine-tunes)."""
        raise NotImplementedError

    def mid_tail(self, blocks: int) -> nn.ModuleList:
        """The last ``blocks`` blocks of the mid level (the product recipe may fine-tune them)."""
        if blocks:
            raise ValueError(f"{self.name}: fine-tuning mid-level blocks is not supported")
        return nn.ModuleList()

    def _set_fine(self, taps: str, channels: int, end: int | None = None) -> None:
        """The fine level's channels and end block, or none unless ``taps="late_fine"``."""
        fine = taps == "late_fine"
        self.fine_channels = channels if fine else 0
        self._fine_end = end if fine else None

    def forward_mid_tail(self, frozen: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """The mid map from the frozen map :meth:`forward_levels` gives with ``tail_blocks``:
        its last ``tail_blocks`` blocks."""
        for block in self.mid_tail(tail_blocks):
            frozen = block(frozen)
        return frozen

    def load_imagenet(self) -> None:
        """Overwrite the trunk with its ImageNet weights (installed locally, never downloaded)."""
        state = load_imagenet_state_dict(self.name)
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(matched))
        if missing:
            raise RuntimeError(f"ImageNet weights for {self.name} lack keys: {missing[:5]}")
        self.load_state_dict(matched, strict=True)


class ResNet50Trunk(Trunk):
    """torchvision ResNet-50 (Bottleneck [3, 4, 6, 3]) without its fc layer."""

    name = "resnet50"
    mid_channels, high_channels, top_channels = 512, 1024, 2048

    def __init__(self, with_top: bool = True, taps: str = "paper") -> None:
        super().__init__()
        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.taps = taps
        self.has_top = with_top and taps == "paper"
        self._set_fine(taps, 512)
        if taps in LATE_TAPS:
            self.mid_channels, self.high_channels = 1024, 2048
        if with_top or taps in LATE_TAPS:
            self.layer4 = net.layer4
        _init_like_reference(self)

    def forward_levels(self, x: torch.Tensor, tail_blocks: int = 0) -> Levels:
        if tail_blocks:
            raise ValueError(f"{self.name}: fine-tuning mid-level blocks is not supported")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        if self.taps not in LATE_TAPS:
            return None, x
        return (x if self.fine_channels else None), self.layer3(x)

    def forward_high(self, mid: torch.Tensor) -> torch.Tensor:
        return self.high_stage()(mid)

    def high_stage(self) -> nn.Module:
        return self.layer4 if self.taps in LATE_TAPS else self.layer3

    def forward_top(self, high: torch.Tensor) -> torch.Tensor:
        return self.layer4(high)


class MobileNetV2Trunk(Trunk):
    """torchvision MobileNetV2 ``features`` cut at the ends of its stride-8 and stride-16 stages
    (``taps="paper"``) or of its stride-16 stage and the whole of ``features`` (``taps="late"``)."""

    name = "mobilenet_v2"
    mid_channels, high_channels, top_channels = 32, 96, 1280
    _MID_END, _HIGH_END = 7, 14
    _FINE_END = 7  # the stride-8 stage's end

    def __init__(self, with_top: bool = True, taps: str = "paper") -> None:
        super().__init__()
        features = mobilenet_v2(weights=None).features
        self.taps = taps
        self.has_top = with_top and taps == "paper"
        self._set_fine(taps, 32, self._FINE_END)
        if taps in LATE_TAPS:
            self._MID_END, self._HIGH_END = 14, 19
            self.mid_channels, self.high_channels = 96, 1280
        self.features = features if with_top or taps in LATE_TAPS else features[: self._HIGH_END]

    def _run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for layer in self.features[start:end]:
            x = layer(x)
        return x

    def forward_levels(self, x: torch.Tensor, tail_blocks: int = 0) -> Levels:
        _check_tail(tail_blocks, self._MID_END)
        return _levels(x, self._run, self._fine_end, self._MID_END - tail_blocks)

    def forward_high(self, mid: torch.Tensor) -> torch.Tensor:
        return self._run(mid, self._MID_END, self._HIGH_END)

    def high_stage(self) -> nn.Module:
        return self.features[self._MID_END : self._HIGH_END]

    def mid_tail(self, blocks: int) -> nn.ModuleList:
        _check_tail(blocks, self._MID_END)
        return nn.ModuleList(self.features[self._MID_END - blocks : self._MID_END] if blocks else [])

    def forward_top(self, high: torch.Tensor) -> torch.Tensor:
        return self._run(high, self._HIGH_END, len(self.features))


class EfficientNetLiteTrunk(Trunk):
    """An EfficientNet-Lite variant cut at its stage boundaries (module names as the shipped
    ImageNet state dicts have them)."""

    mean, std = LITE_MEAN, LITE_STD

    def __init__(self, variant: str, with_top: bool = True, taps: str = "paper") -> None:
        super().__init__()
        lite = build_blocks(variant)
        self.name, self.taps = variant, taps
        self.has_top = with_top and taps == "paper"
        ends, channels = lite.stage_ends, lite.stage_channels
        self._set_fine(taps, channels[2], ends[2])
        if taps in LATE_TAPS:  # mid: stride-16 end; high: the rest with the head
            self._mid_end, self._high_end = ends[4], ends[-1]
            self.mid_channels, self.high_channels = channels[4], HEAD_CHANNELS
        else:  # mid: stride-8 end; high: stride-16 end; top: the rest with the head
            self._mid_end, self._high_end = ends[2], ends[4]
            self.mid_channels, self.high_channels = channels[2], channels[4]
        self.top_channels = HEAD_CHANNELS
        keeps_head = taps in LATE_TAPS or self.has_top
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        self._blocks = lite.blocks if keeps_head else lite.blocks[: self._high_end]
        if keeps_head:
            self._conv_head = SamePadConv2d(channels[-1], HEAD_CHANNELS, 1)
            self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)

    def _run(self, x: torch.Tensor, start: int, end: int, head: bool) -> torch.Tensor:
        for block in self._blocks[start:end]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))) if head else x

    def forward_levels(self, x: torch.Tensor, tail_blocks: int = 0) -> Levels:
        _check_tail(tail_blocks, self._mid_end)
        stem = F.relu6(self._bn0(self._conv_stem(x)))
        return _levels(stem, lambda y, start, end: self._run(y, start, end, head=False),
                       self._fine_end, self._mid_end - tail_blocks)

    def mid_tail(self, blocks: int) -> nn.ModuleList:
        _check_tail(blocks, self._mid_end)
        return nn.ModuleList(self._blocks[self._mid_end - blocks : self._mid_end] if blocks else [])

    def forward_high(self, mid: torch.Tensor) -> torch.Tensor:
        return self._run(mid, self._mid_end, self._high_end, head=self.taps in LATE_TAPS)

    def high_stage(self) -> nn.Module:
        stage = list(self._blocks[self._mid_end : self._high_end])
        return nn.ModuleList(stage + [self._conv_head, self._bn1] if self.taps in LATE_TAPS else stage)

    def forward_top(self, high: torch.Tensor) -> torch.Tensor:
        return self._run(high, self._high_end, len(self._blocks), head=True)


def _levels(x: torch.Tensor, run: Callable[[torch.Tensor, int, int], torch.Tensor], fine_end: int | None,
            end: int) -> Levels:
    """``(fine, mid)`` of a sequential trunk: ``run(x, start, end)`` runs blocks [start, end);
    the fine map is the output of block ``fine_end`` (None: no fine level), the mid map of ``end``."""
    if fine_end is None:
        return None, run(x, 0, end)
    if end < fine_end:
        raise ValueError("the fine level must stay frozen: fine-tune fewer mid-level blocks")
    fine = run(x, 0, fine_end)
    return fine, run(fine, fine_end, end)


def _check_tail(blocks: int, mid_blocks: int) -> None:
    if not 0 <= blocks < mid_blocks:
        raise ValueError(f"the mid level has {mid_blocks} blocks: fine-tune 0 to {mid_blocks - 1} of them")


def _init_like_reference(module: nn.Module) -> None:
    """Reference init: every Conv2d ~ N(0, sqrt(2 / (k*k*out))), BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_trunk(name: str, *, with_top: bool = True, pretrained: str | None = None,
                taps: str = "paper") -> Trunk:
    """A trunk by name; ``pretrained="imagenet"`` loads its ImageNet weights (see :mod:`.weights`).

    ``taps="late"`` moves the mid/high levels one stage up and has no top stage (``with_top``
    is then irrelevant); ``taps="late_fine"`` also gives the stride-8 stage's map as a fine level.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if taps not in TAPS:
        raise ValueError(f"unknown tap points {taps!r}; use one of {', '.join(TAPS)}")
    trunk: Trunk
    if name in VARIANTS:
        trunk = EfficientNetLiteTrunk(name, with_top=with_top, taps=taps)
    else:
        torchvision_trunk = {"resnet50": ResNet50Trunk, "mobilenet_v2": MobileNetV2Trunk}[name]
        trunk = torchvision_trunk(with_top=with_top, taps=taps)
    if pretrained in ("imagenet", "IMAGENET1K_V1"):
        trunk.load_imagenet()
    elif pretrained not in (None, False, "", "none"):
        raise ValueError(f"unknown pretrained weights {pretrained!r}; use None or 'imagenet'")
    return trunk


class MultiLevelFusion(nn.Module):
    """AG-MAN's multi-level map: maxpool(3,2,1)(mid) -> 1x1 conv (+bias) added to high; with a
    fine level (``fine_channels`` > 0), also adaptive-max-pool(fine) to high's size -> its own
    1x1 conv (+bias).

    Returns ``(fused, x_local)`` with ``fused = concat[high, x_local]`` and ``x_local`` high plus
    the projected lower levels.
    """

    def __init__(self, mid_channels: int, high_channels: int, fine_channels: int = 0) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv1_1 = nn.Conv2d(mid_channels, high_channels, kernel_size=1, bias=True)
        nn.init.normal_(self.conv1_1.weight, 0.0, math.sqrt(2.0 / high_channels))
        self.fine_conv: nn.Conv2d | None = None
        if fine_channels:
            self.fine_conv = nn.Conv2d(fine_channels, high_channels, kernel_size=1, bias=True)
            nn.init.normal_(self.fine_conv.weight, 0.0, math.sqrt(2.0 / high_channels))

    def forward(self, mid: torch.Tensor, high: torch.Tensor,
                fine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_local = high + self.conv1_1(self.pool(mid))
        if self.fine_conv is not None:
            if fine is None:
                raise ValueError("this fusion has a fine level: pass the trunk's fine map")
            x_local = x_local + self.fine_conv(F.adaptive_max_pool2d(fine, high.shape[-2:]))
        return torch.cat([high, x_local], dim=1), x_local
