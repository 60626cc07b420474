"""CutMixPick
^^^^^^^^^^

Wang, Lohit, Jones, Fu, "What Makes a 'Good' Data Augmentation in Knowledge Distillation -- A Statistical
Perspective", NeurIPS 2022 (arXiv:2012.02909). A good augmentation for KD lowers the variance of the teacher–student
cross-entropy; CutMixPick strengthens CutMix by generating more CutMix views than it uses and keeping the ones the
teacher is least sure about (highest entropy):

1. ``mix_runs`` CutMix passes over the batch ``x`` (``B`` samples) give a pool of ``mix_runs · B`` views: per pass one
   λ ~ Beta(1, 1), one box of area ≈ (1 − λ)·H·W (centre uniform, clipped to the image) pasted from a permutation of
   the batch without fixed points;
2. each view ``v`` gets a score: the teacher's entropy :math:`H(\\mathrm{softmax}(z_T(v)))` (default), the student's
   entropy, or :math:`\\mathrm{KL}(\\mathrm{softmax}(z_T(v)/\\tau) \\| \\mathrm{softmax}(z_S(v)/\\tau))`;
3. the ``n_pick`` highest-scoring views are kept, and the term is the usual KD on them,

.. math::

    L = \\tau^2 \\cdot \\frac{1}{n} \\sum_{v \\in \\text{picked}}
        \\mathrm{KL}\\big(\\mathrm{softmax}(z_T(v)/\\tau) \\,\\|\\, \\mathrm{softmax}(z_S(v)/\\tau)\\big).

The KD term on the original inputs is separate: the authors' recipe is ``loss=[kd,cutmixpick]``
(``0.1·CE + 0.9·KD(x) + 0.9·KD(picked)``).

Checked against the authors' code, MingSun-Tse/Good-DA-in-KD ``helper/loops.py`` (``cutmix``, ``rand_bbox``,
``get_entropy_batch``, ``cutmix_pick``; ``lw3`` with ``--t_output_as_target_for_input_mix``: KL to the teacher's
output *on the mixed image*), ``option.py`` (``--n_pick 64``, ``--bbox rand_bbox``) and
``scripts/S_test_loss_different_DA_cifar100.sh`` (``-r 0.1 -a 0.9 --lw_mix [1,0,1] --mix_n_run 2
--cutmix_pick_criterion teacher_entropy|student_entropy``, batch 64, so ``n_pick`` = the batch size). As in their
code the scores are computed without gradients, entropies at temperature 1 and the KL criterion at τ; the student
scores views in its current (training) mode, so its BatchNorm statistics see the pool too. The views are drawn from a
numpy generator seeded by ``(seed, rank, step, call)``, so a run is reproducible.

The term runs extra forwards of both models on ``DistillBatch.inputs``: the teacher in eval mode without gradients,
the student with gradients (through ``SetupContext.student_model``: the student network with
:class:`~lightning_kd.module.DistillationModule`, the LightningModule's ``forward`` with
:class:`~lightning_kd.callback.DistillCallback`). Those forwards happen outside the engine's capture window, so the
layer taps of the step are not overwritten.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, check_temperature, register_loss
from lightning_kd.losses.kd import kd_loss

CRITERIA = ("teacher_entropy", "student_entropy", "kl")


def as_logits(output: object) -> torch.Tensor:
    """:func:`lightning_kd.engine.as_logits` (imported on use: the engine imports this package)."""
    from lightning_kd.engine import as_logits as engine_as_logits

    return engine_as_logits(output)


def cutmix_views(inputs: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One CutMix pass over a batch ``[B, C, H, W]``, following the CutMix authors' ``rand_bbox``.

    λ ~ Beta(1, 1); the box is ``int(W·sqrt(1 − λ)) × int(H·sqrt(1 − λ))`` around a uniform centre, clipped to the
    image; inside it every view takes the pixels of its partner ``inputs[perm]`` (a permutation without fixed points
    when ``B > 1``). Returns ``(views, λ adjusted to the pasted area, perm)``: ``λ = 1 − box area / (H·W)``.
    """
    b, _, h, w = inputs.shape
    lam = float(rng.beta(1.0, 1.0))
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
    perm = _derangement(b, rng)
    perm_t = torch.as_tensor(perm, dtype=torch.long, device=inputs.device)
    views = inputs.clone()
    views[:, :, y1:y2, x1:x2] = inputs[perm_t][:, :, y1:y2, x1:x2]
    return views, 1.0 - (x2 - x1) * (y2 - y1) / (h * w), perm_t


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``range(n)`` with no fixed point (identity for ``n == 1``), as in the authors' code."""
    if n < 2:
        return np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of ``softmax(logits)``, float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def per_sample_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``, float32 (no τ² factor: it ranks views)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1)


@register_loss("cutmixpick")
class CutMixPickLoss(LossTerm):
    """KD on the CutMix views of the batch with the highest teacher entropy (CutMixPick, NeurIPS 2022).

    Args:
        weight: weight of the term (authors: 0.9, the same as the KD term on the original inputs).
        temperature: softmax temperature τ of the KD on the picked views (> 0; authors: 4).
        mix_runs: CutMix passes over the batch; the pool holds ``mix_runs · B`` views (≥ 1; authors: 2).
        n_pick: views kept per step; ``None`` keeps ``B`` (the authors' 64 with batches of 64).
        criterion: ``"teacher_entropy"`` (default), ``"student_entropy"`` or ``"kl"`` (KL(p_T‖p_S) at τ).
        standardize: z-score the logits per sample before the softmax of the KD (logit standardisation; off).
        seed: seed of the CutMix draws.
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 4.0,
        mix_runs: int = 2,
        n_pick: int | None = None,
        criterion: str = "teacher_entropy",
        standardize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(weight)
        self.temperature = check_temperature("cutmixpick", temperature)
        if isinstance(mix_runs, bool) or not isinstance(mix_runs, int) or mix_runs < 1:
            raise ValueError(f"cutmixpick: mix_runs must be an integer >= 1 (CutMix passes per batch), got {mix_runs}")
        if n_pick is not None and (isinstance(n_pick, bool) or not isinstance(n_pick, int) or n_pick < 1):
            raise ValueError(f"cutmixpick: n_pick must be a positive integer or null (= the batch size), got {n_pick}")
        if criterion not in CRITERIA:
            raise ValueError(f"cutmixpick: criterion must be one of {CRITERIA}, got {criterion!r}")
        self.mix_runs = mix_runs
        self.n_pick = n_pick
        self.criterion = criterion
        self.standardize = bool(standardize)
        self.seed = int(seed)
        self._step = -1
        self._calls = 0

    def setup(self, ctx: SetupContext) -> None:
        self.borrow("student_model", ctx.student_model)
        self.borrow("teacher_model", ctx.teacher_model)

    # -- pieces ------------------------------------------------------------------------------------------------------
    def _rng(self, step: int) -> np.random.Generator:
        if step != self._step:
            self._step, self._calls = step, 0
        else:
            self._calls += 1  # gradient accumulation: several batches share a step
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        return np.random.default_rng([self.seed, rank, max(step, 0), self._calls])

    def pool(self, inputs: torch.Tensor, step: int) -> torch.Tensor:
        """The ``mix_runs · B`` CutMix views of this step."""
        rng = self._rng(step)
        return torch.cat([cutmix_views(inputs, rng)[0] for _ in range(self.mix_runs)], dim=0)

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        teacher: nn.Module = self.teacher_model
        param = next(teacher.parameters(), None)
        if param is not None and param.device != x.device:
            teacher.to(x.device)  # the teacher may not have run this step (teacher-output cache)
        from lightning_kd.engine import eval_mode

        with eval_mode(teacher), torch.no_grad():
            return as_logits(teacher(x)).detach()

    def score(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(score per view, the teacher's logits on the views when they were computed)``; higher = picked first."""
        if self.criterion == "student_entropy":
            with torch.no_grad():
                return entropy(as_logits(self.student_model(views))), None
        teacher = self._teacher(views)
        if self.criterion == "teacher_entropy":
            return entropy(teacher), teacher
        with torch.no_grad():
            student = as_logits(self.student_model(views))
        return per_sample_kl(student, teacher, self.temperature), teacher

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if "student_model" not in self.__dict__:
            raise RuntimeError("cutmixpick: setup() must run before the first step (the engine calls it)")
        inputs = batch.inputs
        if inputs is None or inputs.dim() != 4:
            got = "no inputs" if inputs is None else f"inputs of shape {tuple(inputs.shape)}"
            raise ValueError(f"cutmixpick needs the step's image batch [B, C, H, W] in DistillBatch.inputs; got {got}")
        views = self.pool(inputs, batch.step)
        scores, teacher = self.score(views)
        n = min(self.n_pick or inputs.shape[0], views.shape[0])
        picked = torch.topk(scores, n).indices
        teacher_logits = teacher[picked] if teacher is not None else self._teacher(views[picked])
        student_logits = as_logits(self.student_model(views[picked]))
        return kd_loss(student_logits, teacher_logits, self.temperature, standardize=self.standardize)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, temperature={self.temperature}, mix_runs={self.mix_runs}, n_pick={self.n_pick}, "
            f"criterion={self.criterion!r}, standardize={self.standardize}"
        )
