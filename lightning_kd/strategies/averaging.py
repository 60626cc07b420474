"""Weight averaging of the student (WAKD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Berezovskiy, Morozov, "Weight Averaging Improves Knowledge Distillation under Domain Shift", ICCV 2023 Workshop on
Out-Of-Distribution Generalization in Computer Vision (arXiv:2309.11446). Weight averaging from domain generalisation
(SWAD, SMA) also improves distillation under domain shift, and a simple average that needs no validation does as
well; its pairing with KD is WAKD. The student's weights after optimizer step :math:`t` (1-based) are averaged
uniformly over the steps :math:`S = \\{s_0, s_0 + k, s_0 + 2k, \\dots\\} \\cap [1, T]`:

.. math::

    \\bar\\theta = \\frac{1}{|S|} \\sum_{t \\in S} \\theta_t, \\qquad s_0 = \\max(1, \\mathrm{round}(f \\cdot T)),

with :math:`f` = ``start_fraction``, :math:`k` = ``every_n_steps`` and :math:`T` the fit's number of optimizer
steps. At the end of the fit the student gets :math:`\\bar\\theta`, and its BatchNorm running statistics are
recomputed with one pass over the training data (cumulative average over the batches, as
``torch.optim.swa_utils.update_bn``), because averaged weights do not match any running statistics seen in training.

Checked against the authors' code, vorobeevich/distillation-in-dg ``src/trainer/trainer.py``
(``swad_train_one_domain``, ``our_swad_begin``: an ``AveragedModel`` created after step ``our_swad_begin`` and updated
after every later step) and ``src/configs/swad/distillation_baseline.yaml`` (``our_swad_begin: 5000`` of
``num_iterations: 50000``), hence the defaults ``start_fraction = 0.1``, ``every_n_steps = 1``. Difference: the
authors follow SWAD's protocol of BatchNorm layers frozen in eval mode (ImageNet statistics, never updated), so they
need no recomputation; here BatchNorm trains normally and its statistics are recomputed at the end.

Built on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (uniform average of the *parameters*,
``use_buffers=False``), with these changes for distillation:

- the averaged copy holds the student only: :class:`~lightning_kd.engine.DistillEngine` submodules (the module face's
  ``engine``, the callback face's ``_lkd_engine``, with the terms' connectors and the teacher kept in the engine) are
  hidden while the copy is made and while weights are averaged or swapped, so the teacher is never copied and the
  terms' trainable parts keep training normally;
- before the first averaged step, validation and the end of the fit use the current weights (Lightning's callback
  would swap in the copy made at setup, i.e. the initial weights); during validation the averaged parameters are
  used with the current BatchNorm statistics (an approximation until the final recomputation);
- checkpoints keep Lightning's layout (``state_dict`` = averaged parameters over the current state,
  ``current_model_state``, ``averaging_state``), with every key of the module present, so ``ckpt_path=`` resumes.
  A checkpoint written at an epoch end holds the averaged parameters but not yet the recomputed BatchNorm
  statistics; the model in memory after ``fit`` has both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_kd.engine import DistillEngine, unpack_batch
from lightning_kd.trainer_utils import max_steps_of, train_dataloader_of


@contextmanager
def without_engines(module: nn.Module) -> Iterator[list[str]]:
    """Hide every :class:`DistillEngine` submodule of ``module`` (the slot is set to ``None``, which keeps the order
    of the remaining parameters) during the ``with`` block; yields their dotted paths."""
    hidden = [
        (f"{path}.{name}" if path else name, parent, name, child)
        for path, parent in module.named_modules()
        for name, child in parent._modules.items()
        if isinstance(child, DistillEngine)
    ]
    for _, parent, name, _ in hidden:
        parent._modules[name] = None
    try:
        yield [path for path, *_ in hidden]
    finally:
        for _, parent, name, child in hidden:
            parent._modules[name] = child


class WAKD(WeightAveraging):
    """Uniform average of the student's weights from ``start_fraction`` of the fit on, every ``every_n_steps``
    steps, then BatchNorm statistics recomputed on the training data (WAKD, Berezovskiy & Morozov 2023; see the
    module docstring for the formula and what was checked).

    Args:
        start_fraction: fraction of the fit's optimizer steps after which averaging starts, in [0, 1] (authors: 0.1).
        every_n_steps: average the weights after every ``k``-th step from the start on (authors: 1).
        start_step: the first averaged step (1-based count of optimizer steps); overrides ``start_fraction``, and is
            needed when the number of steps cannot be known (a dataloader without length and no ``max_steps``).
        recompute_bn: recompute BatchNorm running statistics at the end of the fit (one pass over the training data).
        bn_batches: use at most this many batches for the recomputation (default: the whole training set).
        device: where to keep the averaged copy (default: the student's device).
    """

    def __init__(
        self,
        start_fraction: float = 0.1,
        every_n_steps: int = 1,
        start_step: int | None = None,
        recompute_bn: bool = True,
        bn_batches: int | None = None,
        device: torch.device | str | int | None = None,
    ) -> None:
        if not (isinstance(start_fraction, (int, float)) and 0.0 <= start_fraction <= 1.0):
            raise ValueError(f"WAKD: start_fraction must be in [0, 1], got {start_fraction}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"WAKD: every_n_steps must be an integer >= 1, got {every_n_steps}")
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 1
        ):
            raise ValueError(
                f"WAKD: start_step must be an integer >= 1 (a count of optimizer steps) or None, got {start_step}"
            )
        if bn_batches is not None and (
            isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1
        ):
            raise ValueError(f"WAKD: bn_batches must be a positive integer or None, got {bn_batches}")
        super().__init__(device=device, use_buffers=False)
        self.start_fraction = float(start_fraction)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.recompute_bn = bool(recompute_bn)
        self.bn_batches = bn_batches
        self._first_step: int | None = None  # resolved s_0
        self._swapped = False

    # -- schedule ----------------------------------------------------------------------------------------------------
    @property
    def n_averaged(self) -> int:
        """How many snapshots the average holds."""
        return int(self._average_model.n_averaged) if self._average_model is not None else 0

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Average after optimizer step ``step_idx + 1`` when it is ``s_0 + j·k`` for some ``j >= 0``."""
        if step_idx is None or self._first_step is None:
            return False
        done = step_idx + 1
        return done >= self._first_step and (done - self._first_step) % self.every_n_steps == 0

    def _resolve_first_step(self, trainer: L.Trainer) -> int:
        if self.start_step is not None:
            return self.start_step
        total = max_steps_of(trainer)
        if total < 0:
            raise ValueError(
                "WAKD cannot place start_fraction: the number of training steps is unknown (set trainer max_steps, "
                "or give WAKD(start_step=N))"
            )
        first = max(1, round(self.start_fraction * total))
        if first > total:
            rank_zero_warn(f"WAKD: averaging starts after step {first} but the fit has {total} steps")
        return first

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with without_engines(pl_module) as hidden:
            super().setup(trainer, pl_module, stage)
        assert self._average_model is not None
        copy = self._average_model.module
        for path in hidden:  # drop the empty slots the hidden engines left in the copy
            parent, _, name = path.rpartition(".")
            del (copy.get_submodule(parent) if parent else copy)._modules[name]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)  # the copy was made before the module moved to its device

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = self._resolve_first_step(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with without_engines(pl_module):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Averaging is per step only."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.n_averaged > 0:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.n_averaged == 0:
            rank_zero_warn(
                f"WAKD: no weights were averaged (the fit ended after {trainer.global_step} steps, averaging starts "
                f"after step {self._first_step}); the student keeps its last weights"
            )
            return
        self._copy_average_to_current(pl_module)
        rank_zero_info(f"WAKD: the student now holds the average of {self.n_averaged} snapshots")
        if self.recompute_bn:
            self.update_batchnorm(trainer, pl_module)

    # -- weights -----------------------------------------------------------------------------------------------------
    def _pairs(self, pl_module: L.LightningModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self._average_model is not None
        with without_engines(pl_module):
            current = list(pl_module.parameters())
        return list(zip(self._average_model.module.parameters(), current, strict=True))

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        """Swap the parameters (not the buffers) of the student and the average."""
        for average, current in self._pairs(pl_module):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)

    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        """Copy the averaged parameters into the student (its buffers stay)."""
        for average, current in self._pairs(pl_module):
            current.data.copy_(average.data)

    @torch.no_grad()
    def update_batchnorm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Recompute the running statistics of the student's BatchNorm layers with one pass over the training data:
        statistics reset, then a cumulative average over the batches (``momentum=None``), as
        ``torch.optim.swa_utils.update_bn``. The pass runs ``pl_module``'s ``forward`` on each batch's inputs, under
        the trainer's precision, with the student in training mode and the distillation engines in eval mode (their
        layers keep their statistics). Under DDP each rank passes over its shard and the statistics are averaged
        across ranks."""
        with without_engines(pl_module):
            norms = [m for m in pl_module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if not norms:
            return
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (list, tuple, dict)):
            loader = train_dataloader_of(trainer)
        if loader is None:
            rank_zero_warn("WAKD: no training dataloader to recompute BatchNorm statistics with; they are left as is")
            return
        precision, device = trainer.precision_plugin, pl_module.device
        modes = {m: m.training for m in pl_module.modules()}
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        pl_module.train()
        for m in pl_module.modules():
            if isinstance(m, DistillEngine):
                m.eval()
        try:
            with precision.forward_context():
                for i, batch in enumerate(loader):
                    if self.bn_batches is not None and i >= self.bn_batches:
                        break
                    pl_module(precision.convert_input(unpack_batch(batch)[0].to(device)))
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
            for m, mode in modes.items():
                m.training = mode
        if trainer.world_size > 1:
            for m in norms:
                for buffer in (m.running_mean, m.running_var):
                    if buffer is not None:
                        buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """``state_dict`` = the current state with the averaged parameters (once there are any);
        ``current_model_state`` = the current state; ``averaging_state`` = the average's counter."""
        if self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        current = checkpoint["state_dict"]
        checkpoint["current_model_state"] = current
        average = self._average_model.state_dict()
        checkpoint["averaging_state"] = {k: v for k, v in average.items() if not k.startswith("module.")}
        if self.n_averaged > 0:
            names = {name for name, _ in self._average_model.module.named_parameters()}
            merged = dict(current)
            merged.update({k[7:]: v for k, v in average.items() if k.startswith("module.") and k[7:] in names})
            checkpoint["state_dict"] = merged

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None or not ("current_model_state" in checkpoint and "averaging_state" in checkpoint):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            return
        keys = set(self._average_model.module.state_dict())
        state = {f"module.{k}": v for k, v in checkpoint["state_dict"].items() if k in keys}
        self._average_model.load_state_dict({**state, **checkpoint["averaging_state"]})
        pl_module.load_state_dict(checkpoint["current_model_state"])


__all__ = ["WAKD", "without_engines"]
