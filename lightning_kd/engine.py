"""Distillation engine
^^^^^^^^^^^^^^^^^^^^

The one mechanism behind both faces of the package (:class:`~lightning_kd.module.DistillationModule` and
:class:`~lightning_kd.callback.DistillCallback`): it owns the loss terms (an ``nn.ModuleDict``, so their trainable
parts follow the student into the optimizer, onto the device and into checkpoints), installs the layer taps the terms
ask for, runs the frozen teacher, and turns one step into ``Σ weight_i · term_i`` plus a log entry per term.

The teacher is deliberately *not* a registered submodule: it is never trained, never in an optimizer, never wrapped
by DDP and never saved with the student. It is put in eval mode before every forward (Lightning flips modes after the
sanity check) and moved to the input's device lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from lightning_kd.losses.base import (
    STUDENT,
    TEACHER,
    DistillBatch,
    LossTerm,
    ModelOutputs,
    SetupContext,
    TeacherPass,
    create_loss,
)
from lightning_kd.taps import LOGITS, LayerTaps, TapSpec

LossSpec = str | LossTerm | Mapping[str, Any] | Sequence[Any]

#: Expected calibration error: the usual 15 equal-width confidence bins, L1 norm (Guo et al., ICML 2017, "On
#: Calibration of Modern Neural Networks"; torchmetrics ``MulticlassCalibrationError``).
ECE_BINS = 15


def calibration_error(num_classes: int) -> MulticlassCalibrationError:
    """A fresh ECE metric over ``num_classes`` classes (:data:`ECE_BINS` bins, L1); update it with softmax
    probabilities ``[B, C]`` and class labels ``[B]``."""
    return MulticlassCalibrationError(int(num_classes), n_bins=ECE_BINS, norm="l1")


class TeacherOutputSource(Protocol):
    """Stored teacher outputs a training step may read instead of running the teacher (see
    :meth:`DistillEngine.teacher_outputs`)."""

    def lookup(self, indices: torch.Tensor, epoch: int, device: torch.device) -> ModelOutputs | None:
        """The outputs for these samples in this epoch, or ``None`` when any of them is not stored."""

    def record(self, indices: torch.Tensor, epoch: int, outputs: ModelOutputs) -> None:
        """Offer outputs the live teacher just computed, for storing."""


class NonFiniteLossError(FloatingPointError):
    """A loss term produced NaN or Inf."""


class ClassCountMismatchError(ValueError):
    """Teacher and student predict different numbers of classes."""


# --------------------------------------------------------------------------------------------------------------------
# Building terms from names, dicts (Hydra configs) or objects
# --------------------------------------------------------------------------------------------------------------------
def build_terms(spec: LossSpec | None) -> dict[str, LossTerm]:
    """Build named loss terms from any of the accepted forms.

    - ``"kd"``: a registered name with its defaults;
    - a :class:`LossTerm`: used as is (named by its registry name or class);
    - a mapping ``{name: kwargs}``: ``name`` is the log name; ``kwargs`` may carry ``name`` (the registry name, when
      the log name differs, e.g. two ``fitnet`` terms) or a Hydra ``_target_``;
    - a sequence of the above (names may be given as ``{"kd": {"weight": 0.5}}`` entries).
    """
    if spec is None:
        return {}
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    terms: dict[str, LossTerm] = {}

    def add(name: str, term: LossTerm) -> None:
        if name in terms:
            raise ValueError(f"two loss terms are named {name!r}; give them distinct names")
        terms[name] = term

    if isinstance(spec, str):
        add(spec, create_loss(spec))
    elif isinstance(spec, LossTerm):
        add(getattr(spec, "registry_name", type(spec).__name__.lower()), spec)
    elif isinstance(spec, Mapping):
        for name, kwargs in spec.items():
            add(str(name), _term_from_config(str(name), kwargs))
    elif isinstance(spec, Sequence):
        for item in spec:
            for name, term in build_terms(item).items():
                add(name, term)
    else:
        raise TypeError(f"cannot build loss terms from {type(spec).__name__}: {spec!r}")
    return terms


def _term_from_config(name: str, kwargs: Any) -> LossTerm:
    if isinstance(kwargs, LossTerm):
        return kwargs
    kwargs = dict(kwargs or {})
    if "_target_" in kwargs:
        from hydra.utils import instantiate

        term = instantiate(kwargs)
        if not isinstance(term, LossTerm):
            raise TypeError(f"loss term {name!r}: {kwargs['_target_']} is not a LossTerm subclass")
        return term
    return create_loss(kwargs.pop("name", name), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Batches and model outputs
# --------------------------------------------------------------------------------------------------------------------
_INPUT_KEYS = ("input", "inputs", "image", "images", "x", "pixel_values")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")
_INDEX_KEYS = ("index", "indices", "idx")
#: keys of a token batch (Hugging Face convention) that are passed to the model as keyword arguments.
TOKEN_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
#: the prefix of a token batch's keys that hold the teacher's own tokenization (cross-tokenizer distillation, ULD):
#: ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``.
TEACHER_KEY_PREFIX = "teacher_"

#: what a model is called with: a tensor (``model(x)``) or, for token batches, keyword arguments
#: (``model(input_ids=..., attention_mask=...)``).
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def token_inputs(batch: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The model keyword arguments of a token batch (:data:`TOKEN_INPUT_KEYS`, read under ``prefix``)."""
    return {k: batch[prefix + k] for k in TOKEN_INPUT_KEYS if isinstance(batch.get(prefix + k), torch.Tensor)}


def call_model(model: Any, inputs: Inputs) -> Any:
    """``model(inputs)``, or ``model(**inputs)`` for the keyword inputs of a token batch."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def inputs_device(inputs: Inputs) -> torch.device:
    """The device of the inputs (of their first tensor for keyword inputs)."""
    return next(iter(inputs.values())).device if isinstance(inputs, Mapping) else inputs.device


def inputs_to(inputs: Inputs, device: torch.device | str) -> Inputs:
    """The inputs moved to ``device``."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def head_of(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` samples of the inputs."""
    if isinstance(inputs, Mapping):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def teacher_view(batch: Any, inputs: Inputs, targets: torch.Tensor | None) -> tuple[Inputs, torch.Tensor | None]:
    """What the teacher reads from ``batch``: its own tokenization (``teacher_input_ids``, ``teacher_attention_mask``,
    ``teacher_labels``) when the batch carries one (teacher and student with different tokenizers), else the
    student's inputs; and the teacher's labels (``None`` when it shares the student's)."""
    if isinstance(batch, Mapping) and isinstance(batch.get(TEACHER_KEY_PREFIX + "input_ids"), torch.Tensor):
        return token_inputs(batch, TEACHER_KEY_PREFIX), batch.get(TEACHER_KEY_PREFIX + "labels")
    return inputs, None


def unpack_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None, torch.Tensor | None]:
    """Split a batch into ``(inputs, targets, indices)``.

    Accepts a tensor, a ``(input, target[, index])`` tuple/list (this package's datamodules yield
    ``(input, target, index)``) or a dict with keys such as ``input``/``image``, ``target``/``label``, ``index``.
    A token batch (a dict with ``input_ids``, as Hugging Face collators make) gives its model keyword arguments
    (:func:`token_inputs`) as the inputs and its ``labels`` (``-100`` = ignored) as the targets.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return token_inputs(batch), batch.get("labels"), next((batch[k] for k in _INDEX_KEYS if k in batch), None)
    if isinstance(batch, Mapping):

        def first(keys: tuple[str, ...]) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        inputs = first(_INPUT_KEYS)
        if inputs is None:
            raise KeyError(f"cannot find the inputs in a batch with keys {list(batch)}; expected one of {_INPUT_KEYS}")
        return inputs, first(_TARGET_KEYS), first(_INDEX_KEYS)
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        indices = batch[2] if len(batch) > 2 and isinstance(batch[2], torch.Tensor) else None
        if indices is not None and (indices.dtype.is_floating_point or indices.dim() != 1):
            indices = None
        return batch[0], targets, indices
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}; use a tensor, an (input, target, ...) "
        "tuple or a dict with an 'input' key"
    )


def split_targets(targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(class indices, probability targets)``: a float ``[B, C]`` target (mixup's soft labels) gives its argmax and
    itself; class indices give themselves and ``None``."""
    if targets is not None and targets.is_floating_point() and targets.dim() == 2:
        return targets.argmax(-1), targets
    return targets, None


def ensemble_members(output: Any) -> dict[str, torch.Tensor]:
    """Per-member logits of an ensemble's output (a ``members`` attribute or key), else ``{}``."""
    members = getattr(output, "members", None)
    if members is None and isinstance(output, Mapping):
        members = output.get("members")
    return {str(k): as_logits(v).detach() for k, v in (members or {}).items()}


def as_logits(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, a ``.logits`` attribute, a ``'logits'`` key, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore each submodule's own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher: no gradients, eval mode."""
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------
class DistillEngine(nn.Module):
    """Loss terms + layer taps + a frozen teacher.

    Args:
        loss: the loss terms (see :func:`build_terms`).
        teacher: the frozen teacher. Held outside the module tree.
        student_logits: where the student's logits come from: ``None`` when the caller passes them (the module
            wrapper gets them from ``student(x)``), or a tap (``"logits"`` = the classifier's output, the callback's
            default, or any module path).
        check_finite: raise :class:`NonFiniteLossError` naming the term and the step when a term is NaN/Inf.
        log_prefix: prefix of the log names (``train/`` gives ``train/kd``).
    """

    def __init__(
        self,
        loss: LossSpec | None,
        teacher: nn.Module,
        *,
        student_logits: str | None = None,
        check_finite: bool = True,
        log_prefix: str = "train/",
    ) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(build_terms(loss))
        self.__dict__["teacher"] = freeze(teacher)
        self.student_logits = TapSpec.parse(student_logits) if student_logits else None
        self.check_finite = check_finite
        self.log_prefix = log_prefix
        self.student_taps: LayerTaps | None = None
        self.teacher_taps: LayerTaps | None = None
        self.is_setup = False
        #: where training steps may read the teacher's outputs instead of running it (a
        #: :class:`~lightning_kd.strategies.teacher_cache.TeacherOutputCache` installs itself here), or ``None``.
        self.output_cache: TeacherOutputSource | None = None
        #: the student's validation ECE (:meth:`log_validation`), built by :meth:`setup` once the class count is known.
        self.val_calibration: MulticlassCalibrationError | None = None

    # -- taps --------------------------------------------------------------------------------------------------------
    def _requested(self, side: str) -> list[TapSpec]:
        specs = [spec for term in self.terms.values() for spec in term.taps()[side]]
        if side == STUDENT and self.student_logits is not None:
            specs.append(self.student_logits)
        return list(dict.fromkeys(specs))

    def attach(self, student: nn.Module) -> None:
        """Resolve and install the taps on ``student`` and the teacher (raises on a bad layer path)."""
        if self.student_taps is None or self.student_taps.model is not student:
            self.detach()
            self.student_taps = LayerTaps(student, self._requested(STUDENT))
            self.teacher_taps = LayerTaps(self.teacher, self._requested(TEACHER), detach=True)
        else:
            self.student_taps.attach()
            self.teacher_taps.attach()  # type: ignore[union-attr]

    def detach(self) -> None:
        """Remove every hook and drop captured tensors."""
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.remove()

    @contextmanager
    def student_capture(self) -> Iterator[None]:
        """Capture the student's taps during the ``with`` block."""
        if self.student_taps is None:
            raise RuntimeError("DistillEngine.attach(student) must run before capturing")
        with self.student_taps.capture():
            yield

    def student_outputs(self, logits: torch.Tensor | None = None) -> ModelOutputs:
        """This step's student outputs (pops the taps). ``logits`` is required unless ``student_logits`` is a tap."""
        assert self.student_taps is not None
        features = self.student_taps.pop()
        if logits is None:
            if self.student_logits is None:
                raise ValueError("student logits were not given and no student_logits tap is configured")
            logits = features[self.student_logits]
        return ModelOutputs(as_logits(logits), features)

    # -- teacher -----------------------------------------------------------------------------------------------------
    def run_teacher(self, inputs: Inputs, *, with_features: bool = True) -> ModelOutputs:
        """Teacher forward in eval mode without gradients, on the inputs' device; with its taps unless
        ``with_features`` is false (evaluation) or the taps are removed."""
        teacher = self.teacher
        teacher.eval()
        param = next(teacher.parameters(), None)
        device = inputs_device(inputs)
        if param is not None and param.device != device:
            teacher.to(device)
        taps = self.teacher_taps if with_features and self.teacher_taps is not None else None
        if taps is None or not taps.attached:
            with torch.no_grad():
                output = call_model(teacher, inputs)
            return ModelOutputs(as_logits(output).detach(), members=ensemble_members(output))
        with torch.no_grad(), taps.capture():
            output = call_model(teacher, inputs)
        return ModelOutputs(as_logits(output).detach(), taps.pop(), ensemble_members(output))

    def teacher_outputs(self, inputs: Inputs, indices: torch.Tensor | None, epoch: int) -> ModelOutputs:
        """The teacher's outputs for a training step: read from :attr:`output_cache` when it holds this
        ``(epoch, indices)``, else computed by :meth:`run_teacher` (and offered to the cache to record)."""
        cache = self.output_cache
        if cache is None or indices is None:
            return self.run_teacher(inputs)
        cached = cache.lookup(indices, epoch, inputs_device(inputs))
        if cached is not None:
            return cached
        outputs = self.run_teacher(inputs)
        cache.record(indices, epoch, outputs)
        return outputs

    # -- before fitting ----------------------------------------------------------------------------------------------
    def setup(
        self,
        student: nn.Module,
        inputs: Inputs,
        run_student: Callable[..., Any],
        num_samples: int | None = None,
        teacher_inputs: Inputs | None = None,
    ) -> None:
        """Probe both models on ``inputs`` (eval mode, no grad), check the class counts and let every term build its
        trainable parts. Must run before the optimizer is created. ``num_samples`` is the training-set size (for
        memory banks), when known. ``run_student`` is called like a model (:func:`call_model`); the teacher reads
        ``teacher_inputs`` when given (its own tokenization), else ``inputs``.

        Teacher and student must predict the same classes (vocabulary), unless a term compares distributions
        across vocabularies (:attr:`LossTerm.cross_vocabulary`, e.g. ULD)."""
        self.attach(student)
        with eval_mode(student), torch.no_grad(), self.student_capture():
            out = call_model(run_student, inputs)
        s_out = self.student_outputs(None if self.student_logits is not None else as_logits(out))
        t_out = self.run_teacher(inputs if teacher_inputs is None else teacher_inputs)
        n_s, n_t = s_out.logits.shape[-1], t_out.logits.shape[-1]
        if n_s != n_t and not any(term.cross_vocabulary for term in self.terms.values()):
            raise ClassCountMismatchError(
                f"the student predicts {n_s} classes and the teacher {n_t}; create both with the same num_classes "
                "(e.g. timm.create_model(name, num_classes=N)) or load a teacher trained on the same data. Language "
                "models: both need the same vocabulary (tokenizer); a teacher with another tokenizer needs a "
                "cross-vocabulary term (loss=uld) and batches with its own tokenization (teacher_input_ids)"
            )
        ctx = SetupContext(s_out, t_out, student, self.teacher, int(n_s), num_samples)
        for term in self.terms.values():
            term.setup(ctx)
        self.val_calibration = calibration_error(int(n_s))
        self.is_setup = True

    def prepare(self, batches: Iterable[Any], device: torch.device | str) -> None:
        """Give each term that asks for it one pass of the teacher over ``batches`` (the training data)."""
        for term in self.terms.values():
            if term.needs_prepare:
                term.prepare(self._teacher_passes(batches, torch.device(device)))

    def _teacher_passes(self, batches: Iterable[Any], device: torch.device) -> Iterator[TeacherPass]:
        for batch in batches:
            inputs, targets, indices = unpack_batch(batch)
            to = lambda t: t.to(device) if t is not None else None
            yield TeacherPass(self.run_teacher(inputs_to(inputs, device)), to(targets), to(indices))

    def student_predictor(self, student: nn.Module) -> nn.Module | None:
        """The model that predicts for ``student`` when a term replaces its head (SimKD), else ``None``."""
        found = {name: p for name, term in self.terms.items() if (p := term.student_predictor(student)) is not None}
        if len(found) > 1:
            raise ValueError(f"terms {sorted(found)} each replace the student's predictions; keep only one of them")
        return next(iter(found.values()), None)

    # -- validation -------------------------------------------------------------------------------------------------
    def log_validation(self, module: Any, student_logits: torch.Tensor, batch: Any, prefix: str = "val/") -> None:
        """Log on ``module`` (a LightningModule, from its ``validation_step`` or a callback's validation-batch hook)
        the student's top-1 agreement with the teacher (``<prefix>agreement``, averaged over the epoch) and its
        expected calibration error (``<prefix>ece``, :func:`calibration_error` accumulated over the epoch).

        The teacher runs on the batch's inputs (eval mode, no grad, without taps). ECE needs class labels and the
        metric built by :meth:`setup`; without them only the agreement is logged. Both faces call this:
        :class:`~lightning_kd.module.DistillationModule` and :class:`~lightning_kd.callback.DistillCallback`.
        """
        inputs, targets, _ = unpack_batch(batch)
        logits = as_logits(student_logits).detach()
        teacher_inputs, teacher_labels = teacher_view(batch, inputs, targets)
        teacher = self.run_teacher(teacher_inputs, with_features=False).logits
        if teacher_labels is None and logits.shape == teacher.shape:  # not across tokenizers (ULD)
            module.log(f"{prefix}agreement", agreement(logits, teacher, targets), sync_dist=True)
        if logits.dim() > 2:  # token logits: ECE over a vocabulary is not computed
            return
        labels, _ = split_targets(targets)
        metric = self.val_calibration
        if labels is None or metric is None:
            return
        metric.update(logits.float().softmax(-1), labels)
        module.log(f"{prefix}ece", metric, metric_attribute=self._metric_path(module, metric))

    def _metric_path(self, module: Any, metric: nn.Module) -> str | None:
        """The attribute path of ``metric`` in ``module`` (Lightning needs it to find a metric it may have indexed
        earlier), looked up once per module rather than at every validation batch."""
        paths = self.__dict__.setdefault("_metric_paths", {})
        key = (id(module), id(metric))
        if key not in paths:
            paths[key] = next((n for n, m in module.named_modules() if m is metric), None)
        return paths[key]

    # -- one step ----------------------------------------------------------------------------------------------------
    def forward(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the terms and a dict of unweighted values to log (``train/kd``, ``train/rkd/angle``...)."""
        total = batch.student.logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            value = term(batch)
            if isinstance(value, Mapping):
                for part, v in value.items():
                    logs[f"{self.log_prefix}{name}/{part}"] = v.detach()
                value = sum(value.values(), total.new_zeros(()))
            if self.check_finite and not bool(torch.isfinite(value).all()):
                raise NonFiniteLossError(
                    f"loss term {name!r} is {value.item()} at step {batch.step} (epoch {batch.epoch}). Check the "
                    "inputs and the teacher's outputs for NaN, lower the learning rate, or use a larger temperature"
                )
            logs[f"{self.log_prefix}{name}"] = value.detach()
            for key, diagnostic in (getattr(term, "diagnostics", None) or {}).items():
                logs[f"{self.log_prefix}{name}/{key}"] = diagnostic.detach().float()
            total = total + term.weight * value.float()
        if batch.teacher_targets is None and batch.student.logits.shape == batch.teacher.logits.shape:  # not ULD
            logs[f"{self.log_prefix}agreement"] = agreement(batch.student.logits, batch.teacher.logits, batch.targets)
        for member, logits in batch.teacher.members.items():
            logs[f"{self.log_prefix}agreement/{member}"] = agreement(batch.student.logits, logits)
        return total, logs


def agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of samples whose top-1 class is the same for student and teacher (no gradient).

    Token logits ``[B, T, V]`` compare next-token predictions at the positions whose next label is not ``-100``
    (:func:`~lightning_kd.lm.divergences.next_token_mask`), or at every position without labels."""
    with torch.no_grad():
        same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
        if student_logits.dim() == 3 and labels is not None and labels.shape == same.shape:
            from lightning_kd.lm.divergences import next_token_mask

            mask = next_token_mask(labels)
            return (same * mask).sum() / mask.sum().clamp_min(1)
        return same.mean()


def check_finite_task_loss(value: torch.Tensor, name: str, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when the task loss is NaN/Inf."""
    if not math.isfinite(float(value.detach())):
        raise NonFiniteLossError(
            f"the task loss {name!r} is {float(value)} at step {step}; check the inputs, labels and learning rate"
        )


__all__ = [
    "ECE_BINS",
    "LOGITS",
    "ClassCountMismatchError",
    "DistillEngine",
    "NonFiniteLossError",
    "agreement",
    "as_logits",
    "build_terms",
    "calibration_error",
    "call_model",
    "ensemble_members",
    "eval_mode",
    "freeze",
    "split_targets",
    "teacher_view",
    "token_inputs",
    "unpack_batch",
]
