"""Distillation-aware augmentation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

**MIX-KD partial mixup** (:class:`PartialMixup`, ``augment=mixkd``). Choi, Jeon, Park, Sohn, "Understanding the
Role of Mixup in Knowledge Distillation: An Empirical Study", WACV 2023 (arXiv:2211.03946). Mixup makes the teacher's
outputs smooth, and too much of it hurts the student; *partial mixup* (PMU) mixes only part of each batch:

.. math::

    \\tilde x_i = \\lambda_i x_i + (1 - \\lambda_i) x_{\\pi(i)}, \\qquad
    \\tilde y_i = \\lambda_i e_{y_i} + (1 - \\lambda_i) e_{y_{\\pi(i)}}, \\qquad
    \\lambda_i \\sim \\mathrm{Beta}(\\alpha, \\alpha) \\text{ per sample},

with :math:`\\lambda_i = 1` (the sample left as it is, a one-hot target) for a fraction ``unmixed_fraction`` of each
batch. Teacher and student see the same mixed input (the callback replaces the batch before the training step).
MIX-KD pairs it with logit standardisation (the MIXSTD loss): with ``standardize_logits=True`` (the ``mixkd`` YAML)
the callback turns on ``standardize`` of every distillation term that has it (``kd``, ``dkd``, ``ttm``, ``wttm``,
``cutmixpick``...) for the fit, so that KL compares softmax(Z(z)/τ) with Z the per-sample z-score.

Checked against the authors' code, hchoi71/MIX-KD ``helper/loops_mixstd.py`` (``PMU``), ``distiller_zoo/MIXSTD.py``
and ``train_student_MIXSTD.py`` (defaults ``--partmixup 0.9`` "0.9=10%" mixed, ``--beta_a 1.0``, ``-r 0.1 -a 0.9``).
Differences, on purpose:

- ``partmixup`` is the fraction set to :math:`\\lambda = 1`; the authors draw those positions *with replacement*
  (``torch.randint``), so their nominal 0.9 leaves about :math:`1 - e^{-0.9} \\approx 59\\%` of a batch unmixed in
  expectation. Here exactly ``floor(unmixed_fraction · B)`` distinct samples stay unmixed.
- the authors mix two random permutations of the batch, :math:`\\lambda x_{\\pi_1(i)} + (1 - \\lambda) x_{\\pi_2(i)}`;
  here the first is the identity (the usual mixup of Zhang et al.), which has the same distribution over a shuffled
  loader and keeps ``batch[2]`` (dataset indices) naming each row's first component.
- MIXSTD's loss is :math:`\\gamma\\,\\mathrm{CE}(z_S/\\sigma_S, \\tilde y) + \\alpha\\,\\mathrm{KL}(\\mathrm{softmax}(z_T
  /\\sigma_T) \\| \\mathrm{softmax}(z_S/\\sigma_S))` with no temperature (:math:`\\tau = 1`, no :math:`\\tau^2`) and
  :math:`\\gamma = 0.1, \\alpha = 0.9`. ``standardize_logits`` standardises the *distillation* terms only: the task
  cross-entropy against the mixed soft labels stays on raw logits (it is the LightningModule's own loss, which a
  callback does not rewrite), and ``kd`` keeps its temperature and :math:`\\tau^2` (set
  ``loss.terms.kd.temperature=1`` for the authors' τ = 1; with τ = 1 the KL term equals MIXSTD's up to the 1e-7 in
  the z-score's denominator, since softmax ignores the subtracted mean).

The mixed targets are class-probability rows ``[B, C]`` (float32): :class:`~lightning_kd.module.ClassifierModule`
and ``F.cross_entropy`` accept them, and the engine passes them to the terms as ``DistillBatch.soft_targets`` with
their argmax as ``DistillBatch.targets``. A teacher-output cache (``teacher_cache=``) cannot be combined with
mixup (it would return the teacher's outputs for the unmixed images): the callback refuses it.

**CutMixPick** is the loss term :class:`~lightning_kd.losses.cutmixpick.CutMixPickLoss` (``loss=cutmixpick``) and
**T-stddev** the metric :class:`~lightning_kd.metrics.TeacherStddev`; both are re-exported here.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_kd.engine import DistillEngine
from lightning_kd.losses.cutmixpick import CutMixPickLoss, cutmix_views
from lightning_kd.metrics import TeacherStddev, teacher_stddev

_INPUT_KEYS = ("input", "inputs", "image", "images", "x", "pixel_values")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


def partial_mixup(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    *,
    alpha: float,
    unmixed_fraction: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MIX-KD's partial mixup of one batch.

    Args:
        inputs: ``[B, ...]`` inputs.
        targets: class indices ``[B]`` or probability rows ``[B, C]`` (already soft targets are mixed as they are).
        num_classes: ``C``, the width of the soft targets.
        alpha: the Beta(α, α) parameter (> 0).
        unmixed_fraction: the fraction of the batch left unmixed (λ = 1), in [0, 1].
        rng: the random generator (λ, the permutation and the unmixed positions are drawn from it).

    Returns:
        ``(mixed inputs, soft targets [B, C] float32, λ [B] float32, permutation [B])``: row ``i`` is
        ``λ_i · inputs[i] + (1 − λ_i) · inputs[perm[i]]``.
    """
    b = inputs.shape[0]
    lam = rng.beta(alpha, alpha, size=b)
    n_unmixed = math.floor(unmixed_fraction * b + 1e-9)
    if n_unmixed:
        lam[rng.choice(b, size=n_unmixed, replace=False)] = 1.0
    perm_np = rng.permutation(b)
    device = inputs.device
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=device)
    perm = torch.as_tensor(perm_np, dtype=torch.long, device=device)
    if targets.is_floating_point() and targets.dim() == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(f"PartialMixup: soft targets have {targets.shape[1]} classes, expected {num_classes}")
        soft = targets.float()
    else:
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(
                f"PartialMixup: targets must be class indices [B] or probabilities [B, C], got dtype {targets.dtype} "
                f"and shape {tuple(targets.shape)}"
            )
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"PartialMixup: labels range over [{low}, {high}] but num_classes is {num_classes}; pass the right "
                "num_classes="
            )
        soft = torch.nn.functional.one_hot(targets.long(), num_classes).float()
    shape = (b,) + (1,) * (inputs.dim() - 1)
    lam_x = lam_t.to(inputs.dtype).view(shape) if inputs.is_floating_point() else lam_t.view(shape)
    mixed = lam_x * inputs + (1 - lam_x) * inputs[perm]
    soft = lam_t[:, None] * soft + (1 - lam_t[:, None]) * soft[perm]
    return mixed.to(inputs.dtype), soft, lam_t, perm


class PartialMixup(Callback):
    """MIX-KD partial mixup as a Lightning callback: replaces each training batch's inputs and targets in place,
    before the training step (and so before the teacher and the student see it).

    Args:
        alpha: λ ~ Beta(α, α), one λ per sample (authors: ``--beta_a`` 1.0; 0.2 and 0.4 also studied).
        unmixed_fraction: fraction of each batch left unmixed (λ = 1); exactly ``floor(fraction · B)`` samples
            (authors' ``--partmixup``, default 0.9; see the module docstring for how their sampling differs).
        num_classes: width of the soft targets; default: the datamodule's ``num_classes``.
        standardize_logits: turn on ``standardize`` of every distillation term that has it, for the fit (MIX-KD's
            logit standardisation); restored at teardown. A warning says so when no term has it.
        seed: seed of the mixing; default ``torch.initial_seed()`` at setup (set by ``lightning.seed_everything``).
            The draw of each batch comes from ``(seed, rank, epoch, batch_idx)``, so a resumed fit mixes the same way;
            the resolved seed is saved in the callback's state.

    Batches must be lists ``[input, target, ...]`` (what the default collate makes of ``(x, y, index)`` samples) or
    dicts (keys as in :func:`~lightning_kd.engine.unpack_batch`); tuples and bare tensors are refused. The last
    draw is kept as :attr:`last_lambda` and :attr:`last_permutation` (for inspection).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        unmixed_fraction: float = 0.9,
        num_classes: int | None = None,
        standardize_logits: bool = False,
        seed: int | None = None,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"PartialMixup: alpha must be a finite number > 0 (λ ~ Beta(α, α)), got {alpha}")
        if not (isinstance(unmixed_fraction, (int, float)) and 0.0 <= unmixed_fraction <= 1.0):
            raise ValueError(f"PartialMixup: unmixed_fraction must be in [0, 1], got {unmixed_fraction}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"PartialMixup: num_classes must be a positive integer or None, got {num_classes}")
        self.alpha = float(alpha)
        self.unmixed_fraction = float(unmixed_fraction)
        self.num_classes = num_classes
        self.standardize_logits = bool(standardize_logits)
        self.seed = seed
        self.last_lambda: torch.Tensor | None = None
        self.last_permutation: torch.Tensor | None = None
        self._switched: list[Any] = []  # terms whose standardize flag this callback turned on
        self._checked_cache = False

    # -- checkpoint state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.seed is None:
            self.seed = int(torch.initial_seed()) % 2**63
        if self.num_classes is None:
            classes = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
            if not isinstance(classes, int):
                raise ValueError(
                    "PartialMixup needs the number of classes to build soft targets: pass num_classes=... (or fit "
                    "with a datamodule that has a num_classes attribute)"
                )
            self.num_classes = classes
        self._checked_cache = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.standardize_logits:
            return
        switched = []
        for engine in _engines(pl_module):
            for name, term in engine.terms.items():
                if isinstance(getattr(term, "standardize", None), bool) and not term.standardize:
                    term.standardize = True
                    switched.append(term)
                    rank_zero_info(f"PartialMixup: logit standardisation turned on for loss term {name!r}")
        self._switched = switched
        if not any(
            isinstance(getattr(t, "standardize", None), bool) for e in _engines(pl_module) for t in e.terms.values()
        ):
            rank_zero_warn(
                "PartialMixup(standardize_logits=True): no distillation term has a `standardize` option (kd, dkd, "
                "ttm, wttm, cutmixpick do), so only the partial mixup applies"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for term in self._switched:
            term.standardize = False
        self._switched = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked_cache:
            self._refuse_output_cache(pl_module)
            self._checked_cache = True
        assert self.num_classes is not None and self.seed is not None
        input_key, target_key = _slots(batch)
        inputs, targets = batch[input_key], batch[target_key]
        if targets is None:
            raise ValueError("PartialMixup needs labels in the batch to mix them")
        rng = np.random.default_rng([self.seed, trainer.global_rank, trainer.current_epoch, batch_idx])
        mixed, soft, lam, perm = partial_mixup(
            inputs, targets, self.num_classes, alpha=self.alpha, unmixed_fraction=self.unmixed_fraction, rng=rng
        )
        batch[input_key], batch[target_key] = mixed, soft
        self.last_lambda, self.last_permutation = lam, perm

    def _refuse_output_cache(self, pl_module: L.LightningModule) -> None:
        if any(engine.output_cache is not None for engine in _engines(pl_module)):
            raise RuntimeError(
                "PartialMixup cannot be combined with a teacher-output cache: the cache returns the teacher's outputs "
                "for each sample index, but the inputs are mixed anew at every step. Remove teacher_cache= (or "
                "augment=mixkd)."
            )


def _engines(pl_module: L.LightningModule) -> list[DistillEngine]:
    """The distillation engines in the module: the DistillationModule's own, or those DistillCallbacks attached."""
    return [m for m in pl_module.modules() if isinstance(m, DistillEngine)]


def _slots(batch: Any) -> tuple[Any, Any]:
    """The (input, target) keys/positions of a mutable batch."""
    if isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        return 0, 1
    if isinstance(batch, dict):
        input_key = next((k for k in _INPUT_KEYS if k in batch), None)
        target_key = next((k for k in _TARGET_KEYS if k in batch), None)
        if input_key is None or target_key is None:
            raise KeyError(
                f"PartialMixup cannot find the inputs and targets in a batch with keys {list(batch)}; expected one of "
                f"{_INPUT_KEYS} and one of {_TARGET_KEYS}"
            )
        return input_key, target_key
    raise TypeError(
        f"PartialMixup replaces the batch's inputs and targets in place, so the batch must be a list [input, target, "
        f"...] or a dict; got {type(batch).__name__}. A tuple batch cannot be changed in place: return a list from "
        "your collate_fn (torch's default collate already does)."
    )


__all__ = ["CutMixPickLoss", "PartialMixup", "TeacherStddev", "cutmix_views", "partial_mixup", "teacher_stddev"]
