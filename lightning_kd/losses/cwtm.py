"""Confidence-Weighted by Teacher Max (CWTM)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Furlanello, Lipton, Tschannen, Itti, Anandkumar, "Born-Again Neural Networks", ICML 2018 (arXiv:1805.04770),
section 3.2 "Dark Knowledge Under the Light", Eq. (10).

The paper asks whether knowledge distillation works because of the information in the teacher's non-argmax outputs,
or because it re-weights the samples by the teacher's confidence. CWTM keeps only the re-weighting: the student is
trained with the ordinary cross-entropy on the *labels*, each sample weighted by the teacher's maximum probability
(whether or not the teacher is right), normalised over the mini-batch:

.. math::

    w_s = \\frac{\\max_c p_T(c \\mid x_s)}{\\sum_{u=1}^{b} \\max_c p_T(c \\mid x_u)}, \\qquad
    L_{CWTM} = \\sum_{s=1}^{b} w_s \\, \\mathrm{CE}\\big(\\mathrm{softmax}(z_{S,s}), y_s\\big)

with :math:`p_T = \\mathrm{softmax}(z_T)` (no temperature: the paper uses plain softmax outputs). The weights sum to 1
over the batch, so ``L`` is the ordinary batch-mean cross-entropy when the teacher is equally confident on every
sample, and its gradient with respect to the student's logits is the paper's Eq. (10),
:math:`\\sum_s w_s (q_s - y_s)` (``tests/test_cwtm.py`` checks it with autograd).

Checked against: the paper's text (ICML 2018 version: CWTM "weight[s] each example in the student's loss function
(standard cross-entropy with ground truth labels) by the confidence of the teacher model on that example (even if the
teacher [is] wrong)", an approximation of the importance-weighted gradient of Eq. 9 with the teacher's max output in
place of :math:`p_{*,s}`); Eqs. 9-10 themselves from a public transcription of the paper (the text copy we read had
the formulas stripped): :math:`\\sum_s \\frac{\\max p_{\\cdot,s}}{\\sum_u \\max p_{\\cdot,u}} (q_{*,s} - y_{*,s})`, i.e.
batch-normalised weights with no further ``1/b``; and the public re-implementation
``thetechdude124/Born-Again-NNs-From-Scratch`` (``CWTM_Distillation_Loss.py``: the same batch-normalised
max-probability weights, times an extra ``1/b``, which only rescales the learning rate — we follow the paper, whose
normalised weights already average over the batch). The weights are per mini-batch (under DDP: per process), as in
the paper. The code here is our own.

The term *is* the label loss (:attr:`replaces_task_loss`): train it with ``task_weight = 0`` (``conf/loss/cwtm.yaml``)
unless you want an extra unweighted cross-entropy. With mixup's probability targets (``DistillBatch.soft_targets``)
the per-sample cross-entropy is :math:`-\\sum_c y_{s,c} \\log q_{s,c}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, register_loss


def cwtm_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``max_c softmax(z_T)_c / Σ_batch max_c softmax(z_T)_c`` (float32, ``[B]``, sum 1, no
    gradient)."""
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] == 0:
        raise ValueError(f"cwtm: expected teacher logits of shape (batch, classes), got {tuple(teacher_logits.shape)}")
    with torch.no_grad():
        confidence = F.softmax(teacher_logits.detach().float(), dim=-1).amax(dim=-1)
        return confidence / confidence.sum()


def cwtm_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    soft_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_s w_s · CE(z_S,s, y_s)`` with :func:`cwtm_weights`; float32 whatever the input dtype.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (only their max probability per sample is used).
        targets: class indices ``[B]``; ignored when ``soft_targets`` is given.
        soft_targets: probability targets ``[B, C]`` (mixup), or ``None``.
    """
    if soft_targets is None and targets is None:
        raise ValueError(
            "cwtm: the batch has no targets; CWTM is the cross-entropy on the labels weighted by the teacher's "
            "confidence, so it needs class labels (use a dataset that yields (inputs, labels), or a label-free loss "
            "such as kd or dkpp)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"cwtm: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; both must be (batch, classes)"
        )
    weights = cwtm_weights(teacher_logits)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    if soft_targets is not None:
        per_sample = -(soft_targets.float() * log_q).sum(dim=-1)
    else:
        labels = targets.reshape(-1).long()  # type: ignore[union-attr]
        if labels.shape[0] != log_q.shape[0]:
            raise ValueError(f"cwtm: {labels.shape[0]} targets for a batch of {log_q.shape[0]} logits")
        per_sample = F.nll_loss(log_q, labels, reduction="none")
    return (weights * per_sample).sum()


@register_loss("cwtm")
class CWTMLoss(LossTerm):
    """Label cross-entropy weighted per sample by the teacher's batch-normalised max probability (BAN's CWTM).

    Args:
        weight: weight of the term (``loss.terms.cwtm.weight``).

    It replaces the task loss (:attr:`replaces_task_loss`): ``DistillationModule`` then defaults ``task_weight`` to 0.
    """

    replaces_task_loss = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return cwtm_loss(batch.student.logits, batch.teacher.logits, batch.targets, batch.soft_targets)
