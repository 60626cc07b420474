"""Causal language models
^^^^^^^^^^^^^^^^^^^^^^^

Students and teachers are ``transformers`` causal LMs (``pip install "lightning-kd[llm]"``), described by the same
config node as the vision models (``model=`` / ``teacher=``)::

    name: gpt2            # a transformers model type (gpt2, llama, qwen2, ...) or a local directory / hub name
    pretrained: false     # true: AutoModelForCausalLM.from_pretrained(name) (a local directory, or the hub)
    checkpoint: null      # weights saved by this package (save_lm_file) or a state_dict / Lightning .ckpt
    kwargs: {n_layer: 2}  # config fields (AutoConfig.for_model(name, **kwargs)); vocab_size comes from the tokenizer

Randomly initialised models are built from a config, with no download; weights load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_kd.models import CheckpointError, match_state_dict, read_checkpoint, save_model_file, state_dict_of

LM_TASK = "lm"


def require_transformers() -> Any:
    """The ``transformers`` module, or an ``ImportError`` that says how to install it."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the llm extra is installed in CI
        raise ImportError('language-model distillation needs transformers: pip install "lightning-kd[llm]"') from err
    return transformers


def create_causal_lm(
    name: str,
    vocab_size: int | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    lora: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A ``transformers`` causal LM, optionally wrapped with LoRA adapters (peft).

    Args:
        name: a model type known to ``transformers.AutoConfig.for_model`` (``gpt2``, ``llama``...), or a local
            directory / hub name holding a ``config.json``.
        vocab_size: the tokenizer's vocabulary size (set on the config unless loading pretrained weights).
        pretrained: load the weights of ``name`` with ``from_pretrained`` (a local directory, or the hub where
            reachable).
        checkpoint: local weights to load afterwards (strict, ``weights_only=True``).
        lora: ``peft.LoraConfig`` fields (e.g. ``{r: 8, lora_alpha: 16, target_modules: [c_attn]}``): the model is
            wrapped by ``peft.get_peft_model`` so that only the adapters train (LLM-Neo: "Parameter Efficient
            Knowledge Distillation for Large Language Models" combines LoRA with KD). ``None``: full fine-tuning.
        kwargs: config fields (``n_layer``, ``n_embd``...).
    """
    transformers = require_transformers()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except OSError as err:
            raise CheckpointError(
                f"cannot load pretrained causal LM {name!r}: {str(err).splitlines()[0]}. Give a local directory "
                "(save_pretrained) or set pretrained=false to build it from a config"
            ) from None
    else:
        if Path(name).is_dir():
            config = transformers.AutoConfig.from_pretrained(name, **kwargs)
        else:
            try:
                config = transformers.AutoConfig.for_model(name, **kwargs)
            except ValueError:
                raise ValueError(
                    f"unknown language model {name!r}: not a transformers model type (e.g. gpt2, llama, qwen2) nor a "
                    "local directory with a config.json"
                ) from None
        if vocab_size is not None:
            config.vocab_size = int(vocab_size)
        model = transformers.AutoModelForCausalLM.from_config(config)
    if vocab_size is not None and model.get_output_embeddings().weight.shape[0] < vocab_size:
        raise ValueError(
            f"{name}: the model's vocabulary ({model.get_output_embeddings().weight.shape[0]}) is smaller than the "
            f"tokenizer's ({vocab_size}); use the tokenizer the model was trained with"
        )
    if checkpoint:
        state = state_dict_of(read_checkpoint(checkpoint))
        model.load_state_dict(match_state_dict(model, state, where=repr(str(checkpoint)), arch=name))
    return with_lora(model, lora) if lora else model


def with_lora(model: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model`` with a causal-LM ``LoraConfig(**lora)``: base weights frozen,
    adapters trainable."""
    try:
        import peft
    except ImportError as err:  # pragma: no cover - the llm extra installs peft
        raise ImportError('LoRA students need peft: pip install "lightning-kd[llm]"') from err
    fields = {"task_type": "CAUSAL_LM", **dict(lora)}
    try:
        config = peft.LoraConfig(**fields)
    except TypeError as err:
        raise ValueError(
            f"lora: {err}; the keys are peft.LoraConfig fields (r, lora_alpha, target_modules...)"
        ) from None
    return peft.get_peft_model(model, config)


def vocab_size_of(model: nn.Module) -> int:
    """The width of the model's logits (its output embedding's rows)."""
    return int(model.get_output_embeddings().weight.shape[0])


def save_lm_file(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Atomically save a causal LM: weights and its config (JSON in the metadata), loadable with
    ``weights_only=True`` by :func:`load_lm_file`."""
    meta = {"model": model.config.model_type, "task": LM_TASK, "lm_config": model.config.to_json_string()}
    return save_model_file(model, path, {**meta, **dict(metadata or {})})


def load_lm_file(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a causal LM saved by :func:`save_lm_file`."""
    transformers = require_transformers()
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get("lightning_kd")
    if not isinstance(meta, Mapping) or "lm_config" not in meta:
        raise CheckpointError(f"{str(path)!r} is not a language model saved by lightning_kd (no lm_config)")
    fields = json.loads(meta["lm_config"])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(match_state_dict(model, state_dict_of(checkpoint), where=repr(str(path)), arch=meta["model"]))
    return model, dict(meta)


__all__ = ["create_causal_lm", "load_lm_file", "require_transformers", "save_lm_file", "vocab_size_of", "with_lora"]
