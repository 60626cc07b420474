"""Data-partitioned distillation ("general knowledge transfer")
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Roth, Thede, Koepke, Vinyals, Hénaff, Akata, "Fantastic Gains and Where to Find Them: On the Existence and Prospect of
General Knowledge Transfer between Any Pretrained Model", ICLR 2024 (arXiv:2310.17653).

Plain KD from an arbitrary (possibly weaker) teacher makes a pretrained student forget what it knew. Data
partitioning keeps a **frozen copy of the initial student** as a second teacher and, per sample, distils from
whichever is more confident: the teacher when :math:`c_T(x) > c_0(x)`, else the initial student, with the confidence
:math:`c(x) = \\mathrm{softmax}(z(x))_y` (the probability of the label, the argmax of soft labels after mixup;
"supervised") or :math:`\\max_c \\mathrm{softmax}(z(x))_c` (no labels, "unsupervised"), at temperature 1:

.. math::

    L = \\frac{1}{B} \\sum_x \\tau^2\\, \\mathrm{KL}\\big(\\mathrm{softmax}(z_{t(x)}(x)/\\tau) \\,\\|\\,
        \\mathrm{softmax}(z_S(x)/\\tau)\\big), \\qquad
    t(x) = \\operatorname*{arg\\,max}_{j \\in \\{0, 1, \\dots, M\\}} c_j(x)

With a :class:`~lightning_kd.strategies.multi_teacher.TeacherEnsemble` the candidates are the initial student (index
0) and every member (the authors' multi-teacher variant); ties go to the initial student. The term's ``diagnostics``
hold the fraction of samples routed to a teacher (``teacher_fraction``) and, for an ensemble, to each member
(``routed/<member>``).

**Checked against the authors' code** (``ExplainableML/FantasticGains``: ``main_distillation.py``,
``DistillationTrainer.xe_kl_distill``, loss ``xekl_dp`` with ``strat: most-conf`` / ``most-conf_u``, and
``config/distillation/kl_dp_dist.yaml``): the confidences are softmax probabilities at temperature 1, the teacher is
chosen with a strict ``>`` (``sp_t[i][labels[i]] > sp_st[i][labels[i]]``; ``torch.max`` of the probabilities when
unsupervised); with several teachers the ``argmax`` over ``[initial student, teacher 1, ...]``; the loss is
``DistillKL(kd_T)`` (τ²·KL, batch mean) to the selected logits with ``kd_T = 1`` and ``alpha = 1`` (no cross-entropy),
hence ``temperature: 1`` and ``task_weight: 0`` in ``conf/loss/partition.yaml``. The authors restrict the KL to the
teacher's top-``k`` classes (``k = 1000``, i.e. all ImageNet classes, in their configs); the full distribution is used
here.

**The frozen copy.** :meth:`PartitionKD.setup` deep-copies ``ctx.student_model`` before the first step (its initial
weights), freezes it (``requires_grad_(False)``) and keeps it as the submodule ``initial``: it is therefore in the
checkpoints (a resumed fit distils from the same initial student, not from the weights the student had when the run
was restarted) and moves with the student across devices and precisions. It is put in eval mode before every forward,
as the engine does with the teacher (not at setup, where Lightning would warn about modules in eval mode at the start
of training), and run under ``torch.no_grad()``. When the student is a whole LightningModule (the callback face), the
copy is of that module: its trainer reference is not copied (``LightningModule.__getstate__`` drops it), nor are this
package's engines attached to it (``_lkd_*`` submodules) or the layer taps' hooks. The copy's logits are its
forward's output (a tensor, a ``.logits`` attribute, a ``"logits"`` key or the first item).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, check_temperature, register_loss
from lightning_kd.losses.classroom import member_logits
from lightning_kd.losses.kd import kd_loss
from lightning_kd.taps import frozen_copy

CONFIDENCES = ("auto", "label", "max")


def confidence(logits: torch.Tensor, targets: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Confidence per sample and candidate: ``softmax(z)[y]`` (``"label"``) or ``max softmax(z)`` (``"max"``) over the
    last axis of ``logits [B, K, C]``; ``"auto"`` uses the label when ``targets`` are given."""
    probs = torch.softmax(logits.float(), dim=-1)
    if kind == "auto":
        kind = "label" if targets is not None else "max"
    if kind == "max":
        return probs.amax(-1)
    if targets is None:
        raise ValueError(
            "partition: confidence='label' needs class labels and the batch has none; use confidence='max' (the "
            "unsupervised variant) or 'auto'"
        )
    index = targets.long().view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    return probs.gather(-1, index).squeeze(-1)


def partition_targets(
    candidates: torch.Tensor, targets: torch.Tensor | None, kind: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the most confident of ``candidates [B, K, C]`` (index 0 = the initial student; the first wins ties).
    Returns ``(choice [B], its logits [B, C])``."""
    choice = confidence(candidates, targets, kind).argmax(dim=1)
    rows = torch.arange(len(candidates), device=candidates.device)
    return choice, candidates[rows, choice]


@register_loss("partition")
class PartitionKD(LossTerm):
    """KD where each sample's target is the more confident of the teacher(s) and a frozen copy of the initial student
    (Fantastic Gains' data partitioning).

    Args:
        weight: weight of the term.
        temperature: softmax temperature τ of the KL (> 0; the authors' ``kd_T`` is 1).
        confidence: ``"auto"`` (probability of the label when the batch has labels, else the maximum probability),
            ``"label"`` (supervised) or ``"max"`` (unsupervised).

    Example::

        >>> term = PartitionKD(temperature=1.0)
        >>> term.confidence
        'auto'
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, confidence: str = "auto") -> None:
        super().__init__(weight)
        if confidence not in CONFIDENCES:
            raise ValueError(f"partition: confidence must be one of {CONFIDENCES}, got {confidence!r}")
        self.temperature = check_temperature("partition", temperature)
        self.confidence = confidence
        self.initial: nn.Module | None = None
        self.members: list[str] = []
        #: values logged next to the loss (not part of it): ``teacher_fraction``, ``routed/<member>``.

    def setup(self, ctx: SetupContext) -> None:
        self.members = list(member_logits(ctx.teacher))
        if self.initial is None:
            self.initial = frozen_copy(ctx.student_model)

    def initial_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen initial student (eval mode, no gradient)."""
        from lightning_kd.engine import as_logits  # the engine imports the loss package: import here

        if self.initial is None:
            raise RuntimeError("partition: setup() must run before the first step (it copies the initial student)")
        self.initial.eval()
        with torch.no_grad():
            return as_logits(self.initial(inputs)).detach()

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if batch.inputs is None:
            raise ValueError(
                "partition: the batch carries no inputs (DistillBatch.inputs), which the frozen initial student needs; "
                "use DistillationModule or DistillCallback, which fill them in"
            )
        teachers = member_logits(batch.teacher, self.members, "partition")
        z_s = batch.student.logits
        candidates = torch.stack([self.initial_logits(batch.inputs), *teachers.values()], dim=1).float()
        choice, target = partition_targets(candidates, batch.targets, self.confidence)
        diagnostics = {"teacher_fraction": (choice > 0).float().mean()}
        if batch.teacher.members:
            diagnostics |= {f"routed/{name}": (choice == m + 1).float().mean() for m, name in enumerate(teachers)}
        self.diagnostics = diagnostics
        return kd_loss(z_s, target, self.temperature)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, confidence={self.confidence!r}"
