"""lightning_kd: knowledge distillation for PyTorch Lightning.

One engine (:class:`DistillEngine`: layer taps + loss terms + a frozen teacher), two faces:
:class:`DistillationModule` for a student and a teacher, :class:`DistillCallback` for an existing LightningModule.
"""

from lightning_kd._lazy import import_timm

import_timm()  # timm without its import-time "import wandb": only logger=wandb pays for wandb (about 1 s)

from lightning_kd import zoo  # noqa: F401  (registers the CIFAR zoo in timm)
from lightning_kd.callback import DistillCallback, student_state_dict
from lightning_kd.engine import DistillEngine, NonFiniteLossError, build_terms, unpack_batch
from lightning_kd.losses import (
    DistillBatch,
    LossTerm,
    ModelOutputs,
    SetupContext,
    TeacherPass,
    create_loss,
    register_loss,
    registered_losses,
)
from lightning_kd.module import ClassifierModule, DistillationModule
from lightning_kd.taps import LayerTaps, TapError, TapSpec

__version__ = "0.1.0"

__all__ = [
    "ClassifierModule",
    "DistillBatch",
    "DistillCallback",
    "DistillEngine",
    "DistillationModule",
    "LayerTaps",
    "LossTerm",
    "ModelOutputs",
    "NonFiniteLossError",
    "SetupContext",
    "TapError",
    "TapSpec",
    "TeacherPass",
    "build_terms",
    "create_loss",
    "register_loss",
    "registered_losses",
    "student_state_dict",
    "unpack_batch",
]
