"""DIST: relation matching of class probabilities
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022 (arXiv:2205.10536);
authors' code: ``hunto/image_classification_sota``, ``lib/models/losses/dist_kd.py``.

With :math:`P_S = \\mathrm{softmax}(Z_S/\\tau)` and :math:`P_T = \\mathrm{softmax}(Z_T/\\tau)` (``B × C``) and the
distance :math:`d(u, v) = 1 - \\rho(u, v)`, where :math:`\\rho` is Pearson's correlation (the cosine of the
mean-centred vectors),

.. math::

    L_{inter} = \\frac{1}{B} \\sum_{i=1}^{B} d\\big(P_S[i, :], P_T[i, :]\\big), \\qquad
    L_{intra} = \\frac{1}{C} \\sum_{c=1}^{C} d\\big(P_S[:, c], P_T[:, c]\\big),

    L_{DIST} = \\tau^2 \\big(\\beta L_{inter} + \\gamma L_{intra}\\big).

Pearson's ρ is invariant to positive scaling and shifting of either vector (the paper's argument for a "relaxed"
match: only the ranking/relation of the teacher's probabilities is asked for, not their values). The loss is applied
to softmax outputs, so of the logits it is invariant to a per-sample shift only.

Defaults β = γ = τ = 1, as ``DIST(beta=1, gamma=1, tau=1)`` in the authors' ``kd_loss.py`` (``kd: 'dist'``).
``conf/loss/dist.yaml`` follows the authors' ImageNet recipe ``configs/strategies/distill/resnet_dist.yaml``:
``ori_loss_weight: 1.`` (CE) and ``kd_loss_weight: 2.`` with β = γ = τ = 1 (their CIFAR recipe ``dist_cifar.yaml``
uses the same weights with τ = 4, ``kd: dist_t4``).

Details:

* ``ρ(a, b) = ⟨ā, b̄⟩ / (‖ā‖·‖b̄‖ + eps)`` exactly as the authors' ``cosine_similarity`` (``eps = 1e-8``); a
  constant vector (e.g. a class column whose probability is equal across the batch) has ρ = 0, i.e. d = 1.
  torchdistill's ``DISTLoss`` uses ``torch.nn.functional.cosine_similarity``, which clamps each norm separately,
  ``⟨ā, b̄⟩ / (max(‖ā‖, eps)·max(‖b̄‖, eps))``: identical to ~1e-7 on ordinary inputs, different only when a centred
  norm is within a few orders of magnitude of ``eps`` (nearly-constant probability vectors); see ``tests/test_dist.py``.
* Computed in float32 whatever the logits' dtype (bf16/fp16 autocast); the teacher's probabilities are detached.
* The intra-class term couples the samples of the batch (column correlations over the batch): under DDP it is
  computed on each rank's local batch (as in the authors' code), so it depends on the per-device batch size; with a
  batch of one sample every column is constant and the intra term is the constant 1 (no gradient).
"""

from __future__ import annotations

import math

import torch

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two ``N × D`` tensors: ``⟨ā, b̄⟩ / (‖ā‖·‖b̄‖ + eps)`` with ``ā = a − mean(a)``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over samples of ``1 − ρ(p_S[i, :], p_T[i, :])`` (``B × C`` inputs)."""
    return 1.0 - pearson_correlation(p_s, p_t, eps).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over classes of ``1 − ρ(p_S[:, c], p_T[:, c])`` (correlation across the batch)."""
    return inter_class_relation(p_s.transpose(0, 1), p_t.transpose(0, 1), eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``τ² · (β · inter + γ · intra)`` on ``softmax(z/τ)`` of ``B × C`` logits, in float32; teacher detached."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=1)
    p_t = torch.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = inter_class_relation(p_s, p_t, eps)
    intra = intra_class_relation(p_s, p_t, eps)
    return temperature**2 * (beta * inter + gamma * intra)


@register_loss("dist")
class DISTLoss(LossTerm):
    """DIST (Huang et al., NeurIPS 2022) on logits: Pearson-correlation matching of class probabilities.

    Args:
        weight: weight of the term (``loss.terms.dist.weight``).
        beta: weight β of the inter-class (per-sample, across classes) relation (≥ 0).
        gamma: weight γ of the intra-class (per-class, across the batch) relation (≥ 0).
        temperature: softmax temperature τ (> 0); the loss is multiplied by τ².
        eps: added to the product of norms in the correlation's denominator (≥ 0).
    """

    def __init__(
        self,
        weight: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(weight)
        for name, value in (("beta", beta), ("gamma", gamma), ("eps", eps)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"dist: {name} must be a finite number >= 0, got {value}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = check_temperature("dist", temperature)
        self.eps = float(eps)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return dist_loss(batch.student.logits, batch.teacher.logits, self.beta, self.gamma, self.temperature, self.eps)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, beta={self.beta}, gamma={self.gamma}, "
            f"temperature={self.temperature}, eps={self.eps}"
        )
