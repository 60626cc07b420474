"""Relational knowledge distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).

On batch embeddings :math:`x_i` (student and teacher widths may differ; no connector):

- distance-wise: :math:`\\psi_D(i,j) = \\lVert x_i - x_j \\rVert_2 / \\mu`, with :math:`\\mu` the mean of the
  non-zero pairwise distances of the batch (per model);
  :math:`L_D = \\mathrm{mean}_{i,j}\\, \\ell_\\delta(\\psi_D^S, \\psi_D^T)`;
- angle-wise: :math:`e_{ij} = (x_i - x_j)/\\lVert x_i - x_j \\rVert`,
  :math:`\\psi_A(i,j,k) = \\langle e_{ij}, e_{kj} \\rangle`; :math:`L_A = \\mathrm{mean}_{i,j,k}\\,
  \\ell_\\delta(\\psi_A^S, \\psi_A^T)`,

with :math:`\\ell_\\delta` the smooth-L1 (Huber) loss, mean-reduced as in the authors' code (lenscloth/RKD).
``L = w_D L_D + w_A L_A``; defaults 25 and 50 on penultimate embeddings, as in the CRD benchmark code (the paper's
metric-learning setting uses 1 and 2). Both terms are invariant to scaling the embeddings.

Under DDP the relations are computed per rank over the rank's local batch (not gathered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, register_loss
from lightning_kd.taps import TapSpec


def pairwise_differences(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``diff[j, i] = x_i - x_j`` (``[B, B, D]``) and its Euclidean norm (``[B, B]``), gradient-safe at zero.

    Computed from explicit differences rather than the Gram expansion ``‖a‖² + ‖b‖² − 2⟨a, b⟩`` of the authors' code:
    the expansion loses the distance of near-duplicate samples to cancellation, which turns ``∂d/∂x`` (a unit vector)
    into an unbounded one. The norm is ``sqrt(max(‖diff‖², eps))``, so coincident samples get no gradient.
    """
    diff = x.unsqueeze(0) - x.unsqueeze(1)
    return diff, diff.pow(2).sum(dim=2).clamp(min=eps).sqrt()


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``x`` with a zero diagonal."""
    return pairwise_differences(x)[1] * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD loss on flattened embeddings ``[B, D]``."""
    with torch.no_grad():
        t = pairwise_distances(teacher)
        t = t / t[t > 0].mean()
    s = pairwise_distances(student)
    s = s / s[s > 0].mean()
    return F.smooth_l1_loss(s, t)


def _angles(x: torch.Tensor, rel_tol: float = 1e-4) -> torch.Tensor:
    """Cosines ``⟨e_ji, e_jk⟩`` of all triplets, flattened; ``e`` of (near-)coincident pairs is 0.

    The direction of a pair closer than ``rel_tol`` × the mean pairwise distance is undefined; giving it the unit
    vector of ``F.normalize`` would back-propagate gradients of order ``1/eps`` (1e12) and wreck training (seen on
    digits with resnet18: NaN at step 4). Such pairs contribute a zero cosine without gradient, as the ``i = j`` pairs
    do.
    """
    diff, norm = pairwise_differences(x)
    tol = rel_tol * norm.detach().mean().clamp(min=1e-12)
    unit = torch.where((norm > tol).unsqueeze(2), diff / norm.clamp(min=tol).unsqueeze(2), torch.zeros_like(diff))
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD loss on flattened embeddings ``[B, D]`` (``B³`` cosines)."""
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)


@register_loss("rkd")
class RKDLoss(LossTerm):
    """RKD distance + angle loss.

    Args:
        weight: weight of the whole term.
        distance_weight: :math:`w_D`.
        angle_weight: :math:`w_A`.
        student_layer: student tap (default: penultimate embedding).
        teacher_layer: teacher tap (default: penultimate embedding).
    """

    def __init__(
        self,
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
    ) -> None:
        super().__init__(weight)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        s = batch.student[self.student_tap].float().flatten(1)
        t = batch.teacher[self.teacher_tap].float().flatten(1)
        if len(s) < 2:
            raise ValueError("rkd needs at least 2 samples per batch (relations between samples)")
        parts = {}
        if self.distance_weight:
            parts["distance"] = self.distance_weight * rkd_distance_loss(s, t)
        if self.angle_weight:
            parts["angle"] = self.angle_weight * rkd_angle_loss(s, t)
        return parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
