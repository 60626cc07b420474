"""Structured knowledge transfer (SKT)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Liu, Chen, Wu, Chen, Li, Lin, "Efficient Crowd Counting via Structured Knowledge Transfer", ACM MM 2020
(arXiv:2003.10120). Two parts on matched student/teacher feature maps, the student's first mapped to the teacher's
width by a 1×1 convolution followed by ReLU (:math:`\\hat f^S_l = \\mathrm{ReLU}(W_l * f^S_l + b_l)`):

- **Intra-layer pattern transfer**: one minus the cosine similarity of the channel vectors at each position,

  .. math:: L_{intra} = \\sum_l \\sum_{h,w} \\Big(1 - \\cos\\big(\\hat f^S_l[:, h, w],\\, f^T_l[:, h, w]\\big)\\Big)

- **Inter-layer relation transfer** (dense FSP): every selected map is max-pooled to the smallest spatial size
  among them, instance-normalised (per sample and channel: zero mean, unit variance over the positions), and for
  every pair :math:`i < j` of layers the FSP matrix (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017)

  .. math:: G_{ij}[a, b] = \\frac{1}{hw} \\sum_{s} F_i(s, a)\\, F_j(s, b)

  of the student is matched to the teacher's: :math:`L_{inter} = \\sum_{i<j} \\lVert G^S_{ij} - G^T_{ij}\\rVert_F^2`.
  After the instance normalisation, :math:`G_{ij}[a, b]` is the correlation (over positions) of channel :math:`a` of
  layer :math:`i` with channel :math:`b` of layer :math:`j`.

``L = intra_weight · L_intra + inter_weight · L_inter``, returned as parts ``intra/<student tap>`` (one per layer)
and ``inter`` (all pairs), already weighted.

Sources (checked): HCPLab-SYSU/SKT (commit db9800f): ``models/distillation.py`` — ``cosine_similarity`` is
``(1 - F.cosine_similarity(s, t, dim=1)).sum()``; ``cal_dense_fsp`` takes all pairs ``i < j``, applies
``nn.InstanceNorm2d`` (no affine, eps 1e-5) to both maps and ``gram`` = ``x @ yᵀ / (h·w)`` of the **first sample
only** (they train with batch size 1); ``scale_process`` max-pools the first three maps by 8, 4 and 2 (stride =
kernel, ``ceil_mode``) so that all maps share the 1/8 resolution. ``SKT_distill.py``: the FSP loss is
``MSELoss(size_average=False)`` (sum of squares) per pair, summed over pairs; the cosine loss is summed over the
layers; ``SKT_distill.sh``: ``-laf 0.5 -lac 0.5`` (both weights 0.5). ``models/model_student_vgg.py``:
``feature_transform`` = 1×1 conv (with bias) + ReLU on the student's features, and the FSP is computed on these
transformed features. The paper's equations were not re-read for this implementation (only its abstract); the code is
the reference.

Defaults: ``intra_weight = inter_weight = 0.5`` (authors' script); pairs ``stage:-4``, ``stage:-3``, ``stage:-2`` on
both sides (timm ResNets: ``layer1``–``layer3``; at 32×32 input 8×8, 4×4 and 2×2, so the FSP matrices are taken at
2×2); instance normalisation on; 1×1 conv + ReLU connectors.

Deviations and choices:

- ``reduction="mean"`` (default): :math:`L_{intra}` averages over positions (per layer) and :math:`L_{inter}` over
  the FSP entries (per pair), so the scale does not grow with the resolution or the widths (a classification loss
  sits next to it; the authors' density-map MSE is itself a sum). ``reduction="sum"`` is the authors' code: sums over
  positions and entries. Both average over the batch: at batch size 1 ``"sum"`` equals the authors' loss exactly
  (their FSP uses only the first sample of a batch).
- the authors also put the output density map into the dense FSP set (7 maps); classification logits have no
  spatial map, so only the tapped layers take part.
- pooling: ``adaptive_max_pool2d`` to the smallest size of the set, identical to the authors' ``MaxPool2d(2^k,
  ceil_mode=True)`` when the sizes divide (ResNet stages do). torchdistill's ``FSPLoss`` pools each *pair* to the
  smaller of its two maps instead (the same for two layers, or for the pairs that include the smallest map).
- the instance normalisation is written out (``(x − mean) / sqrt(var + 1e-5)``, biased variance, as
  ``InstanceNorm2d``) so that 1×1 maps give zeros instead of an error: at 16×16 input the default ``stage:-2`` is 1×1,
  and then the FSP part is identically zero (a warning says so in :meth:`SKTLoss.setup`).
- torchdistill's ``FSPLoss`` (no instance normalisation) reduces each pair by the *un-squared* L2 norms of the
  columns of :math:`G^S - G^T`, summed and divided by the batch size; Yim et al. (and SKT) use the squared Frobenius
  norm. With ``instance_norm=False, reduction="sum"`` :math:`L_{inter}` is Yim et al.'s loss (tested).

Under DDP everything is per sample (instance statistics, no batch statistics); the batch mean is the rank's local one.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LayerPairs, LossTerm, SetupContext, check_number, register_loss
from lightning_kd.losses.connectors import make_connector

DEFAULT_LAYERS = ("stage:-4", "stage:-3", "stage:-2")
REDUCTIONS = ("mean", "sum")
IN_EPS = 1e-5


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"skt: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def instance_normalize(f: torch.Tensor, eps: float = IN_EPS) -> torch.Tensor:
    """Per sample and channel, zero mean and unit (biased) variance over the positions of ``f`` [B, C, H, W]
    (``nn.InstanceNorm2d`` without affine parameters; a 1×1 map gives zeros)."""
    x = f.float().flatten(2)
    x = (x - x.mean(dim=2, keepdim=True)) / torch.sqrt(x.var(dim=2, unbiased=False, keepdim=True) + eps)
    return x.view_as(f)


def max_pool_to(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Max-pool ``f`` [B, C, H, W] to ``size`` when it is larger (unchanged otherwise)."""
    return F.adaptive_max_pool2d(f, size) if tuple(f.shape[2:]) != tuple(size) else f


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor, instance_norm: bool = True) -> torch.Tensor:
    """FSP matrix ``G[b] = F1[b] F2[b]ᵀ / (h·w)`` ([B, C1, C2], float32) of two maps; the larger one is max-pooled to
    the other's size first, and each is instance-normalised when ``instance_norm``."""
    if f1.dim() != 4 or f2.dim() != 4 or f1.shape[0] != f2.shape[0]:
        raise ValueError(
            f"fsp_matrix: expects two [B, C, H, W] maps of one batch, got {tuple(f1.shape)} and {tuple(f2.shape)}"
        )
    size = (min(f1.shape[2], f2.shape[2]), min(f1.shape[3], f2.shape[3]))
    x, y = max_pool_to(f1.float(), size), max_pool_to(f2.float(), size)
    if instance_norm:
        x, y = instance_normalize(x), instance_normalize(y)
    return torch.bmm(x.flatten(2), y.flatten(2).transpose(1, 2)) / (size[0] * size[1])


def intra_layer_loss(f_s: torch.Tensor, f_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1 − cos`` of the channel vectors at each position of two maps of equal shape [B, C, H, W]: averaged over the
    positions (``"mean"``) or summed (``"sum"``, the authors'), then averaged over the batch; float32."""
    _check_reduction(reduction)
    if f_s.shape != f_t.shape or f_s.dim() < 3:
        raise ValueError(
            f"skt: intra-layer transfer needs maps of equal shape, got student {tuple(f_s.shape)} and "
            f"teacher {tuple(f_t.shape)}"
        )
    d = 1.0 - F.cosine_similarity(f_s.float(), f_t.detach().float(), dim=1)
    return d.flatten(1).mean(1).mean() if reduction == "mean" else d.flatten(1).sum(1).mean()


def inter_layer_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    instance_norm: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Dense FSP loss: all maps max-pooled to the smallest size among them, FSP matrices of every pair ``i < j``,
    squared differences averaged over the entries (``"mean"``) or summed (``"sum"``, the authors'), averaged over the
    batch, summed over the pairs. ``student[l]`` must have the teacher's channel count ``teacher[l].shape[1]``."""
    _check_reduction(reduction)
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(
            f"skt: inter-layer transfer needs two equal lists of at least 2 maps, got {len(student)} "
            f"student and {len(teacher)} teacher maps"
        )
    maps = list(student) + list(teacher)
    size = (min(f.shape[2] for f in maps), min(f.shape[3] for f in maps))
    s = [max_pool_to(f.float(), size) for f in student]
    t = [max_pool_to(f.detach().float(), size) for f in teacher]
    total = s[0].new_zeros(())
    for i, j in itertools.combinations(range(len(s)), 2):
        diff = (fsp_matrix(s[i], s[j], instance_norm) - fsp_matrix(t[i], t[j], instance_norm)).pow(2).flatten(1)
        total = total + (diff.mean(1) if reduction == "mean" else diff.sum(1)).mean()
    return total


@register_loss("skt")
class SKTLoss(LossTerm):
    """SKT: cosine (intra-layer) and dense FSP (inter-layer) transfer between matched, 1×1-conv-adapted layers.

    Args:
        weight: weight of the whole term.
        student_layers: student taps, one per layer (feature maps ``[B, C, H, W]``).
        teacher_layers: teacher taps, same length and order; each pair must have the same spatial size.
        intra_weight: weight of the intra-layer (cosine) part (authors: 0.5).
        inter_weight: weight of the inter-layer (dense FSP) part (authors: 0.5); 0 disables it (then one layer is
            enough).
        instance_norm: instance-normalise the maps before the FSP matrices (authors: yes).
        reduction: ``"mean"`` over positions / FSP entries (default) or ``"sum"`` (the authors' code).
        connector: ``auto`` / ``conv`` (1×1 conv to the teacher's width) or ``none`` (the shapes must match).
        relu: ReLU after the 1×1 conv (authors' ``feature_transform``: yes).

    ``forward`` returns ``{"intra/<student tap>": ..., "inter": ...}`` (weighted), logged as ``train/skt/...``.
    """

    def __init__(
        self,
        weight: float = 1.0,
        student_layers: Sequence[str] = DEFAULT_LAYERS,
        teacher_layers: Sequence[str] = DEFAULT_LAYERS,
        intra_weight: float = 0.5,
        inter_weight: float = 0.5,
        instance_norm: bool = True,
        reduction: str = "mean",
        connector: str = "auto",
        relu: bool = True,
    ) -> None:
        super().__init__(weight)
        self.layers = LayerPairs.parse("skt", student_layers, teacher_layers)
        self.student_taps, self.teacher_taps = self.layers.student, self.layers.teacher
        for name, value in (("intra_weight", intra_weight), ("inter_weight", inter_weight)):
            check_number("skt", name, value)
        if intra_weight == 0 and inter_weight == 0:
            raise ValueError("skt: intra_weight and inter_weight are both 0; set at least one > 0")
        if inter_weight > 0 and len(self.layers.student) < 2:
            raise ValueError(
                f"skt: the inter-layer (FSP) transfer relates pairs of layers, so it needs at least 2 layers; got "
                f"{[str(s) for s in self.layers.student]}. Add layers or set inter_weight: 0"
            )
        _check_reduction(reduction)
        if connector not in ("auto", "conv", "none"):
            raise ValueError(f"skt: connector must be 'auto', 'conv' or 'none', got {connector!r}")
        self.intra_weight, self.inter_weight = float(intra_weight), float(inter_weight)
        self.instance_norm = bool(instance_norm)
        self.reduction = reduction
        self.connector_kind = connector
        self.relu = bool(relu)
        self.connectors: nn.ModuleList | None = None

    def setup(self, ctx: SetupContext) -> None:
        if self.connectors is not None:  # already built (e.g. restored)
            return
        connectors, sizes = [], []
        for _, s_tap, t_tap in self.layers:
            s_shape, t_shape = tuple(ctx.student[s_tap].shape), tuple(ctx.teacher[t_tap].shape)
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(
                    f"skt: pair student '{s_tap}' {s_shape} / teacher '{t_tap}' {t_shape}: SKT needs feature maps "
                    "[B, C, H, W]; pick convolutional stages (e.g. 'stage:-3'), not embeddings or logits"
                )
            if s_shape[2:] != t_shape[2:]:
                raise ValueError(
                    f"skt: spatial sizes differ for the pair student '{s_tap}' {s_shape} / teacher '{t_tap}' "
                    f"{t_shape} (H×W {s_shape[2:]} vs {t_shape[2:]}). Pick stages of equal resolution in "
                    "student_layers / teacher_layers (e.g. the same 'stage:N' for two ResNets)"
                )
            connectors.append(
                make_connector(
                    s_shape[1:],
                    t_shape[1:],
                    "conv" if self.connector_kind == "auto" else self.connector_kind,
                    relu=self.relu,
                    where=f"skt ({s_tap} -> {t_tap})",
                )
            )
            sizes.append(t_shape[2:])
        if self.inter_weight > 0 and self.instance_norm and min(h for h, _ in sizes) * min(w for _, w in sizes) == 1:
            warnings.warn(
                f"skt: the FSP matrices are taken at the smallest map size of the set, 1×1 here ({sizes}); "
                "instance-normalised 1×1 maps are zero, so the inter-layer part is always 0. Use a larger input or "
                "drop the 1×1 stage from the layers",
                stacklevel=2,
            )
        self.connectors = nn.ModuleList(connectors)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise RuntimeError("skt: setup() was not called, so the connectors do not exist yet")
        student = [conn(batch.student[s_tap]).float() for conn, s_tap in zip(self.connectors, self.student_taps)]
        teacher = [batch.teacher[t_tap].float() for t_tap in self.teacher_taps]
        parts: dict[str, torch.Tensor] = {}
        if self.intra_weight:
            for name, s, t in zip(self.layers.names, student, teacher):
                parts[f"intra/{name}"] = self.intra_weight * intra_layer_loss(s, t, self.reduction)
        if self.inter_weight:
            parts["inter"] = self.inter_weight * inter_layer_loss(student, teacher, self.instance_norm, self.reduction)
        return parts

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for _, s, t in self.layers)
        return (
            f"weight={self.weight}, intra_weight={self.intra_weight}, inter_weight={self.inter_weight}, "
            f"instance_norm={self.instance_norm}, reduction={self.reduction}, pairs=[{pairs}]"
        )
