"""ATKD: adaptive teaching for autoregressive-LM distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Zhong et al., "Revisiting Knowledge Distillation for Autoregressive Language Models", ACL 2024 (authors' code:
github.com/WHU-ZQH/ATKD, ``distill/distill_trainer.py``, ``atkd`` and ``get_tckd_nckd``).

At each scored position with gold next token ``g``, the token-level forward KL splits (the DKD decomposition) into a
*target-oriented* part on the binary distributions ``[p_g, 1 − p_g]`` and a *diversity-oriented* part on the
renormalised non-gold distributions ``p̂_v = p_v / (1 − p_g)``:

.. math::

    \\mathrm{KL}(p \\,\\|\\, q) = \\underbrace{\\mathrm{KL}([p_g, 1-p_g] \\,\\|\\, [q_g, 1-q_g])}_{\\mathrm{TKD}}
    + (1 - p_g)\\,\\underbrace{\\mathrm{KL}(\\hat p \\,\\|\\, \\hat q)}_{\\mathrm{DKD}},

where the paper calls ``1 − p_g`` (the teacher's non-gold mass) the token's uncertainty coefficient. ATKD drops that
coefficient and changes the teaching mode by uncertainty: over the scored tokens of the batch, those whose
uncertainty is at or above the median (the "hard" ~50 %) get ``TKD + DKD``; the others ("easy") get ``DKD`` only;

.. math::

    \\mathcal{L} = \\lambda\\,\\mathrm{mean}_{\\mathrm{easy}}\\,\\mathrm{DKD}
    + (1 - \\lambda)\\,\\mathrm{mean}_{\\mathrm{hard}}(\\mathrm{TKD} + \\mathrm{DKD}),

each part averaged over its own tokens, ``λ = 0.2`` (the code's ``--alpha`` default). The authors' ``reverse``
setting applies the same split to the reverse KL, ``KL(q‖p) = KL([q_g, 1−q_g] ‖ [p_g, 1−p_g]) + (1 − q_g)·KL(q̂ ‖ p̂)``
(uncertainty still from the teacher): ``reverse=true`` here.

**Confirmed** against the authors' code: the decomposition (binary KL on the gold/non-gold masses; KL between softmaxes
over the non-gold logits), the uncertainty ``1 − p_T(g)`` at temperature τ, the split ``hard = u >= median`` over the
batch's scored tokens (``torch.median``: the lower middle value, so ties and even counts go to "hard"), the
unweighted parts (no ``1 − p_g`` factor), per-group means, ``λ = 0.2``, τ = 1 for both models, and the ``reverse``
setting. ``hard_fraction`` generalises the median to another quantile (0.5 = the authors' median exactly); the paper's
text was not available to check beyond its abstract. The split is computed per batch on each rank (as in the
authors' code); a group with no token contributes 0 (the authors' code would divide by zero).

Implementation: a cheap no-grad pass reads ``p_T(g)`` chunk by chunk, the threshold is the batch quantile, then the two
groups' losses are :class:`~lightning_kd.lm.divergences.TokenDivergence` functions run by
:func:`~lightning_kd.lm.divergences.token_divergence` (float32 chunks, closed-form gradient) with the gold ids as
``row_data``. Logs ``hard_fraction``, ``threshold``, ``easy`` and ``hard`` (the two group means) via
:attr:`diagnostics`.
"""

from __future__ import annotations

import math

import torch

from lightning_kd.lm.divergences import (
    DEFAULT_CHUNK_ELEMENTS,
    RowData,
    TokenDivergence,
    next_token_targets,
    token_divergence,
)
from lightning_kd.losses.base import DistillBatch, register_loss
from lightning_kd.losses.token import TokenDivergenceLoss, sequence_logits


# --------------------------------------------------------------------------------------------------------------------
# Per-position parts
# --------------------------------------------------------------------------------------------------------------------
def _xlogratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a·(log a − log b)`` with ``0·log 0 = 0``."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype))


def gold_split(log_x: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log x_g [n], log(1 − x_g) [n], log x̂ [n, V])`` for log-probability rows ``log_x`` and gold ids ``gold``.

    ``1 − x_g`` is computed as the log-sum-exp of the non-gold entries (accurate when ``x_g`` is close to 1);
    ``log x̂ = log x − log(1 − x_g)`` is the renormalised non-gold distribution (``−inf`` at the gold entry; all
    ``−inf`` when the row has no non-gold mass)."""
    index = gold.long().unsqueeze(-1)
    log_g = log_x.gather(-1, index).squeeze(-1)
    rest = log_x.scatter(-1, index, -torch.inf)
    log_r = torch.logsumexp(rest, dim=-1)
    safe_r = torch.where(torch.isfinite(log_r), log_r, torch.zeros((), dtype=log_r.dtype))
    return log_g, log_r, rest - safe_r.unsqueeze(-1)


def _forward_parts(
    log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData, with_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-KL ATKD: ``DKD = KL(p̂ ‖ q̂)`` (+ ``TKD = KL([p_g, p_r] ‖ [q_g, q_r])``) and ∂/∂log q.

    ``∂DKD/∂log q_v = q̂_v − p̂_v`` (v ≠ g, 0 at g); ``∂TKD/∂log q_g = −p_g``, ``∂TKD/∂log q_v = −p_r·q̂_v``."""
    gold = rows["gold"]
    lp_g, lp_r, lp_hat = gold_split(log_p, gold)
    lq_g, lq_r, lq_hat = gold_split(log_q, gold)
    has_rest = torch.isfinite(lp_r).unsqueeze(-1)  # the teacher puts mass off the gold token
    zero = torch.zeros((), dtype=log_q.dtype)
    p_hat, q_hat = lp_hat.exp(), lq_hat.exp()
    value = torch.where(has_rest, _xlogratio(p_hat, lp_hat, lq_hat), zero).sum(-1)
    grad = torch.where(has_rest, q_hat - p_hat, zero)
    if with_target:
        p_g, p_r = lp_g.exp(), lp_r.exp()
        value = value + _xlogratio(p_g, lp_g, lq_g) + _xlogratio(p_r, lp_r, lq_r)
        target_grad = (-p_r).unsqueeze(-1) * q_hat
        grad = grad + target_grad.scatter(-1, gold.long().unsqueeze(-1), (-p_g).unsqueeze(-1))
    return value, grad


def _reverse_parts(
    log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData, with_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse-KL ATKD: ``DKD = KL(q̂ ‖ p̂)`` (+ ``TKD = KL([q_g, q_r] ‖ [p_g, p_r])``) and ∂/∂log q.

    ``∂DKD/∂log q_v = q̂_v (log q̂_v − log p̂_v − DKD)`` (the reverse KL's gradient through the non-gold softmax);
    ``∂TKD/∂log q_g = q_g (log q_g − log p_g)``, ``∂TKD/∂log q_v = q_v (log q_r − log p_r)`` (the ``+q`` terms of
    both are removed by the softmax projection)."""
    gold = rows["gold"]
    lp_g, lp_r, lp_hat = gold_split(log_p, gold)
    lq_g, lq_r, lq_hat = gold_split(log_q, gold)
    has_rest = torch.isfinite(lq_r).unsqueeze(-1)  # the student puts mass off the gold token
    zero = torch.zeros((), dtype=log_q.dtype)
    q_hat = lq_hat.exp()
    per_entry = torch.where(has_rest, _xlogratio(q_hat, lq_hat, lp_hat), zero)
    value = per_entry.sum(-1)
    grad = per_entry - q_hat * value.unsqueeze(-1)
    if with_target:
        q_g, q_r = lq_g.exp(), lq_r.exp()
        tkd_g, tkd_r = _xlogratio(q_g, lq_g, lp_g), _xlogratio(q_r, lq_r, lp_r)
        value = value + tkd_g + tkd_r
        q = log_q.exp()
        rest_grad = torch.where(q > 0, q * (lq_r - lp_r).unsqueeze(-1), zero)
        grad = grad + rest_grad.scatter(-1, gold.long().unsqueeze(-1), tkd_g.unsqueeze(-1))
    return value, grad


def atkd_divergence(with_target: bool, reverse: bool = False) -> TokenDivergence:
    """The per-position ATKD loss of one group: ``DKD`` (easy tokens) or ``TKD + DKD`` (hard tokens), on the forward
    or the reverse KL. Needs ``rows["gold"]`` (the gold next-token ids)."""
    parts = _reverse_parts if reverse else _forward_parts

    def fn(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        return parts(log_q, log_p, rows, with_target)

    name = f"atkd_{'reverse' if reverse else 'forward'}_{'hard' if with_target else 'easy'}"
    return TokenDivergence(name, fn, {"reverse": float(reverse)})


# --------------------------------------------------------------------------------------------------------------------
# Batch statistic
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_gold_probability(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    gold: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``p_T(g) = softmax(z_T/τ)[g]`` at the positions of ``mask`` (in their flattened order), computed chunk by chunk
    in float32, with the vocabulary entries that are infinite in either model left out (as
    :func:`~lightning_kd.lm.divergences.token_divergence` does)."""
    vocab = teacher_logits.shape[-1]
    student, teacher = student_logits.detach().reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    rows_index = mask.reshape(-1).nonzero().squeeze(-1)
    gold_flat = gold.reshape(-1)
    chunk_rows = int(chunk_size) if chunk_size else max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    out = []
    for start in range(0, rows_index.numel(), chunk_rows):
        idx = rows_index[start : start + chunk_rows]
        z_t = teacher.index_select(0, idx).float()
        finite = torch.isfinite(z_t) & torch.isfinite(student.index_select(0, idx))
        z_t = torch.where(finite, z_t / temperature, torch.full((), -torch.inf))
        log_p = z_t.gather(-1, gold_flat.index_select(0, idx).long().unsqueeze(-1)).squeeze(-1)
        out.append((log_p - torch.logsumexp(z_t, dim=-1)).exp())
    return torch.cat(out) if out else teacher.new_zeros(0, dtype=torch.float32)


def hard_threshold(uncertainty: torch.Tensor, hard_fraction: float) -> torch.Tensor:
    """The value at sorted index ``floor((n − 1)·(1 − hard_fraction))`` of ``uncertainty`` (``hard_fraction = 0.5``:
    ``torch.median``, the lower middle value); tokens with ``uncertainty >= threshold`` are hard."""
    n = uncertainty.numel()
    k = math.floor((n - 1) * (1 - hard_fraction))
    return torch.kthvalue(uncertainty, k + 1).values


# --------------------------------------------------------------------------------------------------------------------
# Loss term
# --------------------------------------------------------------------------------------------------------------------
@register_loss("atkd")
class ATKDLoss(TokenDivergenceLoss):
    """ATKD (Zhong et al., ACL 2024): easy tokens learn only the diversity part, hard tokens the target and diversity
    parts of the token-level KL (module docstring).

    Args:
        weight: weight of the term.
        easy_weight: λ in [0, 1], the weight of the easy tokens' loss (the hard tokens' is ``1 − λ``); authors' 0.2.
        hard_fraction: share of scored tokens counted as hard, by teacher uncertainty ``1 − p_T(gold)``; 0.5 is the
            authors' median split.
        reverse: decompose the reverse KL(q ‖ p) instead of the forward KL (the authors' ``reverse`` setting).
        temperature: τ > 0 on both logits (authors: 1).
        shift_labels: labels aligned with the input ids (the logit at t is scored at label t + 1).
        chunk_size: positions per chunk (default: 2²¹ float32 values per chunk).
    """

    def __init__(
        self,
        weight: float = 1.0,
        easy_weight: float = 0.2,
        hard_fraction: float = 0.5,
        reverse: bool = False,
        temperature: float = 1.0,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        if not (isinstance(easy_weight, (int, float)) and math.isfinite(easy_weight) and 0 <= easy_weight <= 1):
            raise ValueError(f"atkd: easy_weight (λ) must be a number in [0, 1], got {easy_weight!r}")
        if not (isinstance(hard_fraction, (int, float)) and math.isfinite(hard_fraction) and 0 < hard_fraction <= 1):
            raise ValueError(f"atkd: hard_fraction must be a number in (0, 1], got {hard_fraction!r}")
        self.easy_weight = float(easy_weight)
        self.hard_fraction = float(hard_fraction)
        self.reverse = bool(reverse)
        self.easy_div = atkd_divergence(with_target=False, reverse=self.reverse)
        self.hard_div = atkd_divergence(with_target=True, reverse=self.reverse)
        self.params = {}

    def split(self, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(easy mask, hard mask, gold ids, threshold)`` of this batch (no gradient)."""
        if batch.targets is None:
            raise ValueError(
                "atkd: needs the gold next tokens, but the batch has no labels; give token batches a 'labels' key "
                "(-100 = ignored), as TextDataModule does"
            )
        student = sequence_logits("atkd", batch.student.logits)
        mask = self.positions(batch)
        gold = next_token_targets(batch.targets, self.shift_labels).clamp_min(0)
        p_gold = teacher_gold_probability(student, batch.teacher.logits, mask, gold, self.temperature, self.chunk_size)
        if p_gold.numel() == 0:
            return mask, mask, gold, p_gold.new_zeros(())
        uncertainty = 1 - p_gold
        threshold = hard_threshold(uncertainty, self.hard_fraction)
        hard_rows = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        hard_rows[mask.reshape(-1).nonzero().squeeze(-1)] = uncertainty >= threshold
        hard = hard_rows.reshape(mask.shape)
        return mask & ~hard, hard, gold, threshold

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        student = sequence_logits("atkd", batch.student.logits)
        easy, hard, gold, threshold = self.split(batch)
        common = {"temperature": self.temperature, "chunk_size": self.chunk_size, "row_data": {"gold": gold}}
        easy_loss = token_divergence(student, batch.teacher.logits, easy, self.easy_div, **common)
        hard_loss = token_divergence(student, batch.teacher.logits, hard, self.hard_div, **common)
        n_hard, n_easy = hard.sum(), easy.sum()
        self.diagnostics = {
            "hard_fraction": (n_hard / (n_hard + n_easy).clamp_min(1)).float(),
            "threshold": threshold.detach().float(),
            "easy": easy_loss.detach(),
            "hard": hard_loss.detach(),
        }
        return self.easy_weight * easy_loss + (1 - self.easy_weight) * hard_loss

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, easy_weight={self.easy_weight}, hard_fraction={self.hard_fraction}, "
            f"reverse={self.reverse}, temperature={self.temperature}"
        )


__all__ = ["ATKDLoss", "atkd_divergence", "gold_split", "hard_threshold", "teacher_gold_probability"]
