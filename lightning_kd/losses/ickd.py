"""Inter-channel correlation (ICKD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Liu, Huang, Lin, Xie, Wang, Chang, Liang, "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge
Distillation", ICCV 2021 (arXiv:2202.03680; code: ADLab-AutoDrive/ICKD).

The student matches the teacher's correlations *between channels*. For one sample's feature map with :math:`C`
channels flattened over the :math:`HW` positions, :math:`F \\in \\mathbb{R}^{C\\times HW}`, the inter-channel
correlation is the Gram matrix :math:`G = F F^\\top \\in \\mathbb{R}^{C\\times C}`, whose rows are L2-normalised,
:math:`\\hat G_{m,:} = G_{m,:} / \\lVert G_{m,:} \\rVert_2`. The student's map first goes through a learned adapter
:math:`a` (1×1 convolution to the teacher's width, then BatchNorm) so that both Grams are :math:`C_T\\times C_T`:

.. math::

    L = \\frac{1}{B\\,C} \\sum_{b=1}^{B} \\lVert \\hat G(a(F^S_b)) - \\hat G(F^T_b) \\rVert_F^2
      = \\operatorname{mean}_{b,m} \\lVert \\hat g^S_{b,m} - \\hat g^T_{b,m} \\rVert_2^2 ,

the mean over samples and channels of the squared distance between unit rows; it lies in :math:`[0, 4]`. It is
invariant to a positive rescaling of either map and to any permutation of the spatial positions of either map (the
Gram sums over positions), but not to a permutation of the student's channels against the teacher's.

**Grid-level correlation** (the paper's extension for dense prediction): with ``grid = g`` the maps are cut into
:math:`g\\times g` cells of equal size, the loss above is computed per cell and averaged over the cells (equivalently,
each cell is treated as a sample). ``grid = 1`` (default) is the classification loss. The authors' segmentation
training code is not released (their ``Segmentation/`` folder only evaluates checkpoints for 1×1, 4×4, 16×16 and 32×32
grids), so this part follows the paper's description and was not checked against code.

Sources (checked), ADLab-AutoDrive/ICKD at 403b8d3:

- ``Cifar100/distiller_zoo/ICKD.py`` (the released CIFAR training code): ``Embed`` = ``Conv2d(s_dim, feat_dim, 1,
  bias=False)`` + ``BatchNorm2d`` applied to the student only (an ``embed_t`` is created but never used),
  ``emd = normalize(bmm(f, fᵀ), dim=2)``, ``loss = Σ (emd_s − emd_t)² / (ch · bsz)``; ``train_student.py``:
  ``g_s = [feat_s[-2]]`` (the output of the last residual group, before pooling) and ``feat_dim = t_dim``; the README
  runs ``--distill ickd -a 0 -b 2.5`` (``train_student.sh`` uses ``-b 4``).
- ``ImageNet/torchdistill/losses/single.py`` ``ChSimLoss`` (the same computation, but divided by ``ch · bsz²``) and
  ``models/special.py`` ``Embed`` (a 3×3 convolution + BatchNorm, 512→512 on ``layer4`` in
  ``configs/sample/ilsvrc2012/single_stage/cs/resnet18_from_resnet34.yaml``, factor 1.0, batch 256).
- torchdistill 1.1.5 ``torchdistill.losses.mid_level.ChSimLoss`` and ``models.wrapper.ChannelSimilarityEmbed``: a
  copy of the authors' ImageNet version (``/(ch · bsz²)``, 3×3 embed).

We follow the CIFAR code: the ``/(C·B)`` reduction is a plain mean over samples and channels, independent of the
batch size, whereas ``/(C·B²)`` shrinks the loss as the batch grows. Hence our value is ``B ×`` torchdistill's
``ChSimLoss`` on the same (adapted) maps — tested, end to end, with torchdistill's ``ChannelSimilarityEmbed`` given
our adapter's weights (a 3×3 kernel that is zero off-centre equals our 1×1 convolution). The adapter is
:func:`make_connector`'s 1×1 convolution (+ BatchNorm), as in the CIFAR code; the ImageNet code's 3×3 adapter is not
offered. The paper's own equation could not be consulted here; the formula above is the authors' code.

Defaults: weight 2.5 (the README's CIFAR command), one pair ``stage:-1`` → ``stage:-1`` — the last feature stage of
timm's ``feature_info``, i.e. the authors' ``feat[-2]`` in RepDistiller's CIFAR models and ``layer4`` in their
ImageNet config. At 32×32 input a timm ResNet's last stage is 1×1, where the Gram is the rank-one outer product of the
channel vector (the correlation over positions degenerates to one position); ``stage:-2`` keeps 2×2 there, and larger
inputs avoid the issue.

Under DDP the loss is per sample, so ranks need nothing gathered; the adapter's BatchNorm uses per-rank batch
statistics (as in the authors' code) unless the model is converted to SyncBatchNorm. The Grams are computed in float32
with autocast disabled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, register_loss
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec

ICKD_CONNECTORS = ("auto", "conv", "none")


def channel_correlation(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised inter-channel Gram ``normalize(F Fᵀ, dim=-1)`` of ``f`` [B, C, H, W] (or [B, C, *]) → [B, C, C],
    float32 (a channel that is zero everywhere gets a zero row)."""
    if f.dim() < 3:
        raise ValueError(f"channel_correlation expects feature maps [B, C, H, W], got shape {tuple(f.shape)}")
    with torch.autocast(device_type=f.device.type, enabled=False):
        q = f.float().flatten(2)
        return F.normalize(torch.bmm(q, q.transpose(1, 2)), p=2.0, dim=2)


def grid_cells(f: torch.Tensor, grid: int) -> torch.Tensor:
    """Cut ``f`` [B, C, H, W] into ``grid × grid`` equal cells, stacked as samples: [B·grid², C, H/grid, W/grid]."""
    b, c, h, w = f.shape
    if h % grid or w % grid:
        raise ValueError(f"ickd: a {h}×{w} map cannot be cut into {grid}×{grid} equal cells; pick a grid dividing both")
    cells = f.reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b * grid * grid, c, h // grid, w // grid)


def ickd_loss(f_s: torch.Tensor, f_t: torch.Tensor, grid: int = 1) -> torch.Tensor:
    """ICKD loss ``Σ_b ‖Ĝ_S,b − Ĝ_T,b‖²_F / (C·B)`` of the (already adapted) student map ``f_s`` and the teacher map
    ``f_t``, both [B, C, H, W] of the same shape; with ``grid > 1``, the mean of that loss over ``grid × grid`` cells."""
    if f_s.shape != f_t.shape or f_s.dim() != 4:
        raise ValueError(
            f"ickd_loss: the adapted student map {tuple(f_s.shape)} and the teacher map {tuple(f_t.shape)} must be "
            "[B, C, H, W] maps of the same shape"
        )
    if grid > 1:
        f_s, f_t = grid_cells(f_s, grid), grid_cells(f_t, grid)
    b, c = f_s.shape[:2]
    return (channel_correlation(f_s) - channel_correlation(f_t)).pow(2).sum() / (c * b)


@register_loss("ickd")
class ICKDLoss(LossTerm):
    """Inter-channel correlation distillation between one student map and one teacher map.

    Args:
        weight: weight of the term (2.5, the authors' CIFAR-100 command).
        student_layer: student tap, a feature map [B, C_s, H, W] (module path, ``path:input`` or ``stage:N``).
        teacher_layer: teacher tap, a feature map [B, C_t, H, W] of the same spatial size.
        connector: the student adapter: ``conv`` / ``auto`` (1×1 convolution C_s → C_t, the authors' ``Embed``) or
            ``none`` (identity; the maps must then have the same shape).
        batchnorm: BatchNorm after the 1×1 convolution (the authors' ``Embed``; the convolution then has no bias).
        grid: cut the maps into ``grid × grid`` cells and average the per-cell losses (the paper's grid-level
            correlation for dense prediction; 1 = whole map, for classification).
    """

    def __init__(
        self,
        weight: float = 2.5,
        student_layer: str = "stage:-1",
        teacher_layer: str = "stage:-1",
        connector: str = "conv",
        batchnorm: bool = True,
        grid: int = 1,
    ) -> None:
        super().__init__(weight)
        if connector not in ICKD_CONNECTORS:
            raise ValueError(
                f"ickd: connector must be one of {ICKD_CONNECTORS} (a 1×1 conv adapter or none), got {connector!r}"
            )
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"ickd: grid must be a positive integer (cells per side), got {grid!r}")
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.connector_kind = connector
        self.batchnorm = bool(batchnorm)
        self.grid = grid
        self.connector: torch.nn.Module | None = None

    def setup(self, ctx: SetupContext) -> None:
        s_shape, t_shape = tuple(ctx.student[self.student_tap].shape), tuple(ctx.teacher[self.teacher_tap].shape)
        pair = f"student '{self.student_tap}' {s_shape} / teacher '{self.teacher_tap}' {t_shape}"
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ValueError(
                f"ickd: {pair}: inter-channel correlation needs feature maps [B, C, H, W] on both sides; tap "
                "convolutional stages (e.g. 'stage:-1'), not embeddings or logits"
            )
        if s_shape[2:] != t_shape[2:]:
            raise ValueError(
                f"ickd: {pair}: spatial sizes differ ({s_shape[2]}×{s_shape[3]} vs {t_shape[2]}×{t_shape[3]}); the "
                "1×1 adapter keeps the resolution, so pick layers of equal resolution (e.g. the same 'stage:N' for "
                "two ResNets)"
            )
        h, w = s_shape[2:]
        if h % self.grid or w % self.grid:
            raise ValueError(
                f"ickd: {pair}: grid {self.grid} does not divide the {h}×{w} maps into equal cells; pick a grid that "
                "divides both H and W (grid: 1 for classification)"
            )
        if self.connector is not None:  # already built (e.g. restored)
            return
        self.connector = make_connector(
            s_shape[1:],
            t_shape[1:],
            self.connector_kind,
            batchnorm=self.batchnorm,
            where=f"ickd ({self.student_tap} -> {self.teacher_tap})",
        )

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.connector is None:
            raise RuntimeError("ickd: setup() was not called, so the adapter does not exist yet")
        student = self.connector(batch.student[self.student_tap])
        return ickd_loss(student.float(), batch.teacher[self.teacher_tap].detach().float(), self.grid)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}, "
            f"connector={self.connector_kind}, batchnorm={self.batchnorm}, grid={self.grid}"
        )
