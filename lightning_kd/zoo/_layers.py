"""Building blocks shared by the CIFAR zoo families (written once, used by every family file).

Activations are never in-place, so the output of any module captured by a layer tap keeps its value after the
next layer runs (an in-place ReLU would silently overwrite a captured BatchNorm output).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, *, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (RepDistiller ``models/resnet.py`` ``conv3x3``)."""
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1, *, groups: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, groups=groups, bias=False)


def conv_bn(
    in_chs: int,
    out_chs: int,
    kernel_size: int,
    stride: int = 1,
    *,
    groups: int = 1,
    bias: bool = False,
    relu: bool = True,
) -> list[nn.Module]:
    """``[Conv2d, BatchNorm2d(, ReLU)]`` as a list, to be spliced into an ``nn.Sequential``.

    Splicing keeps the flat indices of RepDistiller's sequential definitions (``conv.0``, ``conv.1``, ...), which
    are part of the state_dict keys of the released checkpoints.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(out_chs),
    ]
    if relu:
        layers.append(nn.ReLU())
    return layers


class ChannelShuffle(nn.Module):
    """Channel shuffle of ShuffleNet: ``[N, C, H, W] -> [N, g, C/g, H, W] -> transpose -> [N, C, H, W]``
    (RepDistiller ``ShuffleBlock``; Zhang et al., "ShuffleNet", CVPR 2018)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def init_weights(model: nn.Module, *, linear: str = "default") -> None:
    """The initialisation of RepDistiller's CIFAR models.

    Convolutions: ``N(0, sqrt(2 / (k*k*out_channels)))`` (He et al. fan-out; conv biases zeroed); BatchNorm: weight 1,
    bias 0. ``linear``: ``"default"`` keeps PyTorch's Linear init (resnet.py), ``"zero_bias"`` zeroes the bias
    (wrn.py), ``"normal"`` draws weights from ``N(0, 0.01)`` and zeroes the bias (vgg.py, mobilenetv2.py).
    """
    if linear not in ("default", "zero_bias", "normal"):
        raise ValueError(f"linear must be 'default', 'zero_bias' or 'normal', got {linear!r}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
