"""Dark Knowledge with Permuted Predictions (DKPP)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Furlanello, Lipton, Tschannen, Itti, Anandkumar, "Born-Again Neural Networks", ICML 2018 (arXiv:1805.04770),
section 3.2 "Dark Knowledge Under the Light", Eq. (11).

DKPP asks whether the *attribution* of the teacher's dark knowledge to particular wrong classes matters: the student
is distilled towards the teacher's distribution with its argmax probability kept in place and all the other
probabilities randomly permuted among the other classes. The moments of the distribution survive; which class gets
which probability (the class-similarity structure) does not. With :math:`\\phi_s` a random permutation of the
non-argmax classes of sample :math:`s` (fixing the argmax :math:`m_s`):

.. math::

    \\tilde p_{T,s} = \\phi_s\\big(\\mathrm{softmax}(z_{T,s}/\\tau)\\big), \\qquad
    L_{DKPP} = \\tau^2 \\cdot \\frac{1}{b} \\sum_s \\mathrm{KL}\\big(\\tilde p_{T,s} \\,\\|\\, \\mathrm{softmax}(z_{S,s}/\\tau)\\big)

Because the softmax commutes with permutations, :math:`\\tilde p_T = \\mathrm{softmax}(\\phi(z_T)/\\tau)`: the term
permutes the teacher's *logits* (:func:`permute_non_argmax`) and calls :func:`~lightning_kd.losses.kd.kd_loss`, so it
is exactly KD with permuted teacher predictions (and exactly KD when there are 2 classes). At :math:`\\tau = 1` (the
paper: plain softmax outputs, the default) the gradient per sample is the paper's Eq. (11),
:math:`(q_{m,s} - \\max p_{\\cdot,s}) + \\sum_{i \\ne m} (q_{i,s} - \\phi(p)_{i,s})`, divided by :math:`b`. KL and the
paper's cross-entropy differ by the teacher's entropy, a constant, so the gradients are the same.

Randomness. The paper says only that the non-argmax outputs are "randomly permute[d]". Here every sample gets its own
uniformly random permutation, drawn afresh at every training step — a reconstruction, unconfirmed by the authors'
code (not public). The permutations of step ``s`` come from a CPU ``torch.Generator`` seeded with a splitmix64 hash
of ``(seed, s)`` (:func:`dkpp_step_seed`): the same ``seed`` and step always give the same permutations (reruns,
resumed fits), independently of the global RNG; within a step, samples are permuted independently by their position
in the batch (so the micro-batches of one accumulated step, or the processes of a DDP step, reuse the same draws for
the same batch positions — of different samples).

Checked against: the paper's text (ICML 2018: "we permute the non-argmax outputs of the teacher's predicted
distribution", "randomly permute each output dimension except the argmax one"; DKPP students are "trained only from
teacher outputs", i.e. ``task_weight = 0`` in ``conf/loss/dkpp.yaml``) and Eq. (11) from a public transcription of the
paper. The public re-implementation ``thetechdude124/Born-Again-NNs-From-Scratch`` (``DKPP_Distillation_Loss.py``)
shuffles whole rows across the batch instead, which does not keep each sample's argmax; we follow the paper's text.
The code here is our own.
"""

from __future__ import annotations

import torch

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss
from lightning_kd.losses.kd import kd_loss

_MASK64 = (1 << 64) - 1


def dkpp_step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for ``(seed, step)``: the splitmix64 finaliser of ``seed · φ64 + step`` (distinct,
    well-mixed seeds for neighbouring steps and seeds)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def permute_non_argmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row of ``logits`` ``[B, C]`` with its argmax entry kept in place and the other ``C - 1`` entries moved by
    an independent, uniformly random permutation (drawn on the CPU from ``generator``). The values are only moved, so
    each row keeps its multiset of values (and of probabilities, since the softmax commutes with permutations)."""
    if logits.dim() != 2:
        raise ValueError(f"dkpp: expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    b, c = logits.shape
    rows = torch.arange(b, device=logits.device)
    top = logits.argmax(dim=-1)
    # Two orderings of each row's positions, both with the argmax first: the natural one and a random one. Position
    # random[j] receives the value at natural[j]; j = 0 maps the argmax onto itself, the rest is a uniform bijection.
    keys = torch.rand(b, c, generator=generator).to(logits.device)
    keys[rows, top] = -1.0
    natural = torch.arange(c, device=logits.device, dtype=keys.dtype).expand(b, c).clone()
    natural[rows, top] = -1.0
    return torch.empty_like(logits).scatter_(1, keys.argsort(dim=-1), logits.gather(1, natural.argsort(dim=-1)))


def dkpp_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``τ² · KL(softmax(φ(z_T)/τ) ‖ softmax(z_S/τ))``, batch mean, float32, with ``φ`` = :func:`permute_non_argmax`."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"dkpp: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; both must be (batch, classes)"
        )
    return kd_loss(student_logits, permute_non_argmax(teacher_logits.detach(), generator), temperature)


@register_loss("dkpp")
class DKPPLoss(LossTerm):
    """KD towards the teacher's distribution with its non-argmax probabilities randomly permuted (BAN's DKPP).

    Args:
        weight: weight of the term (``loss.terms.dkpp.weight``).
        temperature: softmax temperature τ (> 0); the paper uses plain softmax outputs (1).
        seed: seed of the permutations; those of training step ``s`` are drawn from ``dkpp_step_seed(seed, s)``.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__(weight)
        self.temperature = check_temperature("dkpp", temperature)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"dkpp: seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of training step ``step``."""
        return torch.Generator().manual_seed(dkpp_step_seed(self.seed, step))

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return dkpp_loss(batch.student.logits, batch.teacher.logits, self.temperature, self.generator(batch.step))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, seed={self.seed}"
