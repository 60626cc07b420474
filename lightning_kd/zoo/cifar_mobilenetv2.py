"""MobileNetV2 of the distillation benchmarks at CIFAR width: mobilenetv2_cifar (``_cifar``: timm has ImageNet
MobileNetV2s).

Architecture of RepDistiller ``models/mobilenetv2.py`` ``mobile_half`` (from "Knowledge Distillation via Route
Constrained Optimization", Jin et al., ICCV 2019; mdistiller ``mdistiller/models/cifar/mobilenetv2.py`` is the same):
MobileNetV2 (Sandler et al., CVPR 2018) with width multiplier 0.5 and expansion 6 — a stride-2 3x3 stem of 16
channels, seven stages of inverted residuals (16, 24, 32, 64, 96, 160, 320 channels x 0.5; strides 1, 1, 2, 2, 1, 2,
1), a 1x1 convolution to 1280 channels, global pooling and ``classifier.0``. Module names match RepDistiller's.
Independent implementation.

Feature maps (RepDistiller's ``feat``) at 32x32: ``conv1`` (16x16), ``blocks.1`` (16x16), ``blocks.2`` (8x8),
``blocks.4`` (4x4), ``blocks.6`` (2x2).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from lightning_kd.zoo._base import CifarNet, build_cifar_model, cifar_cfg
from lightning_kd.zoo._layers import conv_bn, init_weights

__all__ = ["CifarMobileNetV2", "InvertedResidual"]

#: (expansion, channels, blocks, stride) per stage; ``None`` = the network's expansion ratio.
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
#: stages whose output is a RepDistiller feature map (``feat[1..4]``).
FEATURE_STAGES = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """1x1 expansion (BN, ReLU), 3x3 depthwise (BN, ReLU), 1x1 linear projection (BN), in one ``conv`` sequence;
    identity shortcut when stride is 1 and the width is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_chs * expand_ratio
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            *conv_bn(in_chs, hidden, 1),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn(hidden, out_chs, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 for 32x32 inputs.

    Args:
        expand_ratio: expansion of the inverted residuals after the first stage (6).
        width_mult: channel multiplier (0.5 in the benchmarks).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    head_path = "classifier"

    def __init__(
        self, expand_ratio: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3
    ) -> None:
        last_chs = int(1280 * width_mult) if width_mult > 1.0 else 1280
        super().__init__(num_classes, last_chs)
        in_chs = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn(in_chans, in_chs, 3, 2))
        self.feature_info = [{"num_chs": in_chs, "reduction": 2, "module": "conv1"}]
        stages: list[nn.Module] = []
        reduction = 2
        for i, (expansion, channels, blocks, stride) in enumerate(STAGES):
            out_chs = int(channels * width_mult)
            layers = []
            for j in range(blocks):
                layers.append(InvertedResidual(in_chs, out_chs, stride if j == 0 else 1, expansion or expand_ratio))
                in_chs = out_chs
            stages.append(nn.Sequential(*layers))
            reduction *= stride
            if i in FEATURE_STAGES:
                self.feature_info.append({"num_chs": out_chs, "reduction": reduction, "module": f"blocks.{i}"})
        self.blocks = nn.Sequential(*stages)
        self.conv2 = nn.Sequential(*conv_bn(in_chs, last_chs, 1))
        self.classifier = self.make_classifier(num_classes)
        init_weights(self, linear="normal")

    def make_classifier(self, num_classes: int) -> nn.Module:
        """RepDistiller's head is ``nn.Sequential(nn.Linear)`` (key ``classifier.0.weight``)."""
        return nn.Sequential(super().make_classifier(num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.blocks(self.conv1(x)))


default_cfgs = generate_default_cfgs(
    {"mobilenetv2_cifar": cifar_cfg(first_conv="conv1.0", classifier="classifier.0", pool_size=(2, 2))}
)


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 x0.5 (RepDistiller ``MobileNetV2`` / ``mobile_half``): student of vgg13 and ResNet50."""
    return build_cifar_model(CifarMobileNetV2, "mobilenetv2_cifar", pretrained, num_stages=5, **kwargs)
