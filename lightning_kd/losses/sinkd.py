"""Sinkhorn knowledge distillation (SinKD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Cui, Qin, Gao, Zhang, Xu, Wu, Li, Sun, Zhou, Li, "Sinkhorn Distance Minimization for Knowledge Distillation",
LREC-COLING 2024 (arXiv:2402.17110).

SinKD compares the *batch* of student distributions with the *batch* of teacher distributions through an
entropy-regularised optimal transport (the Sinkhorn distance) instead of a per-sample divergence. With
:math:`p^S_i = \\mathrm{softmax}(z^S_i/\\tau)`, :math:`p^T_j = \\mathrm{softmax}(z^T_j/\\tau)` for the :math:`B` samples
of the batch:

.. math::

    W_{ij} = \\lVert p^S_i - p^T_j \\rVert_1, \\qquad K = \\exp(-W/\\varepsilon), \\qquad
    P = \\underbrace{\\mathcal{C}\\,\\mathcal{R} \\cdots \\mathcal{C}\\,\\mathcal{R}}_{n\\ \\text{times}}(K),
    \\qquad L_{SinKD} = \\sum_{i,j} P_{ij} W_{ij},

where :math:`\\mathcal{R}` divides every row by its sum and :math:`\\mathcal{C}` every column by its sum (Sinkhorn-Knopp).
:math:`P` converges to the entropic transport plan whose rows and columns each sum to 1 (uniform marginals of mass
1 per sample: :math:`B` times the plan between the two uniform empirical measures), so the loss is :math:`B` times the
(sharp) Sinkhorn transport cost and grows with the batch size. The loss compares the two *sets* of distributions: it
is invariant to re-ordering the teacher's samples relative to the student's (a permutation of :math:`W`'s columns
permutes :math:`P`'s columns).

Checked against the authors' code, ``2018cx/SinKD`` ``loss.py`` (class ``Sinkhorn``, latest commit ``eb4b3da``; first
version ``saliency_mse`` in ``2b91a8e``): ``p_s, p_t = softmax(y/T)`` with ``T = 2`` hard-coded (the constructor's
``T`` argument is ignored); ``Wxy = torch.cdist(x, y, p=1)``; ``K = exp(-Wxy / epsilon)`` with ``epsilon = 0.1``;
``sinkhorn_normalized(K, n_iters=20)`` alternates ``x / x.sum(dim=1)`` then ``x / x.sum(dim=0)`` 20 times; the loss is
``torch.sum(P * Wxy)`` (a sum over the :math:`B\\times B` entries, no batch mean, no :math:`\\tau^2`). The plan is **not
detached**: gradients flow through the 20 normalisations into :math:`P` as well as through :math:`W`; we do the same.
The teacher's logits are detached here (the authors compute the teacher without ``no_grad`` but never update it).

Weight. The authors fold a constant into the loss: ``0.001 * sinkhorn_loss`` in ``loss.py`` at ``eb4b3da`` (GLUE),
``0.0008 * ... * 20 / 8 = 0.002`` in the first version ``2b91a8e``, ``0.0008`` in ``T0/lossd.py`` and
``GPT-Neo/lossd.py``; it is added to their cross-entropy (and, in their runs, to a Hinton KD term: ``kd+sinkhorn`` in
``script/student/*.sh``, ``T0/distillation.py``: ``0.1 * KL + 1 * Sinkhorn + CE``). The released GLUE driver is
ambiguous about any further factor: ``glue_train.py`` builds the term for ``sinkhorn`` in ``--distill_loss`` but
adds it (times ``--beta``, 0.8 in the scripts) only under the key ``saliency``. Here the constant is the term's
``weight``, default 0.001 (the latest ``loss.py``), and ``conf/loss/sinkd.yaml`` adds it to the cross-entropy with
weight 1; add a ``kd`` term to reproduce their KD + SinKD mixture. These NLP settings (GLUE, batch 16) are the only
published ones; for image classification the weight is a starting point to tune (the loss scales with the batch).
Defaults: :math:`\\tau = 2`, :math:`\\varepsilon = 0.1`, 20 iterations (all three from ``loss.py``).

Deviation (numerics only). The iteration runs in the log domain: :math:`\\log P \\leftarrow \\log P -
\\mathrm{logsumexp}_j \\log P` (rows), then the same over :math:`i` (columns), starting from :math:`-W/\\varepsilon`.
This is the same map as the authors' division by the sums (equal up to float rounding, tested), but it cannot
underflow: with the plain form a small :math:`\\varepsilon` (e.g. 0.01, :math:`e^{-200}` for :math:`W = 2`) makes
whole rows of :math:`K` zero in float32 and the division 0/0 gives NaN. All maths is in float32 whatever the input
dtype.

Under DDP the plan is computed per rank over the rank's local batch (nothing is gathered), so the loss and its
scale depend on the per-rank batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import (
    DistillBatch,
    LossTerm,
    SetupContext,
    check_number,
    check_temperature,
    register_loss,
)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"sinkd: expected logits of shape (batch, classes), got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"sinkd: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; the cost is the L1 distance between class distributions, so both models need the same "
            "classes and the same batch"
        )


def sinkhorn_plan(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp plan of the square cost matrix ``cost`` [B, B]: ``iterations`` times, normalise the rows of
    ``exp(-cost / epsilon)`` to sum 1, then the columns to sum 1 (the authors' ``sinkhorn_normalized``), computed in
    the log domain. Differentiable (the plan is not detached); float32."""
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"sinkhorn_plan: expected a square cost matrix [B, B], got {tuple(cost.shape)}")
    log_p = -cost.float() / epsilon
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    return log_p.exp()


def sinkhorn_cost(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cost matrix ``W_ij = ‖p^S_i − p^T_j‖_1`` [B, B] between every student and every teacher distribution."""
    return torch.cdist(student_probs.float(), teacher_probs.float(), p=1)


def sinkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> torch.Tensor:
    """SinKD loss ``Σ_ij P_ij W_ij`` of a batch (sum over the B×B plan, no batch mean; the authors' reduction), with
    ``W`` the L1 distances between ``softmax(z/τ)`` of every student and teacher sample and ``P`` its Sinkhorn plan.
    Float32 whatever the input dtype; the teacher is detached, the plan is not."""
    _check_logits(student_logits, teacher_logits)
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    cost = sinkhorn_cost(p_s, p_t)
    return (sinkhorn_plan(cost, epsilon, iterations) * cost).sum()


@register_loss("sinkd")
class SinKDLoss(LossTerm):
    """SinKD: Sinkhorn distance between the batch of student and the batch of teacher class distributions.

    Args:
        weight: weight of the term; the authors fold 0.001 into their loss (``2018cx/SinKD`` ``loss.py``; 0.002 in
            its first version, 0.0008 for T0/GPT-Neo). The loss is a sum over the B×B plan, so it grows with the
            (per-rank) batch size.
        temperature: softmax temperature τ of both models (> 0; authors: 2, no τ² factor).
        epsilon: entropic regularisation ε of the kernel ``exp(−W/ε)`` (> 0; authors: 0.1). Smaller values give a
            plan closer to the exact (unregularised) transport and need more iterations.
        iterations: number of row-then-column normalisations (>= 1; authors: 20).
    """

    def __init__(
        self, weight: float = 0.001, temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20
    ) -> None:
        super().__init__(weight)
        self.temperature = check_temperature("sinkd", temperature)
        check_number("sinkd", "epsilon", epsilon, positive=True)
        if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
            raise ValueError(f"sinkd: iterations must be an integer >= 1, got {iterations}")
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)

    def setup(self, ctx: SetupContext) -> None:
        _check_logits(ctx.student.logits, ctx.teacher.logits)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return sinkd_loss(batch.student.logits, batch.teacher.logits, self.temperature, self.epsilon, self.iterations)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, temperature={self.temperature}, epsilon={self.epsilon}, "
            f"iterations={self.iterations}"
        )
