"""ShuffleNets of the distillation benchmarks: shufflenetv1_cifar, shufflenetv2_cifar.

Architectures of RepDistiller ``models/ShuffleNetv1.py`` (``ShuffleV1``: groups 3, widths 240/480/960, 4/8/4 blocks)
and ``models/ShuffleNetv2.py`` (``ShuffleV2``: net size 1, widths 116/232/464, 3/7/3 basic blocks after a down block,
1x1 convolution to 1024); mdistiller ``mdistiller/models/cifar/ShuffleNetv*.py`` are the same. Both use a 1x1 stem of
24 channels at stride 1 (no max-pool), global pooling and a ``linear`` classifier. After Zhang et al., "ShuffleNet",
CVPR 2018, and Ma et al., "ShuffleNet V2", ECCV 2018, with RepDistiller's details kept (e.g. the ReLU after the
depthwise convolution of the V1 unit). Module names match RepDistiller's. Independent implementation.

Difference in structure, not in weights: the stem's ReLU (and V2's head ReLU) are modules here, ``relu`` (and
``relu2``), where RepDistiller calls ``F.relu``, so that the stem feature map ``feat[0]`` is the output of a module.

Feature maps at 32x32: ``relu`` (32x32), ``layer1`` (16x16), ``layer2`` (8x8), ``layer3`` (4x4). For V1 the
pre-activation of a stage (``preact=True``) is the input of ``layer<i>.<last>.relu_out``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from lightning_kd.zoo._base import CifarNet, build_cifar_model, cifar_cfg
from lightning_kd.zoo._layers import ChannelShuffle, conv1x1, conv3x3

__all__ = ["ShuffleNetV1", "ShuffleNetV2", "ShuffleV1Unit", "ShuffleV2DownUnit", "ShuffleV2Unit"]

STEM_CHS = 24


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 (BN, ReLU), channel shuffle, 3x3 depthwise (BN, ReLU), grouped 1x1 (BN); added to the input, or
    concatenated with its 3x3 average pool when strided; then ReLU (``relu_out``).

    Args:
        in_chs, out_chs: input channels and channels of the residual branch (at stride 2 the unit outputs
            ``in_chs + out_chs``).
        stride: 1 or 2.
        groups: groups of the 1x1 convolutions.
        first: the network's first unit, whose first 1x1 convolution is not grouped (its input is the stem's).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, first: bool = False) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        pw_groups = 1 if first else groups
        self.stride = stride
        self.conv1 = conv1x1(in_chs, mid_chs, groups=pw_groups)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.shuffle1 = ChannelShuffle(pw_groups)
        self.conv2 = conv3x3(mid_chs, mid_chs, stride, groups=mid_chs)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = conv1x1(mid_chs, out_chs, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu_out(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleV2Unit(nn.Module):
    """Split the channels in halves; the second goes through 1x1 (BN, ReLU), 3x3 depthwise (BN), 1x1 (BN, ReLU);
    concatenate with the first half and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv3x3(half, half, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class ShuffleV2DownUnit(nn.Module):
    """Spatial down-sampling unit: two strided branches (3x3 depthwise (BN), 1x1 (BN, ReLU) | 1x1 (BN, ReLU), 3x3
    depthwise (BN), 1x1 (BN, ReLU)) of ``out_chs / 2`` channels each, concatenated and shuffled."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        mid_chs = out_chs // 2
        self.conv1 = conv3x3(in_chs, in_chs, 2, groups=in_chs)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = conv1x1(in_chs, mid_chs)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = conv1x1(in_chs, mid_chs)
        self.bn3 = nn.BatchNorm2d(mid_chs)
        self.conv4 = conv3x3(mid_chs, mid_chs, 2, groups=mid_chs)
        self.bn4 = nn.BatchNorm2d(mid_chs)
        self.conv5 = conv1x1(mid_chs, mid_chs)
        self.bn5 = nn.BatchNorm2d(mid_chs)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class _ShuffleNetBase(CifarNet):
    """Stem (1x1 conv to 24 channels, BN, ``relu``), three stages ``layer1..3`` at stride 2 each, ``linear``."""

    head_path = "linear"

    def _init_stem(self, in_chans: int, widths: tuple[int, int, int]) -> None:
        self.conv1 = nn.Conv2d(in_chans, STEM_CHS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHS)
        self.relu = nn.ReLU()
        self.feature_info = [{"num_chs": STEM_CHS, "reduction": 1, "module": "relu"}] + [
            {"num_chs": w, "reduction": 2 ** (i + 1), "module": f"layer{i + 1}"} for i, w in enumerate(widths)
        ]

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class ShuffleNetV1(_ShuffleNetBase):
    """ShuffleNet V1 for 32x32 inputs.

    Args:
        widths: output channels of the three stages (240, 480, 960 for groups 3).
        blocks: units per stage (4, 8, 4).
        groups: groups of the 1x1 convolutions (3).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__(num_classes, widths[-1])
        self._init_stem(in_chans, widths)
        in_chs = STEM_CHS
        for i, (width, count) in enumerate(zip(widths, blocks)):
            units = []
            for j in range(count):
                # a strided unit concatenates its pooled input, so its branch makes up the rest of the width
                units.append(
                    ShuffleV1Unit(in_chs, width - in_chs if j == 0 else width, 2 if j == 0 else 1, groups, i == j == 0)
                )
                in_chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self.linear = self.make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_stages(x)


class ShuffleNetV2(_ShuffleNetBase):
    """ShuffleNet V2 for 32x32 inputs.

    Args:
        widths: output channels of the three stages and of the final 1x1 convolution (116, 232, 464, 1024).
        blocks: basic units per stage after the down-sampling unit (3, 7, 3).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__(num_classes, widths[3])
        self._init_stem(in_chans, widths[:3])
        in_chs = STEM_CHS
        for i, (width, count) in enumerate(zip(widths[:3], blocks)):
            units = [ShuffleV2DownUnit(in_chs, width), *(ShuffleV2Unit(width) for _ in range(count))]
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            in_chs = width
        self.conv2 = conv1x1(widths[2], widths[3])
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.linear = self.make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self._forward_stages(x))))


default_cfgs = generate_default_cfgs(
    {
        name: cifar_cfg(first_conv="conv1", classifier="linear", pool_size=(4, 4))
        for name in ("shufflenetv1_cifar", "shufflenetv2_cifar")
    }
)


@register_model
def shufflenetv1_cifar(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV1:
    """ShuffleNet V1, groups 3 (RepDistiller ``ShuffleV1``): student of resnet32x4 and wrn_40_2 (lr 0.01)."""
    return build_cifar_model(ShuffleNetV1, "shufflenetv1_cifar", pretrained, num_stages=4, **kwargs)


@register_model
def shufflenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNet V2 1x (RepDistiller ``ShuffleV2``): student of resnet32x4 (lr 0.01)."""
    return build_cifar_model(ShuffleNetV2, "shufflenetv2_cifar", pretrained, num_stages=4, **kwargs)
