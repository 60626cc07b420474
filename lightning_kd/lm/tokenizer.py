"""Tokenizers
^^^^^^^^^^^

A tokenizer is either loaded (a ``tokenizer.json`` file or a ``save_pretrained`` directory, offline) or trained here:
a byte-level BPE (the GPT-2 scheme: any text is encodable, no unknown token) fitted with the ``tokenizers`` library
on the training texts in a few seconds, and kept in ``<cache_dir>/tokenizers/`` keyed by its texts and vocabulary
size, so the teacher, the student and later runs share it. Special tokens: ``<|endoftext|>`` (beginning and end of a
text) and ``<pad>``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_kd.lm.models import require_transformers

EOS = "<|endoftext|>"
PAD = "<pad>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``vocab_size`` entries (special tokens included) fitted on
    ``texts``."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258 + 2:
        raise ValueError(f"vocab_size must be at least 260 (256 bytes + specials), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A tokenizer from a ``tokenizer.json`` file or a ``save_pretrained`` directory (no download)."""
    transformers = require_transformers()
    path = Path(path).expanduser()
    if path.is_file():
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.is_dir():
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} does not exist; give a tokenizer.json, a save_pretrained directory, or "
            "{vocab_size: N} to train one on the corpus"
        )
    vocab = tok.get_vocab()
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.bos_token is None and EOS in vocab:
        tok.bos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = PAD if PAD in vocab else tok.eos_token
    return tok


def tokenizer_signature(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and merges (part of teacher-store keys)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def obtain_tokenizer(spec: Any, texts: Sequence[str], cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer described by ``spec``: a path (:func:`load_tokenizer`), or ``{vocab_size: N[, min_frequency]}``
    trained on ``texts`` with :func:`train_bpe_tokenizer` and cached under ``cache_dir/tokenizers``."""
    if spec is None or isinstance(spec, (str, os.PathLike)):
        if spec is None:
            spec = {}
        else:
            return load_tokenizer(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"tokenizer must be a path or {{vocab_size: N}}, got {spec!r}")
    unknown = set(spec) - {"vocab_size", "min_frequency"}
    if unknown:
        raise ValueError(f"tokenizer: unknown keys {sorted(unknown)}; accepted: vocab_size, min_frequency")
    vocab_size, min_frequency = int(spec.get("vocab_size", 1024)), int(spec.get("min_frequency", 2))
    if cache_dir is None:
        return train_bpe_tokenizer(texts, vocab_size, min_frequency)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    key = f"bpe-{vocab_size}-{min_frequency}-{digest.hexdigest()[:16]}.json"
    path = Path(cache_dir).expanduser() / "tokenizers" / key
    if path.is_file():
        return load_tokenizer(path)
    tokenizer = train_bpe_tokenizer(texts, vocab_size, min_frequency)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.backend_tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return load_tokenizer(path)


__all__ = ["EOS", "PAD", "load_tokenizer", "obtain_tokenizer", "tokenizer_signature", "train_bpe_tokenizer"]
