"""Teacher token logits computed once: top-k / top-p truncated, stored per sample, replayed
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

A language-model teacher produces ``[T, V]`` logits per sample, tens of thousands of values per token: stored whole,
one epoch of a small corpus outweighs the corpus by four orders of magnitude. Pre-training distillation stores them
truncated and replays them offline (Peng, Lv, Bai, Yao, Zhang, Hou, Li, "Pre-training Distillation for Large Language
Models: A Design Space Exploration", 2024, arXiv:2410.16215, ACL 2025: "top-p-k" truncation, first the smallest set of
tokens whose probability reaches ``p``, then at most ``k`` of them; the paper's default is p = 0.95, k = 100 —
[recalled, uncertain]: the abstract and summaries were checked, not the paper's equations). The same top-k storage is
what Megatron-LM's offline-logits distillation caches (top-K log-probabilities per token).

:class:`LMTeacherOutputCache` is :class:`~lightning_kd.strategies.teacher_cache.TeacherOutputCache` for token logits:
the same manifest and refusal of stale caches (the teacher's weights, the data's signature — for
:class:`~lightning_kd.lm.data.TextDataModule` its corpus and **tokenizer** hashes —, the settings), the same atomic
per-rank shards, prefill or online filling, verification against the live teacher and DDP behaviour; only what is
stored per sample and how it is replayed differ.

**What is stored**, per sample and per *real* position ``t < L`` (``L`` = the sample's number of attention-mask ones;
batches must be right-padded, the padding is never stored), with ``log p = log_softmax(z)`` the teacher's
log-probabilities and entries sorted by probability:

- ``n_t = min(k, n_p)`` kept entries, where ``n_p`` is the smallest prefix whose mass reaches ``p``
  (``Σ_{i ≤ n_p} p_(i) ≥ p − 10⁻⁶``, the tolerance absorbing float rounding; at least one entry); without ``top_p``,
  ``n_t = k``;
- their log-probabilities (float16; log-probabilities rather than raw logits because the softmax ignores a shift and
  the likely tokens' log-probabilities are small numbers, which float16 keeps to ±0.05 % relative: a raw logit of 100
  would be off by up to 0.03, i.e. its probability by 3 %) and token ids (int16 when the vocabulary fits, else int32);
- ``tail_lse_t = log Σ_{j ∉ K_t} p_j``, the log of the mass of the tokens not kept (float32; ``-inf`` when none);
- ``n_t`` (int16, or int32 when ``k > 32767``), the sample's length and a checksum of its token ids (int64), and the
  per-sample sums of the truncation report below (float64).

A shard is ragged: ``samples [n]``, ``lengths [n]``, ``checksums [n]``, ``truncation [n, 3]``, ``counts [ΣL]``,
``tail_lse [ΣL]``, ``values [Σn_t]``, ``indices [Σn_t]`` (samples in order, positions in order, entries in order).
Disk per token: ``4·n_t + 6`` bytes with int16 ids, ``6·n_t + 6`` with int32 ones, against ``4·V`` for float32
logits: with GPT-2's vocabulary (50257, int32 ids) and k = 100, 606 bytes against 201 kB, about 1/330 (top-p shrinks
``n_t`` further where the teacher is sure).

**Replay** (:func:`reconstruct_token_logits`) fills the batch's ``[B, T, V]`` (float32, on the training device) with,
at each stored position, the kept log-probabilities at their token ids and, at every other token,

.. math::

    \\tilde z_j = \\mathrm{tail\\_lse}_t - \\log(V - n_t) \\qquad (j \\notin K_t),

the truncated mass shared uniformly — the reconstruction of the classifier cache. At τ = 1 the kept probabilities
and the total truncated mass are exact (up to float16), so ``softmax(z̃)`` is a proper distribution that puts the
truncated mass where it was, only flattened over the tail. Padding positions (``t ≥ L``) get zeros (a uniform
distribution; token losses never score them). All logits stay finite, so every token divergence
(:mod:`lightning_kd.lm.divergences`) and every term that reads teacher logit statistics works unchanged.

*Why not PD's renormalisation over the kept entries (fill ``-inf``).* The token divergences treat an infinite logit
as "this vocabulary entry does not exist" *in both models* (padded vocabulary rows): with a ``-inf`` fill the
student's distribution would be renormalised over the kept tokens too, so the mass it puts on the other tokens
would never be penalised (``KL(p̃ ‖ q) = KL(p̃ ‖ q̃) − log q(K)``: the ``− log q(K)`` term is lost), and terms that
read logit means or standard deviations would see infinities. The uniform tail keeps the truncated mass where it
belongs and costs one float per position.

**The approximation's effect, reported.** When a sample is stored the full logits are in hand, so for every stored
position the cache computes, at τ = 1, with ``p`` the teacher's distribution and ``p̃ = softmax(z̃)`` the replayed
one (float16 rounding included):

- ``truncation_kl`` = ``KL(p ‖ p̃)``. For the forward-KL loss ``fkl`` the replayed loss differs from the live one by
  exactly ``KL(p ‖ q) − KL(p̃ ‖ q) = KL(p ‖ p̃) + Σ_j (p̃_j − p_j) log q_j`` (because ``log p̃`` is constant on the
  tail and ``p̃ = p`` on the kept entries, up to rounding); the second sum vanishes when the student is flat on the
  tail and is at most ``TV(p, p̃) · (max − min)`` of the student's tail log-probabilities. So ``KL(p ‖ p̃)`` is the
  loss gap at a student that is flat on the tail — in particular the loss the real teacher still charges a student
  that learned the replayed teacher exactly.
- ``truncation_tv`` = ``TV(p, p̃) = ½ Σ_j |p_j − p̃_j|``: the forward-KL gradient with respect to the student's
  logits moves by exactly ``p̃ − p`` per position (L1 norm ``2·TV``), whatever the student.
- ``tail_mass`` = ``Σ_{j ∉ K} p_j``, the probability the stored entries do not carry.

The stored per-sample sums let every epoch log the means over the positions it actually *served* from the cache
(``train/teacher_cache/truncation_kl``, ``…/truncation_tv``, ``…/tail_mass``, per rank, with ``read`` and
``computed``); rank 0 keeps the mean over every stored sample of a slot in the manifest's ``info.truncation`` (not
compared, so it never makes a cache stale). At τ ≠ 1 the uniform tail is flatter than the truth and the losses
change more than these τ = 1 numbers say (see the classifier cache's report on KD at τ = 4).

**Checks at replay.** Each served sample's stored length and token checksum are compared with the training batch's
(:class:`~lightning_kd.strategies.teacher_cache.CacheMismatchError` if they differ: other tokens under the same
signature, e.g. a ``data_id`` that did not change with the tokenizer); the first ``verify_batches`` batches are also
compared with the live teacher (stored log-probabilities and tail mass, ``verify_rtol``/``verify_atol``).

The cache reads each training batch's teacher inputs in ``on_train_batch_start`` (its own tokenization when the
batch carries ``teacher_input_ids``): :meth:`~lightning_kd.engine.DistillEngine.teacher_outputs` passes only the
sample indices, and the replayed logits need the batch's width and each sample's length. Teacher taps (hidden
states) are not stored: terms that read them need the live teacher. Memory: one slot's stored entries are held in CPU
memory (the disk size above, plus about 1 KB of bookkeeping per sample).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from lightning_kd.engine import Inputs, teacher_view, unpack_batch
from lightning_kd.losses.base import ModelOutputs
from lightning_kd.strategies.teacher_cache import (
    MANIFEST,
    CacheMismatchError,
    TeacherOutputCache,
    index_dtype,
    rows_in_range,
    write_atomic,
)

LM_FORMAT = "lightning_kd.teacher_cache.tokens"
LM_VERSION = 1
#: a prefix whose probability is within this of ``top_p`` counts as reaching it (float rounding of the softmax)
TOP_P_TOLERANCE = 1e-6
#: float32 values per chunk of positions when packing or checking ``[positions, V]`` logits (8 MiB per array)
CHUNK_ELEMENTS = 1 << 21
#: the per-sample sums kept for the truncation report, in this order
REPORT = ("truncation_kl", "truncation_tv", "tail_mass")


# --------------------------------------------------------------------------------------------------------------------
# Truncation, packing and reconstruction (pure functions on [positions, V])
# --------------------------------------------------------------------------------------------------------------------
def kept_counts(sorted_log_probs: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Entries kept per position (int64 ``[n]``) from the ``k`` largest log-probabilities ``[n, k]`` (descending):
    all ``k`` without ``top_p``, else the smallest prefix whose probability reaches ``top_p`` (within
    :data:`TOP_P_TOLERANCE`), at least one and at most ``k``."""
    n, k = sorted_log_probs.shape
    if top_p is None or top_p >= 1:
        return torch.full((n,), k, dtype=torch.long, device=sorted_log_probs.device)
    mass = sorted_log_probs.detach().cpu().double().exp().cumsum(-1)  # float64 (on the CPU: not every device has it)
    return ((mass < top_p - TOP_P_TOLERANCE).sum(-1) + 1).clamp(max=k).to(sorted_log_probs.device)


def reconstruct_token_logits(
    counts: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    tail_lse: torch.Tensor,
    vocab_size: int,
    rows: torch.Tensor | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """Dense float32 logits ``[num_rows, V]`` from packed positions (on the device of ``counts``).

    Stored position ``i`` (``counts[i]`` entries, taken in order from the flat ``values``/``indices``) becomes row
    ``rows[i]`` (default ``i``): its kept entries at their stored values, each of its ``V − n_i`` other entries
    ``tail_lse[i] − log(V − n_i)`` (the truncated mass shared uniformly). Rows no stored position maps to are zeros.
    """
    device = counts.device
    n = counts.long()
    positions = n.numel()
    rows = torch.arange(positions, device=device) if rows is None else rows.to(device)
    num_rows = positions if num_rows is None else int(num_rows)
    if int(n.sum()) != values.numel() or values.numel() != indices.numel() or tail_lse.numel() != positions:
        raise ValueError(
            f"packed token logits are inconsistent: {positions} positions keeping {int(n.sum())} entries, but "
            f"{values.numel()} values, {indices.numel()} indices and {tail_lse.numel()} tail masses"
        )
    if positions and int(n.max()) > vocab_size:
        raise ValueError(f"{int(n.max())} kept entries at one position for a vocabulary of {vocab_size}")
    rest = (vocab_size - n).clamp_min(1).to(torch.float32)
    fill = torch.where(n < vocab_size, tail_lse.to(device, torch.float32) - rest.log(), torch.zeros((), device=device))
    dense = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
    dense[rows] = fill.unsqueeze(-1)
    dense[rows.repeat_interleave(n), indices.to(device).long()] = values.to(device, torch.float32)
    return dense


def pack_token_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> dict[str, torch.Tensor]:
    """Truncate the teacher's logits at ``P`` positions (``[P, V]``, any float dtype) for storage, and measure what
    the truncation changes.

    Returns CPU tensors: ``counts [P]`` (int64), ``values`` float16 and ``indices`` int64 ``[Σ counts]`` (the kept
    log-probabilities, largest first), ``tail_lse`` float32 ``[P]`` and the per-position report (float64 ``[P]``
    each): ``truncation_kl`` = KL(p ‖ p̃), ``truncation_tv`` = TV(p, p̃), ``tail_mass`` (see the module docs).
    Works on chunks of positions (:data:`CHUNK_ELEMENTS` values), on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"pack_token_logits takes [positions, vocabulary] logits, got shape {tuple(logits.shape)}")
    positions, vocab = logits.shape
    k = vocab if top_k is None else min(int(top_k), vocab)
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("counts", "values", "indices", "tail_lse", *REPORT)}
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, positions, chunk):
        z = logits[start : start + chunk].detach().float()
        if bool(torch.isnan(z).any() | (z == float("inf")).any()):
            raise ValueError("the teacher's logits hold NaN or +inf; they cannot be cached (check the teacher)")
        log_p = torch.log_softmax(z, dim=-1)
        top, idx = log_p.topk(k, dim=-1)
        n = kept_counts(top, top_p)
        valid = torch.arange(k, device=z.device) < n.unsqueeze(-1)
        # -inf at the kept entries (invalid slots repeat the first, kept, entry) leaves the tail
        tail_lse = torch.logsumexp(log_p.scatter(-1, torch.where(valid, idx, idx[:, :1]), float("-inf")), dim=-1)
        values = top[valid].half()
        indices = idx[valid]
        rebuilt = torch.log_softmax(reconstruct_token_logits(n, values, indices, tail_lse, vocab), dim=-1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - rebuilt), torch.zeros((), device=z.device)).sum(-1)
        tv = 0.5 * (p - rebuilt.exp()).abs().sum(-1)
        for key, value in (("counts", n), ("values", values), ("indices", indices), ("tail_lse", tail_lse)):
            parts[key].append(value.cpu())
        for key, value in zip(REPORT, (kl.clamp_min(0), tv, tail_lse.exp())):
            parts[key].append(value.double().cpu())
        del z, log_p, rebuilt, p
    empty = {"counts": torch.long, "values": torch.float16, "indices": torch.long, "tail_lse": torch.float32}
    return {
        key: torch.cat(chunks) if chunks else torch.zeros(0, dtype=empty.get(key, torch.float64))
        for key, chunks in parts.items()
    }


@functools.lru_cache(maxsize=8)
def _checksum_weights(length: int) -> torch.Tensor:
    return torch.randint(1, 1 << 20, (length,), generator=torch.Generator().manual_seed(20241021), dtype=torch.long)


def token_layout(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(lengths [B], checksums [B], width T)`` of a right-padded token batch's inputs (CPU int64): each sample's
    number of real tokens (attention-mask ones; all ``T`` without a mask) and a checksum of its real token ids."""
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise TypeError(
            "LMTeacherOutputCache stores token logits: the teacher must read token batches (a dict with input_ids "
            "[batch, sequence] and attention_mask); for classifiers use TeacherOutputCache (teacher_cache=disk)"
        )
    ids = inputs["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(ids.shape)}")
    width = int(ids.shape[1])
    mask = inputs.get("attention_mask")
    positions = torch.arange(width, device=ids.device)
    if mask is None:
        lengths = torch.full((ids.shape[0],), width, dtype=torch.long, device=ids.device)
    else:
        real = mask.bool()
        lengths = real.sum(-1)
        if not torch.equal(real, positions < lengths.unsqueeze(-1)):
            raise ValueError(
                "LMTeacherOutputCache stores the first attention_mask.sum() positions of each sample, so batches must "
                "be right-padded (attention mask 1…1 0…0); got a left-padded or holed mask. Pad on the right "
                "(tokenizer.padding_side = 'right'; TextDataModule does)"
            )
    weights = _checksum_weights(max(width, 1))[:width].to(ids.device)
    checksums = torch.where(positions < lengths.unsqueeze(-1), (ids.long() + 1) * weights, 0).sum(-1)
    return lengths.long().cpu(), checksums.cpu(), width


# --------------------------------------------------------------------------------------------------------------------
# One slot's token logits, ragged per sample
# --------------------------------------------------------------------------------------------------------------------
class TokenSlotTable:
    """The stored token logits of every sample of one slot (CPU, a record per dataset index), which samples are
    stored (``filled``) and which are not written to disk yet (``dirty``). Parts and shards are the ragged layout of
    the module docs."""

    FIELDS = ("lengths", "checksums", "truncation", "counts", "tail_lse", "values", "indices")

    def __init__(self, slot: int, num_samples: int, count_dtype: torch.dtype, idx_dtype: torch.dtype) -> None:
        self.slot = slot
        self.count_dtype = count_dtype
        self.idx_dtype = idx_dtype
        self.records: list[dict[str, torch.Tensor] | None] = [None] * num_samples
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.dirty = torch.zeros(num_samples, dtype=torch.bool)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def put(self, rows: torch.Tensor, part: Mapping[str, torch.Tensor], *, dirty: bool) -> None:
        lengths = part["lengths"].long()
        counts = torch.split(part["counts"], lengths.tolist())
        tails = torch.split(part["tail_lse"], lengths.tolist())
        entries = [int(c.long().sum()) for c in counts]
        values = torch.split(part["values"], entries)
        indices = torch.split(part["indices"], entries)
        for i, row in enumerate(rows.tolist()):
            self.records[row] = {
                "lengths": part["lengths"][i : i + 1].to(torch.int32),
                "checksums": part["checksums"][i : i + 1].long(),
                "truncation": part["truncation"][i : i + 1].double(),
                "counts": counts[i].to(self.count_dtype),
                "tail_lse": tails[i].float(),
                "values": values[i].half(),
                "indices": indices[i].to(self.idx_dtype),
            }
        self.filled[rows] = True
        if dirty:
            self.dirty[rows] = True

    def take(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        records = [self.records[row] for row in rows.tolist()]
        if any(r is None for r in records):
            raise KeyError("TokenSlotTable.take: some of these samples are not stored")
        if not records:
            return self._empty()
        return {key: torch.cat([r[key] for r in records]) for key in self.FIELDS}  # type: ignore[index]

    def _empty(self) -> dict[str, torch.Tensor]:
        dtypes = {"lengths": torch.int32, "checksums": torch.long, "counts": self.count_dtype,
                  "tail_lse": torch.float32, "values": torch.float16, "indices": self.idx_dtype}  # fmt: skip
        empty = {key: torch.zeros(0, dtype=dtype) for key, dtype in dtypes.items()}
        return {**empty, "truncation": torch.zeros(0, len(REPORT), dtype=torch.float64)}

    def pop_dirty(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        rows = self.dirty.nonzero().flatten()
        if not len(rows):
            return None
        self.dirty[rows] = False
        return rows, self.take(rows)

    def report_sums(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[positions, Σ truncation_kl, Σ truncation_tv, Σ tail_mass]`` (float64) over ``rows`` (default: every
        stored sample)."""
        picked = self.filled.nonzero().flatten().tolist() if rows is None else rows.tolist()
        sums = torch.zeros(1 + len(REPORT), dtype=torch.float64)
        for row in picked:
            record = self.records[row]
            if record is not None:
                sums[0] += float(record["lengths"])
                sums[1:] += record["truncation"][0]
        return sums

    def check_shard(self, shard: Any) -> bool:
        """Whether ``shard`` has the ragged layout, dtypes and consistent sizes of this table."""
        if not (isinstance(shard, Mapping) and {"samples", *self.FIELDS} <= set(shard)):
            return False
        n = len(shard["samples"])
        lengths = shard["lengths"].long()
        return bool(
            shard["lengths"].shape == (n,)
            and shard["checksums"].shape == (n,)
            and shard["truncation"].shape == (n, len(REPORT))
            and shard["counts"].dtype == self.count_dtype
            and shard["indices"].dtype == self.idx_dtype
            and shard["values"].dtype == torch.float16
            and shard["counts"].numel() == int(lengths.sum())
            and shard["tail_lse"].numel() == int(lengths.sum())
            and shard["values"].numel() == int(shard["counts"].long().sum()) == shard["indices"].numel()
            and rows_in_range(shard["samples"], len(self.filled))
        )

    def merge_shard(self, shard: Mapping[str, torch.Tensor]) -> None:
        """Put the samples of a (checked) shard that are not stored yet (as written: not dirty)."""
        rows = shard["samples"].long()
        new = ~self.filled[rows]
        if bool(new.all()):
            self.put(rows, shard, dirty=False)
        elif bool(new.any()):
            self.put(rows[new], _select_samples(shard, new), dirty=False)


def _select_samples(part: Mapping[str, torch.Tensor], picked: torch.Tensor) -> dict[str, torch.Tensor]:
    """The samples ``picked`` (boolean ``[n]``) of a ragged part."""
    lengths = part["lengths"].long()
    sample_of_position = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    keep_position = picked[sample_of_position]
    keep_entry = torch.repeat_interleave(keep_position, part["counts"].long())
    return {
        "lengths": part["lengths"][picked],
        "checksums": part["checksums"][picked],
        "truncation": part["truncation"][picked],
        "counts": part["counts"][keep_position],
        "tail_lse": part["tail_lse"][keep_position],
        "values": part["values"][keep_entry],
        "indices": part["indices"][keep_entry],
    }


# --------------------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------------------
class LMTeacherOutputCache(TeacherOutputCache):
    """Store a causal-LM teacher's token logits once, top-k / top-p truncated, and replay them to the distillation
    engine (pre-training distillation's offline logits, Peng et al. 2024). See the module documentation for the
    format, the uniform-tail reconstruction and the reported truncation effect.

    Works with :class:`~lightning_kd.lm.module.LMDistillationModule` or a
    :class:`~lightning_kd.callback.DistillCallback` on token batches (``input_ids``, right-padded ``attention_mask``,
    ``labels``, and ``index`` = the sample's position in the training dataset; :class:`~lightning_kd.lm.data.
    TextDataModule` makes them).

    Args:
        dir: the cache directory; a ``{key}`` in it becomes a hash of the manifest (teacher weights, data signature
            with the tokenizer, settings), so each setting gets its own directory.
        top_k: at most this many vocabulary entries kept per position (``None``: all, exact up to float16). The
            default, 100, and ``top_p=0.95`` are PD's recipe.
        top_p: keep only the smallest prefix of the sorted distribution whose probability reaches ``top_p``
            (0 < top_p ≤ 1; ``None`` or 1: no top-p, always ``top_k``), capped at ``top_k``.
        prefill: run the teacher over the slot's missing samples at the start of the epoch; else the training steps
            fill the cache (those batches train on the live, untruncated teacher).
        verify_batches: batches read from the cache that are compared with the live teacher in each fit (0: none).
        verify_rtol, verify_atol: tolerance of that comparison on log-probabilities and the tail's log-mass.
        rebuild: delete this cache's files in ``dir`` at fit start and fill it anew.
        data_id: a name for the training data instead of the datamodule's signature or the dataset's fingerprint.

    Example::

        trainer = L.Trainer(callbacks=[LMTeacherOutputCache("cache/gpt2-teacher/{key}", top_k=100, top_p=0.95)])
        trainer.fit(LMDistillationModule(student, teacher, loss="fkl"), datamodule=TextDataModule(...))
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        top_k: int | None = 100,
        top_p: float | None = 0.95,
        prefill: bool = True,
        verify_batches: int = 1,
        verify_rtol: float = 1e-3,
        verify_atol: float = 1e-3,
        rebuild: bool = False,
        data_id: str | None = None,
    ) -> None:
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for the whole vocabulary), got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] (or None for no top-p truncation), got {top_p!r}")
        super().__init__(
            dir,
            k=top_k,
            features=False,
            prefill=prefill,
            verify_batches=verify_batches,
            verify_rtol=verify_rtol,
            verify_atol=verify_atol,
            rebuild=rebuild,
            data_id=data_id,
        )
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None or top_p >= 1 else float(top_p)
        #: the current training batch: (indices, teacher inputs, (lengths, checksums, width)), from on_train_batch_start
        self._step: tuple[torch.Tensor, Inputs, tuple[torch.Tensor, torch.Tensor, int]] | None = None
        #: [positions, Σ kl, Σ tv, Σ tail mass] of the positions served from the cache in this epoch
        self._served = torch.zeros(1 + len(REPORT), dtype=torch.float64)

    @property
    def stored_k(self) -> int:
        assert self.manifest is not None
        return int(self.manifest["top_k"])

    # -- what is stored ----------------------------------------------------------------------------------------------
    def _describe_outputs(self, probe: ModelOutputs) -> dict[str, Any]:
        if probe.logits.dim() != 3:
            raise ValueError(
                f"LMTeacherOutputCache stores token logits [batch, sequence, vocabulary]; the teacher gives shape "
                f"{tuple(probe.logits.shape)}. For classifiers use TeacherOutputCache (teacher_cache=disk)"
            )
        taps = self._teacher_taps()
        if taps:
            raise ValueError(
                f"the loss terms read the teacher taps {[str(t) for t in taps]}; LMTeacherOutputCache stores the "
                "teacher's token logits only. Use the live teacher (no teacher_cache) with terms that read hidden "
                "states, or terms that read logits only"
            )
        vocab = int(probe.logits.shape[-1])
        k = vocab if self.top_k is None else min(self.top_k, vocab)
        return {
            "format": LM_FORMAT,
            "version": LM_VERSION,
            "top_k": k,
            "top_p": self.top_p,
            "fill": "uniform",
            "num_classes": vocab,
            "value_dtype": "float16 log-probabilities",
            "index_dtype": str(index_dtype(vocab)).replace("torch.", ""),
            "count_dtype": "int16" if k <= 32767 else "int32",
            "features": {},
        }

    def _new_table(self, slot: int) -> TokenSlotTable:
        assert self.manifest is not None
        return TokenSlotTable(
            slot,
            int(self.manifest["num_samples"]),
            getattr(torch, self.manifest["count_dtype"]),
            getattr(torch, self.manifest["index_dtype"]),
        )

    def _store(self, rows: torch.Tensor, outputs: ModelOutputs, inputs: Inputs | None = None) -> None:
        assert self.table is not None
        if inputs is None:
            raise RuntimeError("LMTeacherOutputCache needs the teacher's token inputs to store its logits")
        lengths, checksums, width = token_layout(inputs)
        logits = outputs.logits
        if logits.dim() != 3 or logits.shape[:2] != (len(lengths), width):
            raise ValueError(
                f"the teacher's logits {tuple(logits.shape)} do not match its input_ids [{len(lengths)}, {width}]"
            )
        real = torch.arange(width) < lengths.unsqueeze(-1)
        packed = pack_token_logits(logits[real.to(logits.device)], self.stored_k, self.top_p)
        sample_of_position = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        truncation = torch.zeros(len(lengths), len(REPORT), dtype=torch.float64)
        for j, key in enumerate(REPORT):
            truncation[:, j].index_add_(0, sample_of_position, packed[key])
        part = {
            "lengths": lengths.to(torch.int32),
            "checksums": checksums,
            "truncation": truncation,
            "counts": packed["counts"],
            "tail_lse": packed["tail_lse"],
            "values": packed["values"],
            "indices": packed["indices"],
        }
        self.table.put(rows, part, dirty=True)

    # -- the training batch ------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._served.zero_()
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        inputs, targets, indices = unpack_batch(batch)
        if indices is None:
            self._step = None
            return
        teacher_inputs = teacher_view(batch, inputs, targets)[0]
        self._step = (indices.detach().cpu().long(), teacher_inputs, token_layout(teacher_inputs))

    def _current_step(self, indices: torch.Tensor) -> tuple[Inputs, tuple[torch.Tensor, torch.Tensor, int]]:
        rows = indices.detach().cpu().long()
        if self._step is None or not torch.equal(self._step[0], rows):
            raise RuntimeError(
                "LMTeacherOutputCache was asked for samples that are not those of the current training batch (it "
                "reads each batch's tokens in on_train_batch_start): put the cache in trainer.callbacks of the fit "
                "that trains, and do not change the batch's input_ids or index after that hook"
            )
        return self._step[1], self._step[2]

    def _step_inputs(self, indices: torch.Tensor, picked: torch.Tensor) -> Inputs | None:
        inputs, _ = self._current_step(indices)
        assert isinstance(inputs, Mapping)
        return {key: value[picked.to(value.device)] for key, value in inputs.items()}

    # -- replay ------------------------------------------------------------------------------------------------------
    def _serve(self, rows: torch.Tensor, part: Mapping[str, Any], device: torch.device) -> ModelOutputs:
        _, (lengths, checksums, width) = self._current_step(rows)
        stored_lengths = part["lengths"].long()
        wrong = (stored_lengths != lengths) | (part["checksums"] != checksums)
        if bool(wrong.any()):
            raise CacheMismatchError(
                f"the teacher logits stored in {self.dir} for samples {rows[wrong][:8].tolist()} were computed on "
                f"other tokens (stored lengths {stored_lengths[wrong][:8].tolist()}, now "
                f"{lengths[wrong][:8].tolist()}, or other token ids): the corpus, tokenizer or max_length changed "
                "while the manifest's data identity did not (a fixed data_id?). Delete the cache, give another "
                "data_id, or pass rebuild=True"
            )
        starts = torch.arange(len(rows)) * width
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        target_rows = torch.repeat_interleave(starts, lengths) + offsets
        logits = reconstruct_token_logits(
            part["counts"].to(device),
            part["values"].to(device),
            part["indices"].to(device),
            part["tail_lse"].to(device),
            self.num_classes,
            rows=target_rows.to(device),
            num_rows=len(rows) * width,
        )
        self._served[0] += float(lengths.sum())
        self._served[1:] += part["truncation"].sum(0)
        return ModelOutputs(logits.view(len(rows), width, self.num_classes))

    def verify(self, rows: torch.Tensor, stored: Mapping[str, Any], live: ModelOutputs) -> None:
        """Raise :class:`CacheMismatchError` when the stored log-probabilities or tail masses of these samples differ
        from the live teacher's beyond the tolerance."""
        lengths = stored["lengths"].long()
        z = live.logits.detach()
        real = (torch.arange(z.shape[1]) < lengths.unsqueeze(-1)).to(z.device)
        log_p = torch.log_softmax(z[real].float(), dim=-1).cpu()
        counts = stored["counts"].long()
        entry_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        idx = stored["indices"].long()
        kept = torch.zeros_like(log_p, dtype=torch.bool)
        kept[entry_rows, idx] = True
        live_tail = torch.logsumexp(log_p.masked_fill(kept, float("-inf")), dim=-1)
        sample_of_position = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        entry_sample = sample_of_position[entry_rows]
        checks = [
            ("kept log-probabilities", log_p[entry_rows, idx], stored["values"].float(), entry_sample),
            ("tail log-mass", live_tail, stored["tail_lse"].float(), sample_of_position),
        ]
        for what, ref, got, sample in checks:
            both_inf = torch.isneginf(ref) & torch.isneginf(got)
            excess = torch.where(
                both_inf, torch.zeros(()), (got - ref).abs() - (self.verify_atol + self.verify_rtol * ref.abs())
            )
            excess = torch.nan_to_num(excess, nan=float("inf"))
            if bool((excess > 0).any()):
                bad = rows[sample[excess > 0].unique()][:8].tolist()
                worst = float(torch.nan_to_num((got - ref).abs(), nan=float("inf")).max())
                raise CacheMismatchError(
                    f"the teacher logits read from {self.dir} differ from the live teacher's on the same batch: "
                    f"{what} off by up to {worst:.4g} (tolerance {self.verify_atol} + {self.verify_rtol}·|x|) for "
                    f"samples {bad}. The teacher changed, or did not read the same tokens when the cache was filled; "
                    "keep the teacher frozen and refill the cache (rebuild=True). Under mixed precision a looser "
                    "verify_rtol/verify_atol may be needed."
                )

    # -- the report --------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        positions = float(self._served[0])
        if positions > 0:
            for j, key in enumerate(REPORT):
                value = float(self._served[1 + j]) / positions
                pl_module.log(f"train/teacher_cache/{key}", value, on_step=False, on_epoch=True)
        self._served.zero_()
        self.update_manifest_report()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.update_manifest_report()

    def truncation_report(self) -> dict[str, float] | None:
        """The means of the report over every sample stored in the current slot's table (``None`` when empty):
        ``{"samples", "positions", "truncation_kl", "truncation_tv", "tail_mass"}``."""
        if self.table is None or not bool(self.table.filled.any()):
            return None
        sums = self.table.report_sums()
        positions = max(float(sums[0]), 1.0)
        report = {"samples": int(self.table.filled.sum()), "positions": int(sums[0])}
        report |= {key: float(sums[1 + j]) / positions for j, key in enumerate(REPORT)}
        return report

    def update_manifest_report(self) -> None:
        """Rank 0 writes :meth:`truncation_report` into ``info.truncation.<slot>`` of the manifest (atomically; the
        ``info`` field is not compared, so this never makes the cache stale)."""
        trainer = self._trainer
        report = self.truncation_report()
        if report is None or (trainer is not None and not trainer.is_global_zero):
            return
        path = self.dir / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        info = manifest.setdefault("info", {})
        truncation = info.setdefault("truncation", {})
        key = str(self.table.slot)
        if truncation.get(key) == report:
            return
        truncation[key] = report
        write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._step = None


__all__ = [
    "LMTeacherOutputCache",
    "TokenSlotTable",
    "kept_counts",
    "pack_token_logits",
    "reconstruct_token_logits",
    "token_layout",
]
