"""CIFAR ResNets of the distillation benchmarks: resnet20/32/56/110 and the 4x-wide resnet8x4/resnet32x4.

Architecture of RepDistiller ``models/resnet.py`` (CRD, Tian et al., ICLR 2020; copied by mdistiller
``mdistiller/models/cifar/resnet.py``), after He et al., "Deep Residual Learning", CVPR 2016, section 4.2: a 3x3 stem,
three stages of ``n = (depth - 2) / 6`` basic blocks at strides 1, 2, 2, and a 1x1-convolution + BN projection
shortcut ("option B") wherever the shape changes. Module names match RepDistiller's, so its checkpoints load as they
are. Independent implementation.

Feature maps (RepDistiller's ``feat``): ``relu`` (stem, 32x32), ``layer1`` (32x32), ``layer2`` (16x16), ``layer3``
(8x8). The pre-activation of a stage (``preact=True``) is the input of ``layer<i>.<last>.relu_out``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from lightning_kd.zoo._base import CifarNet, build_cifar_model, cifar_cfg
from lightning_kd.zoo._layers import conv1x1, conv3x3, init_weights

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (``relu_out``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = (
            nn.Sequential(conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))
            if stride != 1 or in_chs != out_chs
            else None
        )
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class CifarResNet(CifarNet):
    """ResNet for 32x32 inputs.

    Args:
        depth: ``6n + 2`` (8, 20, 32, 56, 110, ...).
        widths: channels of the stem and of the three stages (``[16, 16, 32, 64]``; x4: ``[32, 64, 128, 256]``).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    head_path = "fc"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_chans: int = 3):
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 56, 110, ...), got {depth}")
        super().__init__(num_classes, widths[3])
        blocks = (depth - 2) // 6
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks, stride=2)
        self.fc = self.make_classifier(num_classes)
        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "relu"},
            {"num_chs": widths[1], "reduction": 1, "module": "layer1"},
            {"num_chs": widths[2], "reduction": 2, "module": "layer2"},
            {"num_chs": widths[3], "reduction": 4, "module": "layer3"},
        ]
        init_weights(self, linear="default")

    @staticmethod
    def _make_stage(in_chs: int, out_chs: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_chs, out_chs, stride), *(BasicBlock(out_chs, out_chs) for _ in range(blocks - 1))
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return cifar_cfg(first_conv="conv1", classifier="fc", pool_size=(8, 8), **kwargs)


default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in ("resnet8x4", "resnet32x4", "resnet20", "resnet32", "resnet56", "resnet110")}
)

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _create(variant: str, depth: int, widths: tuple[int, ...], pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, num_stages=4, depth=depth, widths=widths, **kwargs)


@register_model
def resnet8x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8x4 (widths 32/64/128/256, 1 block per stage): student of resnet32x4 in the CRD/DKD tables."""
    return _create("resnet8x4", 8, _WIDE, pretrained, **kwargs)


@register_model
def resnet32x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32x4 (widths 32/64/128/256, 5 blocks per stage): the most cited CIFAR-100 teacher (79.42 %)."""
    return _create("resnet32x4", 32, _WIDE, pretrained, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (3 blocks per stage): student of resnet56 and resnet110."""
    return _create("resnet20", 20, _NARROW, pretrained, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (5 blocks per stage): student of resnet110."""
    return _create("resnet32", 32, _NARROW, pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (9 blocks per stage): teacher of resnet20."""
    return _create("resnet56", 56, _NARROW, pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (18 blocks per stage): teacher of resnet20 and resnet32."""
    return _create("resnet110", 110, _NARROW, pretrained, **kwargs)
