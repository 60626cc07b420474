"""Token-level divergences over a vocabulary, chunked
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Language-model distillation compares, at every unmasked position, the teacher's next-token distribution
``p = softmax(z_T / τ)`` with the student's ``q = softmax(z_S / τ)`` over a vocabulary of tens of thousands of
entries. Written naively, the float32 log-probabilities of both models and the divergence's intermediates are
materialised for the whole ``batch × sequence × vocabulary`` (TRL's ``generalized_jsd_loss`` at 4 × 1024 × 50k
holds a dozen 0.8 GB tensors), and autograd keeps most of them until the backward pass.

:func:`token_divergence` bounds that memory. Positions are processed in chunks of rows (``chunk_size``); each chunk
is cast to float32, its per-position losses and the gradient with respect to the student's logits are computed in
closed form, the gradient is written into one buffer of the logits' size and dtype, and the chunk's temporaries are
freed. Backward only scales that buffer. Peak memory above the inputs is therefore one logits-sized gradient (which
backward would allocate anyway) plus a few chunk-sized float32 arrays, whatever the vocabulary.

Every divergence ``D`` is a function of the two log-probability rows that returns its per-position value and
``h = ∂D/∂log q`` (the gradient with respect to the student's log-probabilities). Through the softmax,

.. math::

    \\frac{\\partial D}{\\partial z_{S,v}} = \\frac{1}{\\tau}\\Big(h_v - q_v \\sum_u h_u\\Big),

so adding a divergence is writing ``D`` and ``h`` (:class:`TokenDivergence`); the tests check every ``h`` against
autograd on the same formula.

Shared rules (DistiLLM's ``losses.py``, TRL's GKD, TAID's code): softmax in float32 whatever the logits' dtype;
positions whose label is ``-100`` are skipped; vocabulary entries whose logit is infinite in either model (padded
vocabulary rows) contribute nothing; the result is the mean over unmasked positions (or ``sum / normalizer``, e.g.
the number of label tokens of the whole accumulated batch, as TRL's ``num_items_in_batch``). No ``τ²`` factor, as in
TRL and DistiLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
#: float32 elements per chunk (rows × vocabulary) when ``chunk_size`` is not given: 2²¹ = 8 MiB per array.
DEFAULT_CHUNK_ELEMENTS = 1 << 21

RowData = Mapping[str, torch.Tensor]
#: ``(log_q, log_p, rows) -> (per-position value [n], ∂value/∂log_q [n, V])``, float32, rows = per-position extras;
#: ``log_p`` is ``None`` when the teacher comes through the extras (``token_divergence(..., teacher_logits=None)``).
DivergenceFn = Callable[[torch.Tensor, torch.Tensor, RowData], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------------------
def next_token_mask(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Which logit positions are scored: ``mask[b, t] = labels[b, t + 1] != -100`` (the logit at ``t`` predicts the
    token at ``t + 1``; the Hugging Face convention, where labels are aligned with ``input_ids``), ``False`` at the
    last position. With ``shift=False`` the labels are already aligned with the logits: ``labels != -100``."""
    if not shift:
        return labels != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask


def next_token_targets(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """The label each logit position predicts: ``labels[b, t + 1]`` (``-100`` at the last position), or ``labels``
    itself with ``shift=False``."""
    if not shift:
        return labels
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


def position_mask(
    labels: torch.Tensor | None, logits: torch.Tensor, shift: bool = True, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The positions of ``logits [B, T, V]`` to score: from ``labels`` (:func:`next_token_mask`), else from the
    ``attention_mask`` (real next tokens), else every position but the last."""
    if labels is not None:
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}; labels "
                "must be [batch, sequence] like the input ids (-100 = ignored)"
            )
        return next_token_mask(labels, shift)
    if attention_mask is not None:
        return next_token_mask(torch.where(attention_mask.bool(), 0, IGNORE_INDEX), shift)
    return next_token_mask(torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device), shift)


# --------------------------------------------------------------------------------------------------------------------
# Divergences: value and ∂value/∂log q per position
# --------------------------------------------------------------------------------------------------------------------
def _where_finite(value: torch.Tensor, finite: torch.Tensor | None) -> torch.Tensor:
    return value if finite is None else torch.where(finite, value, torch.zeros((), dtype=value.dtype))


def _xlogratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a · (log a − log b)`` with ``0 · log 0 = 0``."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype))


def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p ‖ q) = Σ p (log p − log q); ∂/∂log q = −p. Mass-covering (Hinton KD's divergence)."""
    p, fin = log_p.exp(), rows.get("finite")
    return _where_finite(_xlogratio(p, log_p, log_q), fin).sum(-1), _where_finite(-p, fin)


def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q ‖ p) = Σ q (log q − log p) (MiniLLM's token-level form); ∂/∂log q = q (log q − log p) (+ q, which the
    softmax projection removes). Mode-seeking."""
    q, fin = log_q.exp(), rows.get("finite")
    value = _where_finite(_xlogratio(q, log_q, log_p), fin)
    return value.sum(-1), value


def mixture_log(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """``log(w · p + (1 − w) · q)`` from log-probabilities, stably (``0 < w < 1``)."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


@dataclass(frozen=True)
class TokenDivergence:
    """A divergence over the vocabulary: ``fn(log_q, log_p, rows) -> (value [n], ∂value/∂log_q [n, V])``.

    Attributes:
        name: what it is called in logs and errors.
        fn: the per-position computation on float32 rows (``rows`` holds per-position extras, e.g. ``"finite"``).
        params: its hyperparameters, for ``repr``.
    """

    name: str
    fn: DivergenceFn
    params: dict[str, float] = field(default_factory=dict)

    def __call__(self, log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(log_q, log_p, rows)


def symmetric_kl(reverse_weight: float = 0.5) -> TokenDivergence:
    """``(1 − λ) · KL(p ‖ q) + λ · KL(q ‖ p)`` (DistiLLM's ``symmetric_kl``; λ = 0.5 gives the symmetric KL)."""
    lam = _check_unit("symmetric_kl", "reverse_weight", reverse_weight)

    def fn(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        f_value, f_grad = forward_kl(log_q, log_p, rows)
        r_value, r_grad = reverse_kl(log_q, log_p, rows)
        return (1 - lam) * f_value + lam * r_value, (1 - lam) * f_grad + lam * r_grad

    return TokenDivergence("symmetric_kl", fn, {"reverse_weight": lam})


def generalized_jsd(beta: float = 0.5) -> TokenDivergence:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al., "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes", ICLR 2024), as TRL's ``generalized_jsd_loss`` defines it:

    ``m = β·p + (1 − β)·q``, ``JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``; β = 0 is exactly the forward KL
    KL(p ‖ q) and β = 1 exactly the reverse KL KL(q ‖ p) (the general formula tends to 0 at both ends).
    ``∂JSD_β/∂q = (1 − β)(log q − log m)``, so ``∂/∂log q = (1 − β)·q·(log q − log m)``.
    """
    b = _check_unit("generalized_jsd", "beta", beta)
    if b == 0:
        return TokenDivergence("generalized_jsd", forward_kl, {"beta": 0.0})
    if b == 1:
        return TokenDivergence("generalized_jsd", reverse_kl, {"beta": 1.0})

    def fn(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        fin = rows.get("finite")
        log_m = mixture_log(log_p, log_q, b)
        q_part = _where_finite(_xlogratio(log_q.exp(), log_q, log_m), fin)
        value = b * _where_finite(_xlogratio(log_p.exp(), log_p, log_m), fin) + (1 - b) * q_part
        return value.sum(-1), (1 - b) * q_part

    return TokenDivergence("generalized_jsd", fn, {"beta": b})


def total_variation(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
    """TVD = ½ Σ |p − q| (DistiLLM's ``tv_distance``); ∂/∂q = ½ sign(q − p), so ∂/∂log q = ½ q sign(q − p)."""
    fin = rows.get("finite")
    q, diff = log_q.exp(), log_q.exp() - log_p.exp()
    return 0.5 * _where_finite(diff.abs(), fin).sum(-1), _where_finite(0.5 * q * diff.sign(), fin)


def skew_forward_kl(alpha: float = 0.1) -> TokenDivergence:
    """Skew KL of DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    ICML 2024): ``SKL_α = KL(p ‖ α·p + (1 − α)·q)``; α = 0 is the forward KL. With ``m`` the mixture,
    ``∂/∂q = −(1 − α)·p/m``, so ``∂/∂log q = −(1 − α)·p·q/m``. (DistiLLM's code returns the cross-entropy form
    ``−Σ p log m``, which differs by the teacher's entropy, a constant: same gradient.)"""
    a = _check_unit("skew_forward_kl", "alpha", alpha, upper_open=True)

    def fn(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        fin = rows.get("finite")
        log_m = log_q if a == 0 else mixture_log(log_p, log_q, a)
        value = _where_finite(_xlogratio(log_p.exp(), log_p, log_m), fin).sum(-1)
        grad = -(1 - a) * (log_p + log_q - log_m).exp()
        return value, _where_finite(grad, fin)

    return TokenDivergence("skew_forward_kl", fn, {"alpha": a})


def skew_reverse_kl(alpha: float = 0.1) -> TokenDivergence:
    """Skew reverse KL of DistiLLM: ``SRKL_α = KL(q ‖ (1 − α)·p + α·q)``; α = 0 is the reverse KL. With ``m`` the
    mixture, ``∂/∂q = log q + 1 − log m − α·q/m``, so ``∂/∂log q = q·(log q − log m) − α·q²/m`` (the ``+q`` is
    removed by the softmax projection)."""
    a = _check_unit("skew_reverse_kl", "alpha", alpha, upper_open=True)

    def fn(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
        fin = rows.get("finite")
        log_m = log_p if a == 0 else mixture_log(log_p, log_q, 1 - a)
        q_part = _where_finite(_xlogratio(log_q.exp(), log_q, log_m), fin)
        grad = q_part - a * _where_finite((2 * log_q - log_m).exp(), fin)
        return q_part.sum(-1), grad

    return TokenDivergence("skew_reverse_kl", fn, {"alpha": a})


def _check_unit(name: str, arg: str, value: float, *, upper_open: bool = False) -> float:
    ok = (
        isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1 and not (upper_open and value == 1)
    )
    if not ok:
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}: {arg} must be a number in {interval}, got {value!r}")
    return float(value)


FORWARD_KL = TokenDivergence("forward_kl", forward_kl)
REVERSE_KL = TokenDivergence("reverse_kl", reverse_kl)
TOTAL_VARIATION = TokenDivergence("total_variation", total_variation)

#: name -> factory(**params) of the divergences selectable by name (``divergence=`` of the loss terms).
DIVERGENCES: dict[str, Callable[..., TokenDivergence]] = {
    "forward_kl": lambda: FORWARD_KL,
    "reverse_kl": lambda: REVERSE_KL,
    "symmetric_kl": symmetric_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": lambda: TOTAL_VARIATION,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def get_divergence(name: str | TokenDivergence, **params: float) -> TokenDivergence:
    """The divergence called ``name`` with ``params`` (e.g. ``get_divergence("generalized_jsd", beta=0.5)``)."""
    if isinstance(name, TokenDivergence):
        return name
    if name not in DIVERGENCES:
        raise KeyError(f"unknown token divergence {name!r}; choose one of {', '.join(sorted(DIVERGENCES))}")
    try:
        return DIVERGENCES[name](**params)
    except TypeError:
        raise TypeError(f"token divergence {name!r} does not take {sorted(params)}") from None


# --------------------------------------------------------------------------------------------------------------------
# The chunked computation
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ChunkedStats:
    """Side results of one :func:`token_divergence` call (no gradient): the unnormalised sum, the number of scored
    positions, and the per-position values when ``keep_rows`` was asked for."""

    total: float = 0.0
    count: int = 0
    rows: torch.Tensor | None = None


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 ``log_softmax(logits / τ)``."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def prepare_rows(
    z_s: torch.Tensor, z_t: torch.Tensor | None, extras: dict[str, torch.Tensor], teacher_mix: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logit rows as the divergences read them: entries infinite in either model set to ``-inf`` in both (and
    ``extras["finite"]`` marking the others, so they contribute nothing); with ``teacher_mix`` t ≠ 1 the teacher's
    rows replaced by TAID's interpolated target ``t·z_T + (1 − t)·sg(z_S)``, in logit space. ``z_t`` is ``None``
    for divergences that read the teacher from ``row_data`` (ULD)."""
    finite = torch.isfinite(z_s) if z_t is None else torch.isfinite(z_s) & torch.isfinite(z_t)
    if not bool(finite.all()):
        extras["finite"] = finite
        z_s = torch.where(finite, z_s, torch.full((), -torch.inf))
        z_t = None if z_t is None else torch.where(finite, z_t, torch.full((), -torch.inf))
    if teacher_mix != 1.0 and z_t is not None:
        z_t = teacher_mix * z_t + (1 - teacher_mix) * z_s.detach()
    return z_s, z_t


class _ChunkedDivergence(torch.autograd.Function):
    """Forward computes value and student-logit gradient chunk by chunk; backward scales the stored gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        rows_index: torch.Tensor,
        divergence: TokenDivergence,
        temperature: float,
        chunk_rows: int,
        normalizer: float,
        teacher_mix: float,
        row_data: Mapping[str, torch.Tensor],
        stats: ChunkedStats | None,
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if needs_grad else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        kept = [] if stats is not None and stats.rows is not None else None
        for start in range(0, rows_index.numel(), chunk_rows):
            idx = rows_index[start : start + chunk_rows]
            z_s = student.index_select(0, idx).float()
            z_t = None if teacher is None else teacher.index_select(0, idx).float()
            extras: dict[str, torch.Tensor] = {k: v.index_select(0, idx) for k, v in row_data.items()}
            z_s, z_t = prepare_rows(z_s, z_t, extras, teacher_mix)
            log_q = log_probs(z_s, temperature)
            log_p = None if z_t is None else log_probs(z_t, temperature)
            value, h = divergence(log_q, log_p, extras)
            total += value.sum(dtype=torch.float64)
            if kept is not None:
                kept.append(value.detach())
            if grad is not None:
                q = log_q.exp()
                dz = (h - q * h.sum(-1, keepdim=True)) / (temperature * normalizer)
                grad.index_copy_(0, idx, dz.to(grad.dtype))
            del z_s, z_t, log_q, log_p, value, h
        if stats is not None:
            stats.total, stats.count = float(total), int(rows_index.numel())
            if kept is not None:
                stats.rows = torch.cat(kept) if kept else total.new_zeros(0, dtype=torch.float32)
        # Kept on ctx (not save_for_backward) so that backward can hand the buffer over without a copy: scaled in
        # place and returned as the only reference, autograd's gradient accumulation takes it as is.
        ctx.grad = grad
        return (total / normalizer).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "token_divergence: backward ran twice through the same loss (retain_graph=True); its gradient buffer "
                "is handed over on the first backward to save memory. Recompute the loss for a second backward"
            )
        return (grad.mul_(grad_output.to(grad.dtype)), *([None] * 9))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    divergence: str | TokenDivergence = "forward_kl",
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    normalizer: float | None = None,
    teacher_mix: float = 1.0,
    row_data: Mapping[str, torch.Tensor] | None = None,
    stats: ChunkedStats | None = None,
    **params: float,
) -> torch.Tensor:
    """Mean divergence between the teacher's and the student's next-token distributions over the positions in
    ``mask``, computed in float32 on chunks of positions (memory bounded by ``chunk_size × vocabulary``).

    Args:
        student_logits: ``[..., V]`` (any float dtype); receives the gradient.
        teacher_logits: ``[..., V]``, same shape; treated as constants (a teacher is frozen). ``None`` for a
            divergence that reads the teacher from ``row_data`` (ULD: another vocabulary and other positions); it is
            then called with ``log_p=None``.
        mask: boolean ``[...]`` of the positions to score (:func:`next_token_mask`); ``None`` = all.
        divergence: a :data:`DIVERGENCES` name (with ``params``, e.g. ``beta=0.5``) or a :class:`TokenDivergence`.
        temperature: τ > 0; both logits are divided by it. No τ² factor (TRL, DistiLLM).
        chunk_size: positions per chunk; default so that a chunk holds :data:`DEFAULT_CHUNK_ELEMENTS` float32 values.
        normalizer: divide the sum by this instead of the number of scored positions (e.g. the label tokens of an
            accumulated batch).
        teacher_mix: ``t`` of TAID's interpolated target ``softmax(t·z_T + (1 − t)·sg(z_S))``; 1 = the teacher.
        row_data: per-position tensors ``[...]`` handed to the divergence chunk by chunk (e.g. gold token ids).
        stats: filled with the unnormalised sum and the position count (and per-position values when its ``rows``
            is set to an empty tensor beforehand).

    Returns:
        a float32 scalar; ``0`` (with a zero gradient) when no position is scored.
    """
    if teacher_logits is not None and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "token divergences need the same positions and vocabulary (use loss=uld across tokenizers)"
        )
    if teacher_logits is not None and teacher_logits.requires_grad:
        raise ValueError(
            "token_divergence treats the teacher's logits as constants and would drop their gradient; pass "
            "teacher_logits.detach() (the engine's teacher is frozen)"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    div = get_divergence(divergence, **params)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab).detach()
    if mask is None:
        rows_index = torch.arange(student.shape[0], device=student.device)
    else:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} must match the logits' positions {student_logits.shape[:-1]}")
        rows_index = mask.reshape(-1).nonzero().squeeze(-1)
    count = rows_index.numel()
    norm = float(normalizer) if normalizer is not None else float(max(count, 1))
    if norm <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    chunk_rows = int(chunk_size) if chunk_size else max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    flat_rows = {k: v.reshape(-1, *v.shape[student_logits.dim() - 1 :]) for k, v in (row_data or {}).items()}
    return _ChunkedDivergence.apply(
        student, teacher, rows_index, div, float(temperature), chunk_rows, norm, float(teacher_mix),
        flat_rows, stats,
    )  # fmt: skip


def dense_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence: str | TokenDivergence = "forward_kl",
    *,
    temperature: float = 1.0,
    teacher_mix: float = 1.0,
    row_data: Mapping[str, torch.Tensor] | None = None,
    **params: float,
) -> torch.Tensor:
    """The same value as :func:`token_divergence`, computed on the whole tensor at once with autograd through the
    divergence's formula (no closed-form gradient, no chunks). A readable reference for tests and the memory
    benchmark; its memory grows with ``batch × sequence × vocabulary``."""
    div = get_divergence(divergence, **params)
    vocab = student_logits.shape[-1]
    z_s = student_logits.reshape(-1, vocab).float()
    z_t = teacher_logits.reshape(-1, vocab).float().detach()
    keep = torch.ones(z_s.shape[0], dtype=torch.bool, device=z_s.device) if mask is None else mask.reshape(-1)
    extras = {k: v.reshape(-1, *v.shape[student_logits.dim() - 1 :])[keep] for k, v in (row_data or {}).items()}
    z_s, z_t = prepare_rows(z_s[keep], z_t[keep], extras, teacher_mix)
    value, _ = div(log_probs(z_s, temperature), log_probs(z_t, temperature), extras)
    return value.sum() / max(int(keep.sum()), 1)


__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "ChunkedStats",
    "TokenDivergence",
    "dense_token_divergence",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "mixture_log",
    "next_token_mask",
    "next_token_targets",
    "position_mask",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "token_divergence",
    "total_variation",
]
