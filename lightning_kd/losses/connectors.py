"""Connectors
^^^^^^^^^^

Learned maps from a student feature to the teacher's shape, used by feature losses when widths differ
(FitNets' regressor: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

- maps ``[B, C_s, H, W] → [B, C_t, H, W]``: a 1×1 convolution (optionally followed by BatchNorm and ReLU, the
  ``ConvReg`` variant of the CRD benchmark code);
- vectors ``[B, D_s] → [B, D_t]`` and token sequences ``[B, N, D_s] → [B, N, D_t]``: a linear layer.
"""

from __future__ import annotations

from torch import nn

CONNECTOR_KINDS = ("auto", "conv", "linear", "none")


class ShapeMismatchError(ValueError):
    """Student and teacher features whose shapes cannot be matched."""


def make_connector(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    kind: str = "auto",
    *,
    batchnorm: bool = False,
    relu: bool = False,
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
        where: a label for error messages (e.g. ``"fitnet: layer3 -> layer3"``).

    Raises:
        ShapeMismatchError: when the shapes cannot be matched with this kind of connector.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    label = f"{where}: " if where else ""
    if kind not in CONNECTOR_KINDS:
        raise ValueError(f"{label}connector must be one of {CONNECTOR_KINDS}, got {kind!r}")
    if kind == "none":
        if s != t:
            raise ShapeMismatchError(
                f"{label}student feature {list(s)} and teacher feature {list(t)} differ and no connector is "
                "configured; set connector: auto (1x1 conv / linear) or tap layers of equal shape"
            )
        return nn.Identity()
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
        if s[1:] != t[1:]:
            raise ShapeMismatchError(
                f"{label}student map {list(s)} and teacher map {list(t)} differ in spatial size; "
                "tap layers with the same resolution (e.g. the same stage index) or resize the inputs"
            )
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
