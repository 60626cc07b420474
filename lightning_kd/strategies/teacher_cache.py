"""Teacher-output cache
^^^^^^^^^^^^^^^^^^^^

Run the teacher once per augmentation slot, store its outputs on disk, and let later epochs and later runs read them
instead of running the teacher: a large teacher then costs nothing per epoch. This is CED's recipe (Dinkel, Wang,
Yan, Zhang, Wang, "CED: Consistent Ensemble Distillation for Audio Tagging", ICASSP 2024, arXiv:2308.11957):
"consistent teaching" — the student sees exactly the augmented view the teacher saw — with the teacher's top-k logits
stored in float16 and their class indices in int16 per (epoch, sample), so the cache costs a fraction of the data
(checked against RicherMans/CED: ``save_logits.py`` writes per epoch and per rank ``topk_values`` float16,
``topk_indexes`` int16 and the sample's augmentation ``seeds`` to ``logits_ep{E}_{rank}.h5``; ``dataset.py``
``LogitsReader`` replays the augmentation from the seed and cycles the stored epochs, ``epoch % max_epochs``).

Why the augmentation must be replayed: a cache keyed by the sample alone is stale as soon as the teacher's input is
randomly augmented (torchdistill's ``CacheableDataset`` was, and was removed; methods.md §12). Here the views come from
:class:`~lightning_kd.strategies.replay.ReplayAugment`, a pure function of ``(seed, slot, index)``; without it the
inputs must be deterministic and every epoch reads slot 0.

**Filling.** With ``prefill=True`` (the default) the cache runs the teacher over the samples of the epoch's slot that
are not stored yet at the start of the epoch, in dataset order, through the same batch pipeline as training (the
module's batch-transfer hooks, the device, the :class:`ReplayAugment` view, the precision context); the training
steps of the epoch then only read. The global RNG state is restored afterwards, so training draws the same shuffles
and dropouts as without the cache. With ``prefill=False`` the training steps fill the cache themselves: a batch with
any sample not stored runs the live teacher on the *whole* batch (the engine asks the cache before it runs the
teacher) and the samples not stored yet are recorded; with ``drop_last`` and shuffling, a few samples are missed per
epoch, so later epochs still see some live batches.

**What is stored** per (slot, sample): the top-k teacher logits (float16) and their class indices (int16 when the
classes fit, else int32); ``tail_lse``, the logsumexp of the other ``C − k`` logits (float32; ``-inf`` when
``k = C``); and every teacher tap the loss terms read (``features=True``; float16, ``[*shape]`` per sample).

**Reconstruction** (:func:`reconstruct_logits`): dense logits whose top-k entries are the stored values and whose
``C − k`` other entries all equal ``tail_lse − log(C − k)``, i.e. the tail's probability mass is shared uniformly:

.. math::

    \\tilde z_i = v_i \\ (i \\in K), \\qquad
    \\tilde z_j = \\log\\frac{1}{C-k}\\sum_{l \\notin K} e^{z_l} \\ (j \\notin K).

At τ = 1 this is exact for the top-k probabilities and for the total tail mass (``softmax(z̃)_i = softmax(z)_i`` for
``i ∈ K``, ``Σ_{j∉K} softmax(z̃)_j = Σ_{j∉K} softmax(z)_j``; the top-k logits themselves are kept, so the
normaliser is the true one). At τ ≠ 1 the tail is flatter than the truth, so KD, DKD and any loss on the full
distribution change; losses on logit statistics (logit standardisation's mean/std) too. At ``k = C`` everything is
exact up to float16 rounding. ``tests/test_teacher_cache.py`` reports the difference to the full-logit KD and DKD at
τ = 4: with 100 classes it is large (loss off by 14–26 %, its gradient by 17–31 % at k = 20; more at k = 1, 5),
because at τ = 4 the tail carries much of the distribution. Hence the default ``k=None`` (every class, exact up to
float16, about ``4·C`` bytes per sample and slot); top-k is for large vocabularies, where storing every class costs
too much. The uniform tail is this package's design (a reconstruction, not CED's): CED trains multi-label sigmoid
outputs and fills the tail with ``min(top-k) / (C − k)`` ("last_mean" in ``LogitsReader``), which has no softmax
normaliser to preserve. Storing the tail's logsumexp rather than the full logsumexp avoids the cancellation
``1 − Σ p_topk`` of float16-rounded top-k values.

**On disk**, ``dir`` holds ``manifest.json`` (JSON: format and version, the teacher's class and the sha256 of its
state_dict, the data's identity — ``datamodule.signature()`` when the datamodule has one, else the dataset's class,
length and a hash of a few samples, or ``data_id`` —, the augmentation's :meth:`ReplayAugment.signature` or
``"none"``, ``k``, the class count, the index dtype, the stored taps and their shapes, the number of samples;
``info.period`` is recorded but not compared, since slot ``s`` shows the same views whatever the period) and shards
``slot<S>-rank<R>-<uid>.pt``: ``torch.save`` of a dict of tensors (``samples`` int64 ``[n]``, ``values`` float16
``[n, k]``, ``indices`` ``[n, k]``, ``tail_lse`` float32 ``[n]``, ``features`` ``{tap: float16 [n, ...]}``) plus
``slot``/``rank`` ints, loadable with ``torch.load(..., weights_only=True)``. Each
shard is written atomically (a temporary file in the same directory, flushed and fsync'ed, then ``os.replace``;
readers ignore anything else), at the end of every epoch that stored something, at the end of training and, while
filling, at least every :data:`FLUSH_SECONDS` (so an interrupted fill keeps what it wrote). A
manifest that differs from the current run's raises :class:`StaleCacheError` listing the fields; a ``{key}`` in
``dir`` (the Hydra default) is replaced by a hash of the manifest, so each setting gets a directory of its own.

**DDP.** Each rank writes its own shards (with ``prefill``, the missing samples of a slot are split between the
ranks); before reading a slot, every rank waits for the others (barrier) and loads all ranks' shards into dense
per-sample tables, so a later run with another world size reads them too. ``dir`` must be on a filesystem every rank
sees.

**Checks.** The first ``verify_batches`` batches served from the cache in each fit are also run through the live
teacher (after the step, in ``on_train_batch_end``) and compared: the stored top-k values, the tail logsumexp and the
features must match to ``verify_rtol``/``verify_atol`` (float16 keeps 11 significant bits, a relative error of at
most 4.9e-4), else :class:`CacheMismatchError` — it catches augmentation that is not replayed (a dataset-level random
transform, e.g. ``DigitsDataModule(augment=True)``, a mixing callback) and a teacher that changes.

Memory: one slot's table is held in (CPU) memory, ``N · (4k + 6 + 2·Σ tap sizes)`` bytes (int16 indices). The
prefill covers the whole training set of a slot even if ``limit_train_batches`` uses part of it. Only for frozen
teachers (not EMA or mutual ones). Ensemble members' own logits (``ModelOutputs.members``) are not stored, so per-member
agreement is not logged for batches read from the cache.

**Token logits.** :class:`~lightning_kd.lm.logit_cache.LMTeacherOutputCache` is this cache for language models
(pre-training distillation's top-k / top-p truncated logits, stored per sample and real token position). It keeps the
manifest, the stale refusal, the shards, the filling, the verification and DDP of this class and overrides only the
layout hooks: :meth:`TeacherOutputCache._describe_outputs` (the manifest fields of what is stored),
:meth:`~TeacherOutputCache._new_table` (a table with ``put``/``take``/``pop_dirty``/``check_shard``/``merge_shard``,
like :class:`SlotTable`), :meth:`~TeacherOutputCache._store`, :meth:`~TeacherOutputCache._serve`,
:meth:`~TeacherOutputCache._step_inputs` and :meth:`~TeacherOutputCache.verify`. This class refuses token logits
(``[batch, sequence, vocabulary]``) with a pointer to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd.callback import DistillCallback
from lightning_kd.engine import DistillEngine, Inputs, teacher_view, unpack_batch
from lightning_kd.losses.base import ModelOutputs
from lightning_kd.strategies.replay import ReplayAugment
from lightning_kd.taps import TapSpec
from lightning_kd.trainer_utils import train_dataloader_of

log = logging.getLogger("lightning_kd")

FORMAT = "lightning_kd.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
#: largest finite float16
FP16_MAX = 65504.0
#: while filling, pending rows are written at least this often (seconds), so an interrupted fill keeps its work
FLUSH_SECONDS = 60.0


class StaleCacheError(RuntimeError):
    """The cache directory holds outputs of another teacher, other data, another augmentation or other settings."""


class CacheMismatchError(RuntimeError):
    """Outputs read from the cache differ from the live teacher's on the same batch."""


# --------------------------------------------------------------------------------------------------------------------
# Top-k packing and reconstruction
# --------------------------------------------------------------------------------------------------------------------
def index_dtype(num_classes: int) -> torch.dtype:
    """int16 when every class index fits (``num_classes <= 32767``), else int32."""
    return torch.int16 if num_classes <= 32767 else torch.int32


def pack_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values float16 [B, k], indices [B, k], tail_lse float32 [B])`` of ``logits [B, C]``: the ``k`` largest
    logits, their classes (sorted by value), and the logsumexp of the ``C − k`` others (``-inf`` when ``k = C``)."""
    z = logits.detach().float()
    if z.dim() != 2:
        raise ValueError(f"teacher logits must be [batch, classes], got shape {tuple(z.shape)}")
    values, indices = z.topk(k, dim=-1)
    tail_lse = torch.logsumexp(z.scatter(-1, indices, float("-inf")), dim=-1)
    if not bool(torch.isfinite(values).all()) or float(values.abs().max()) > FP16_MAX:
        raise ValueError(
            f"teacher logits must be finite and within float16 range (|z| <= {FP16_MAX}) to be cached; got values "
            f"up to {float(values.abs().max())}"
        )
    return values.half(), indices.to(index_dtype(z.shape[-1])), tail_lse


def reconstruct_logits(
    values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dense float32 logits ``[B, C]`` from stored top-k entries: the top-k classes get their stored logits, each of
    the ``C − k`` others ``tail_lse − log(C − k)`` (the tail's probability mass shared uniformly; exact at τ = 1 for
    the top-k probabilities and the tail's total mass)."""
    v = values.float()
    k = v.shape[-1]
    if k > num_classes:
        raise ValueError(f"{k} stored values for {num_classes} classes")
    if k == num_classes:
        fill = torch.zeros_like(v[:, :1])
    else:
        fill = (tail_lse.float() - float(np.log(num_classes - k))).unsqueeze(-1)
    dense = fill.expand(v.shape[0], num_classes).clone()
    return dense.scatter_(-1, indices.long(), v)


# --------------------------------------------------------------------------------------------------------------------
# Identities for the manifest
# --------------------------------------------------------------------------------------------------------------------
def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``module.state_dict()`` (sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _fingerprint(items: Iterable[Any]) -> str:
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, np.ndarray):
            feed(torch.from_numpy(np.ascontiguousarray(obj)))
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                feed(o)
        elif isinstance(obj, Mapping):
            for key in sorted(obj, key=str):
                h.update(str(key).encode())
                feed(obj[key])
        else:
            h.update(repr(obj).encode())

    for item in items:
        feed(item)
    return h.hexdigest()


def data_identity(trainer: L.Trainer, dataset: Any, data_id: str | None = None) -> dict[str, Any]:
    """What identifies the training data: ``data_id`` if given, else the datamodule's ``signature()``, else the
    dataset's class, its length and a sha256 of 8 evenly spaced samples."""
    if data_id is not None:
        return {"id": str(data_id)}
    datamodule = getattr(trainer, "datamodule", None)
    signature = getattr(datamodule, "signature", None)
    if callable(signature):
        return {"datamodule": type(datamodule).__qualname__, **signature()}
    n = len(dataset)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 8))})
    with preserved_rng():
        digest = _fingerprint(dataset[i] for i in picks)
    return {"dataset": type(dataset).__qualname__, "length": n, "samples_sha256": digest}


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and current CUDA device), numpy and ``random`` RNG states on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` (bytes, or an object for ``torch.save``) to ``path`` atomically: a temporary file in the same
    directory, flushed and fsync'ed, then renamed over ``path``; on any error the temporary file is removed and
    ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------------------------
# One slot's outputs, dense per sample
# --------------------------------------------------------------------------------------------------------------------
class SlotTable:
    """The stored outputs of every sample of one slot (CPU tensors, row = dataset index) and which rows are filled
    (``filled``) or not yet written to disk (``dirty``)."""

    def __init__(self, slot: int, num_samples: int, k: int, idx_dtype: torch.dtype, shapes: Mapping[str, list]) -> None:
        self.slot = slot
        self.values = torch.zeros(num_samples, k, dtype=torch.float16)
        self.indices = torch.zeros(num_samples, k, dtype=idx_dtype)
        self.tail_lse = torch.full((num_samples,), float("-inf"))
        self.features = {name: torch.zeros(num_samples, *shape, dtype=torch.float16) for name, shape in shapes.items()}
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.dirty = torch.zeros(num_samples, dtype=torch.bool)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def put(self, rows: torch.Tensor, part: Mapping[str, Any], *, dirty: bool) -> None:
        self.values[rows] = part["values"]
        self.indices[rows] = part["indices"]
        self.tail_lse[rows] = part["tail_lse"]
        for name, table in self.features.items():
            table[rows] = part["features"][name]
        self.filled[rows] = True
        if dirty:
            self.dirty[rows] = True

    def take(self, rows: torch.Tensor) -> dict[str, Any]:
        return {
            "values": self.values[rows],
            "indices": self.indices[rows],
            "tail_lse": self.tail_lse[rows],
            "features": {name: table[rows] for name, table in self.features.items()},
        }

    def pop_dirty(self) -> tuple[torch.Tensor, dict[str, Any]] | None:
        rows = self.dirty.nonzero().flatten()
        if not len(rows):
            return None
        self.dirty[rows] = False
        return rows, self.take(rows)

    def check_shard(self, shard: Any) -> bool:
        """Whether ``shard`` (a loaded shard file) has this table's fields, dtypes and shapes."""
        ok = isinstance(shard, Mapping) and {"samples", "values", "indices", "tail_lse", "features"} <= set(shard)
        if ok:
            n = len(shard["samples"])
            ok = (
                shard["values"].shape == (n, self.values.shape[1])
                and shard["indices"].dtype == self.indices.dtype
                and shard["indices"].shape == (n, self.values.shape[1])
                and shard["tail_lse"].shape == (n,)
                and set(shard["features"]) == set(self.features)
                and all(shard["features"][k].shape[1:] == t.shape[1:] for k, t in self.features.items())
                and rows_in_range(shard["samples"], len(self.filled))
            )
        return bool(ok)

    def merge_shard(self, shard: Mapping[str, Any]) -> None:
        """Put the rows of a (checked) shard that are not filled yet (as written: not dirty)."""
        rows = shard["samples"]
        new = ~self.filled[rows]
        if bool(new.any()):
            part = {
                "values": shard["values"][new],
                "indices": shard["indices"][new],
                "tail_lse": shard["tail_lse"][new],
                "features": {name: t[new] for name, t in shard["features"].items()},
            }
            self.put(rows[new], part, dirty=False)


def rows_in_range(samples: torch.Tensor, num_samples: int) -> bool:
    """Whether every sample index of a shard lies in ``[0, num_samples)``."""
    return len(samples) == 0 or (int(samples.min()) >= 0 and int(samples.max()) < num_samples)


# --------------------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------------------
class TeacherOutputCache(Callback):
    """Store the teacher's outputs on disk once per augmentation slot and serve them to the distillation engine.

    Works with :class:`~lightning_kd.callback.DistillCallback` (in ``trainer.callbacks``) or
    :class:`~lightning_kd.module.DistillationModule`; installs itself as the engine's ``output_cache`` at fit start.
    See the module documentation for the format, the reconstruction and its approximation. Classifier logits only;
    language models: :class:`~lightning_kd.lm.logit_cache.LMTeacherOutputCache`.

    Args:
        dir: the cache directory (created if needed). A ``{key}`` in it is replaced at fit start by a hash of the
            manifest's compared fields, so that each teacher/data/augmentation/k gets a directory of its own (the
            Hydra default, ``${cache_dir}/teacher_outputs/<teacher>/{key}``); without it, ``dir`` holds one setting
            and refuses others (:class:`StaleCacheError`).
        k: logits stored per sample (clamped to the class count); ``None`` (default): all, exact up to float16.
            With ``k < C`` losses see the top-k + uniform-tail reconstruction (see above).
        features: store the teacher taps the loss terms read (float16). Must be on when a term reads one.
        prefill: fill a slot with one teacher pass at the start of its epoch (see the module documentation); else the
            training steps fill it.
        verify_batches: batches read from the cache that are compared with the live teacher in each fit (0: none).
        verify_rtol, verify_atol: the tolerance of that comparison, ``|live − stored| <= atol + rtol · |live|``.
        rebuild: delete this cache's files in ``dir`` (manifest and shards only) at fit start and fill it anew.
        data_id: a name for the training data to use in the manifest instead of the datamodule's signature or the
            dataset's fingerprint.

    Example::

        trainer = L.Trainer(callbacks=[ReplayAugment(RandomCropFlip(4), period=10), TeacherOutputCache("cache/r50"),
                                       DistillCallback(teacher, loss="kd")])
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        k: int | None = None,
        features: bool = True,
        prefill: bool = True,
        verify_batches: int = 1,
        verify_rtol: float = 1e-3,
        verify_atol: float = 1e-3,
        rebuild: bool = False,
        data_id: str | None = None,
    ) -> None:
        if k is not None and (int(k) != k or k < 1):
            raise ValueError(f"k must be an integer >= 1 (or None for every class), got {k!r}")
        if int(verify_batches) != verify_batches or verify_batches < 0:
            raise ValueError(f"verify_batches must be an integer >= 0, got {verify_batches!r}")
        if verify_rtol < 0 or verify_atol < 0:
            raise ValueError(f"verify_rtol and verify_atol must be >= 0, got {verify_rtol}, {verify_atol}")
        self.dir_template = os.path.expanduser(str(dir))
        self.dir = Path(self.dir_template)
        self.k = None if k is None else int(k)
        self.features = bool(features)
        self.prefill = bool(prefill)
        self.verify_batches = int(verify_batches)
        self.verify_rtol = float(verify_rtol)
        self.verify_atol = float(verify_atol)
        self.rebuild = bool(rebuild)
        self.data_id = data_id
        self.engine: DistillEngine | None = None
        self.augment: ReplayAugment | None = None
        self.manifest: dict[str, Any] | None = None
        #: the current slot's outputs (a :class:`SlotTable`; a subclass may use another layout with the same methods)
        self.table: Any = None
        self._trainer: L.Trainer | None = None
        self._pl_module: L.LightningModule | None = None
        self._verify_left = 0
        self._to_verify: tuple[torch.Tensor, dict[str, Any]] | None = None
        #: batches served from the cache / run live, and samples read / computed by the teacher, since construction
        self.stats = {"hit_batches": 0, "miss_batches": 0, "read": 0, "computed": 0, "verified_batches": 0}
        self._epoch_stats = {"read": 0, "computed": 0}
        self._last_flush = time.monotonic()

    # -- settings derived at fit start -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        assert self.manifest is not None
        return int(self.manifest["num_classes"])

    @property
    def stored_k(self) -> int:
        assert self.manifest is not None
        return int(self.manifest["k"])

    def slot_of(self, epoch: int) -> int:
        """The augmentation slot of ``epoch`` (always 0 without a :class:`ReplayAugment`)."""
        return 0 if self.augment is None else self.augment.slot(epoch)

    # -- fit start: find the engine, describe this run, check the directory ------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        self.engine = find_engine(trainer, pl_module)
        self.augment = find_augment(trainer)
        loader = train_dataloader_of(trainer)
        dataset = getattr(loader, "dataset", None)
        try:
            num_samples = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                "TeacherOutputCache needs a map-style training dataset with a length (samples are stored by their "
                f"dataset index); got {type(dataset).__name__}"
            ) from None
        # materialised, so that the generator's RNG-restoring context closes here
        (_, probe, _), *_ = list(self._teacher_passes(trainer, pl_module, [0], batch_size=1))
        self.manifest = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": {
                "class": f"{type(self.engine.teacher).__module__}.{type(self.engine.teacher).__qualname__}",
                "sha256": state_dict_sha256(self.engine.teacher),
            },
            "data": data_identity(trainer, dataset, self.data_id),
            "num_samples": num_samples,
            "augment": "none" if self.augment is None else self.augment.signature(),
            **self._describe_outputs(probe),
            # not compared: a slot's views do not depend on the period, only which slots an epoch uses
            "info": {"period": None if self.augment is None else self.augment.period},
        }
        self.dir = Path(self.dir_template.replace("{key}", manifest_key(self.manifest)))
        self._open_directory(trainer)
        self.table = None
        self._verify_left = self.verify_batches
        self.engine.output_cache = self

    def _teacher_taps(self) -> list[TapSpec]:
        assert self.engine is not None
        taps = self.engine.teacher_taps
        return list(taps.requested) if taps is not None else []

    def _describe_outputs(self, probe: ModelOutputs) -> dict[str, Any]:
        """The manifest fields that say what is stored, from the teacher's outputs on one sample (``probe``)."""
        if probe.logits.dim() != 2:
            raise ValueError(
                f"TeacherOutputCache stores classifier logits [batch, classes]; the teacher gives shape "
                f"{tuple(probe.logits.shape)}. For language models (token logits [batch, sequence, vocabulary]) use "
                "lightning_kd.lm.logit_cache.LMTeacherOutputCache (teacher_cache=lm_topk)"
            )
        num_classes = int(probe.logits.shape[-1])
        taps = self._teacher_taps()
        if taps and not self.features:
            raise ValueError(
                f"the loss terms read the teacher taps {[str(t) for t in taps]}, which the cache would not store "
                "(features=False); set features=True (TeacherOutputCache(..., features=True) / "
                "teacher_cache.features=true) or use terms that read logits only"
            )
        return {
            "k": num_classes if self.k is None else min(self.k, num_classes),
            "num_classes": num_classes,
            "value_dtype": "float16",
            "index_dtype": str(index_dtype(num_classes)).replace("torch.", ""),
            "features": {str(t): list(probe.features[t].shape[1:]) for t in taps},
        }

    def _open_directory(self, trainer: L.Trainer) -> None:
        """Rank 0 checks (or writes) the manifest; every rank raises the same error, then waits for the others."""
        assert self.manifest is not None
        problem: str | None = None
        if trainer.is_global_zero:
            try:
                self._check_or_write_manifest()
            except StaleCacheError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise StaleCacheError(problem)
        trainer.strategy.barrier("teacher_cache_open")

    def _check_or_write_manifest(self) -> None:
        assert self.manifest is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MANIFEST
        if self.rebuild:
            for shard in self._shards():
                shard.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                stored = {"unreadable": str(err)}
            current = json.loads(json.dumps(self.manifest, default=str))  # as it reads back (tuples -> lists)
            keys = (set(stored) | set(current)) - {"info"}
            differing = sorted(key for key in keys if stored.get(key) != current.get(key))
            if differing:
                lines = [
                    f"  {key}: stored {_short(stored.get(key))}, now {_short(current.get(key))}" for key in differing
                ]
                raise StaleCacheError(
                    f"the teacher-output cache in {self.dir} was made for another setting; differing fields:\n"
                    + "\n".join(lines)
                    + "\nDelete that directory, point dir= elsewhere (teacher_cache.dir=...), or pass rebuild=True "
                    "(teacher_cache.rebuild=true) to refill it."
                )
        else:
            if any(self._shards()):
                raise StaleCacheError(
                    f"{self.dir} holds teacher-output shards but no {MANIFEST}, so nothing says what they are. Delete "
                    "them, point dir= elsewhere, or pass rebuild=True."
                )
            write_atomic(path, (json.dumps(self.manifest, indent=2, sort_keys=True, default=str) + "\n").encode())

    def _shards(self, slot: int | None = None) -> list[Path]:
        pattern = f"slot{slot}-rank*-*.pt" if slot is not None else "slot*-rank*-*.pt"
        return sorted(p for p in self.dir.glob(pattern) if not p.name.startswith("."))

    # -- slots: load, fill, flush ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_stats = {"read": 0, "computed": 0}
        self._enter_slot(self.slot_of(trainer.current_epoch), trainer)
        assert self.table is not None
        incomplete = not self.table.complete
        if trainer.world_size > 1:  # every rank takes the same decision (they all read the same shards)
            incomplete = trainer.strategy.reduce_boolean_decision(incomplete, all=False)
        if self.prefill and incomplete:
            self._prefill(trainer, pl_module)

    def _enter_slot(self, slot: int, trainer: L.Trainer | None) -> None:
        """Make ``slot``'s table current: write what is pending, wait for every rank (DDP), then merge in the shards
        on disk unless the table in memory is already complete."""
        assert self.manifest is not None
        self.flush()
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("teacher_cache_slot")
        if self.table is None or self.table.slot != slot:
            self.table = self._new_table(slot)
        if not self.table.complete:
            self._load_shards(self.table)

    def _new_table(self, slot: int) -> SlotTable:
        """An empty table for ``slot`` in the layout of the manifest."""
        assert self.manifest is not None
        return SlotTable(
            slot,
            int(self.manifest["num_samples"]),
            self.stored_k,
            getattr(torch, self.manifest["index_dtype"]),
            self.manifest["features"],
        )

    def _load_shards(self, table: Any) -> None:
        for path in self._shards(table.slot):
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - name the file whatever went wrong
                raise RuntimeError(f"cannot read the teacher-output shard {path}: {err}. Delete it (or the cache).")
            if not table.check_shard(shard):
                raise RuntimeError(
                    f"the teacher-output shard {path} does not match {self.dir / MANIFEST}; delete the cache"
                )
            table.merge_shard(shard)

    def _prefill(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One teacher pass over this rank's share of the slot's missing samples, then share the results."""
        assert self.table is not None
        missing = (~self.table.filled).nonzero().flatten().tolist()
        mine = missing[trainer.global_rank :: trainer.world_size]
        loader = train_dataloader_of(trainer)
        batch_size = getattr(loader, "batch_size", None) or 64
        epoch = trainer.current_epoch
        for rows, outputs, inputs in self._teacher_passes(trainer, pl_module, mine, batch_size, epoch):
            self._store(rows, outputs, inputs)
            self._flush_if_due()
            self._count_computed(len(rows))
        self.flush()
        if trainer.world_size > 1:
            trainer.strategy.barrier("teacher_cache_prefill")
            self._load_shards(self.table)
        log.info("teacher cache: slot %d filled with %d samples in %s", self.table.slot, len(mine), self.dir)

    def _teacher_passes(
        self, trainer: L.Trainer, pl_module: L.LightningModule, samples: list[int], batch_size: int, epoch: int = 0
    ) -> Iterator[tuple[torch.Tensor, ModelOutputs, Inputs]]:
        """``(indices, outputs, teacher inputs)`` of the live teacher on ``samples`` (dataset indices), batched,
        through the training batch pipeline: precision input conversion, the module's batch-transfer hooks and device,
        the ReplayAugment view of ``epoch``; the teacher reads its own tokenization when the batch carries one
        (:func:`~lightning_kd.engine.teacher_view`). The RNG state is restored afterwards."""
        assert self.engine is not None
        loader = train_dataloader_of(trainer)
        if getattr(loader, "batch_size", 1) is None:
            raise ValueError(
                "TeacherOutputCache(prefill=True) loads single samples from the training dataset, but the training "
                "dataloader has batch_size=None (the dataset yields whole batches); use prefill=False"
            )
        passes = DataLoader(
            loader.dataset,
            batch_size=batch_size,
            sampler=samples,
            num_workers=getattr(loader, "num_workers", 0),
            collate_fn=loader.collate_fn,
        )
        with preserved_rng():
            for batch in passes:
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)  # what the fit loop calls
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
                if self.augment is not None:
                    self.augment.augment_batch(batch, epoch)
                inputs, targets, indices = unpack_batch(batch)
                if indices is None:
                    raise ValueError(
                        "TeacherOutputCache stores samples by their dataset index: yield (input, target, index) "
                        "samples (lightning_kd.data.IndexedDataset) or put an 'index' key in dict batches"
                    )
                inputs = teacher_view(batch, inputs, targets)[0]
                with trainer.precision_plugin.train_step_context():
                    outputs = self.engine.run_teacher(inputs)
                yield indices.detach().cpu().long(), outputs, inputs

    def _store(self, rows: torch.Tensor, outputs: ModelOutputs, inputs: Inputs | None = None) -> None:
        """Pack the teacher's ``outputs`` on the samples ``rows`` (and the ``inputs`` it read, when known) into the
        table, marked as not written yet."""
        assert self.table is not None
        values, indices, tail_lse = pack_topk(outputs.logits, self.stored_k)
        features = {}
        for name in self.table.features:
            tensor = outputs[name].detach().to("cpu", torch.float16)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"the teacher tap {name} has values beyond float16 range (or NaN/Inf) and cannot be cached; "
                    "use features=False with logit-only losses, or tap a normalised layer"
                )
            features[name] = tensor
        part = {"values": values.cpu(), "indices": indices.cpu(), "tail_lse": tail_lse.cpu(), "features": features}
        self.table.put(rows, part, dirty=True)

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> Path | None:
        """Write this rank's not-yet-written rows of the current slot as a new shard (atomically); returns its path."""
        if self.table is None:
            return None
        pending = self.table.pop_dirty()
        if pending is None:
            return None
        rows, part = pending
        rank = self._trainer.global_rank if self._trainer is not None else 0
        path = self.dir / f"slot{self.table.slot}-rank{rank}-{uuid.uuid4().hex[:12]}.pt"
        shard = {"slot": self.table.slot, "rank": rank, "samples": rows.clone(), **part}
        try:
            write_atomic(path, shard)
        except BaseException:
            self.table.dirty[rows] = True  # not written: keep them pending
            raise
        self._last_flush = time.monotonic()
        return path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()
        pl_module.log("train/teacher_cache/read", float(self._epoch_stats["read"]), on_step=False, on_epoch=True)
        pl_module.log(
            "train/teacher_cache/computed", float(self._epoch_stats["computed"]), on_step=False, on_epoch=True
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.engine is not None and self.engine.output_cache is self:
            self.engine.output_cache = None
        self.table = None
        self._to_verify = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # -- the engine's TeacherOutputSource protocol -------------------------------------------------------------------
    def _rows(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        slot = self.slot_of(epoch)
        if self.table is None or self.table.slot != slot:
            self._enter_slot(slot, None)
        assert self.table is not None
        rows = indices.detach().cpu().long()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self.table.filled)):
            raise IndexError(
                f"dataset indices in the batch range over [{int(rows.min())}, {int(rows.max())}], but the training "
                f"set has {len(self.table.filled)} samples; indices must be positions in the training dataset"
            )
        return rows

    def lookup(self, indices: torch.Tensor, epoch: int, device: torch.device) -> ModelOutputs | None:
        """The stored outputs of these samples in ``epoch``'s slot, or ``None`` when any of them is not stored."""
        rows = self._rows(indices, epoch)
        assert self.table is not None
        if not bool(self.table.filled[rows].all()):
            self.stats["miss_batches"] += 1
            return None
        part = self.table.take(rows)
        outputs = self._serve(rows, part, device)
        self.stats["hit_batches"] += 1
        self.stats["read"] += len(rows)
        self._epoch_stats["read"] += len(rows)
        if self._verify_left > 0:
            self._to_verify = (rows, part)
        return outputs

    def _serve(self, rows: torch.Tensor, part: Mapping[str, Any], device: torch.device) -> ModelOutputs:
        """The teacher outputs of the stored rows ``part`` (a :meth:`SlotTable.take`), on ``device``."""
        logits = reconstruct_logits(part["values"], part["indices"], part["tail_lse"], self.num_classes)
        features = {TapSpec.parse(name): t.to(device).float() for name, t in part["features"].items()}
        return ModelOutputs(logits.to(device), features)

    def record(self, indices: torch.Tensor, epoch: int, outputs: ModelOutputs) -> None:
        """Store the live teacher's outputs for the samples of this batch that are not stored yet."""
        rows = self._rows(indices, epoch)
        assert self.table is not None
        self._count_computed(len(rows))
        new = ~self.table.filled[rows]
        if bool(new.any()):
            picked = new.to(outputs.logits.device)
            subset = ModelOutputs(outputs.logits[picked], {k: v[picked] for k, v in outputs.features.items()})
            self._store(rows[new], subset, self._step_inputs(indices, new))
            self._flush_if_due()

    def _step_inputs(self, indices: torch.Tensor, picked: torch.Tensor) -> Inputs | None:
        """The teacher inputs of the ``picked`` samples of the current training batch, for :meth:`_store`; the
        classifier cache does not need them (``None``)."""
        return None

    def _count_computed(self, n: int) -> None:
        self.stats["computed"] += n
        self._epoch_stats["computed"] += n

    # -- verification against the live teacher -----------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._to_verify is None:
            return
        rows, stored = self._to_verify
        self._to_verify = None
        self._verify_left -= 1
        inputs, targets, indices = unpack_batch(batch)
        if indices is None or not torch.equal(indices.detach().cpu().long(), rows):
            return  # not the batch the cache served (another consumer); nothing to compare
        assert self.engine is not None
        with trainer.precision_plugin.train_step_context():
            live = self.engine.run_teacher(teacher_view(batch, inputs, targets)[0])
        self.verify(rows, stored, live)
        self.stats["verified_batches"] += 1

    def verify(self, rows: torch.Tensor, stored: Mapping[str, Any], live: ModelOutputs) -> None:
        """Raise :class:`CacheMismatchError` when ``stored`` (rows of the table) and the live teacher's outputs on the
        same samples differ beyond the tolerance."""
        z = live.logits.detach().float().cpu()
        idx = stored["indices"].long()
        checks = [("top-k logits", z.gather(-1, idx), stored["values"].float())]
        if idx.shape[-1] < z.shape[-1]:
            live_tail = torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1)
            checks.append(("tail logsumexp", live_tail, stored["tail_lse"]))
        for name, table in stored["features"].items():
            checks.append((f"tap {name}", live[name].detach().float().cpu(), table.float()))
        for what, ref, got in checks:
            excess = (got - ref).abs() - (self.verify_atol + self.verify_rtol * ref.abs())
            if bool((excess > 0).any()):
                per_sample = excess.reshape(len(rows), -1).amax(-1)
                bad = rows[per_sample > 0][:8].tolist()
                worst = float((got - ref).abs().max())
                raise CacheMismatchError(
                    f"the teacher outputs read from {self.dir} (slot {self.slot_of(self._epoch())}) differ from the "
                    f"live teacher's on the same batch: {what} off by up to {worst:.4g} (tolerance "
                    f"{self.verify_atol} + {self.verify_rtol}·|x|) for samples {bad}. The teacher did not see the "
                    "same inputs when the cache was filled: augment only with ReplayAugment (turn off random "
                    "transforms in the dataset, e.g. data.augment=false, and input-mixing callbacks), keep the "
                    "teacher frozen, and refill the cache (rebuild=True). Under mixed precision a looser "
                    "verify_rtol/verify_atol may be needed."
                )

    def _epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0


def manifest_key(manifest: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the manifest's compared fields (everything but ``info``)."""
    compared = {key: value for key, value in manifest.items() if key != "info"}
    return hashlib.sha256(json.dumps(compared, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "(missing)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_engine(trainer: L.Trainer, pl_module: L.LightningModule) -> DistillEngine:
    """The distillation engine of this fit: a :class:`DistillCallback`'s or the module's own ``engine``."""
    found = [cb.engine for cb in trainer.callbacks if isinstance(cb, DistillCallback) and cb.engine is not None]
    own = getattr(pl_module, "engine", None)
    if isinstance(own, DistillEngine):
        found.append(own)
    if len(found) != 1:
        raise RuntimeError(
            f"TeacherOutputCache serves exactly one distillation engine, found {len(found)}: use it with one "
            "DistillCallback in trainer.callbacks or with a DistillationModule"
            + (" (several DistillCallbacks: give each teacher its own fit)" if found else "")
        )
    return found[0]


def find_augment(trainer: L.Trainer) -> ReplayAugment | None:
    """The fit's :class:`ReplayAugment` (at most one), or ``None``."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, ReplayAugment)]
    if len(found) > 1:
        raise RuntimeError(f"found {len(found)} ReplayAugment callbacks; a teacher cache can replay only one")
    return found[0] if found else None


__all__ = [
    "CacheMismatchError",
    "SlotTable",
    "StaleCacheError",
    "TeacherOutputCache",
    "data_identity",
    "find_augment",
    "find_engine",
    "index_dtype",
    "manifest_key",
    "pack_topk",
    "reconstruct_logits",
    "rows_in_range",
    "state_dict_sha256",
    "write_atomic",
]
