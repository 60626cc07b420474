"""TAID: temporally adaptive interpolated distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language
Models", ICLR 2025 (code: github.com/SakanaAI/TAID, ``src/distil_losses/taid.py``).

The student is distilled toward an intermediate distribution that moves from the student's own distribution to the
teacher's. At each position, in logit space and with the student's logits detached,

.. math::

    p_t = \\mathrm{softmax}\\big((t\\,z_T + (1 - t)\\,\\mathrm{sg}(z_S)) / \\tau\\big), \\qquad
    \\mathcal{L} = -\\frac{1}{N}\\sum_{n} \\sum_v p_{t,v} \\log q_{S,v},

the cross-entropy of ``p_t`` against the student ``q_S``, mean over the label tokens (the reference's value; it is
KL(p_t ‖ q_S) plus the entropy of ``p_t``, a constant for the gradient because ``p_t`` is detached).

**Schedule of t** (the reference's ``update_t``, after the loss of a step has been computed with the current t).
With ``L`` the detached loss of optimizer step ``s`` and ``N`` the number of optimizer steps of the fit:

- first step: only ``prev ← L`` (t stays ``t_start``);
- then ``rel = (prev − L) / (prev + 1e-15)``, ``m ← β·m + (1 − β)·rel``, ``Δ = α·sigmoid(m)·(1 − t)``,
  ``t_lin = t_start + (t_end − t_start)·s / N``, ``t ← min(t_end, max(t_lin, t + Δ))``, ``prev ← L``;
- ``disable_adaptive``: ``t ← t_lin`` (clamped to ``t_end`` here).

So the t used at step ``s`` comes from the update with step ``s − 1``'s loss; the t after the last update is
``t_start + (t_end − t_start)·(N − 1)/N`` on the linear schedule, as in the reference (t reaches ``t_end`` earlier
only through the adaptive part). When the number of steps is unknown (``batch.max_steps == -1``: an iterable
dataloader without a length and no ``max_steps``), ``t_lin = t_start``: t grows by the adaptive part only, and
``disable_adaptive`` is refused.

**Differences from the reference, for training at scale.**

- *Once per optimizer step.* With gradient accumulation several micro-batches share ``batch.step``
  (``trainer.global_step``). Every micro-batch of a step uses the same t; their detached losses are averaged, and
  that mean updates t when the first micro-batch of the next step arrives (without accumulation this is the
  reference's sequence of t exactly; the reference updates at every ``training_step`` call).
- *Training only.* t changes only while the term is in training mode (the reference also updates during
  validation).
- *DDP.* When ``torch.distributed`` is initialised, each micro-batch's detached loss is all-reduced (averaged over
  the ranks) as it is accumulated, so the pending sum, the update and t are identical on every rank, also when DDP
  broadcasts rank 0's buffers before a forward (the reference uses each rank's own loss).
- *State.* t, the previous loss, the momentum, whether the first step happened and the pending (not yet applied)
  losses of the current step are buffers: saved in checkpoints, restored on resume, moved with the module (the
  reference creates them on ``"cuda"``); they stay float32 (the sum float64) when the module is cast to bf16.

Logs ``t`` (the value used in this step) and ``delta`` (Δ of the last update) through :attr:`diagnostics`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lightning_kd.lm.divergences import RowData, TokenDivergence
from lightning_kd.losses.base import DistillBatch, register_loss
from lightning_kd.losses.token import TokenDivergenceLoss, sequence_logits


def cross_entropy_to_target(
    log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData
) -> tuple[torch.Tensor, torch.Tensor]:
    """``−Σ_v p_v log q_v`` (entries where ``p = 0`` contribute 0); ``∂/∂log q = −p``: the forward KL's gradient."""
    p, fin = log_p.exp(), rows.get("finite")
    zero = torch.zeros((), dtype=p.dtype)
    keep = p > 0 if fin is None else (p > 0) & fin
    return torch.where(keep, -p * log_q, zero).sum(-1), torch.where(keep, -p, zero)


#: TAID's per-position loss: the cross-entropy of the interpolated target against the student.
TAID_CROSS_ENTROPY = TokenDivergence("cross_entropy", cross_entropy_to_target)


def _unit(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"taid: {name} must be a number in {interval}, got {value!r}")
    return float(value)


@register_loss("taid")
class TAIDLoss(TokenDivergenceLoss):
    """TAID's interpolated-target distillation with its adaptive schedule of t (module docstring).

    Args:
        weight: weight of the term.
        t_start: initial interpolation t in [0, 1) (reference default 0.4; its scripts use 0.2 for some pairs).
        t_end: final t in (0, 1], ``>= t_start``.
        alpha: α in [0, 1], the adaptive step size (reference 5e-4).
        beta: β in [0, 1], the momentum of the relative loss change (reference 0.99).
        disable_adaptive: follow the linear schedule only (needs the number of training steps).
        temperature: τ > 0 on the interpolated logits and the student's (the reference has none: 1).
        shift_labels: labels aligned with the input ids (the logit at t is scored at label t + 1).
        chunk_size: positions per chunk (default: 2²¹ float32 values per chunk).
    """

    def __init__(
        self,
        weight: float = 1.0,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        disable_adaptive: bool = False,
        temperature: float = 1.0,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.t_start = _unit("t_start", t_start, high_open=True)
        self.t_end = _unit("t_end", t_end, low_open=True)
        if self.t_end < self.t_start:
            raise ValueError(f"taid: t_end ({t_end}) must be >= t_start ({t_start}); t only grows")
        self.alpha = _unit("alpha", alpha)
        self.beta = _unit("beta", beta)
        self.disable_adaptive = bool(disable_adaptive)
        self.div = TAID_CROSS_ENTROPY
        self.params = {}
        f32 = torch.float32
        self.register_buffer("t", torch.tensor(self.t_start, dtype=f32))
        self.register_buffer("prev_loss", torch.zeros((), dtype=f32))
        self.register_buffer("momentum", torch.zeros((), dtype=f32))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        # losses of the optimizer step in progress (micro-batches), applied when the next step begins
        self.register_buffer("pending_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("delta", torch.zeros((), dtype=f32), persistent=False)

    #: dtypes the schedule's state keeps when the module is cast (``.half()``, Lightning's ``bf16-true``): a bf16 t
    #: could not take steps of Δ ≈ 1e-4.
    _STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "t": torch.float32,
        "prev_loss": torch.float32,
        "momentum": torch.float32,
        "delta": torch.float32,
        "pending_sum": torch.float64,
    }

    def _apply(self, fn: Any, recurse: bool = True) -> TAIDLoss:  # type: ignore[override]
        before = {name: getattr(self, name) for name in self._STATE_DTYPES}
        super()._apply(fn, recurse)
        for name, dtype in self._STATE_DTYPES.items():
            buffer = getattr(self, name)
            if buffer.dtype != dtype:  # from the value before the cast: no rounding through bf16
                setattr(self, name, before[name].to(device=buffer.device, dtype=dtype))
        return self

    # -- schedule -----------------------------------------------------------------------------------------------------
    def linear_t(self, step: int, max_steps: int) -> float:
        """``t_start + (t_end − t_start)·step / max_steps`` (``t_start`` when ``max_steps`` is unknown, ``<= 0``)."""
        if max_steps <= 0:
            return self.t_start
        return self.t_start + (self.t_end - self.t_start) * step / max_steps

    @torch.no_grad()
    def update(self, loss: torch.Tensor | float, step: int, max_steps: int) -> None:
        """One update of t with the (rank-averaged) loss of optimizer step ``step`` (the reference's ``update_t``)."""
        if self.disable_adaptive and max_steps <= 0:
            raise ValueError(
                "taid: disable_adaptive=true follows t_start -> t_end over the training steps, but the trainer does "
                "not know how many there are (estimated_stepping_batches unavailable). Set trainer.max_steps, use a "
                "dataloader with a length, or keep disable_adaptive=false"
            )
        value = torch.as_tensor(loss, dtype=torch.float32, device=self.t.device)
        if not bool(self.started):
            self.prev_loss.copy_(value)
            self.started.fill_(True)
            return
        relative = (self.prev_loss - value) / (self.prev_loss + 1e-15)
        self.momentum.mul_(self.beta).add_((1 - self.beta) * relative)
        delta = self.alpha * torch.sigmoid(self.momentum) * (1 - self.t)
        t_lin = self.linear_t(step, max_steps)
        if self.disable_adaptive:
            new_t = torch.full_like(self.t, min(self.t_end, t_lin))
        else:
            new_t = torch.clamp(torch.maximum(self.t + delta, torch.full_like(self.t, t_lin)), max=self.t_end)
        self.t.copy_(new_t)
        self.delta.copy_(delta)
        self.prev_loss.copy_(value)

    @torch.no_grad()
    def _flush(self, step: int, max_steps: int) -> None:
        """Apply the pending losses when ``step`` is a new optimizer step."""
        pending = int(self.pending_step)
        if pending < 0 or pending == step:
            return
        mean = self.pending_sum / self.pending_count.clamp_min(1)
        self.pending_sum.zero_()
        self.pending_count.zero_()
        self.pending_step.fill_(-1)
        self.update(mean, pending, max_steps)

    @torch.no_grad()
    def _accumulate(self, loss: torch.Tensor, step: int) -> None:
        """Add this micro-batch's loss, averaged over the DDP ranks, to the pending sum of optimizer step ``step``."""
        value = loss.detach().to(self.pending_sum.dtype).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
                value /= world
        self.pending_sum += value[0]
        self.pending_count += 1
        self.pending_step.fill_(step)

    # -- loss ---------------------------------------------------------------------------------------------------------
    def forward(self, batch: DistillBatch) -> torch.Tensor:
        from lightning_kd.lm.divergences import token_divergence

        student = sequence_logits("taid", batch.student.logits)
        if self.training:
            self._flush(int(batch.step), int(batch.max_steps))
        t = float(self.t)
        loss = token_divergence(
            student, batch.teacher.logits, self.positions(batch), self.div, temperature=self.temperature,
            chunk_size=self.chunk_size, teacher_mix=t,
        )  # fmt: skip
        if self.training:
            self._accumulate(loss, int(batch.step))
        self.diagnostics = {"t": self.t.detach().clone(), "delta": self.delta.detach().clone()}
        return loss

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}, disable_adaptive={self.disable_adaptive}, temperature={self.temperature}"
        )


__all__ = ["TAID_CROSS_ENTROPY", "TAIDLoss", "cross_entropy_to_target"]
