"""Text data for causal-LM distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`TextDataModule` turns a corpus (the built-in offline one, :func:`~lightning_kd.lm.corpus.default_corpus`,
or your text files) into batches in the Hugging Face convention, the form :func:`~lightning_kd.engine.unpack_batch`
reads::

    {"input_ids": [B, T], "attention_mask": [B, T], "labels": [B, T] (-100 = ignored),
     "prompt_lengths": [B], "index": [B]}

Each document is cut into segments of about ``segment_chars`` characters at whitespace; segments are shuffled once
(``seed``) into train/val/test splits. A segment is a *prompt* (its first ``prompt_fraction`` of characters, labels
``-100``) followed by an *answer* (labelled), tokenized separately so that the answer starts at a token boundary in
every tokenizer; ``prompt_fraction: 0`` labels every token (plain language modelling). On-policy distillation
generates new answers from the prompts (:mod:`lightning_kd.lm.generation`).

With ``teacher_tokenizer`` set (cross-tokenizer distillation, ULD) each batch also carries the teacher's own
tokenization of the same texts: ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_kd.lm.corpus import Corpus, default_corpus, files_corpus
from lightning_kd.lm.divergences import IGNORE_INDEX
from lightning_kd.lm.tokenizer import obtain_tokenizer, tokenizer_signature


def split_segments(text: str, segment_chars: int) -> list[str]:
    """``text`` cut into pieces of about ``segment_chars`` characters, at whitespace (words are never split)."""
    words = re.findall(r"\S+\s*", text)
    segments, current = [], ""
    for word in words:
        if current and len(current) + len(word) > segment_chars:
            segments.append(current.strip())
            current = ""
        current += word
    if current.strip():
        segments.append(current.strip())
    return segments


def split_prompt(segment: str, prompt_fraction: float) -> tuple[str, str]:
    """``(prompt, answer)``: the prompt ends at the last whitespace before ``prompt_fraction`` of the segment; the
    answer keeps its leading space (so it tokenizes as it would in running text)."""
    if prompt_fraction <= 0:
        return "", segment
    cut = segment.rfind(" ", 0, max(1, int(len(segment) * prompt_fraction)))
    return (segment[:cut], segment[cut:]) if cut > 0 else ("", segment)


def encode_example(tokenizer: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, prompt_length)`` of one example: ``<bos> prompt answer <eos>``, prompt tokens (and
    ``<bos>``) labelled ``-100``, truncated to ``max_length`` tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + (tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels, min(len(prompt_ids), len(ids))


class TextExamples(Dataset):
    """``(prompt, answer)`` pairs, tokenized on access by one or two tokenizers."""

    def __init__(
        self, pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int, teacher_tokenizer: Any = None
    ) -> None:
        self.pairs = list(pairs)
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = int(max_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt, answer = self.pairs[index]
        ids, labels, prompt_length = encode_example(self.tokenizer, prompt, answer, self.max_length)
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "prompt_length": prompt_length, "index": index}
        if self.teacher_tokenizer is not None:
            t_ids, t_labels, _ = encode_example(self.teacher_tokenizer, prompt, answer, self.max_length)
            item |= {"teacher_input_ids": t_ids, "teacher_labels": t_labels}
        return item


def pad_batch(items: Sequence[Mapping[str, Any]], pad_id: int, teacher_pad_id: int | None = None) -> dict[str, Any]:
    """Right-pad a list of examples into the batch dict (attention mask 0 and label -100 on padding)."""

    def pad(key: str, value: int) -> torch.Tensor:
        width = max(len(item[key]) for item in items)
        return torch.tensor([list(item[key]) + [value] * (width - len(item[key])) for item in items])

    batch: dict[str, Any] = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "prompt_lengths": torch.tensor([item["prompt_length"] for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
    }
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    if "teacher_input_ids" in items[0]:
        batch["teacher_input_ids"] = pad("teacher_input_ids", pad_id if teacher_pad_id is None else teacher_pad_id)
        batch["teacher_labels"] = pad("teacher_labels", IGNORE_INDEX)
        t_lengths = torch.tensor([len(item["teacher_input_ids"]) for item in items])
        batch["teacher_attention_mask"] = (
            torch.arange(batch["teacher_input_ids"].shape[1]) < t_lengths[:, None]
        ).long()
    return batch


class TextDataModule(L.LightningDataModule):
    """Token batches from real text, offline.

    Args:
        paths: text files or directories (``.txt``/``.md``/``.rst``); ``None`` = the built-in corpus
            (:func:`~lightning_kd.lm.corpus.default_corpus`: scikit-learn's dataset descriptions and the READMEs of
            the installed dependencies).
        tokenizer: a ``tokenizer.json`` / ``save_pretrained`` directory, or ``{vocab_size: N}`` to train a byte-level
            BPE on the training split (cached in ``cache_dir``).
        teacher_tokenizer: the teacher's own tokenizer (same forms), for cross-tokenizer distillation (ULD).
        segment_chars: characters per example (cut at whitespace).
        max_length: tokens per example at most (longer ones are truncated).
        prompt_fraction: leading fraction of each example that is a prompt (labels -100); 0 = plain LM.
        val_fraction, test_fraction: fractions of the segments held out.
        max_segments: keep at most this many segments (before splitting; ``None`` = all), for quick runs.
        batch_size, num_workers, seed: as usual (``seed`` fixes the split).
        cache_dir: where trained tokenizers are kept (``None``: not cached).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]] | None = None,
        tokenizer: Any = None,
        teacher_tokenizer: Any = None,
        segment_chars: int = 400,
        max_length: int = 128,
        prompt_fraction: float = 0.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_segments: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= prompt_fraction < 1:
            raise ValueError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must leave training data"
            )
        if segment_chars < 8 or max_length < 4:
            raise ValueError(f"segment_chars ({segment_chars}) must be >= 8 and max_length ({max_length}) >= 4")
        self.paths = list(paths) if paths else None
        self.tokenizer_spec = tokenizer
        self.teacher_tokenizer_spec = teacher_tokenizer
        self.segment_chars = int(segment_chars)
        self.max_length = int(max_length)
        self.prompt_fraction = float(prompt_fraction)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.max_segments = max_segments
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.corpus: Corpus | None = None
        self.tokenizer: Any = None
        self.teacher_tokenizer: Any = None
        self.splits: dict[str, list[tuple[str, str]]] = {}

    # -- data --------------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.corpus = files_corpus(self.paths) if self.paths else default_corpus()
        segments = [seg for doc in self.corpus.documents for seg in split_segments(doc.text, self.segment_chars)]
        random.Random(self.seed).shuffle(segments)
        if self.max_segments:
            segments = segments[: int(self.max_segments)]
        n_val = max(1, round(len(segments) * self.val_fraction))
        n_test = round(len(segments) * self.test_fraction)
        if len(segments) - n_val - n_test < 1:
            raise ValueError(
                f"the corpus gives {len(segments)} segments of {self.segment_chars} characters: too few to split; "
                "give more text or a smaller segment_chars"
            )
        parts = {"val": segments[:n_val], "test": segments[n_val : n_val + n_test], "train": segments[n_val + n_test :]}
        self.splits = {k: [split_prompt(s, self.prompt_fraction) for s in v] for k, v in parts.items()}
        train_texts = parts["train"]
        self.tokenizer = obtain_tokenizer(self.tokenizer_spec, train_texts, self.cache_dir)
        if self.teacher_tokenizer_spec is not None:
            self.teacher_tokenizer = obtain_tokenizer(self.teacher_tokenizer_spec, train_texts, self.cache_dir)

    @property
    def vocab_size(self) -> int:
        """The student tokenizer's vocabulary size (the logit width of models built for it)."""
        self._require_setup()
        return len(self.tokenizer)

    @property
    def teacher_vocab_size(self) -> int:
        """The teacher's vocabulary size: its own tokenizer's, else the student's."""
        self._require_setup()
        return len(self.teacher_tokenizer) if self.teacher_tokenizer is not None else self.vocab_size

    #: the logit width, under the name the vision datamodules use.
    num_classes = vocab_size

    def _require_setup(self) -> None:
        if not self.splits:
            raise RuntimeError("TextDataModule.setup() must run before its tokenizer and splits are used")

    def signature(self) -> dict[str, Any]:
        """What identifies this data (part of the teacher-store key)."""
        self._require_setup()
        assert self.corpus is not None
        return {
            "name": type(self).__name__,
            "corpus": self.corpus.signature,
            "tokenizer": tokenizer_signature(self.tokenizer),
            "segment_chars": self.segment_chars,
            "max_length": self.max_length,
            "prompt_fraction": self.prompt_fraction,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "max_segments": self.max_segments,
            "seed": self.seed,
        }

    def dataset(self, split: str) -> TextExamples:
        self._require_setup()
        return TextExamples(self.splits[split], self.tokenizer, self.max_length, self.teacher_tokenizer)

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        teacher_pad = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer is not None else None
        return pad_batch(items, self.tokenizer.pad_token_id, teacher_pad)

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.splits.get("test"):
            return self.val_dataloader()
        return self._loader("test", shuffle=False)


__all__ = ["TextDataModule", "TextExamples", "encode_example", "pad_batch", "split_prompt", "split_segments"]
