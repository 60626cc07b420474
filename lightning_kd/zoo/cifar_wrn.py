"""Wide ResNets of the distillation benchmarks: wrn_16_2, wrn_40_1, wrn_40_2.

Architecture of RepDistiller ``models/wrn.py`` (mdistiller ``mdistiller/models/cifar/wrn.py`` is the same), after
Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 stem with 16 channels, three stages of
``n = (depth - 4) / 6`` pre-activation blocks of widths ``16k, 32k, 64k`` at strides 1, 2, 2, a final BN-ReLU, global
pooling and ``fc``. Module names match RepDistiller's (``block1.layer.0.bn1``, ``convShortcut``, ...). Independent
implementation.

Feature maps (RepDistiller's ``feat``): ``conv1`` (32x32), ``block1`` (32x32), ``block2`` (16x16), ``block3``
(8x8) — stage outputs before the next BN-ReLU. RepDistiller's ``preact=True`` features are the outputs of
``block2.layer.0.bn1``, ``block3.layer.0.bn1`` and ``bn1``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from lightning_kd.zoo._base import CifarNet, build_cifar_model, cifar_cfg
from lightning_kd.zoo._layers import conv1x1, conv3x3, init_weights

__all__ = ["NetworkBlock", "PreActBlock", "WideResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity shortcut, or a 1x1 ``convShortcut`` (applied to the
    pre-activated input, as in RepDistiller) when the channel count changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_chs, out_chs)
        # the name is RepDistiller's (a state_dict key of the released checkpoints)
        self.convShortcut = conv1x1(in_chs, out_chs, stride) if in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One stage: ``layer``, a sequence of :class:`PreActBlock` (the first one strided)."""

    def __init__(self, blocks: int, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            PreActBlock(in_chs, out_chs, stride), *(PreActBlock(out_chs, out_chs, 1) for _ in range(blocks - 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """WRN-depth-k for 32x32 inputs.

    Args:
        depth: ``6n + 4`` (16, 40, ...).
        widen_factor: ``k``.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    head_path = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3) -> None:
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 28, 40, ...), got {depth}")
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        super().__init__(num_classes, widths[3])
        blocks = (depth - 4) // 6
        self.conv1 = conv3x3(in_chans, widths[0])
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = self.make_classifier(num_classes)
        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "conv1"},
            {"num_chs": widths[1], "reduction": 1, "module": "block1"},
            {"num_chs": widths[2], "reduction": 2, "module": "block2"},
            {"num_chs": widths[3], "reduction": 4, "module": "block3"},
        ]
        init_weights(self, linear="zero_bias")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))


default_cfgs = generate_default_cfgs(
    {
        name: cifar_cfg(first_conv="conv1", classifier="fc", pool_size=(8, 8))
        for name in ("wrn_16_2", "wrn_40_1", "wrn_40_2")
    }
)


def _create(variant: str, depth: int, widen_factor: int, pretrained: bool, **kwargs: Any) -> WideResNet:
    return build_cifar_model(
        WideResNet, variant, pretrained, num_stages=4, depth=depth, widen_factor=widen_factor, **kwargs
    )


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2: student of wrn_40_2."""
    return _create("wrn_16_2", 16, 2, pretrained, **kwargs)


@register_model
def wrn_40_1(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-1: student of wrn_40_2."""
    return _create("wrn_40_1", 40, 1, pretrained, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2: teacher of wrn_16_2, wrn_40_1 and ShuffleNetV1 (75.61 %)."""
    return _create("wrn_40_2", 40, 2, pretrained, **kwargs)
