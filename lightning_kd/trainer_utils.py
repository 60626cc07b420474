"""Small helpers shared by the module wrapper and the callback to read from a running ``lightning.Trainer``."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_kd.engine import Inputs, head_of, teacher_view, unpack_batch


def train_dataloader_of(trainer: L.Trainer) -> Any:
    """A fresh training dataloader: the datamodule's, or the one given to ``trainer.fit``."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return datamodule.train_dataloader()
    source = getattr(trainer.fit_loop, "_data_source", None)  # dataloaders passed to fit() directly
    if source is not None and source.is_defined():
        return source.dataloader()
    return None


def probe_inputs(trainer: L.Trainer, pl_module: L.LightningModule, example: Any = None, n: int = 2) -> Inputs:
    """A few training inputs to probe layer shapes before fitting.

    Taken from ``example`` if given, else ``pl_module.example_input_array``, else the first training batch.
    """
    return probe_views(trainer, pl_module, example, n)[0]


def probe_views(
    trainer: L.Trainer, pl_module: L.LightningModule, example: Any = None, n: int = 2
) -> tuple[Inputs, Inputs | None]:
    """``(student inputs, teacher inputs)`` of a few training samples (see :func:`probe_inputs`); the teacher's are
    ``None`` unless the batch carries the teacher's own tokenization (:func:`~lightning_kd.engine.teacher_view`)."""
    if example is None:
        example = getattr(pl_module, "example_input_array", None)
    if example is None:
        loader = train_dataloader_of(trainer)
        if loader is None:
            raise RuntimeError(
                "cannot find training data to probe layer shapes before fitting; pass example_input=<a batch of "
                "inputs> or set example_input_array on the LightningModule"
            )
        example = next(iter(loader))
    inputs, targets, _ = unpack_batch(example)
    teacher_inputs = teacher_view(example, inputs, targets)[0]
    return head_of(inputs, n), (None if teacher_inputs is inputs else head_of(teacher_inputs, n))


def num_samples_of(trainer: L.Trainer) -> int | None:
    """The size of the training dataset (sample indices range over ``[0, n)``), or ``None`` when it has no length."""
    loader = train_dataloader_of(trainer)
    try:
        return len(loader.dataset)  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None


def max_steps_of(trainer: L.Trainer) -> int:
    """The total number of optimisation steps of the fit, or ``-1`` when it cannot be known."""
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - unknown when the dataloader has no length
        return -1
