"""Tiny causal LMs, tokenizers and token batches built in code (no hub), shared by the language-model tests."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader

from lightning_kd.lm.data import pad_batch
from lightning_kd.lm.models import create_causal_lm

#: a few sentences of real text to fit tiny tokenizers on (two different vocabularies give two different tokenizers).
TEXTS = [
    "Knowledge distillation trains a small student network to match the outputs of a large teacher network.",
    "The teacher's soft targets carry information about the similarity between classes.",
    "A language model predicts the next token from the tokens before it, one position at a time.",
    "On-policy distillation trains the student on sequences that the student generated itself.",
    "The reverse Kullback-Leibler divergence is mode seeking; the forward divergence covers every mode.",
    "Temperature softens a distribution; a larger temperature spreads probability over more tokens.",
] * 4


def tiny_lm(vocab_size: int, n_layer: int = 1, n_embd: int = 32, n_head: int = 2, seed: int = 0, **kw):
    """A random-init GPT-2 with ``vocab_size`` logits (a few thousand parameters), dropout off (so that a step can
    be recomputed exactly)."""
    torch.manual_seed(seed)
    dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return create_causal_lm(
        "gpt2", vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128, **{**dropout, **kw}
    )


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with ``vocab_size`` entries fitted on :data:`TEXTS` (cached per size; do not mutate)."""
    from lightning_kd.lm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TEXTS, vocab_size, min_frequency=1)


def token_batch(
    batch: int = 4, length: int = 12, vocab_size: int = 50, prompt: int = 3, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids with labels -100 on the first ``prompt`` tokens of each row and on right padding (rows get
    shorter by one token each), in the Hugging Face batch form."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(batch):
        n = max(prompt + 2, length - i)
        ids = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt, "index": i})
    return pad_batch(items, pad_id=0)


def token_loader(n_batches: int = 4, **kw) -> DataLoader:
    """A list-backed DataLoader of :func:`token_batch` batches (``batch_size=None``: already collated)."""
    return DataLoader([token_batch(seed=i, **kw) for i in range(n_batches)], batch_size=None)
