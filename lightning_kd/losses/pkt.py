"""Probabilistic knowledge transfer
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

On batch embeddings :math:`x_i` (student and teacher widths may differ; no connector), each model's cosine kernel
is turned into conditional probabilities over the batch:

.. math::

    K_{ij} = \\frac{1}{2}\\Big(\\frac{\\langle x_i, x_j\\rangle}{(\\lVert x_i\\rVert + \\epsilon)
    (\\lVert x_j\\rVert + \\epsilon)} + 1\\Big), \\qquad P_{ij} = \\frac{K_{ij}}{\\sum_k K_{ik}},

and the loss is :math:`\\mathrm{mean}_{i,j}\\; P^T_{ij}\\,\\log\\frac{P^T_{ij} + \\epsilon}{P^S_{ij} + \\epsilon}`
(a KL divergence averaged over all :math:`B^2` entries, not summed per row), with :math:`\\epsilon = 10^{-7}`, exactly
as in the authors' code (passalis/probabilistic_kt ``nn/pkt.py`` ``cosine_similarity_loss``), copied unchanged into
RepDistiller (``distiller_zoo/PKT.py``) and torchdistill (``PKTLoss``). The only deviation: their in-place
``x[x != x] = 0`` (NaN → 0 after normalising) is dropped, since a zero vector already normalises to 0 through the
``+ eps`` and a NaN input should surface as a non-finite loss rather than be hidden; and the norm is
``torch.linalg.vector_norm`` (same value) instead of ``sqrt(sum(x²))``, whose gradient is NaN for an all-zero
embedding (e.g. a dead ReLU feature vector).

Defaults follow the CRD benchmark code (HobbitLong/RepDistiller): penultimate embeddings (``feat[-1]``) and weight
30000 (``--distill pkt -a 0 -b 30000`` in ``scripts/run_cifar_distill.sh``, cross-entropy weight 1). The loss only
depends on the cosines between samples, so it is invariant to positive scaling of either model's embeddings and to
orthogonal maps of either embedding space.

Under DDP the probabilities are computed per rank over the rank's local batch (not gathered): the relations are
between the samples each rank sees, and the loss depends on the per-rank batch size.
"""

from __future__ import annotations

import torch

from lightning_kd.losses.base import DistillBatch, LossTerm, register_loss
from lightning_kd.taps import TapSpec


def _conditional_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalised shifted cosine kernel ``P`` (``[B, B]``) of the rows of ``x`` (``[B, D]``)."""
    # vector_norm (not sqrt(sum(x²)) as in the authors' code): same value, but a zero gradient (not NaN) at x_i = 0
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT loss on flattened embeddings ``f_s: [B, Ds]``, ``f_t: [B, Dt]``; the teacher side gets no gradient."""
    with torch.no_grad():
        p_t = _conditional_probabilities(f_t, eps)
    p_s = _conditional_probabilities(f_s, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register_loss("pkt")
class PKTLoss(LossTerm):
    """PKT: match the batch's conditional-probability (cosine kernel) distributions of student and teacher.

    Args:
        weight: weight of the term (30000 in the CRD benchmark's CIFAR-100 runs).
        eps: :math:`\\epsilon` of the normalisation and of the log ratio (authors' 1e-7).
        student_layer: student tap (default: penultimate embedding).
        teacher_layer: teacher tap (default: penultimate embedding).
    """

    def __init__(
        self,
        weight: float = 30000.0,
        eps: float = 1e-7,
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
    ) -> None:
        super().__init__(weight)
        self.eps = float(eps)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        s = batch.student[self.student_tap].float().flatten(1)
        t = batch.teacher[self.teacher_tap].float().flatten(1)
        if len(s) < 2:
            raise ValueError("pkt needs at least 2 samples per batch (relations between samples)")
        return pkt_loss(s, t, self.eps)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, eps={self.eps}"
