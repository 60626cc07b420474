"""ND loss (KD++): norm and direction of the student's embedding
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Wang, Cheng, Duan, Wang, Feng, Kong, "Improving Knowledge Distillation via Regularizing Feature Direction and Norm",
ECCV 2024 (arXiv:2305.17007, first titled "... Feature Norm and Direction").

With :math:`s_i` the student's penultimate embedding (linearly projected to the teacher's width when the widths
differ), :math:`t_i` the teacher's, and :math:`c_k` the mean teacher embedding of class :math:`k` over the training
set (computed once, before fitting):

.. math::

    L_{ND} = \\frac{1}{B}\\sum_{i=1}^{B}\\Big(1 - \\frac{\\langle s_i,\\, c_{y_i}/\\lVert c_{y_i}\\rVert\\rangle}
    {\\max(\\lVert s_i\\rVert, \\lVert t_i\\rVert)}\\Big)

The numerator aligns the *direction* of :math:`s_i` with the teacher's class mean; the denominator makes the loss keep
decreasing while :math:`\\lVert s_i\\rVert < \\lVert t_i\\rVert`, i.e. it pushes the student to produce features at
least as large as the teacher's (*norm*). :math:`L_{ND} \\in [0, 2]`, and it is 0 exactly when :math:`s_i` points
along :math:`c_{y_i}` with :math:`\\lVert s_i\\rVert \\ge \\lVert t_i\\rVert`. The maximum is not detached (as in
the authors' code): when the student's norm is the larger, the gradient also flows through it.

KD++ is ``CE + KD + λ·L_ND``: this term is the ND part only; combine it with KD as ``loss=[kd,nd]`` (or with DKD,
DIST, ReviewKD for their "++" variants, as the paper does).

Sources (checked): WangYZ1608/Knowledge-Distillation-via-ND (commit fc6f3f9):

- ``CIFAR/utils.py`` and ``ImageNet/utils.py`` ``DirectNormLoss.project_center``: per sample
  ``1 - dot(s, center / center.norm()) / max(s.norm(), t.norm())``, summed and divided by the batch size;
- ``CIFAR/emb_fea_distribution.py``: the class means are the per-class averages of the teacher's embedding (the input
  of its classifier) over the training set, teacher in eval mode; the repository ships them as
  ``ckpt/teacher/*/center_emb_train.json``;
- ``CIFAR/Models/embtrans_cifar.py`` / ``ImageNet/Models/embtrans.py`` ``EmbTrans``: the student's embedding is
  projected to the teacher's width only when the widths differ (no projector for equal widths);
- ``CIFAR/train_cifar_kd.py``: ``loss = cls + kd·min(1, epoch/warm_up) + nd``; the warm-up applies to KD only.

Defaults: ``weight = 1.0`` — the ``--nd_loss_factor`` default of both ``train_cifar_kd.py`` and ImageNet
``train_kd.py``, and the authors' value for ResNet-34 → ResNet-18 on ImageNet (``ImageNet/train.sh``). Their
per-pair recipes range from 0.5 to 4.0 (CIFAR ``train_cifar.sh``: 2.0 for ResNet-56 → ResNet-20 and
ResNet-32×4 → ResNet-8×4, 1.5 for WRN-40-2 → WRN-40-1). Taps: the penultimate embedding of both models.

Deviations:

- projector: ``connector="auto"`` is the identity when the widths are equal and a plain ``nn.Linear`` otherwise
  (:func:`~lightning_kd.losses.connectors.make_connector`); the authors' projector is
  ``BatchNorm1d → Dropout(0.5) → Linear``. The projected embedding feeds this loss only; the student's classifier
  still reads its own embedding (as in ``EmbTrans``).
- the denominator is clamped at 1e-12 and the class mean normalised with ``F.normalize`` (eps 1e-12), so all-zero
  embeddings give a finite loss instead of NaN.
- class means: computed at the start of each fit, in float64, from one pass over the training dataloader (with its
  augmentation, teacher in eval mode) — as the authors do (``emb_fea_distribution.py`` iterates the training set
  with its random crop/flip transform), except that they store the means rounded to 4 decimals in a JSON file once.

Under DDP, the class means are global: in :meth:`NDLoss.prepare` each rank sums the teacher embeddings and counts
the samples of its pass, the sums and counts are all-reduced (summed over ranks), then divided. When each rank's loader
is a shard (a ``DistributedSampler``; one that pads the last batch counts the repeated samples twice) this gives the
means over the whole set; when every rank passes over the whole set (``DistillationModule`` / ``DistillCallback`` use
the plain training dataloader, without the sampler Lightning injects for fitting) the sums and counts are all scaled
by the world size and the means are unchanged. The loss itself is per sample, averaged over the rank's local batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, TeacherPass, register_loss
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec

Reducer = Callable[[torch.Tensor], None]


def nd_loss(student: torch.Tensor, teacher: torch.Tensor, centers: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Batch mean of ``1 − ⟨s_i, c_i/‖c_i‖⟩ / max(‖s_i‖, ‖t_i‖)`` in float32.

    Args:
        student: student embeddings ``[B, D]`` (already projected to the teacher's width).
        teacher: teacher embeddings ``[B, D]`` (detached here).
        centers: the class mean of each sample's label, ``[B, D]`` (i.e. ``class_means[targets]``).
        eps: floor of the denominator and of the centre's norm.
    """
    s, t, c = student.float(), teacher.detach().float(), centers.detach().float()
    if not (s.shape == t.shape == c.shape and s.dim() == 2):
        raise ValueError(
            f"nd_loss: student {tuple(s.shape)}, teacher {tuple(t.shape)} and centres {tuple(c.shape)} must all be "
            "[B, D] with the same D (project the student to the teacher's width first)"
        )
    direction = F.normalize(c, dim=1, eps=eps)
    denom = torch.maximum(torch.linalg.vector_norm(s, dim=1), torch.linalg.vector_norm(t, dim=1)).clamp_min(eps)
    return (1.0 - (s * direction).sum(dim=1) / denom).mean()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """In-place sum over the processes of the default group when ``torch.distributed`` is initialised; else nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def class_sums(
    passes: Iterable[TeacherPass], tap: TapSpec, num_classes: int, width: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums ``[K, D]`` (float64) and counts ``[K]`` of the teacher's ``tap`` over ``passes``."""
    sums = torch.zeros(num_classes, width, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for p in passes:
        if p.targets is None:
            raise ValueError("nd: the training batches have no labels; the class means need (inputs, labels) batches")
        emb = p.teacher[tap].detach().flatten(1).to(device=device, dtype=torch.float64)
        y = p.targets.reshape(-1).to(device=device, dtype=torch.long)
        if emb.shape[1] != width:
            raise ValueError(f"nd: teacher tap '{tap}' has width {emb.shape[1]} in the pass, {width} at setup")
        if y.shape[0] != emb.shape[0] or p.targets.dtype.is_floating_point:
            raise ValueError(
                f"nd: the class means need one integer label per sample; got targets {tuple(p.targets.shape)} "
                f"({p.targets.dtype}) for {emb.shape[0]} embeddings"
            )
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            raise ValueError(
                f"nd: label {int(bad[0])} is outside [0, {num_classes}) (the models predict {num_classes} classes)"
            )
        sums.index_add_(0, y, emb)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    return sums, counts


def class_means(sums: torch.Tensor, counts: torch.Tensor, reduce: Reducer | None = all_reduce_sum) -> torch.Tensor:
    """``sums / counts`` per class after ``reduce`` (in place, e.g. an all-reduce over ranks) of both.

    Raises:
        ValueError: naming the classes that have no sample (after the reduction).
    """
    if reduce is not None:
        reduce(sums)
        reduce(counts)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else "")
        raise ValueError(
            f"nd: no training sample of class(es) {shown} ({len(empty)} of {len(counts)} classes) in the pass over the "
            "training data, so their teacher class mean is undefined; train on data that covers every class the "
            "models predict"
        )
    return sums / counts.unsqueeze(1)


@register_loss("nd")
class NDLoss(LossTerm):
    """ND loss of KD++: align the student's embedding with the teacher's class mean and enlarge its norm.

    The teacher's class means are computed in :meth:`prepare` (one pass over the training data before fitting) and kept
    in the persistent buffer ``class_means`` ``[num_classes, D_teacher]``, saved in checkpoints.

    Args:
        weight: λ of ``CE + KD + λ·L_ND`` (authors' default 1.0; 0.5–4.0 in their per-pair recipes).
        student_layer: student tap (default: the penultimate embedding, the classifier's input).
        teacher_layer: teacher tap (default: the penultimate embedding); its class means are the centres.
        connector: ``auto`` (identity when the widths are equal, linear otherwise, as the authors), ``linear``
            (always a learned linear map) or ``none`` (the widths must be equal).
    """

    needs_prepare = True

    def __init__(
        self,
        weight: float = 1.0,
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
        connector: str = "auto",
    ) -> None:
        super().__init__(weight)
        if connector not in ("auto", "linear", "none"):
            raise ValueError(f"nd: connector must be 'auto', 'linear' or 'none', got {connector!r}")
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.connector_kind = connector
        self.connector: nn.Module | None = None
        self.register_buffer("class_means", None)  # [num_classes, D_teacher], created in setup()
        self.register_buffer("prepared", None)  # bool scalar: class_means holds the teacher's means
        self.reduce: Reducer | None = all_reduce_sum

    def setup(self, ctx: SetupContext) -> None:
        if self.connector is not None:  # already built (e.g. restored)
            return
        s_shape, t_shape = tuple(ctx.student[self.student_tap].shape), tuple(ctx.teacher[self.teacher_tap].shape)
        if len(s_shape) != 2 or len(t_shape) != 2:
            raise ValueError(
                f"nd: student '{self.student_tap}' {s_shape} / teacher '{self.teacher_tap}' {t_shape}: the ND loss "
                "works on embedding vectors [B, D]; tap 'embedding' (the classifier's input) or another pooled layer"
            )
        kind = self.connector_kind
        if kind == "auto":
            kind = "none" if s_shape[1] == t_shape[1] else "linear"
        self.connector = make_connector(
            s_shape[1:], t_shape[1:], kind, where=f"nd ({self.student_tap} -> {self.teacher_tap})"
        )
        param = next(self.connector.parameters(), None)
        device = param.device if param is not None else ctx.teacher[self.teacher_tap].device
        self.class_means = torch.zeros(ctx.num_classes, t_shape[1], device=device)
        self.prepared = torch.zeros((), dtype=torch.bool, device=device)

    def prepare(self, passes: Iterable[TeacherPass]) -> None:
        """Set ``class_means`` to the mean teacher embedding of each class over ``passes`` (all-reduced under DDP)."""
        if self.class_means is None:
            raise RuntimeError("nd: setup() must run before prepare()")
        num_classes, width = self.class_means.shape
        sums, counts = class_sums(passes, self.teacher_tap, num_classes, width, self.class_means.device)
        self.class_means.copy_(class_means(sums, counts, self.reduce).to(self.class_means.dtype))
        self.prepared.fill_(True)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.connector is None or self.class_means is None:
            raise RuntimeError("nd: setup() was not called, so the connector and the class means do not exist yet")
        if not bool(self.prepared):
            raise RuntimeError(
                "nd: the teacher's class means were not computed; prepare() runs on the training data before fitting "
                "(DistillationModule / DistillCallback do it), or load a checkpoint that holds them"
            )
        targets = batch.targets
        if targets is None:
            raise ValueError("nd: the batch has no labels; the ND loss needs each sample's class to pick its centre")
        if targets.dim() != 1 or targets.dtype.is_floating_point:
            raise ValueError(
                f"nd: needs integer class labels [B], got targets {tuple(targets.shape)} ({targets.dtype}); soft or "
                "mixed labels (mixup/cutmix) have no single class centre"
            )
        student = self.connector(batch.student[self.student_tap].flatten(1).float())
        teacher = batch.teacher[self.teacher_tap].flatten(1)
        return nd_loss(student, teacher, self.class_means[targets.long()])

    def extra_repr(self) -> str:
        return f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}"
