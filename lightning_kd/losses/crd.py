"""Contrastive representation distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699).

Student and teacher features (default: the penultimate embeddings) are mapped by trainable heads (linear + L2
normalisation, :class:`~lightning_kd.losses.memory.Embed`) to unit vectors :math:`s_i, t_i \\in \\mathbb{R}^{128}`.
Two memory banks hold an embedding of every training sample (:class:`~lightning_kd.losses.memory.ContrastMemory`).
With the student as anchor, the positive is the teacher-bank row of the same sample and the ``K`` negatives are
teacher-bank rows of other samples; each pair gets the (fixed-normalised) score

.. math::

    P_{ij} = \\frac{\\exp(\\langle m^T_j, s_i\\rangle / \\tau)}{Z_S}, \\qquad
    L_S = -\\frac{1}{B}\\sum_i \\Big[\\log\\frac{P_{ii}}{P_{ii} + K/N + \\epsilon}
    + \\sum_{j \\in \\mathrm{neg}(i)} \\log\\frac{K/N}{P_{ij} + K/N + \\epsilon}\\Big],

the NCE loss of the paper's Eq. (18)–(19) (critic :math:`h = P/(P + K/N)`, noise distribution uniform over the
:math:`N` training samples). :math:`L_T` is the same with the teacher embedding as anchor against the student bank,
and ``L = L_S + L_T``. The constants :math:`Z_S = N\\,\\overline{\\exp(\\cdot/\\tau)}` (and :math:`Z_T`) are estimated
once, on the first batch (all ``B(K+1)`` scores), and then kept fixed. After the loss, the banks' rows of the batch
move towards the new embeddings with momentum and are renormalised (no gradient).

Verified line by line against the authors' code, HobbitLong/RepDistiller ``crd/criterion.py`` (``CRDLoss``,
``ContrastLoss``, ``Embed``), ``crd/memory.py`` (``ContrastMemory``: bank initialisation, scores, Z on the first
batch, momentum update) and ``dataset/cifar100.py`` (negatives from other classes, ``exact`` positive), and against
torchdistill's ``CRDLoss`` (a refactoring of the same code; parity test to 1e-5 with injected negatives, see
``tests/test_crd.py``). ``eps`` = 1e-7 as in both. The only differences from RepDistiller are in the sampling of
negatives (class of each row learned from the batches; with replacement; own generator saved in the checkpoint) —
see :mod:`~lightning_kd.losses.memory` — and an ``F.normalize`` instead of a plain division by the norm (equal for
non-zero vectors). torchdistill's own sampler (``draw``) refers to an attribute that does not exist
(``self.prob``) and fails when no negatives are given; its dataset wrapper samples like RepDistiller.

Defaults from RepDistiller ``train_student.py`` / ``scripts/run_cifar_distill.sh``: ``feat_dim`` 128, ``nce_k``
16384, ``nce_t`` 0.07, ``nce_m`` 0.5, CRD weight β = 0.8 with cross-entropy weight 1 and no KD (``--distill crd -a 0
-b 0.8``; "CRD+KD" is ``-a 1 -b 0.8``: add a ``kd`` term). ``nce_k`` is capped at ``N − 1`` (with a warning) on
small datasets.

Under DDP the embeddings, indices and labels of all ranks are all-gathered (without gradient) before the bank update,
so every rank's banks hold every sample; each rank computes the loss of its own batch against negatives drawn from
the whole bank; :math:`Z` is the mean of the ranks' first-batch estimates.
"""

from __future__ import annotations

import torch

from lightning_kd.losses.base import register_loss
from lightning_kd.losses.memory import MemoryBankTerm, all_reduce_mean

EPS = 1e-7


def contrast_scores(anchor: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(⟨rows[i, j], anchor[i]⟩ / τ)``: ``anchor [B, d]``, ``rows [B, K+1, d]`` → ``[B, K+1]``."""
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


def nce_loss(probs: torch.Tensor, num_samples: int, eps: float = EPS) -> torch.Tensor:
    """The NCE loss of CRD's Eq. (18) on normalised scores ``probs [B, K+1]`` (column 0 = positive).

    ``-(Σ_i log(P_i0 / (P_i0 + K/N + eps)) + Σ_i Σ_{j≥1} log((K/N) / (P_ij + K/N + eps))) / B``.
    """
    b, k = probs.shape[0], probs.shape[1] - 1
    noise = k / float(num_samples)
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
    log_neg = torch.log(noise / (probs[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / b


@register_loss("crd")
class CRDLoss(MemoryBankTerm):
    """CRD: NCE between student and teacher embeddings with memory-bank negatives, in both directions.

    Args:
        weight: β, the weight of the term (0.8 in the paper's code).
        feat_dim: width of the contrast embeddings (128).
        nce_k: negatives per anchor (16384; capped at ``N − 1``).
        nce_t: temperature τ of the scores (0.07).
        nce_m: momentum of the memory-bank update (0.5).
        negatives: ``"other_class"`` (the authors' loaders: negatives from other classes, needs integer targets) or
            ``"instance"`` (any other sample).
        student_layer: student tap (default: penultimate embedding; flattened).
        teacher_layer: teacher tap (default: penultimate embedding; flattened).

    The batches must carry each sample's dataset index (``DistillBatch.indices``) and the training-set size must be
    known at setup. Returns ``{"student_anchor": L_S, "teacher_anchor": L_T}``.
    """

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "other_class",
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
    ) -> None:
        super().__init__(weight, feat_dim, nce_k, nce_t, nce_m, negatives, student_layer, teacher_layer)
        # Z of the student-anchor and teacher-anchor scores (RepDistiller's Z_v1, Z_v2); -1 = not estimated yet
        self.register_buffer("normalizers", torch.full((2,), -1.0))

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.normalizers = self.normalizers.to(ctx.student[self.student_tap].device)

    def contrast_parts(self, f_s, f_t, s, t, w_s, w_t) -> dict[str, torch.Tensor]:
        """The two NCE losses (student anchor vs the teacher bank, teacher anchor vs the student bank); Z is
        estimated on the first batch (averaged over ranks) and then kept."""
        out_s = contrast_scores(s, w_t, self.nce_t)
        out_t = contrast_scores(t, w_s, self.nce_t)
        n = self.memory.num_samples
        if bool((self.normalizers < 0).any()):
            estimate = all_reduce_mean(torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * n)
            self.normalizers.copy_(torch.where(self.normalizers < 0, estimate, self.normalizers))
        return {
            "student_anchor": nce_loss(out_s / self.normalizers[0], n),
            "teacher_anchor": nce_loss(out_t / self.normalizers[1], n),
        }
