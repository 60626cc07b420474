"""Transformed teacher matching (TTM) and weighted TTM (WTTM)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024 (arXiv:2402.11148).

Temperature scaling is applied to the **teacher only**, read as a power transform of its distribution. With
:math:`p_T = \\mathrm{softmax}(z_T)`, :math:`p_S = \\mathrm{softmax}(z_S)` and :math:`\\gamma = 1/\\tau`:

.. math::

    \\tilde p_{T,j} = \\frac{p_{T,j}^{\\gamma}}{\\sum_k p_{T,k}^{\\gamma}}
                    = \\mathrm{softmax}(z_T/\\tau)_j, \\qquad
    U = \\sum_k p_{T,k}^{\\gamma}, \\qquad
    L_{TTM} = \\frac1N\\sum_i \\mathrm{KL}(\\tilde p_{T,i} \\,\\|\\, p_{S,i}), \\qquad
    L_{WTTM} = \\frac1N\\sum_i U_i \\, \\mathrm{KL}(\\tilde p_{T,i} \\,\\|\\, p_{S,i}).

The student is **not** temperature-scaled and there is **no** :math:`\\tau^2` factor. :math:`U_i \\ge 1` for
:math:`\\gamma \\le 1` (equality at :math:`\\gamma = 1`): smoother teacher outputs get more weight.

Checked against the authors' code (``zkxufo/TTM`` at ``fe457b3``):

- ``distiller_zoo/ttm.py`` lines 14-19: ``p_s = log_softmax(y_s)``; ``p_t = pow(softmax(y_t), l)``;
  ``norm = sum(p_t, 1)``; ``p_t = p_t / norm``; ``KL = sum(kl_div(p_s, p_t, reduction='none'), 1)``;
  ``loss = mean(KL)``.
- ``distiller_zoo/wttm.py`` lines 14-19: the same, with ``loss = mean(norm * KL)`` (``norm`` is the un-normalised
  power sum U). ``norm`` is not detached there; it depends on the teacher only, whose logits carry no gradient,
  so detaching it here (we detach the teacher's logits) changes nothing.
- ``train_student.py`` lines 60-68: ``-r/--gamma`` (CE weight, default 1), ``-b/--beta`` (distillation weight),
  ``--ttm_l`` (the exponent γ); ``helper/loops.py`` line 83: ``loss = gamma·CE + alpha·div + beta·kd``.
- ``README.md`` lines 17-23: the CIFAR-100 TTM example ``--distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0`` (γ = 0.1,
  i.e. τ = 10, β = 45, CE 1) → ``conf/loss/ttm.yaml``; lines 35-42: the WTTM example ``--add wttm --ttm_l 0.2 -a 4``
  (γ = 0.2, i.e. τ = 5, weight 4; there combined with CRD) → ``conf/loss/wttm.yaml``. The paper's appendix A.4
  lists per teacher/student pair values; these are starting points, not universal settings.

Here the parameter is the temperature τ (γ = 1/τ), as in the other logit terms. The maths is our own, in float32
whatever the input dtype and in log space: ``log p̃_T = γ·log_softmax(z_T) − logsumexp(γ·log_softmax(z_T))`` and
``log U = logsumexp(γ·log_softmax(z_T))`` (no underflow of ``p_T^γ``). With ``standardize``, both logits are
z-scored per sample first (logit standardisation, Sun et al., CVPR 2024;
:func:`~lightning_kd.losses.kd.standardize_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss
from lightning_kd.losses.kd import standardize_logits


def transformed_teacher(
    teacher_logits: torch.Tensor, temperature: float, *, standardize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p̃_T, log U)`` for γ = 1/τ: the log of the power-transformed teacher distribution ``p_T^γ / U`` (shape of
    the logits) and the log of the un-normalised power sum ``U = Σ_j p_{T,j}^γ`` (one per sample). Float32, teacher
    detached."""
    t = teacher_logits.detach().float()
    if standardize:
        t = standardize_logits(t)
    powered = F.log_softmax(t, dim=-1) / temperature  # γ · log p_T
    log_u = torch.logsumexp(powered, dim=-1)
    return powered - log_u.unsqueeze(-1), log_u


def ttm_per_sample(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(KL(p̃_T ‖ softmax(z_S)), U)``, float32; the student is not temperature-scaled."""
    s = student_logits.float()
    if standardize:
        s = standardize_logits(s)
    log_pt, log_u = transformed_teacher(teacher_logits, temperature, standardize=standardize)
    log_ps = F.log_softmax(s, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=-1)
    return kl, log_u.exp()


def ttm_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *, standardize: bool = False
) -> torch.Tensor:
    """TTM: batch mean of ``KL(p̃_T ‖ softmax(z_S))`` with ``p̃_T ∝ softmax(z_T)^(1/τ)``; no τ², float32."""
    kl, _ = ttm_per_sample(student_logits, teacher_logits, temperature, standardize=standardize)
    return kl.mean()


def wttm_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *, standardize: bool = False
) -> torch.Tensor:
    """WTTM: batch mean of ``U · KL(p̃_T ‖ softmax(z_S))`` with ``U = Σ_j p_{T,j}^(1/τ)``; no τ², float32."""
    kl, u = ttm_per_sample(student_logits, teacher_logits, temperature, standardize=standardize)
    return (u * kl).mean()


@register_loss("ttm")
class TTMLoss(LossTerm):
    """Transformed teacher matching on logits (temperature on the teacher only).

    Args:
        weight: weight of the term (β in the paper; ``loss.terms.ttm.weight``).
        temperature: teacher temperature τ (> 0); the power transform's exponent is γ = 1/τ.
        standardize: z-score both logits per sample first (logit standardisation, CVPR 2024).
    """

    _fn = staticmethod(ttm_loss)

    def __init__(self, weight: float = 45.0, temperature: float = 10.0, standardize: bool = False) -> None:
        super().__init__(weight)
        self.temperature = check_temperature(getattr(self, "registry_name", "ttm"), temperature)
        self.standardize = bool(standardize)

    @property
    def gamma(self) -> float:
        """The power-transform exponent γ = 1/τ (the authors' ``--ttm_l``)."""
        return 1.0 / self.temperature

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return self._fn(batch.student.logits, batch.teacher.logits, self.temperature, standardize=self.standardize)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, standardize={self.standardize}"


@register_loss("wttm")
class WTTMLoss(TTMLoss):
    """Weighted TTM: each sample's TTM divergence weighted by ``U = Σ_j p_{T,j}^γ`` (γ = 1/τ).

    Args:
        weight: weight of the term (β in the paper; ``loss.terms.wttm.weight``).
        temperature: teacher temperature τ (> 0); the power transform's exponent is γ = 1/τ.
        standardize: z-score both logits per sample first (logit standardisation, CVPR 2024).
    """

    _fn = staticmethod(wttm_loss)

    def __init__(self, weight: float = 4.0, temperature: float = 5.0, standardize: bool = False) -> None:
        super().__init__(weight, temperature, standardize)
