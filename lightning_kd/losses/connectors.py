"""Connectors
^^^^^^^^^^

Learned maps from a student feature to the teacher's shape, used by feature losses when widths differ
(FitNets' regressor: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

- maps ``[B, C_s, H, W] → [B, C_t, H, W]``: a 1×1 convolution (optionally followed by BatchNorm and ReLU, the
  ``ConvReg`` variant of the CRD benchmark code);
- vectors ``[B, D_s] → [B, D_t]`` and token sequences ``[B, N, D_s] → [B, N, D_t]``: a linear layer.

Maps of different resolution (e.g. a student stage matched to a teacher stage of another depth) are refused unless
the connector is built with ``resize=True``: the larger map is then average-pooled to the smaller one
(:func:`common_resolution`), per spatial dimension, with adaptive average pooling. A student map larger than the
teacher's is pooled inside the connector (before the 1×1 conv; without BatchNorm/ReLU the two commute exactly); a
teacher map larger than the student's is pooled by the loss with :func:`pool_to`. Average pooling is parameter-free
and works for any pair of sizes. The CRD benchmark code (HobbitLong/RepDistiller ``models/util.py`` ``ConvReg``)
learns the resampling instead: a stride-2 3×3 conv when the student map is twice as large, a transposed conv when it
is half as large, a :math:`(1 + H_S - H_T)`-wide valid conv when it is otherwise larger, and no support for any other
smaller student map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONNECTOR_KINDS = ("auto", "conv", "linear", "none")


class ShapeMismatchError(ValueError):
    """Student and teacher features whose shapes cannot be matched."""


def common_resolution(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial size both maps are compared at with ``resize=True``: the smaller of the two in each spatial
    dimension (``[C, H, W]`` shapes, batch dim excluded)."""
    return tuple(min(a, b) for a, b in zip(tuple(student_shape)[1:], tuple(teacher_shape)[1:]))


def pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of the maps ``x`` [B, C, H, W] to ``size`` (H', W') ≤ (H, W); ``x`` unchanged when
    it already has that size."""
    size = tuple(int(v) for v in size)
    if tuple(x.shape[2:]) == size:
        return x
    if len(size) != 2 or x.dim() != 4 or any(a < b for a, b in zip(x.shape[2:], size)):
        raise ShapeMismatchError(
            f"pool_to: can only average-pool maps [B, C, H, W] down to a smaller (H', W'); got {tuple(x.shape)} "
            f"-> {size}"
        )
    return F.adaptive_avg_pool2d(x, size)


def make_connector(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    kind: str = "auto",
    *,
    batchnorm: bool = False,
    relu: bool = False,
    resize: bool = False,
    where: str = "",
) -> nn.Module:
    """Build the connector that maps a student feature of ``student_shape`` to ``teacher_shape`` (batch dim excluded).

    Args:
        student_shape: per-sample shape of the student feature.
        teacher_shape: per-sample shape of the teacher feature.
        kind: ``"auto"`` (1×1 conv for maps, linear otherwise), ``"conv"``, ``"linear"`` or ``"none"`` (identity;
            the shapes must then be equal).
        batchnorm: append BatchNorm (maps only).
        relu: append ReLU.
        resize: maps ``[C, H, W]`` of different resolution are allowed: the connector outputs the teacher's channels
            at :func:`common_resolution` (an ``nn.AdaptiveAvgPool2d`` comes first when the student map is larger;
            pool the teacher map with :func:`pool_to` when it is larger). Off by default: the spatial sizes must
            then be equal. No effect on vectors and token sequences.
        where: a label for error messages (e.g. ``"fitnet: layer3 -> layer3"``).

    Raises:
        ShapeMismatchError: when the shapes cannot be matched with this kind of connector.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    label = f"{where}: " if where else ""
    if kind not in CONNECTOR_KINDS:
        raise ValueError(f"{label}connector must be one of {CONNECTOR_KINDS}, got {kind!r}")
    # resize: compare maps at their common resolution; the student is pooled here, the teacher by the loss (pool_to)
    pool: list[nn.Module] = []
    s_cmp, t_cmp = s, t
    if resize and kind != "linear" and len(s) == 3 and len(t) == 3 and s[1:] != t[1:]:
        target = common_resolution(s, t)
        if s[1:] != target:
            pool.append(nn.AdaptiveAvgPool2d(target))
        s_cmp, t_cmp = (s[0], *target), (t[0], *target)
    if kind == "none":
        if s_cmp != t_cmp:
            raise ShapeMismatchError(
                f"{label}student feature {list(s)} and teacher feature {list(t)} differ and no connector is "
                "configured; set connector: auto (1x1 conv / linear) or tap layers of equal shape"
            )
        return pool[0] if pool else nn.Identity()
    if len(s) != len(t):
        raise ShapeMismatchError(
            f"{label}student feature {list(s)} and teacher feature {list(t)} have different ranks; "
            "tap layers of the same kind (both feature maps or both vectors)"
        )
    if kind == "auto":
        kind = "conv" if len(s) == 3 else "linear"
    layers: list[nn.Module] = []
    if kind == "conv":
        if len(s) != 3:
            raise ShapeMismatchError(f"{label}a conv connector needs [C, H, W] maps, got {list(s)}")
        if s_cmp[1:] != t_cmp[1:]:
            raise ShapeMismatchError(
                f"{label}student map {list(s)} and teacher map {list(t)} differ in spatial size; "
                "tap layers with the same resolution (e.g. the same stage index) or set resize=True to "
                "average-pool the larger map to the smaller one"
            )
        layers.extend(pool)
        layers.append(nn.Conv2d(s[0], t[0], kernel_size=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(t[0]))
    else:
        if s[:-1] != t[:-1]:
            raise ShapeMismatchError(
                f"{label}a linear connector maps the last dimension only; student {list(s)} and teacher "
                f"{list(t)} differ elsewhere"
            )
        layers.append(nn.Linear(s[-1], t[-1]))
    if relu:
        layers.append(nn.ReLU())
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
