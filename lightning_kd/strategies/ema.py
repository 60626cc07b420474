"""EMA / momentum teacher
^^^^^^^^^^^^^^^^^^^^^^^

The teacher is an exponential moving average (EMA) of the student's weights, updated after every optimizer step::

    θ_T ← m·θ_T + (1 − m)·θ_S

and the student is distilled toward it with ordinary loss terms (``kd`` by default). This is the momentum teacher of
**MKD** — N. Michel, M. Wang, L. Xiao, T. Yamasaki, "Rethinking Momentum Knowledge Distillation in Online Continual
Learning", ICML 2024 (PMLR 235), arXiv:2309.02870 — and of Mean Teacher (A. Tarvainen, H. Valpola, NeurIPS 2017,
arXiv:1703.01780). Optionally the update is **parameter-selective** as in **PSMT** — J. Tian et al.,
"Parameter-Selective Continual Test-Time Adaptation", ACCV 2024, arXiv:2407.02253: elements of low Fisher importance
do not take the EMA step.

Pieces (one concern each):

- :class:`MomentumTeacher`: the update rule on a (teacher, student) pair — momentum (and warm-up), buffers, the
  Fisher mask — and its checkpoint state. No Lightning.
- :class:`EMADistillCallback`: the callback face. A :class:`~lightning_kd.callback.DistillCallback` whose teacher is
  a frozen copy of the student taken at ``setup`` and kept as the student's EMA.
- :class:`EMATeacherCallback`: the module face. Keeps an existing teacher (``DistillationModule``'s
  ``engine.teacher``, or any module given) as the EMA of a student submodule.
- :func:`run_app`: ``strategy=ema`` (and ``strategy=psmt``) of the Hydra app.

**What was checked against the authors' code.**

- MKD, ``Nicolas1203/mkd_ocl: src/learners/ema/er_ema.py`` (``update_ema``) and the ICML configs
  (``config/icml24/all/*EMA*.yaml``: one teacher, ``alpha_min = alpha_max = 0.01``, i.e. m = 0.99): the teacher's
  *parameters* follow ``ema ← (1 − α)·ema + α·θ_S / (1 − α^k)``, updated right after each optimizer step, with
  k = max(1, stream samples // (batch size · ema_correction_step)). Two differences here, both deliberate: no
  ``1/(1 − α^k)`` factor (1.0101 while k = 1, about the first 20 steps of their defaults, 1.0001 at k = 2, then ≈ 1),
  and the teacher starts as an exact copy of the student (their ``update_ema(init=True)`` scales the copy by
  α/(1 − α)); use ``warmup=True`` for a teacher that starts by averaging. Their teachers also run in train mode
  (batch statistics); here, as for every teacher of this package, the teacher runs in eval mode, so its BatchNorm
  running statistics matter — see ``buffers``. Not implemented from MKD: several teachers with different α, the
  α-dependent weight of the KD term, distilling on both the augmented and the raw view, and predicting with the
  average of teacher and student weights.
- Warm-up, ``CuriousAI/mean-teacher: pytorch/main.py`` (``update_ema_variables``, called after ``global_step += 1``):
  ``m_k = min(m, 1 − 1/(k + 1))`` at the k-th update, i.e. the teacher is the plain mean of θ_0 … θ_k until the
  exponential average "is more correct".
- PSMT, ``JiaxuTian/PSMT: classification/methods/psmt.py`` (``PSMT.forward_and_adapt``, commit 49fb2d3). The paper
  text could not be read; the code does, per step: F = g² (this step's squared gradient of every weight/bias, after
  ``backward``); threshold = the ``perc``-quantile (0.03, linear interpolation) of all elements of F together;
  mask = F < threshold, i.e. the **least** important 3 %; the student's masked elements are restored to the source
  (initial) weights; the teacher's masked elements are set to that restored value, the others follow the EMA. So the
  protected elements are the low-Fisher ones (the note in ``methods.md`` — "EMA applied only to parameters with low
  Fisher importance" — is the opposite and is not what the code does). Here: ``fisher_quantile`` = ``perc``;
  ``protect="source"`` (masked teacher elements := initial weights) together with ``restore_student=True`` is the
  code's behaviour; ``protect="keep"`` (masked teacher elements keep their current value) without restoring the
  student is the teacher-only variant, the default. Deviations: the code applies the EMA step *twice* to the unmasked
  elements (``update_ema_variables`` then ``update_ema_variables_two``, an effective momentum m²); here once.
  ``fisher_decay > 0`` turns the per-step F into a running mean (an option, not in the code). PSMT's other parts —
  the symmetric cross-entropy and the EWC penalty with a Fisher computed on source data — are losses, not teacher
  updates, and are not implemented here.

Timing and precision: the EMA step runs in ``on_train_batch_end`` when ``trainer.global_step`` advanced, so with
``accumulate_grad_batches=k`` it runs once per optimizer step. The squared gradients are read in
``on_before_optimizer_step``: after accumulation (the full step's gradient), after DDP's all-reduce (identical masks on
every rank), and under ``16-mixed`` after Lightning's ``scaler.unscale_`` (Lightning unscales right before that
hook). The mask depends only on the ranks of F, so even a uniformly scaled gradient would give the same mask; a step
whose gradients are not finite (the grad scaler skips it) leaves F unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.callback import DistillCallback
from lightning_kd.engine import LossSpec, freeze
from lightning_kd.taps import INTERNAL_PREFIX, LOGITS, frozen_copy

BUFFER_MODES = ("ema", "copy")
PROTECT_MODES = ("keep", "source")


# --------------------------------------------------------------------------------------------------------------------
# The update rule
# --------------------------------------------------------------------------------------------------------------------
def quantile(values: list[torch.Tensor], q: float) -> torch.Tensor:
    """The ``q``-quantile of all elements of ``values`` together, interpolated linearly between order statistics
    (``torch.quantile``'s default and PSMT's ``find_quantile``). Uses ``kthvalue``, so it has no size limit."""
    flat = torch.cat([v.reshape(-1).float() for v in values])
    n = flat.numel()
    position = q * (n - 1)
    lower = math.floor(position)
    frac = position - lower
    low = flat.kthvalue(lower + 1).values
    if frac == 0.0 or lower + 1 >= n:
        return low
    high = flat.kthvalue(lower + 2).values
    return low + (high - low) * frac


class MomentumTeacher:
    """The EMA update of a teacher from a student, optionally Fisher-masked (PSMT).

    At the k-th update (k = 1, 2, …), for every parameter element::

        m_k = momentum                        (warmup=False)
        m_k = min(momentum, 1 − 1/(k + 1))    (warmup=True: the mean of θ_0 … θ_k until that is below momentum)
        θ_T ← m_k·θ_T + (1 − m_k)·θ_S         where not protected
        θ_T ← θ_T  (protect="keep")  or  θ_0 (protect="source")   where protected

    Protected elements (only with ``fisher_quantile``): ``F < quantile_q(F)`` over all elements of all parameters
    that received a gradient, where F is the squared gradient of the last optimizer step (``fisher_decay = 0``, as in
    PSMT's code) or its running mean ``F ← β·F + (1 − β)·g²`` (``fisher_decay = β``). Parameters without a gradient
    follow the plain EMA. The comparison is strict, as in the code: elements whose F is exactly 0 count in the
    quantile, so when more than a fraction q of F is 0 the threshold is 0 and nothing is protected at that step (this
    happens at the start of training a timm ResNet from scratch: behind a zero-initialised last BatchNorm of each
    block the residual branch gets no gradient; PSMT adapts an already trained model).

    Args:
        momentum: m in [0, 1]; 0 makes the teacher a copy of the student after each step, 1 freezes it at θ_0.
            Default 0.99 (MKD's configs use α = 1 − m = 0.01).
        warmup: Mean Teacher's warm-up (see above).
        buffers: ``"ema"``: floating-point buffers (BatchNorm running mean/var) are averaged with the same m_k, the
            way timm's ``ModelEmaV3`` does, integer buffers (``num_batches_tracked``) are copied; ``"copy"``: every
            buffer is copied from the student. The Fisher mask applies to parameters only.
        fisher_quantile: PSMT's ``perc`` in (0, 1) (the code uses 0.03), or ``None`` for the plain EMA.
        fisher_decay: β in [0, 1): 0 = this step's squared gradient only.
        protect: what protected teacher elements hold: ``"keep"`` their current value, ``"source"`` the initial
            weights θ_0 (PSMT's code).
        restore_student: also reset the student's protected elements to θ_0 after its optimizer step (PSMT's code;
            meant for a student that starts from trained weights, as in test-time adaptation).

    θ_0 is the teacher's weights when :meth:`bind` first runs (a fresh copy of the student).
    """

    def __init__(
        self,
        momentum: float = 0.99,
        *,
        warmup: bool = False,
        buffers: str = "ema",
        fisher_quantile: float | None = None,
        fisher_decay: float = 0.0,
        protect: str = "keep",
        restore_student: bool = False,
    ) -> None:
        if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1] (θ_T ← m·θ_T + (1−m)·θ_S), got {momentum!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if protect not in PROTECT_MODES:
            raise ValueError(f"protect must be one of {PROTECT_MODES}, got {protect!r}")
        if fisher_quantile is not None and not (
            isinstance(fisher_quantile, (int, float)) and 0.0 < float(fisher_quantile) < 1.0
        ):
            raise ValueError(
                f"fisher_quantile must be a fraction in (0, 1) (PSMT uses 0.03) or None for a plain EMA, "
                f"got {fisher_quantile!r}"
            )
        if not isinstance(fisher_decay, (int, float)) or not 0.0 <= float(fisher_decay) < 1.0:
            raise ValueError(f"fisher_decay must be a number in [0, 1), got {fisher_decay!r}")
        if fisher_quantile is None and (restore_student or protect != "keep" or fisher_decay):
            raise ValueError(
                "protect=, restore_student= and fisher_decay= configure the Fisher mask; set fisher_quantile= "
                "(e.g. 0.03) to use them"
            )
        self.momentum = float(momentum)
        self.warmup = bool(warmup)
        self.buffers = buffers
        self.fisher_quantile = None if fisher_quantile is None else float(fisher_quantile)
        self.fisher_decay = float(fisher_decay)
        self.protect = protect
        self.restore_student = bool(restore_student)
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        #: number of EMA updates applied so far (k of the last update)
        self.updates = 0
        #: per-parameter Fisher estimate F (squared gradients), when ``fisher_quantile`` is set
        self.fisher: dict[str, torch.Tensor] = {}
        #: the initial weights θ_0, kept when ``protect="source"`` or ``restore_student``
        self.source: dict[str, torch.Tensor] | None = None
        #: fraction of parameter elements protected at the last update (``None`` without a mask)
        self.protected_fraction: float | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def selective(self) -> bool:
        """Whether the Fisher mask is on (PSMT)."""
        return self.fisher_quantile is not None

    @property
    def needs_source(self) -> bool:
        return self.protect == "source" or self.restore_student

    def momentum_at(self, k: int) -> float:
        """m_k, the momentum of the k-th update (k ≥ 1)."""
        return min(self.momentum, 1.0 - 1.0 / (k + 1)) if self.warmup else self.momentum

    # -- binding -----------------------------------------------------------------------------------------------------
    def bind(self, teacher: nn.Module, student: nn.Module) -> None:
        """Pair ``teacher`` with ``student``: every teacher parameter and buffer must exist in the student under the
        same name and shape (the student may hold more, e.g. the distillation connectors). Freezes the teacher and,
        on the first bind, records θ_0; applies a state loaded before the pair existed."""
        if teacher is student:
            raise ValueError("the EMA teacher must be a separate copy of the student, not the student itself")
        s_state = {**dict(student.named_parameters()), **dict(student.named_buffers())}
        t_state = {**dict(teacher.named_parameters()), **dict(teacher.named_buffers())}
        missing = [n for n in t_state if n not in s_state]
        shapes = [n for n in t_state if n in s_state and t_state[n].shape != s_state[n].shape]
        if missing or shapes:
            raise ValueError(
                f"the EMA teacher ({type(teacher).__name__}) is not a copy of the student ({type(student).__name__}): "
                f"{len(missing)} of its tensors are not in the student (e.g. {missing[:3]}), {len(shapes)} differ in "
                f"shape (e.g. {shapes[:3]}). Build the teacher as copy.deepcopy(student)."
            )
        self.teacher, self.student = freeze(teacher), student
        if self.needs_source and self.source is None:
            self.source = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _pair(self) -> tuple[nn.Module, nn.Module]:
        if self.teacher is None or self.student is None:
            raise RuntimeError("MomentumTeacher.bind(teacher, student) must run before updates")
        return self.teacher, self.student

    # -- Fisher (PSMT) -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe_gradients(self) -> None:
        """Fold the student's current gradients into F (call once per optimizer step, before ``step``)."""
        if not self.selective:
            return
        teacher, student = self._pair()
        names = {n for n, _ in teacher.named_parameters()}
        grads = {n: p.grad for n, p in student.named_parameters() if n in names and p.grad is not None}
        squared = {n: g.detach().float().square() for n, g in grads.items()}
        if not squared:
            return
        if not bool(torch.stack([torch.isfinite(s).all() for s in squared.values()]).all()):
            return  # a step the grad scaler skips: keep F as it was
        beta = self.fisher_decay
        if beta == 0.0:
            self.fisher = squared
            return
        for n, s in squared.items():
            old = self.fisher.get(n)
            self.fisher[n] = s if old is None else old.to(s.device).mul_(beta).add_(s, alpha=1.0 - beta)

    def _masks(self) -> dict[str, torch.Tensor]:
        if not self.selective or not self.fisher:
            self.protected_fraction = None
            return {}
        threshold = quantile(list(self.fisher.values()), self.fisher_quantile)  # type: ignore[arg-type]
        masks = {n: f < threshold for n, f in self.fisher.items()}
        total = sum(m.numel() for m in masks.values())
        protected = torch.stack([m.sum() for m in masks.values()]).sum()
        self.protected_fraction = float(protected) / max(total, 1)
        return masks

    def _source_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        assert self.source is not None
        src = self.source[name]
        if src.device != like.device:
            src = self.source[name] = src.to(like.device)
        return src.to(like.dtype)

    # -- the update --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> float:
        """Apply one EMA step (the next k); returns the momentum used."""
        teacher, student = self._pair()
        self.updates += 1
        m = self.momentum_at(self.updates)
        masks = self._masks()
        s_params = dict(student.named_parameters())
        for name, t in teacher.named_parameters():
            s = s_params[name]
            mask = masks.get(name)
            if mask is None:
                t.lerp_(s.detach().to(t.device, t.dtype), 1.0 - m)
                continue
            if self.restore_student:
                s.copy_(torch.where(mask.to(s.device), self._source_like(name, s), s))
            mask = mask.to(t.device)
            averaged = t.lerp(s.detach().to(t.device, t.dtype), 1.0 - m)
            held = t if self.protect == "keep" else self._source_like(name, t)
            t.copy_(torch.where(mask, held, averaged))
        s_buffers = dict(student.named_buffers())
        for name, b in teacher.named_buffers():
            sb = s_buffers[name].to(b.device)
            if self.buffers == "ema" and b.is_floating_point():
                b.lerp_(sb.to(b.dtype), 1.0 - m)
            else:
                b.copy_(sb)
        if self.selective and self.fisher_decay == 0.0:
            self.fisher = {}  # F is this step's only
        return m

    # -- checkpoint state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (``torch.load(..., weights_only=True)``): the teacher's weights (parameters and
        buffers), the update count, and with the Fisher mask its running F (``fisher_decay > 0``) and θ_0."""
        teacher, _ = self._pair()
        state: dict[str, Any] = {
            "updates": self.updates,
            "teacher": {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()},
        }
        if self.selective and self.fisher_decay > 0.0:
            state["fisher"] = {k: v.detach().cpu().clone() for k, v in self.fisher.items()}
        if self.source is not None:
            state["source"] = {k: v.detach().cpu().clone() for k, v in self.source.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (deferred until :meth:`bind` when the pair does not exist yet)."""
        if self.teacher is None:
            self._pending = dict(state)
            return
        self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state["updates"])
        self.fisher = {k: v.clone() for k, v in (state.get("fisher") or {}).items()}
        if state.get("source") is not None:
            self.source = {k: v.clone() for k, v in state["source"].items()}


def student_of(pl_module: nn.Module, student_attr: str | None) -> nn.Module:
    """The network whose EMA is the teacher: ``pl_module`` itself, or its submodule ``student_attr``."""
    if student_attr is None:
        return pl_module
    try:
        return pl_module.get_submodule(student_attr)
    except AttributeError:
        children = [n for n, _ in pl_module.named_children() if not n.startswith(INTERNAL_PREFIX)]
        raise ValueError(
            f"student_attr={student_attr!r}: {type(pl_module).__name__} has no submodule {student_attr!r}; use one of "
            f"{children} or None (the whole LightningModule)"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Lightning hooks shared by both faces
# --------------------------------------------------------------------------------------------------------------------
class _EMAHooks(Callback):
    """Runs a :class:`MomentumTeacher` (``self.ema``) from Lightning hooks; cooperative (``super()``) so that it
    composes with :class:`~lightning_kd.callback.DistillCallback`."""

    ema: MomentumTeacher
    _seen_step = -1

    @property
    def _ema_log_prefix(self) -> str:
        return "train/ema/"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._seen_step = trainer.global_step  # after a resume: the restored step

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.ema.observe_gradients()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._seen_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._seen_step = trainer.global_step
        momentum = self.ema.update()
        logs = {f"{self._ema_log_prefix}momentum": momentum}
        if self.ema.protected_fraction is not None:
            logs[f"{self._ema_log_prefix}protected"] = self.ema.protected_fraction
        pl_module.log_dict(logs)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema.teacher is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        ema = state.pop("ema", None)
        super().load_state_dict(state)
        if ema is not None:
            self.ema.load_state_dict(ema)


class _StudentCopy(nn.Module):
    """Placeholder teacher of :class:`EMADistillCallback` until ``setup`` copies the student."""


class EMADistillCallback(_EMAHooks, DistillCallback):
    """Distil the LightningModule into itself through a momentum (EMA) teacher (MKD; PSMT with ``fisher_quantile``).

    At ``setup`` the teacher is a frozen copy of the student (:func:`~lightning_kd.taps.frozen_copy`), held outside the module tree
    like every teacher of :class:`~lightning_kd.callback.DistillCallback` (never in the optimizer, never given a
    gradient). After each optimizer step it moves toward the student by :class:`MomentumTeacher`'s rule. The loss the
    user's ``training_step`` returns is replaced by ``task_weight · user_loss + Σ weight_i · term_i(student, teacher)``
    exactly as with a fixed teacher.

    The teacher's weights, the update count and, with the Fisher mask, F and θ_0 are in the callback's checkpoint
    state (under ``"ema"``), so ``trainer.fit(..., ckpt_path=...)`` resumes with the same teacher.

    Args:
        loss: loss terms, as in :class:`~lightning_kd.callback.DistillCallback`.
        momentum: m (see :class:`MomentumTeacher`).
        student_attr: the network to copy and average: ``None`` (default) = the whole LightningModule (its
            ``forward`` must return the logits: the teacher is called as ``teacher(inputs)``; tap paths on both sides
            are then the same, e.g. ``"net.layer3"``; everything the module holds is copied, datasets or frozen
            encoders included); or the name of a submodule such as ``"model"``/``"net"`` (the teacher is that network
            only; teacher tap paths are relative to it, e.g. ``"layer3"``).
        task_weight, student_logits, example_input, name: as in :class:`~lightning_kd.callback.DistillCallback`.
        **options: the other arguments of :class:`MomentumTeacher` (``warmup``, ``buffers``, ``fisher_quantile``,
            ``fisher_decay``, ``protect``, ``restore_student``).

    Logs ``train/ema/momentum`` (and ``train/ema/protected``, the protected fraction, with the Fisher mask) besides
    the terms; with ``name=`` under ``train/<name>/ema/``.

    Example::

        >>> cb = EMADistillCallback(loss="kd", momentum=0.99, student_attr="net")
        >>> cb.ema.momentum_at(1), EMADistillCallback(warmup=True).ema.momentum_at(1)
        (0.99, 0.5)
    """

    def __init__(
        self,
        loss: LossSpec = "kd",
        momentum: float = 0.99,
        *,
        student_attr: str | None = None,
        task_weight: float = 1.0,
        student_logits: str = LOGITS,
        example_input: torch.Tensor | None = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        self.ema = MomentumTeacher(momentum, **options)
        super().__init__(
            _StudentCopy(),
            loss,
            task_weight=task_weight,
            student_logits=student_logits,
            example_input=example_input,
            name=name,
        )
        self.student_attr = student_attr

    @property
    def _ema_log_prefix(self) -> str:
        return f"{self._log_prefix}ema/"

    @property
    def teacher_model(self) -> nn.Module:
        """The EMA teacher (after ``setup``)."""
        if self.ema.teacher is None:
            raise RuntimeError("the EMA teacher exists once trainer.fit has set the callback up")
        return self.ema.teacher

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        student = student_of(pl_module, self.student_attr)
        if self.engine is None:
            self.teacher = freeze(frozen_copy(student))  # before DistillCallback builds its engine around it
        super().setup(trainer, pl_module, stage)
        assert self.engine is not None
        self.ema.bind(self.engine.teacher, student)


class EMATeacherCallback(_EMAHooks):
    """Keep an existing teacher as the EMA of the student (the module face).

    With :class:`~lightning_kd.module.DistillationModule`, give it a copy of the student as the teacher::

        module = DistillationModule(net, copy.deepcopy(net), loss="kd")
        Trainer(callbacks=[EMATeacherCallback(momentum=0.99)]).fit(module, data)

    Args:
        momentum: m (see :class:`MomentumTeacher`).
        teacher: the module to update; default ``pl_module.engine.teacher`` (``DistillationModule``). It must be a
            copy of the student (same tensor names and shapes); it is frozen.
        student_attr: the student network inside the LightningModule (``DistillationModule`` keeps it as
            ``"model"``); ``None`` for the LightningModule itself.
        **options: the other arguments of :class:`MomentumTeacher`.

    State: the teacher's weights and the update count under ``"ema"`` in the callback's checkpoint state.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        *,
        teacher: nn.Module | None = None,
        student_attr: str | None = "model",
        **options: Any,
    ) -> None:
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (a copy of the student) or None, got {type(teacher)}")
        self.ema = MomentumTeacher(momentum, **options)
        self._teacher = teacher
        self.student_attr = student_attr

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        teacher = self._teacher
        if teacher is None:
            teacher = getattr(getattr(pl_module, "engine", None), "teacher", None)
        if teacher is None:
            raise ValueError(
                f"EMATeacherCallback has no teacher to update: {type(pl_module).__name__} has no engine.teacher. Pass "
                "teacher=<a copy of the student>, or use DistillationModule(student, copy.deepcopy(student))"
            )
        self.ema.bind(teacher, student_of(pl_module, self.student_attr))


# --------------------------------------------------------------------------------------------------------------------
# Hydra app: strategy=ema / strategy=psmt
# --------------------------------------------------------------------------------------------------------------------
_OPTION_KEYS = ("warmup", "buffers", "fisher_quantile", "fisher_decay", "protect", "restore_student")


def run_app(cfg: Any, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """``strategy=ema``: the student ``cfg.model`` (a :class:`~lightning_kd.module.ClassifierModule`) trained with
    :class:`EMADistillCallback` (``student_attr="model"``) and the terms of ``cfg.loss``; no teacher is loaded or
    trained (``cfg.teacher`` and ``teacher_epochs`` are ignored). ``strategy.task_weight`` (when set) replaces
    ``loss.task_weight``: the self-teacher is a regulariser next to the full label loss. Results: ``student_acc``, ``teacher_acc`` (the EMA
    teacher's test accuracy), ``agreement``, and rows with the momentum, the number of updates and, with the Fisher
    mask, its quantile and last protected fraction."""
    from lightning_kd.app import (
        build_model,
        check_single_fit,
        classifier_module,
        evaluate,
        fit_report,
        make_trainer,
        option_callbacks,
        train_baseline,
    )

    strategy = cfg.strategy
    check_single_fit(cfg, "ema", "the teacher is the moving average of the student and trains with it in one fit")
    options = {k: strategy[k] for k in _OPTION_KEYS if strategy.get(k) is not None}
    L.seed_everything(cfg.seed, workers=True)
    student = build_model(cfg.model, datamodule.num_classes)
    module = classifier_module(cfg, student)
    callback = EMADistillCallback(
        loss=cfg.loss.terms,
        momentum=float(strategy.get("momentum", 0.99)),
        student_attr="model",
        task_weight=cfg.loss.task_weight if strategy.get("task_weight") is None else strategy.task_weight,
        **options,
    )
    trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=(*option_callbacks(cfg), callback))
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    assert callback.engine is not None
    teacher = callback.teacher_model
    scores = evaluate(student, datamodule, teacher)
    ema = callback.ema
    rows: list[list[Any]] = [["EMA momentum", ema.momentum], ["EMA updates", ema.updates]]
    if ema.selective:
        rows += [["Fisher quantile (PSMT)", ema.fisher_quantile], ["protected fraction", ema.protected_fraction]]
    results: dict[str, Any] = {
        "teacher": f"EMA of {cfg.model.name}",
        "teacher_source": f"momentum teacher, m={ema.momentum}" + (", Fisher-masked (PSMT)" if ema.selective else ""),
        "teacher_acc": evaluate(teacher, datamodule)["acc"],
        "student": cfg.model.name,
        "loss": ",".join(callback.engine.terms),
        "student_acc": scores["acc"],
        "student_val_acc": evaluate(student, datamodule, split="val")["acc"],
        "agreement": scores["agreement"],
        "rows": rows,
        **fit_report(trainer, out_dir),
    }
    if cfg.baseline:
        results["baseline_acc"] = train_baseline(cfg, datamodule, out_dir)
    return results


__all__ = [
    "EMADistillCallback",
    "EMATeacherCallback",
    "MomentumTeacher",
    "quantile",
    "run_app",
    "student_of",
]
