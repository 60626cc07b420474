"""Distillation loss terms.

Every module in this package is imported here, so a new method is one file that defines a
:class:`~lightning_kd.losses.base.LossTerm` decorated with :func:`~lightning_kd.losses.base.register_loss`.
"""

import importlib
import pkgutil

from lightning_kd.losses.base import (
    DistillBatch,
    LossTerm,
    ModelOutputs,
    SetupContext,
    TeacherPass,
    create_loss,
    get_loss_class,
    register_loss,
    registered_losses,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DistillBatch",
    "LossTerm",
    "ModelOutputs",
    "SetupContext",
    "TeacherPass",
    "create_loss",
    "get_loss_class",
    "register_loss",
    "registered_losses",
]
