"""Token batches in and out of generation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

The generation callbacks read the prompts of a right-padded token batch (the form of
:class:`~lightning_kd.lm.data.TextDataModule`: ``input_ids``, ``attention_mask``, ``labels`` with ``-100`` on the prompt
and on padding, ``prompt_lengths`` counting the prompt tokens including ``<bos>``, ``index``), left-pad them for
``generate`` and pack prompt + completion back into the same right-padded form, in place. Reproducible randomness comes
from :func:`derive_seed`: a hash of ``(seed, keys...)``, identical in every process, never the process's RNG state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lightning_kd.engine import TEACHER_KEY_PREFIX
from lightning_kd.lm.divergences import IGNORE_INDEX

#: the keys a generation callback rewrites; every other key is kept as is.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


# --------------------------------------------------------------------------------------------------------------------
# Reproducible randomness
# --------------------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed determined by ``(seed, *keys)`` alone (BLAKE2b of their repr): the same in every process and
    every run, so decisions derived from ``(seed, step)`` agree across DDP ranks and after a resume."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniform(seed: int, *keys: int | str) -> float:
    """A number in ``[0, 1)`` determined by ``(seed, *keys)`` (53 bits of :func:`derive_seed`)."""
    return (derive_seed(seed, *keys) >> 10) / float(1 << 53)


def sampling_seed(seed: int, step: int, batch_idx: int, rank: int = 0) -> int:
    """The seed of the sampling RNG for one training batch: the global RNG is seeded with it (inside
    :func:`seeded_rng`) around Hugging Face ``generate``. Ranks draw different samples (their prompts differ anyway),
    every run draws the same ones."""
    return derive_seed(seed, "sample", rank, step, batch_idx)


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global CPU RNG (and ``device``'s CUDA RNG) with ``seed`` inside the block; restore both afterwards,
    so that generation neither depends on nor disturbs the training RNG (dropout, shuffling)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------------
# Reading prompts
# --------------------------------------------------------------------------------------------------------------------
def check_token_batch(batch: Any, owner: str) -> MutableMapping[str, Any]:
    """``batch`` if a generation callback can rewrite it in place, else an error naming the problem: it must be a
    dict with ``input_ids`` (the Hugging Face form), without the teacher's own tokenization (``teacher_input_ids``:
    it could not follow the new sequences) and without other per-token tensors that would go stale."""
    if not isinstance(batch, MutableMapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise TypeError(
            f"{owner} rewrites token batches: dicts with input_ids, attention_mask and labels (-100 = ignored), as "
            f"lightning_kd.lm.data.TextDataModule makes them; got {type(batch).__name__}"
        )
    if any(str(key).startswith(TEACHER_KEY_PREFIX) for key in batch):
        raise ValueError(
            f"{owner}: the batch carries the teacher's own tokenization (teacher_input_ids), which generated "
            "sequences cannot update. On-policy generation needs teacher and student to share a tokenizer."
        )
    shape = batch["input_ids"].shape
    stale = [
        key
        for key, value in batch.items()
        if key not in SEQUENCE_KEYS
        and isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and value.shape[:2] == shape
    ]
    if stale:
        raise ValueError(
            f"{owner}: the batch has per-token tensors {stale} that cannot follow the generated sequences; drop them "
            f"from the batch (only {list(SEQUENCE_KEYS)} are rewritten)"
        )
    return batch


def prompt_lengths_of(batch: Mapping[str, Any]) -> torch.Tensor:
    """The prompt length of each row: ``prompt_lengths`` if present, else the position of the first label that is
    not ``-100``. Every prompt needs at least one token (the ``<bos>``) to generate from."""
    ids = batch["input_ids"]
    lengths = batch.get("prompt_lengths")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.to(ids.device, torch.long).reshape(-1)
    elif isinstance(batch.get("labels"), torch.Tensor):
        labelled = batch["labels"] != IGNORE_INDEX
        lengths = torch.where(labelled.any(-1), labelled.long().argmax(-1), ids.shape[1])
    else:
        raise KeyError("generation needs the prompt of each row: a 'prompt_lengths' key, or 'labels' with -100 on it")
    if lengths.shape[0] != ids.shape[0]:
        raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for a batch of {ids.shape[0]} rows")
    if bool((lengths < 1).any()):
        raise ValueError(
            "a row has an empty prompt: generation needs at least one prompt token. Start every example with <bos> "
            "(TextDataModule does when the tokenizer has a bos_token)"
        )
    return lengths


def prompts_of(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """The prompt tokens of each row (``input_ids[i, :prompt_length_i]``)."""
    ids = batch["input_ids"]
    return [ids[i, :n] for i, n in enumerate(prompt_lengths_of(batch).tolist())]


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` left-padded to the longest (what decoder-only ``generate`` needs)."""
    width = max(len(row) for row in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------------------------
# Writing sequences
# --------------------------------------------------------------------------------------------------------------------
def cut_at_eos(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> list[torch.Tensor]:
    """Each row of ``generated`` (``[B, N]`` new tokens) up to and including its first end-of-sequence token (the
    whole row when it has none); what follows is the padding ``generate`` adds to finished rows."""
    if not eos_token_ids or generated.shape[1] == 0:
        return list(generated)
    is_eos = torch.isin(generated, torch.tensor(list(eos_token_ids), device=generated.device))
    ends = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, generated.shape[1])
    return [row[:n] for row, n in zip(generated, ends.tolist())]


def pack_sequences(
    prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids = prompt + completion``, ``attention_mask`` (1 on both), ``labels`` (the completion;
    ``-100`` on the prompt and on padding) and ``prompt_lengths``: the form of
    :func:`lightning_kd.lm.data.pad_batch`."""
    rows = [torch.cat([p, c.to(p.dtype)]) for p, c in zip(prompts, completions)]
    width = max(len(row) for row in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = row[len(prompt) :]
    lengths = torch.tensor([len(p) for p in prompts], device=ids.device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_lengths": lengths}


def completion_positions(packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` mask of the completion tokens of a packed batch (labelled positions)."""
    return packed["labels"] != IGNORE_INDEX


def rewrite_batch(batch: MutableMapping[str, Any], packed: Mapping[str, torch.Tensor]) -> None:
    """Replace the sequences of ``batch`` by ``packed`` (from :func:`pack_sequences`), in place; ``prompt_lengths``
    is written back only when the batch had it, every other key (``index``...) is kept."""
    for key in SEQUENCE_KEYS:
        batch[key] = packed[key]
    if "prompt_lengths" in batch:
        batch["prompt_lengths"] = packed["prompt_lengths"].to(batch["prompt_lengths"].device)


__all__ = [
    "check_token_batch",
    "completion_positions",
    "cut_at_eos",
    "derive_seed",
    "left_pad",
    "pack_sequences",
    "prompt_lengths_of",
    "prompts_of",
    "rewrite_batch",
    "sampling_seed",
    "seeded_rng",
    "uniform",
]
