"""Loss-term protocol
^^^^^^^^^^^^^^^^^^^

Every distillation method is a :class:`LossTerm`: an ``nn.Module`` that says which layers it needs (:meth:`taps`),
builds its trainable parts once it has seen the shapes (:meth:`setup`), may run a pass over the training data before
fitting (:meth:`prepare`), and turns one step's :class:`DistillBatch` into a scalar (or a dict of named scalars) in
:meth:`forward`. Its parameters (connectors, embeddings) and buffers (memory banks, running statistics) are ordinary
module state: optimised with the student and saved in checkpoints by both faces of the engine.

Adding a method is one module in :mod:`lightning_kd.losses` that subclasses :class:`LossTerm` and is decorated with
:func:`register_loss`, one ``conf/loss/NAME.yaml`` and one test file.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_kd.taps import TapSpec

STUDENT = "student"
TEACHER = "teacher"


@dataclass
class ModelOutputs:
    """What one model produced in this step: its logits, the tensors of the taps the terms asked for and, for a
    teacher ensemble (:class:`~lightning_kd.strategies.multi_teacher.TeacherEnsemble`), each member's logits by name
    (``logits`` is then the ensemble's combined prediction)."""

    logits: torch.Tensor
    features: dict[TapSpec, torch.Tensor] = field(default_factory=dict)
    members: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, spec: str | TapSpec) -> torch.Tensor:
        key = TapSpec.parse(spec)
        try:
            return self.features[key]
        except KeyError:
            raise KeyError(
                f"tap {key} was not captured; a term must list it in taps() (captured: "
                f"{', '.join(map(str, self.features)) or 'none'})"
            ) from None


@dataclass
class DistillBatch:
    """One training step as a loss term sees it.

    Attributes:
        student: the student's logits and tapped features (with gradients).
        teacher: the teacher's logits and tapped features (no gradients).
        targets: class labels, or ``None`` when the batch has none.
        indices: each sample's dataset index (for memory banks and output caches), or ``None``.
        step: the trainer's global step (drives schedules).
        epoch: the current epoch.
        max_steps: the total number of optimisation steps, when known (``-1`` otherwise).
        inputs: the step's inputs, for terms that run extra forwards (augmented candidates, a frozen copy of the
            student), or ``None``.
        soft_targets: probability targets ``[B, C]`` when the batch carries them (mixup); ``targets`` then holds
            their argmax, so terms that need class indices keep working.
        teacher_targets: the teacher's labels ``[B, T']`` when it reads its own tokenization of the batch
            (cross-tokenizer distillation, :func:`~lightning_kd.engine.teacher_view`), else ``None``.

    Token batches (language models): ``student.logits``/``teacher.logits`` are ``[B, T, V]``, ``targets`` the
    labels ``[B, T]`` aligned with the input ids (``-100`` = ignored; the logit at position ``t`` predicts the label
    at ``t + 1``, the Hugging Face convention), ``inputs`` the model's keyword arguments (``input_ids``,
    ``attention_mask``).
    """

    student: ModelOutputs
    teacher: ModelOutputs
    targets: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    step: int = 0
    epoch: int = 0
    max_steps: int = -1
    inputs: Any = None
    soft_targets: torch.Tensor | None = None
    teacher_targets: torch.Tensor | None = None


@dataclass
class SetupContext:
    """What a term may look at once, before fitting, to build its trainable parts.

    Attributes:
        student: outputs of the student on a probe batch (shapes of every tap the terms asked for).
        teacher: outputs of the teacher on the same batch.
        student_model: the student (read-only use).
        teacher_model: the teacher (read-only use: e.g. copy its classifier weights into a buffer; never store the
            module itself on the term, or it would be trained and checkpointed).
        num_classes: the number of classes (logit width).
        num_samples: the size of the training set, when known (memory banks indexed by ``DistillBatch.indices``).
    """

    student: ModelOutputs
    teacher: ModelOutputs
    student_model: nn.Module
    teacher_model: nn.Module
    num_classes: int
    num_samples: int | None = None


@dataclass
class TeacherPass:
    """The teacher's outputs on one batch of the training set, for :meth:`LossTerm.prepare`."""

    teacher: ModelOutputs
    targets: torch.Tensor | None
    indices: torch.Tensor | None


class LossTerm(nn.Module):
    """Base class of every distillation loss term.

    Args:
        weight: the term's weight in the total loss ``task_weight · task + Σ weight_i · term_i``.

    Subclasses set :attr:`student_taps` / :attr:`teacher_taps` (or override :meth:`taps`) and implement
    :meth:`forward`. Logits are always available as ``batch.student.logits`` / ``batch.teacher.logits``.
    """

    #: set ``True`` to receive :meth:`prepare` with a pass of the teacher over the training data before fitting.
    needs_prepare: ClassVar[bool] = False
    #: set ``True`` when the term already contains the label loss (PLD) or the method trains without it (SimKD): the
    #: module wrapper's ``task_weight`` then defaults to 0.
    replaces_task_loss: ClassVar[bool] = False
    #: set ``True`` when the term compares teacher and student distributions over different vocabularies (ULD):
    #: the engine then accepts a teacher whose logit width differs from the student's.
    cross_vocabulary: ClassVar[bool] = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.student_taps: list[TapSpec] = []
        self.teacher_taps: list[TapSpec] = []
        #: values to log that are not part of the loss (a router's routed fractions...), set by :meth:`forward`;
        #: the engine logs them as ``train/<term>/<key>`` after each call.
        self.diagnostics: dict[str, torch.Tensor] = {}

    def taps(self) -> dict[str, list[TapSpec]]:
        """The layers this term reads, per side."""
        return {STUDENT: list(self.student_taps), TEACHER: list(self.teacher_taps)}

    def borrow(self, name: str, obj: Any) -> None:
        """Keep a reference to something owned elsewhere (the student's classifier, the teacher's head) as
        ``self.<name>`` without registering it as a submodule: it is not in this term's parameters or state_dict, so
        it is neither trained twice nor saved with the term (the student's own parameters still get gradients
        through it; the teacher's stay frozen)."""
        self.__dict__[name] = obj

    def setup(self, ctx: SetupContext) -> None:
        """Build trainable parts from the probe shapes. Called once, before the optimizer exists."""

    def prepare(self, passes: Iterable[TeacherPass]) -> None:
        """Consume one pass of the teacher over the training data (only if :attr:`needs_prepare`)."""

    def student_predictor(self, student: nn.Module) -> nn.Module | None:
        """The model that makes the student's predictions when this term replaces the student's own head (SimKD
        reuses the teacher's classifier); ``None`` (the default) when the student predicts with its own logits."""
        return None

    def forward(self, batch: DistillBatch) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Return the unweighted loss: a scalar, or a dict of named scalars that are summed."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


# --------------------------------------------------------------------------------------------------------------------
# Argument helpers shared by the terms
# --------------------------------------------------------------------------------------------------------------------
def check_number(term: str, name: str, value: float, *, positive: bool = False) -> float:
    """``value`` as a float, or a ``ValueError`` naming the term and the argument when it is not a finite number
    ``>= 0`` (``> 0`` with ``positive``)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{term}: {name} must be a finite number {'>' if positive else '>='} 0, got {value}")
    return float(value)


def check_temperature(term: str, temperature: float) -> float:
    """``temperature`` as a float, or a ``ValueError`` naming the term when it is not a finite number > 0."""
    return check_number(term, "temperature", temperature, positive=True)


@dataclass
class LayerPairs:
    """Matched student/teacher taps of a multi-layer term, with a log name per pair.

    Log names are the student taps (``/`` replaced), suffixed ``#i`` when a student tap is used twice.
    """

    student: list[TapSpec]
    teacher: list[TapSpec]
    names: list[str]

    @classmethod
    def parse(cls, term: str, student_layers: str | Sequence[str], teacher_layers: str | Sequence[str]) -> LayerPairs:
        s_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        t_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
        if not s_layers or len(s_layers) != len(t_layers):
            raise ValueError(
                f"{term}: student_layers ({len(s_layers)}) and teacher_layers ({len(t_layers)}) must be "
                "non-empty lists of equal length (one teacher layer per student layer)"
            )
        student = [TapSpec.parse(x) for x in s_layers]
        names = [str(x).replace("/", "_") for x in student]
        names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        return cls(student, [TapSpec.parse(x) for x in t_layers], names)

    def __iter__(self) -> Iterator[tuple[str, TapSpec, TapSpec]]:
        return iter(zip(self.names, self.student, self.teacher))


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[LossTerm]] = {}


def register_loss(name: str) -> Any:
    """Class decorator: register a :class:`LossTerm` under ``name`` (the ``loss=NAME`` of the command line)."""

    def decorator(cls: type[LossTerm]) -> type[LossTerm]:
        if not (isinstance(cls, type) and issubclass(cls, LossTerm)):
            raise TypeError(f"@register_loss({name!r}) must decorate a LossTerm subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def registered_losses() -> list[str]:
    """Names of every registered loss term."""
    from lightning_kd import losses  # noqa: F401 - importing the package registers every module in it

    return sorted(_REGISTRY)


def get_loss_class(name: str) -> type[LossTerm]:
    """The class registered as ``name``; an unknown name raises with the valid names."""
    names = registered_losses()
    if name not in _REGISTRY:
        raise KeyError(f"unknown loss {name!r}; registered losses: {', '.join(names)}")
    return _REGISTRY[name]


def create_loss(name: str, **kwargs: Any) -> LossTerm:
    """Instantiate the registered term ``name``; unknown keyword arguments raise with the accepted ones."""
    cls = get_loss_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params or k == "self"]
    if unknown and not accepts_any:
        valid = [k for k in params if k != "self"]
        raise TypeError(f"loss {name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(valid)}")
    return cls(**kwargs)
