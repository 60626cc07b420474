"""Module wrapper
^^^^^^^^^^^^^^

:class:`ClassifierModule` trains one classifier with cross-entropy (a teacher, or the no-distillation baseline);
:class:`DistillationModule` is the same module with a frozen teacher and loss terms added through
:class:`~lightning_kd.engine.DistillEngine` — the engine that :class:`~lightning_kd.callback.DistillCallback` uses too.

Checkpoints hold the student (``model.*``) and the terms' trainable parts (``engine.terms.*``), never the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.engine import (
    DistillEngine,
    Inputs,
    LossSpec,
    agreement,
    as_logits,
    call_model,
    check_finite_task_loss,
    split_targets,
    teacher_view,
    unpack_batch,
)
from lightning_kd.losses.base import DistillBatch
from lightning_kd.trainer_utils import max_steps_of, num_samples_of, probe_views, train_dataloader_of

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def keyword_inputs(x: Inputs | None, inputs: dict[str, torch.Tensor]) -> Inputs:
    """``x``, or the keyword inputs when the module was called with keywords only."""
    if x is None:
        if not inputs:
            raise TypeError("no inputs: call the module with a tensor, a dict of keyword inputs, or keywords")
        return inputs
    if inputs:
        raise TypeError("give the inputs either as one tensor/dict or as keywords, not both")
    return x


class ClassifierModule(L.LightningModule):
    """Supervised training of a classifier; logs ``train/ce``, ``val/acc``, ``test/acc``.

    Args:
        model: the network (any ``nn.Module`` returning logits).
        optimizer: a factory ``params -> Optimizer`` (Hydra ``_partial_: true``); default SGD(0.05, momentum 0.9,
            weight decay 5e-4).
        scheduler: ``"cosine"`` (cosine annealing per step, over the whole fit), ``None`` (constant learning rate),
            or a factory ``optimizer -> LRScheduler`` (Hydra ``_partial_: true``, e.g. ``MultiStepLR`` with
            ``milestones=[150, 180, 210]``), stepped once per epoch (Lightning's default interval).
        label_smoothing: for the cross-entropy.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: str | SchedulerFactory | None = "cosine",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        if not (scheduler is None or scheduler == "cosine" or callable(scheduler)):
            raise ValueError(
                f"scheduler must be 'cosine', null or a factory optimizer -> LRScheduler (a Hydra node with "
                f"_target_ and _partial_: true), got {scheduler!r}"
            )
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        # Factories are code, not hyperparameters: kept out so checkpoints load with weights_only=True.
        ignore = ["model", "student", "teacher", "optimizer", "loss"] + (["scheduler"] if callable(scheduler) else [])
        self.save_hyperparameters(ignore=ignore)

    def forward(self, x: Inputs | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """The model's logits. Called with a tensor, a dict of keyword inputs, or the keywords themselves
        (``module(input_ids=..., attention_mask=...)``, as a Hugging Face model and
        :func:`~lightning_kd.engine.call_model` call it)."""
        return as_logits(call_model(self.model, keyword_inputs(x, inputs)))

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on labels (computed in float32); ``targets`` are class indices or, after mixup, class
        probabilities ``[B, C]``."""
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets, _ = unpack_batch(batch)
        ce = self.task_loss(self(inputs), targets)
        check_finite_task_loss(ce, "ce", self.global_step)
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/loss", ce)
        return ce

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        inputs, targets, _ = unpack_batch(batch)
        logits = self(inputs)
        self.log(f"{stage}/loss", self.task_loss(logits, targets), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(-1) == targets).float().mean(), prog_bar=True, sync_dist=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler is None:
            return optimizer
        if callable(self.scheduler):
            per_epoch = {"scheduler": self.scheduler(optimizer), "interval": "epoch"}
            return {"optimizer": optimizer, "lr_scheduler": per_epoch}
        total = max(1, max_steps_of(self.trainer))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DistillationModule(ClassifierModule):
    """Distil a frozen ``teacher`` into ``student``.

    ``loss = task_weight · CE(student, y) + Σ weight_i · term_i``; each term is logged as ``train/<name>``.

    Args:
        student: the network to train.
        teacher: the frozen teacher (kept out of the module tree, optimizer, DDP and checkpoints).
        loss: loss terms — a registered name (``"kd"``), a list, ``{name: kwargs}`` or :class:`LossTerm` objects.
        task_weight: weight of the cross-entropy on labels; default 1, or 0 when a term replaces the label loss
            (``pld``, ``simkd``: :attr:`LossTerm.replaces_task_loss`).
        optimizer, scheduler, label_smoothing: as in :class:`ClassifierModule`.

    Example::

        >>> import timm
        >>> module = DistillationModule(timm.create_model("resnet18", num_classes=10),
        ...                             timm.create_model("resnet34", num_classes=10), loss="kd", task_weight=0.1)
        >>> list(module.engine.terms)
        ['kd']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: LossSpec = "kd",
        task_weight: float | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: str | None = "cosine",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(student, optimizer, scheduler, label_smoothing)
        self.engine = DistillEngine(loss, teacher)
        if task_weight is None:
            replaces = any(term.replaces_task_loss for term in self.engine.terms.values())
            task_weight = 0.0 if replaces else 1.0
        self.task_weight = float(task_weight)
        self._max_steps = -1

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule)."""
        return self.engine.teacher

    def forward(self, x: Inputs | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """The student's predictions: its own logits, or those of the term that replaces its head (SimKD)."""
        predictor = self.engine.student_predictor(self.model) if self.engine.is_setup else None
        return as_logits(call_model(self.model if predictor is None else predictor, keyword_inputs(x, inputs)))

    def setup(self, stage: str) -> None:
        """Install the taps and build the terms' trainable parts before ``configure_optimizers`` and DDP."""
        if stage == "fit" and not self.engine.is_setup:
            inputs, teacher_inputs = probe_views(self.trainer, self)
            self.engine.setup(self.model, inputs, self.model, num_samples_of(self.trainer), teacher_inputs)
        elif stage == "fit":
            self.engine.attach(self.model)

    def on_fit_start(self) -> None:
        if any(term.needs_prepare for term in self.engine.terms.values()):
            self.engine.prepare(train_dataloader_of(self.trainer), self.device)

    def on_train_start(self) -> None:
        self._max_steps = max_steps_of(self.trainer)

    def on_train_end(self) -> None:
        """Taps are removed when training ends."""
        self.engine.detach()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets, indices = unpack_batch(batch)
        teacher_inputs, teacher_targets = teacher_view(batch, inputs, targets)
        teacher = self.engine.teacher_outputs(teacher_inputs, indices, self.current_epoch)
        with self.engine.student_capture():
            # the student's own head (a SimKD predictor is for evaluation)
            logits = as_logits(call_model(self.model, inputs))
        student = self.engine.student_outputs(logits)
        ce = self.task_loss(logits, targets)
        labels, soft = split_targets(targets)
        step = DistillBatch(
            student, teacher, labels, indices, self.global_step, self.current_epoch, self._max_steps, inputs, soft,
            teacher_targets,
        )  # fmt: skip
        distill, logs = self.engine(step)
        check_finite_task_loss(ce, "ce", self.global_step)
        loss = self.task_weight * ce + distill
        self.log("train/ce", ce, prog_bar=True)
        self.log_dict({**logs, "train/loss": loss.detach()})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation accuracy and loss, the student's top-1 agreement with the teacher (``val/agreement``) and its
        expected calibration error (``val/ece``; see :meth:`DistillEngine.log_validation`)."""
        logits = self._evaluate(batch, "val")
        if self.engine.is_setup:
            self.engine.log_validation(self, logits, batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test accuracy and teacher–student top-1 agreement (``test/agreement``)."""
        inputs, targets, _ = unpack_batch(batch)
        logits = self._evaluate(batch, "test")
        teacher_inputs, teacher_labels = teacher_view(batch, inputs, targets)
        teacher = self.engine.run_teacher(teacher_inputs, with_features=False).logits
        if teacher_labels is None and teacher.shape == logits.shape:  # not across tokenizers (ULD)
            self.log("test/agreement", agreement(logits, teacher, targets), sync_dist=True)
