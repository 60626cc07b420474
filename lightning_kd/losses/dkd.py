"""Decoupled knowledge distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).

With :math:`p = \\mathrm{softmax}(z/\\tau)` and :math:`t` the label, the binary distribution
:math:`b = [p_t, 1 - p_t]` (target vs. all non-target classes) and the distribution over the non-target classes only
:math:`\\hat p_i = \\mathrm{softmax}(z_{\\setminus t}/\\tau)_i`, :math:`i \\ne t`:

.. math::

    \\mathrm{TCKD} = \\mathrm{KL}(b^T \\,\\|\\, b^S), \\qquad
    \\mathrm{NCKD} = \\mathrm{KL}(\\hat p^T \\,\\|\\, \\hat p^S), \\qquad
    L_{DKD} = \\tau^2 \\, (\\alpha \\, \\mathrm{TCKD} + \\beta \\, \\mathrm{NCKD})

averaged over the batch. Classical KD decomposes as :math:`\\mathrm{KD} = \\mathrm{TCKD} + (1 - p^T_t)\\,
\\mathrm{NCKD}` (paper, Eq. 5); DKD frees the two weights.

Defaults are the authors' (``megvii-research/mdistiller``, ``mdistiller/engine/cfg.py``: ``DKD.CE_WEIGHT 1.0``,
``ALPHA 1.0``, ``BETA 8.0``, ``T 4.0``, ``WARMUP 20``); the CE weight is ``task_weight`` in ``conf/loss/dkd.yaml``.

Warm-up. ``mdistiller/distillers/DKD.py`` scales the loss by ``min(kwargs["epoch"] / self.warmup, 1.0)`` and
``mdistiller/engine/trainer.py`` counts epochs from 1 (``epoch = 1`` ... ``while epoch < cfg.SOLVER.EPOCHS + 1``,
passing ``epoch=epoch`` to the distiller), so the first epoch of training already gets ``1/warmup`` and epoch
``warmup`` (1-based) the full weight. :attr:`DistillBatch.epoch` is Lightning's 0-based ``current_epoch``, so this term
uses ``min((epoch + 1) / warmup, 1)``: the same factor at the same epoch of training (0.05 in the first of 20, 1.0
from the 20th, i.e. ``epoch >= 19``). The factor is constant within an epoch, as in the authors' code.
``warmup = 0`` disables the warm-up (factor 1).

The maths is our own: all in float32 whatever the input dtype; :math:`\\log b` uses ``log p_t`` gathered from
``log_softmax`` and ``log(1 - p_t) = logsumexp(z_{\\setminus t}/τ) - logsumexp(z/τ)`` (stable even when
:math:`p_t \\to 1`); :math:`\\hat p` is a ``log_softmax`` with the target logit set to ``-inf``, whose (zero)
contribution is then dropped from the KL sum. The teacher's logits are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss
from lightning_kd.losses.kd import standardize_logits


def _check_targets(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise ValueError(
            "dkd: the batch has no targets; DKD splits the logits into the target class and the non-target classes, "
            "so it needs class labels (use a dataset that yields (inputs, labels) or a label-free loss such as kd)"
        )
    if logits.dim() != 2:
        raise ValueError(f"dkd: expected logits of shape (batch, classes), got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got {logits.shape[1]}")
    targets = targets.reshape(-1).long()
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"dkd: {targets.shape[0]} targets for a batch of {logits.shape[0]} logits")
    return targets


def dkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    *,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(TCKD, NCKD)`` KL divergences at temperature τ (no τ², no weights, no batch mean), float32.

    With ``standardize``, both logits are z-scored per sample first (logit standardisation, Sun et al., CVPR 2024;
    :func:`~lightning_kd.losses.kd.standardize_logits`)."""
    targets = _check_targets(student_logits, targets)
    s, t = student_logits.float(), teacher_logits.detach().float()
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    s, t = s / temperature, t / temperature
    idx = targets.unsqueeze(1)
    target_mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)

    # TCKD: binary distribution [p_t, 1 - p_t]
    def log_binary(z: torch.Tensor) -> torch.Tensor:
        lse_all = torch.logsumexp(z, dim=1, keepdim=True)
        lse_other = torch.logsumexp(z.masked_fill(target_mask, float("-inf")), dim=1, keepdim=True)
        log_pt = z.gather(1, idx) - lse_all
        return torch.cat([log_pt, lse_other - lse_all], dim=1)

    log_b_s, log_b_t = log_binary(s), log_binary(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)

    # NCKD: softmax over the non-target classes only (target logit -> -inf, its 0·(-inf) term dropped)
    log_q_s = F.log_softmax(s.masked_fill(target_mask, float("-inf")), dim=1)
    log_q_t = F.log_softmax(t.masked_fill(target_mask, float("-inf")), dim=1)
    terms = log_q_t.exp() * (log_q_t - log_q_s)
    nckd = torch.where(target_mask, torch.zeros_like(terms), terms).sum(dim=1)
    return tckd, nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    alpha: float,
    beta: float,
    temperature: float,
    *,
    standardize: bool = False,
) -> torch.Tensor:
    """``τ² · (α·TCKD + β·NCKD)``, batch mean, computed in float32 whatever the input dtype."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, temperature, standardize=standardize)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


@register_loss("dkd")
class DKDLoss(LossTerm):
    """Decoupled KD on logits (needs labels); logs ``tckd`` and ``nckd`` (each already weighted, warmed up and τ²-scaled).

    Args:
        weight: weight of the term (``loss.terms.dkd.weight``); the authors' loss has none (1.0).
        alpha: weight α of TCKD (authors: 1.0).
        beta: weight β of NCKD (authors: 8.0 on CIFAR-100).
        temperature: softmax temperature τ (> 0; authors: 4.0).
        warmup: epochs of linear warm-up, factor ``min((epoch + 1) / warmup, 1)`` with the 0-based epoch (authors:
            20, with 1-based epochs and ``min(epoch / warmup, 1)``); 0 disables it.
        standardize: z-score the logits per sample before the softmax (logit standardisation, CVPR 2024).
    """

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
        standardize: bool = False,
    ) -> None:
        super().__init__(weight)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not math.isfinite(value):
                raise ValueError(f"dkd: {name} must be finite, got {value}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"dkd: warmup must be an integer number of epochs >= 0, got {warmup}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = check_temperature("dkd", temperature)
        self.warmup = int(warmup)
        self.standardize = bool(standardize)

    def warmup_factor(self, epoch: int) -> float:
        """``min((epoch + 1) / warmup, 1)`` for the 0-based ``epoch`` (1.0 when ``warmup == 0``)."""
        if self.warmup == 0:
            return 1.0
        return min((epoch + 1) / self.warmup, 1.0)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_parts(
            batch.student.logits, batch.teacher.logits, batch.targets, self.temperature, standardize=self.standardize
        )
        scale = self.warmup_factor(batch.epoch) * self.temperature**2
        return {"tckd": scale * self.alpha * tckd.mean(), "nckd": scale * self.beta * nckd.mean()}

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"warmup={self.warmup}, standardize={self.standardize}"
        )
