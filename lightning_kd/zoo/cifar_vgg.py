"""CIFAR VGGs of the distillation benchmarks: vgg8_cifar, vgg13_cifar (``_cifar``: timm's ``vgg13`` is the ImageNet
model).

Architecture of RepDistiller ``models/vgg.py`` with batch norm (``vgg8_bn``, ``vgg13_bn``; mdistiller
``mdistiller/models/cifar/vgg.py`` is the same): five blocks of 3x3 conv (with bias) + BN + ReLU, widths 64/128/256/512/
512 (vgg8: one conv per block; vgg13: two), max-pooling after blocks 0-2 (and after block 3 only for 64x64 inputs, as
in RepDistiller), global average pooling and one linear ``classifier`` (no FC stack). Independent implementation.

Difference in structure, not in weights: RepDistiller drops each block's last ReLU and applies it in ``forward``; here
the ReLU stays at the end of the block's ``nn.Sequential`` (same index, no parameters, so the state_dict keys are
identical), which makes each feature map ``feat[i]`` the output of module ``block<i>``. The pre-activation
(``preact=True``) is the output of ``block<i>.<len-2>``, the block's last BatchNorm.

Feature maps at 32x32: ``block0`` (32x32), ``block1`` (16x16), ``block2`` (8x8), ``block3`` (4x4), ``block4`` (4x4).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from lightning_kd.zoo._base import CifarNet, build_cifar_model, cifar_cfg
from lightning_kd.zoo._layers import conv_bn, init_weights

__all__ = ["CifarVGG"]

#: conv widths per block (RepDistiller ``cfg['S']`` and ``cfg['B']``).
VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(CifarNet):
    """VGG with BN for 32x32 inputs.

    Args:
        widths: conv widths of the five blocks.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
    """

    head_path = "classifier"

    def __init__(self, widths: tuple[tuple[int, ...], ...], num_classes: int = 100, in_chans: int = 3) -> None:
        if len(widths) != 5:
            raise ValueError(f"CifarVGG needs the conv widths of 5 blocks, got {len(widths)}")
        super().__init__(num_classes, widths[-1][-1])
        in_chs = in_chans
        self.feature_info = []
        for i, block_widths in enumerate(widths):
            layers: list[nn.Module] = []
            for width in block_widths:
                layers += conv_bn(in_chs, width, 3, bias=True)
                in_chs = width
            self.add_module(f"block{i}", nn.Sequential(*layers))
            self.feature_info.append({"num_chs": in_chs, "reduction": 2 ** min(i, 3), "module": f"block{i}"})
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.classifier = self.make_classifier(num_classes)
        init_weights(self, linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if height == 64:  # RepDistiller pools after block 3 only for 64x64 inputs (Tiny-ImageNet)
            x = self.pool3(x)
        return self.block4(x)


default_cfgs = generate_default_cfgs(
    {
        name: cifar_cfg(first_conv="block0.0", classifier="classifier", pool_size=(4, 4))
        for name in ("vgg8_cifar", "vgg13_cifar")
    }
)


@register_model
def vgg8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-8 with BN (RepDistiller ``vgg8``): student of vgg13 and ResNet50."""
    return build_cifar_model(CifarVGG, "vgg8_cifar", pretrained, num_stages=5, widths=VGG_CFGS["vgg8"], **kwargs)


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-13 with BN (RepDistiller ``vgg13``): teacher of vgg8 and MobileNetV2 (74.64 %)."""
    return build_cifar_model(CifarVGG, "vgg13_cifar", pretrained, num_stages=5, widths=VGG_CFGS["vgg13"], **kwargs)
