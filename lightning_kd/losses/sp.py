"""Similarity-preserving knowledge distillation (SP)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).

For each matched pair of activations :math:`f \\in \\mathbb{R}^{B\\times \\dots}`, with :math:`Q = \\operatorname{flatten}(f)
\\in \\mathbb{R}^{B\\times N}`:

.. math::

    G = Q Q^\\top \\in \\mathbb{R}^{B\\times B}, \\qquad \\tilde G_{[i,:]} = G_{[i,:]} / \\lVert G_{[i,:]} \\rVert_2,
    \\qquad L = \\frac{1}{B^2} \\lVert \\tilde G_T - \\tilde G_S \\rVert_F^2,

summed over the pairs. :math:`G` is :math:`B\\times B` whatever the widths and spatial sizes, so the student and the
teacher may differ in both (no connector). The loss is invariant to positive scaling of either activation, and zero when
the student's batch Gram matrix is a positive multiple of the teacher's (e.g. ``f_S = c·f_T`` or ``f_S = f_T R`` with
``R`` orthogonal: the pairwise similarities are preserved).

Notes:

- **row normalisation is L2** (paper Eq. 2; authors' code ``F.normalize(G)`` = ``p=2, dim=1``). torchdistill 1.1.5's
  ``SPKDLoss`` calls ``normalize(G, 1)``, whose second positional argument is the norm *order* ``p`` (``dim`` stays 1):
  it row-normalises by the L1 norm, which changes the value. We follow the paper; the test suite checks that we match
  torchdistill's computation with ``p = 2`` substituted, and differ from its actual output.
- **per rank under DDP.** The relations are between the samples of the rank's local batch (not gathered), as in the
  authors' single-GPU code; :math:`B` is the per-rank batch size.
- the maths is done in float32 (bf16/fp16 activations are upcast); the teacher side carries no gradient.

Sources (checked): HobbitLong/RepDistiller ``distiller_zoo/SP.py`` (``Similarity``, "verified by original author":
``G = mm(f, f.t())``, ``normalize(G)``, ``(G_t - G_s)² .sum() / bsz²``, a list of per-pair losses that
``train_student.py`` sums, with ``g_s = [feat_s[-2]]`` — the output of the last residual group, before pooling);
``scripts/run_cifar_distill.sh``: ``--distill similarity -b 3000``.

Defaults: weight γ = 3000 (the authors' CIFAR value, also RepDistiller's), one pair ``stage:-1`` → ``stage:-1`` (the
last stage of timm's ``feature_info``, i.e. RepDistiller's ``feat[-2]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LayerPairs, LossTerm, register_loss

DEFAULT_LAYERS = ("stage:-1",)


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """Row-wise L2-normalised batch Gram matrix ``normalize(Q Qᵀ)`` of ``f`` ([B, ...] → [B, B], float32)."""
    q = f.float().flatten(1)
    return F.normalize(q @ q.t(), p=2.0, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """SP loss of one pair: ``‖G̃_T − G̃_S‖²_F / B²`` (widths and spatial sizes may differ; batch sizes must match).

    The teacher's similarity matrix is computed without gradient.
    """
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"sp_loss: student {tuple(f_s.shape)} and teacher {tuple(f_t.shape)} differ in batch size")
    b = f_s.shape[0]
    with torch.no_grad():
        g_t = similarity_matrix(f_t)
    g_s = similarity_matrix(f_s)
    return (g_t - g_s).pow(2).sum() / (b * b)


@register_loss("sp")
class SPLoss(LossTerm):
    """Similarity-preserving KD between matched student/teacher layers, summed over the pairs.

    Args:
        weight: weight of the term (γ = 3000: the authors' CIFAR value, RepDistiller ``-b 3000``).
        student_layers: student taps, one per pair (module path, ``path:input`` or ``stage:N``).
        teacher_layers: teacher taps, same length and order (any widths / spatial sizes).

    ``forward`` returns a dict ``{student tap: pair loss}`` (logged as ``train/sp/<tap>``), whose sum is the loss.
    Relations are within the per-rank batch under DDP.
    """

    def __init__(
        self,
        weight: float = 3000.0,
        student_layers: Sequence[str] = DEFAULT_LAYERS,
        teacher_layers: Sequence[str] = DEFAULT_LAYERS,
    ) -> None:
        super().__init__(weight)
        self.layers = LayerPairs.parse("sp", student_layers, teacher_layers)
        self.student_taps, self.teacher_taps = self.layers.student, self.layers.teacher

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        return {name: sp_loss(batch.student[s_tap], batch.teacher[t_tap]) for name, s_tap, t_tap in self.layers}

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for _, s, t in self.layers)
        return f"weight={self.weight}, pairs=[{pairs}]"
