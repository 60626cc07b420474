"""The mechanism shared by the generation callbacks
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`GenerationCallback` finds the student (``pl_module.model`` of an
:class:`~lightning_kd.lm.module.LMDistillationModule`, an attribute path ``student=``, or the first submodule with a
``generate`` method) and the teacher (the :class:`~lightning_kd.engine.DistillEngine` of the module or of the
:class:`~lightning_kd.callback.DistillCallback` in ``trainer.callbacks``), resolves the end-of-sequence and padding ids,
and samples completions with Hugging Face ``generate`` (no gradient, eval mode, left-padded prompts, the global RNG
seeded from ``(seed, step, batch)`` and restored). Subclasses rewrite the training batch in ``on_train_batch_start``,
which Lightning calls with the batch already on the device and before ``training_step``, so both faces
(:class:`~lightning_kd.lm.module.LMDistillationModule` and a user's module wrapped by ``DistillCallback``) train on the
rewritten batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.engine import DistillEngine, eval_mode
from lightning_kd.lm.generation.batch import cut_at_eos, left_pad, sampling_seed, seeded_rng, uniform

TokenIds = int | Sequence[int] | None


def vocabulary_size(model: nn.Module) -> int | None:
    """The width of the model's logits, when it says (output embedding rows, else ``config.vocab_size``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size is not None else None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (``n_positions``/``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(owner: str, model: nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    """A clear error when prompt + completion would run past the model's position embeddings."""
    limit = max_positions(model)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"{owner}: prompts of up to {prompt_length} tokens + max_new_tokens={max_new_tokens} exceed the "
            f"{limit} positions of {type(model).__name__}; lower max_new_tokens or the data's max_length"
        )


def get_attribute(root: Any, path: str) -> Any:
    """``root.a.b`` for ``path="a.b"`` (``AttributeError`` naming the missing part)."""
    value = root
    for part in path.split("."):
        if not hasattr(value, part):
            raise AttributeError(f"{type(value).__name__} has no attribute {part!r} (student path {path!r})")
        value = getattr(value, part)
    return value


class GenerationCallback(Callback):
    """Base of the callbacks that replace training sequences by generated ones.

    Args:
        max_new_tokens: tokens generated per prompt at most.
        seed: the seed every random choice derives from (with the global step and batch index).
        student: attribute path of the student generator in the LightningModule (``None``: ``model`` of an
            ``LMDistillationModule``, else the first submodule that has ``generate``).
        distill_callback: ``name`` of the ``DistillCallback`` whose teacher to use when there are several.
        eos_token_id: end-of-sequence id(s) (``None``: the generating model's ``generation_config``).
        pad_token_id: padding id (``None``: ``generation_config``/``config`` pad id, else the first eos id, else 0).
    """

    #: whether this callback generates with (or consults) the teacher.
    needs_teacher: ClassVar[bool] = False

    def __init__(
        self,
        *,
        max_new_tokens: int,
        seed: int = 0,
        student: str | None = None,
        distill_callback: str | None = None,
        eos_token_id: TokenIds = None,
        pad_token_id: int | None = None,
    ) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{self._name}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)
        self.student = student
        self.distill_callback = distill_callback
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._ids: dict[int, tuple[list[int], int]] = {}

    @property
    def _name(self) -> str:
        return type(self).__name__

    # -- models ------------------------------------------------------------------------------------------------------
    def student_model(self, pl_module: L.LightningModule) -> nn.Module:
        """The model that generates as the student."""
        if self.student is not None:
            model = get_attribute(pl_module, self.student)
            if not callable(getattr(model, "generate", None)):
                raise TypeError(f"{self._name}: {self.student!r} ({type(model).__name__}) has no generate() method")
            return model
        model = getattr(pl_module, "model", None)
        if isinstance(getattr(pl_module, "engine", None), DistillEngine) and callable(getattr(model, "generate", None)):
            return model
        for _, module in pl_module.named_modules():
            if module is not pl_module and callable(getattr(module, "generate", None)):
                return module
        raise RuntimeError(
            f"{self._name}: cannot find the student in {type(pl_module).__name__}: no submodule has a generate() "
            "method (a Hugging Face causal LM). Name it with student='<attribute path>', e.g. student='net'"
        )

    def engine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DistillEngine:
        """The distillation engine: the module's (``LMDistillationModule``) or the ``DistillCallback``'s."""
        engine = getattr(pl_module, "engine", None)
        if isinstance(engine, DistillEngine):
            return engine
        from lightning_kd.callback import DistillCallback

        found = [c for c in trainer.callbacks if isinstance(c, DistillCallback)]
        if self.distill_callback is not None:
            found = [c for c in found if c.name == self.distill_callback]
        if not found:
            which = f" named {self.distill_callback!r}" if self.distill_callback is not None else ""
            raise RuntimeError(
                f"{self._name} needs the teacher, but {type(pl_module).__name__} has no distillation engine and the "
                f"trainer has no DistillCallback{which}: train an LMDistillationModule or add DistillCallback(teacher, "
                "loss=...) to the trainer's callbacks"
            )
        if len(found) > 1:
            raise RuntimeError(
                f"{self._name}: the trainer has {len(found)} DistillCallbacks ({[c.name for c in found]}); choose the "
                "teacher with distill_callback='<its name>'"
            )
        if found[0].engine is None:
            raise RuntimeError(
                f"{self._name}: the DistillCallback has not built its engine yet (its setup() runs first)"
            )
        return found[0].engine

    def teacher_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """The frozen teacher (on the student's device)."""
        teacher = self.engine(trainer, pl_module).teacher
        param = next(teacher.parameters(), None)
        if param is not None and param.device != pl_module.device:
            teacher.to(pl_module.device)
        return teacher

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the models and their token ids now, so that a misconfiguration fails before the first step."""
        student = self.student_model(pl_module)
        self.token_ids(student)
        if self.needs_teacher:
            engine = self.engine(trainer, pl_module)
            if engine.output_cache is not None:
                raise RuntimeError(
                    f"{self._name} changes the training sequences at every step, so stored teacher outputs "
                    "(TeacherOutputCache) cannot be used with it; remove the cache"
                )
            n_s, n_t = vocabulary_size(student), vocabulary_size(engine.teacher)
            if n_s is not None and n_t is not None and n_s != n_t:
                raise ValueError(
                    f"{self._name}: the student's vocabulary ({n_s}) differs from the teacher's ({n_t}); generation "
                    "with both models needs one shared tokenizer"
                )
            self.token_ids(engine.teacher)

    # -- token ids ---------------------------------------------------------------------------------------------------
    def token_ids(self, model: nn.Module) -> tuple[list[int], int]:
        """``(eos ids, pad id)`` for generating with ``model``: the ones given to the callback, else the model's
        ``generation_config``/``config``; ids outside the vocabulary (a config made for another tokenizer) raise."""
        key = id(model)
        if key in self._ids:
            return self._ids[key]
        gen = getattr(model, "generation_config", None)
        config = getattr(model, "config", None)
        eos: Any = self.eos_token_id
        if eos is None:
            eos = getattr(gen, "eos_token_id", None)
            if eos is None:
                eos = getattr(config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        vocab = vocabulary_size(model)
        bad = [i for i in [*eos_ids, int(pad)] if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise ValueError(
                f"{self._name}: token id(s) {bad} (eos {eos_ids}, pad {pad}) are outside the vocabulary of "
                f"{type(model).__name__} ({vocab} tokens): its config was made for another tokenizer. Pass "
                f"{self._name}(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id), or set "
                "model.generation_config.eos_token_id / pad_token_id"
            )
        self._ids[key] = (eos_ids, int(pad))
        return self._ids[key]

    # -- randomness --------------------------------------------------------------------------------------------------
    def coin(self, tag: str, step: int, batch_idx: int) -> float:
        """A uniform number in ``[0, 1)`` for a decision at ``(step, batch_idx)``: identical on every rank and run."""
        return uniform(self.seed, tag, step, batch_idx)

    def batch_seed(self, trainer: L.Trainer, batch_idx: int) -> int:
        """The sampling seed of this batch (:func:`~lightning_kd.lm.generation.batch.sampling_seed`)."""
        return sampling_seed(self.seed, trainer.global_step, batch_idx, trainer.global_rank)

    # -- sampling ----------------------------------------------------------------------------------------------------
    def sample(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        *,
        seed: int,
        temperature: float,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> list[torch.Tensor]:
        """Completions of ``prompts`` sampled by ``model.generate`` (each cut after its first eos)."""
        from transformers import GenerationConfig

        eos_ids, pad = self.token_ids(model)
        ids, mask = left_pad(prompts, pad)
        check_length(self._name, model, ids.shape[1], self.max_new_tokens)
        config = GenerationConfig(
            do_sample=True,
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_ids or None,
            pad_token_id=pad,
            use_cache=True,
        )
        with seeded_rng(seed, ids.device), torch.no_grad(), eval_mode(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return cut_at_eos(sequences[:, ids.shape[1] :], eos_ids)

    @staticmethod
    def precision_context(trainer: L.Trainer) -> Any:
        """The student's forward precision (autocast under mixed precision) for generation outside training_step."""
        return trainer.precision_plugin.forward_context()


def check_sampling(owner: str, temperature: float, top_k: int, top_p: float) -> None:
    """Validate sampling settings (temperature > 0, top_k >= 0, 0 < top_p <= 1)."""
    if not temperature > 0:
        raise ValueError(f"{owner}: temperature must be > 0 (sampling), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{owner}: top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{owner}: top_p must be in (0, 1], got {top_p}")


__all__ = ["GenerationCallback", "check_length", "check_sampling", "get_attribute", "max_positions", "vocabulary_size"]
