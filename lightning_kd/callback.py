"""Distillation callback
^^^^^^^^^^^^^^^^^^^^^^

Add distillation to an existing Lightning project without editing its LightningModule::

    trainer = Trainer(callbacks=[DistillCallback(teacher=teacher, loss="kd")])

**How the distillation term joins the user's loss.** No Lightning hook can change the loss that ``training_step``
returns (``on_before_backward`` ignores its return value, and calling ``backward`` from a callback would bypass AMP's
loss scaling and double-sync DDP). So in ``setup`` the callback wraps the module's ``training_step`` *on the
instance* (the way Lightning's own ``_ForwardRedirection`` patches ``forward``), and removes the wrap in
``teardown``. The wrapper runs inside Lightning's training-step precision context, so the teacher sees the same
autocast as the student:

1. run the frozen teacher on the batch's inputs (no grad, eval mode) and capture its taps;
2. call the user's ``training_step`` while capturing the student's taps (logits = output of the classifier by
   default, ``student_logits=``);
3. return ``task_weight · user_loss + Σ weight_i · term_i`` in place of the user's loss.

Because the sum is what ``training_step`` returns, Lightning treats it like the user's loss: the precision plugin
scales it (``16-mixed``'s grad scaler), it is divided by ``accumulate_grad_batches``, DDP reduces its gradients once.

**Validation.** While fitting, each validation batch's student logits are read from the student's logits tap (the
taps record from ``on_validation_batch_start`` to ``on_validation_batch_end``), the teacher runs on the batch, and
the student's top-1 agreement with it (``val/agreement``) and its expected calibration error (``val/ece``) are
logged, as :class:`~lightning_kd.module.DistillationModule` does (:meth:`DistillEngine.log_validation`).

Several callbacks: give each a distinct ``name`` (an error says so otherwise); each logs under ``train/<name>/``
(and ``val/<name>/``) and keeps its own state key. The wrappers nest; each callback's ``task_weight`` applies to the
user's loss only (so the user's loss is scaled by the product of the ``task_weight``\ s), never to another
callback's terms.

Supported ``training_step`` returns: a loss tensor, or a dict with a ``"loss"`` key (the other keys are kept).
Manual optimization is refused at ``setup``; a ``training_step`` that returns ``None`` is refused at its first step.

The terms' trainable parts (connectors) are attached to the LightningModule as a submodule before
``configure_optimizers`` and DDP wrapping, so ``self.parameters()`` includes them and checkpoints save them; if the
module's optimizer does not hold them, fitting stops with an error that says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.engine import (
    DistillEngine,
    LossSpec,
    call_model,
    eval_mode,
    split_targets,
    teacher_view,
    unpack_batch,
)
from lightning_kd.losses.base import DistillBatch
from lightning_kd.models import create_model, load_model_file, load_weights
from lightning_kd.taps import INTERNAL_PREFIX, LOGITS, LayerTaps, TapError
from lightning_kd.trainer_utils import max_steps_of, num_samples_of, probe_views, train_dataloader_of

_ATTR_PREFIX = f"{INTERNAL_PREFIX}engine"


class DistillCallback(Callback):
    """Distil a frozen teacher into the LightningModule being trained.

    Args:
        teacher: an ``nn.Module``; a file saved by this package (architecture in its metadata); or a timm model name
            (created with the student's class count, weights from ``teacher_checkpoint`` or ``teacher_pretrained``).
        loss: loss terms — a registered name (``"kd"``), a list of names, ``{name: kwargs}`` or :class:`LossTerm`s.
        task_weight: factor applied to the loss the user's ``training_step`` returns.
        student_logits: tap giving the student's logits (default: the classifier's output).
        teacher_checkpoint: weights for a teacher given by timm name.
        teacher_pretrained: load timm's pretrained weights for a teacher given by name (needs the hub).
        example_input: inputs used to probe layer shapes before fitting (default: the first training batch).
        name: a suffix that tells several DistillCallbacks apart in logs and state keys.
        save_teacher: also store the teacher's weights in the callback's checkpoint state (off by default: the
            teacher is not saved); on resume they are loaded back into the teacher.
    """

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike[str],
        loss: LossSpec = "kd",
        *,
        task_weight: float = 1.0,
        student_logits: str = LOGITS,
        teacher_checkpoint: str | None = None,
        teacher_pretrained: bool = False,
        example_input: torch.Tensor | None = None,
        name: str | None = None,
        save_teacher: bool = False,
    ) -> None:
        if not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise TypeError(f"teacher must be an nn.Module, a checkpoint path or a timm name, got {type(teacher)}")
        self.teacher = teacher
        self.loss = loss
        self.task_weight = float(task_weight)
        self.student_logits = student_logits
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_pretrained = teacher_pretrained
        self.example_input = example_input
        self.name = name
        self.save_teacher = bool(save_teacher)
        self.engine: DistillEngine | None = None
        self._original_training_step: Callable[..., Any] | None = None
        self._max_steps = -1
        self._last_parts: tuple[torch.Tensor, torch.Tensor] | None = None  # (weighted user loss, terms) of this step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def _attr(self) -> str:
        return f"{_ATTR_PREFIX}_{self.name}" if self.name else _ATTR_PREFIX

    @property
    def _log_prefix(self) -> str:
        return f"train/{self.name}/" if self.name else "train/"

    @property
    def _val_prefix(self) -> str:
        return f"val/{self.name}/" if self.name else "val/"

    # -- checkpoint state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The terms' trainable parts live in the module's state (``_lkd_engine.*``); the callback adds its identity
        and, with ``save_teacher=True``, the teacher's weights."""
        state: dict[str, Any] = {"name": self.name, "terms": list(self.engine.terms) if self.engine else None}
        if self.save_teacher and self.engine is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in self.engine.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        teacher_state = state_dict.get("teacher")
        if teacher_state is None:
            return
        if self.engine is None:
            raise RuntimeError("DistillCallback: cannot restore the saved teacher before setup() built the engine")
        self.engine.teacher.load_state_dict(teacher_state)

    # -- teacher -----------------------------------------------------------------------------------------------------
    def _resolve_teacher(self, num_classes: int) -> nn.Module:
        teacher = self.teacher
        if isinstance(teacher, nn.Module):
            return teacher
        if os.path.isfile(teacher):
            return load_model_file(teacher)[0]
        model = create_model(str(teacher), num_classes, pretrained=self.teacher_pretrained)
        if self.teacher_checkpoint:
            load_weights(model, self.teacher_checkpoint, arch=str(teacher))
        return model

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DistillCallback supports automatic optimization only: with manual optimization the callback cannot "
                "add its term to your loss. Call the engine yourself, or set automatic_optimization = True."
            )
        clash = [
            c for c in trainer.callbacks if isinstance(c, DistillCallback) and c is not self and c._attr == self._attr
        ]
        if clash:
            raise ValueError(
                f"{len(clash) + 1} DistillCallbacks are named {self.name!r}: give each one a distinct name= (e.g. "
                "DistillCallback(..., name='t1')) so that their engines, state keys and log names stay apart"
            )
        inputs, teacher_inputs = probe_views(trainer, pl_module, self.example_input)
        if self.engine is None:
            num_classes = 0 if isinstance(self.teacher, nn.Module) else self._probe_classes(pl_module, inputs)
            teacher = self._resolve_teacher(num_classes)
            self.engine = DistillEngine(
                self.loss, teacher, student_logits=self.student_logits, log_prefix=self._log_prefix
            )
            self.engine.setup(pl_module, inputs, pl_module, num_samples_of(trainer), teacher_inputs)
        else:
            self.engine.attach(pl_module)
        pl_module.add_module(self._attr, self.engine)
        self._wrap_training_step(pl_module)

    def _probe_classes(self, pl_module: L.LightningModule, inputs: torch.Tensor) -> int:
        """Class count of the student, read from its logits tap on the probe inputs."""
        taps = LayerTaps(pl_module, [self.student_logits])
        try:
            with eval_mode(pl_module), torch.no_grad(), taps.capture():
                call_model(pl_module, inputs)
            return int(next(iter(taps.pop().values())).shape[-1])
        finally:
            taps.remove()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.engine is not None
        trainable = {id(p) for p in self.engine.parameters() if p.requires_grad}
        in_optimizers = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if trainable - in_optimizers:
            raise RuntimeError(
                f"the distillation terms {list(self.engine.terms)} have trainable parts (connectors) that are not in "
                f"your optimizer. Build the optimizer from self.parameters() in configure_optimizers (the callback "
                f"attaches them as self.{self._attr}), or add a param group for them."
            )
        if any(term.needs_prepare for term in self.engine.terms.values()):
            self.engine.prepare(train_dataloader_of(trainer), pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._max_steps = max_steps_of(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.engine is not None:
            self.engine.detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap_training_step(pl_module)
        if self.engine is not None:
            self.engine.detach()
        if self._attr in pl_module._modules:
            delattr(pl_module, self._attr)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # -- validation metrics ------------------------------------------------------------------------------------------
    def _validation_taps(self, trainer: L.Trainer) -> LayerTaps | None:
        """The student taps, while fitting (the validation loop of ``fit``; taps are installed in ``setup``)."""
        engine = self.engine
        if engine is None or engine.student_taps is None or not engine.student_taps.attached:
            return None
        return engine.student_taps if trainer.state.fn == "fit" else None

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        taps = self._validation_taps(trainer)
        if taps is not None:
            taps.start()  # record the student's logits during the module's validation_step

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        taps = self._validation_taps(trainer)
        if taps is None:
            return
        taps.stop()
        assert self.engine is not None and self.engine.student_logits is not None
        try:
            logits = taps.pop()[self.engine.student_logits]
        except TapError:  # this validation_step did not run the student: nothing to compare
            return
        with trainer.precision_plugin.forward_context():  # the teacher under the student's precision
            self.engine.log_validation(pl_module, logits, batch, prefix=self._val_prefix)

    # -- loss injection ----------------------------------------------------------------------------------------------
    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        if self._original_training_step is not None:
            return
        original = pl_module.training_step  # bound method (or an earlier callback's wrapper)
        self._original_training_step = original

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._distill_step(pl_module, original, *args, **kwargs)

        training_step.__lkd_callback__ = self  # type: ignore[attr-defined] - lets an outer callback find this one
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _unwrap_training_step(self, pl_module: L.LightningModule) -> None:
        if self._original_training_step is None:
            return
        if "training_step" in pl_module.__dict__:
            if getattr(self._original_training_step, "__self__", None) is pl_module:
                del pl_module.training_step  # back to the class method
            else:
                pl_module.training_step = self._original_training_step  # type: ignore[method-assign]
        self._original_training_step = None

    def _distill_step(self, pl_module: L.LightningModule, original: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        engine = self.engine
        assert engine is not None
        batch = args[0] if args else kw.get("batch")
        inputs, targets, indices = unpack_batch(batch)
        teacher_inputs, teacher_targets = teacher_view(batch, inputs, targets)
        trainer = pl_module.trainer
        teacher = engine.teacher_outputs(teacher_inputs, indices, trainer.current_epoch)
        with engine.student_capture():
            output = original(*args, **kw)
        student = engine.student_outputs()
        if isinstance(output, torch.Tensor):
            task = output
        elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
            task = output["loss"]
        else:
            raise RuntimeError(
                f"DistillCallback needs training_step to return the loss tensor or a dict with a 'loss' key; "
                f"{type(pl_module).__name__}.training_step returned {type(output).__name__}"
            )
        labels, soft = split_targets(targets)
        step = DistillBatch(
            student, teacher, labels, indices, trainer.global_step, trainer.current_epoch, self._max_steps, inputs, soft,
            teacher_targets,
        )  # fmt: skip
        distill, logs = engine(step)
        terms = distill
        inner = getattr(original, "__lkd_callback__", None)  # an earlier DistillCallback's wrapper
        if inner is not None and inner._last_parts is not None:
            # its loss is its weighted task part + its terms: this task_weight applies to the user's part only
            task, inner_terms = inner._last_parts
            inner._last_parts = None
            terms = inner_terms + distill
        self._last_parts = (self.task_weight * task, terms)
        loss = self.task_weight * task + terms
        pl_module.log_dict({**logs, f"{self._log_prefix}distill": distill.detach()})
        if isinstance(output, Mapping):
            return {**output, "loss": loss}
        return loss


def student_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of your module from a checkpoint written during a fit with :class:`DistillCallback`, without the
    terms' trainable parts (the ``_lkd_engine*`` keys that ``ckpt_path=`` resume needs): what your module's
    ``load_state_dict`` expects, e.g. ``MyModule().load_state_dict(student_state_dict(torch.load(path,
    weights_only=True)))``. Accepts a checkpoint dict or a bare state_dict."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k: v for k, v in state.items() if not k.startswith(_ATTR_PREFIX)}
