"""Contrastive memory banks
^^^^^^^^^^^^^^^^^^^^^^^^^

The parts shared by the memory-bank contrastive terms (:mod:`~lightning_kd.losses.crd`,
:mod:`~lightning_kd.losses.wcord`), following the CRD authors' code (Tian, Krishnan, Isola, "Contrastive
Representation Distillation", ICLR 2020, arXiv:1910.10699; HobbitLong/RepDistiller ``crd/criterion.py``,
``crd/memory.py``, ``dataset/cifar100.py``):

- :class:`Embed`: a linear head followed by L2 normalisation (RepDistiller's ``Embed``), one per model, mapping the
  flattened tapped feature to the ``feat_dim``-dimensional contrast space;
- :class:`ContrastMemory`: one bank per model, ``[num_samples, feat_dim]`` rows indexed by the dataset index of each
  sample. The banks start uniform in :math:`[-s, s]`, :math:`s = 1/\\sqrt{d/3}` (rows of norm ≈ 1), as in
  ``ContrastMemory``. After each step the rows of the batch's samples move towards the new embeddings and are
  renormalised, :math:`m_i \\leftarrow (\\mu\\, m_i + (1-\\mu)\\, v_i) / \\lVert \\mu\\, m_i + (1-\\mu)\\, v_i \\rVert`
  (momentum :math:`\\mu`, 0.5 in the paper's code), with no gradient;
- negatives (:meth:`ContrastMemory.draw`): ``K`` bank rows per anchor, column 0 of the index matrix being the
  anchor's own index (the positive). ``negatives="other_class"`` draws them uniformly among the samples of *other
  classes*, which is what the authors' CIFAR-100 and ImageNet data loaders do (``cls_negative``, the ``exact`` mode
  of ``CIFAR100InstanceSample``; torchdistill's ``CRDDatasetWrapper`` likewise); ``negatives="instance"`` draws
  uniformly among all samples but the anchor (instance discrimination; the authors' in-memory ``AliasMethod``
  fallback, which could also draw the positive itself).

Deviations from the authors' code, and why:

- the class of each bank row is learned from the batches as they arrive (buffer ``labels``, ``-1`` = not yet seen)
  instead of being read from the dataset up front, since a loss term does not see the dataset. During the first
  epoch, samples not yet seen can be drawn as negatives whatever their class (for CIFAR-100 with 100 classes about
  1% of them could be same-class); from the second epoch on the sampling is exactly the authors' "other classes";
- negatives are drawn with replacement on the bank's device (RepDistiller's ImageNet loader draws with replacement,
  its CIFAR loader without; 16384 of 49500 candidates), by rejection of the excluded rows;
- the draws use their own generator, seeded from the buffers ``sample_seed`` and ``sample_count`` (plus the rank
  under DDP), so a checkpoint restores the sampling stream as well as the banks.

Under DDP (``torch.distributed`` initialised) :meth:`ContrastMemory.update` all-gathers the embeddings, indices and
labels of every rank before writing, so every rank's banks hold every sample and negatives are drawn from the whole
training set; the gather carries no gradient (bank updates are detached). Each rank draws its own negatives.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, check_temperature
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec

NEGATIVE_MODES = ("other_class", "instance")

# a large odd constant to spread (seed, draw, rank) over the 64-bit seed space (the golden-ratio increment)
_SEED_STRIDE = 0x9E3779B97F4A7C15
_MAX_REJECTION_ROUNDS = 1000


class Embed(nn.Module):
    """Flatten, linear map to ``feat_dim``, L2-normalise (RepDistiller's ``Embed``).

    The linear layer comes from :func:`~lightning_kd.losses.connectors.make_connector`. Computed in float32 with
    autocast disabled, so the contrast scores ``exp(⟨u, v⟩/τ)`` of a bf16/fp16 run keep their precision.
    """

    def __init__(self, dim_in: int, feat_dim: int, where: str = "") -> None:
        super().__init__()
        self.linear = make_connector((dim_in,), (feat_dim,), "linear", where=where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(self.linear(x.float().flatten(1)), dim=1)


def momentum_update(rows: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """``normalize(momentum · rows + (1 − momentum) · new)`` row-wise (the bank update of ``ContrastMemory``)."""
    return F.normalize(rows * momentum + new * (1.0 - momentum), dim=1)


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather_cat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over the ranks (rank order) along dim 0, detached; identity without DDP.

    Ranks may hold different numbers of rows (an uneven last batch): the sizes are gathered first and the rows padded
    to the largest, then trimmed.
    """
    _, world = distributed_world()
    if world == 1:
        return tuple(t.detach() for t in tensors)
    device = tensors[0].device
    size = torch.tensor([tensors[0].shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    biggest = max(counts)
    out = []
    for t in tensors:
        t = t.detach().contiguous()
        padded = t.new_zeros((biggest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return tuple(out)


@torch.no_grad()
def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over the ranks (a copy); ``value`` itself without DDP."""
    _, world = distributed_world()
    if world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world


def class_labels(targets: torch.Tensor | None) -> torch.Tensor | None:
    """Integer class labels ``[B]`` from ``targets``, or ``None`` when they are absent or soft (mixup, smoothing)."""
    if targets is None or targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return None
    return targets.long()


def draw_negatives(
    indices: torch.Tensor,
    num_negatives: int,
    num_samples: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, K]`` bank rows drawn uniformly with replacement, never the anchor's own index; when ``labels`` (the
    class of each bank row, ``-1`` = unknown) and ``targets`` (the anchors' classes) are given, never a row known to
    be of the anchor's class either. Rejection sampling on ``indices``' device."""
    device = indices.device
    b = indices.shape[0]
    anchors = indices.view(b, 1)
    classes = targets.view(b, 1) if labels is not None and targets is not None else None

    def excluded(candidates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        bad = candidates == anchors[rows, 0]
        if classes is not None:
            lab = labels[candidates]
            bad |= (lab == classes[rows, 0]) & (lab >= 0)
        return bad

    if classes is None:
        # uniform over the other num_samples − 1 rows, exactly: draw in [0, n − 1) and skip the anchor
        out = torch.randint(num_samples - 1, (b, num_negatives), generator=generator, device=device)
        return out + (out >= anchors).long()
    out = torch.randint(num_samples, (b, num_negatives), generator=generator, device=device)
    rows = torch.arange(b, device=device).view(b, 1).expand(b, num_negatives)
    bad = excluded(out, rows)
    for _ in range(_MAX_REJECTION_ROUNDS):
        n_bad = int(bad.sum())
        if n_bad == 0:
            return out
        out[bad] = torch.randint(num_samples, (n_bad,), generator=generator, device=device)
        bad[bad.clone()] = excluded(out[bad], rows[bad])
    raise ValueError(
        f"cannot draw negatives of another class: after {_MAX_REJECTION_ROUNDS} rounds some anchors still only find "
        "samples of their own class (is the training set a single class?); use negatives: instance"
    )


class ContrastMemory(nn.Module):
    """Student and teacher memory banks with momentum updates and negative sampling.

    Args:
        num_samples: rows of each bank (the training-set size; ``DistillBatch.indices`` must lie in ``[0, n)``).
        feat_dim: width of the contrast embeddings.
        num_negatives: ``K``, negatives per anchor (at most ``num_samples − 1``).
        momentum: :math:`\\mu` of the bank update (0.5 in the authors' code).
        negatives: ``"other_class"`` or ``"instance"`` (see the module docstring).

    Buffers (saved in checkpoints): ``student_bank``, ``teacher_bank`` (``[n, feat_dim]``), ``labels`` (``[n]``,
    ``-1`` until a sample is seen), ``sample_seed`` and ``sample_count`` (the negative-sampling stream).
    """

    def __init__(
        self, num_samples: int, feat_dim: int, num_negatives: int, momentum: float, negatives: str = "other_class"
    ) -> None:
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        if not 1 <= num_negatives <= num_samples - 1:
            raise ValueError(f"num_negatives must be in [1, num_samples - 1 = {num_samples - 1}], got {num_negatives}")
        self.num_samples = int(num_samples)
        self.num_negatives = int(num_negatives)
        self.momentum = float(momentum)
        self.negatives = negatives
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("student_bank", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("teacher_bank", torch.rand(num_samples, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("sample_seed", torch.randint(0, 2**62, ()))
        self.register_buffer("sample_count", torch.zeros((), dtype=torch.long))

    def check_indices(self, indices: torch.Tensor | None, where: str) -> torch.Tensor:
        """``indices`` as a long tensor, or a ``ValueError`` saying how to provide valid ones."""
        if indices is None:
            raise ValueError(
                f"{where}: the batch carries no sample indices; the memory bank needs each sample's dataset index. "
                "Yield (input, target, index) batches (lightning_kd's datamodules do; wrap a dataset of (input, "
                "target) pairs in lightning_kd.data.IndexedDataset) or dict batches with an 'index' key"
            )
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise ValueError(
                f"{where}: sample indices must lie in [0, {self.num_samples}) (the training-set size seen at setup), "
                f"got min {int(indices.min())}, max {int(indices.max())}; the indices must be positions in the "
                "training dataset"
            )
        return indices

    def _generator(self) -> torch.Generator:
        rank, world = distributed_world()
        count = int(self.sample_count)
        seed = (int(self.sample_seed) + _SEED_STRIDE * (count * world + rank + 1)) % 2**64
        generator = torch.Generator(device=self.student_bank.device)
        generator.manual_seed(seed)
        self.sample_count += 1
        return generator

    def draw(self, indices: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, K + 1]`` bank rows per anchor: column 0 the anchor itself, then ``K`` negatives."""
        labels = class_labels(targets)
        if self.negatives == "other_class":
            if labels is None:
                raise ValueError(
                    "negatives='other_class' needs integer class targets in the batch (got "
                    f"{'none' if targets is None else f'a {targets.dtype} tensor of shape {tuple(targets.shape)}'}); "
                    "use negatives: instance for unlabelled data or soft targets"
                )
            negatives = draw_negatives(
                indices, self.num_negatives, self.num_samples, self._generator(), self.labels, labels
            )
        else:
            negatives = draw_negatives(indices, self.num_negatives, self.num_samples, self._generator())
        return torch.cat([indices.view(-1, 1), negatives], dim=1)

    def rows(self, contrast_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student-bank and teacher-bank rows ``[B, K + 1, d]`` of ``contrast_idx`` (detached copies:
        ``index_select`` copies, so later in-place bank updates do not reach them)."""
        b = contrast_idx.shape[0]
        flat = contrast_idx.reshape(-1)
        d = self.student_bank.shape[1]
        return (
            self.student_bank.index_select(0, flat).view(b, -1, d).detach(),
            self.teacher_bank.index_select(0, flat).view(b, -1, d).detach(),
        )

    @torch.no_grad()
    def update(
        self,
        indices: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> None:
        """Move the rows of ``indices`` towards the new embeddings (gathered over all ranks under DDP)."""
        labels = class_labels(targets)
        if labels is None:
            labels = torch.full_like(indices, -1)
        indices, student, teacher, labels = all_gather_cat(indices.long(), student.float(), teacher.float(), labels)
        self.student_bank.index_copy_(
            0, indices, momentum_update(self.student_bank.index_select(0, indices), student, self.momentum)
        )
        self.teacher_bank.index_copy_(
            0, indices, momentum_update(self.teacher_bank.index_select(0, indices), teacher, self.momentum)
        )
        known = labels >= 0
        self.labels[indices[known]] = labels[known]

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, num_negatives={self.num_negatives}, momentum={self.momentum}, "
            f"negatives={self.negatives!r}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Setup shared by the memory-bank terms
# --------------------------------------------------------------------------------------------------------------------
def flat_dim(x: torch.Tensor) -> int:
    """Per-sample size of a feature once flattened."""
    return int(math.prod(x.shape[1:]))


def check_contrast_args(term: str, feat_dim: int, nce_k: int, nce_m: float, negatives: str) -> None:
    """``ValueError`` naming ``term`` for out-of-range hyper-parameters of a memory-bank term."""
    if not (isinstance(feat_dim, int) and feat_dim >= 1):
        raise ValueError(f"{term}: feat_dim must be an integer >= 1, got {feat_dim!r}")
    if not (isinstance(nce_k, int) and nce_k >= 1):
        raise ValueError(f"{term}: nce_k (negatives per anchor) must be an integer >= 1, got {nce_k!r}")
    if not (isinstance(nce_m, (int, float)) and 0.0 <= nce_m < 1.0):
        raise ValueError(f"{term}: nce_m (memory momentum) must be in [0, 1), got {nce_m!r}")
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"{term}: negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")


def build_memory(
    term: str,
    ctx: SetupContext,
    student_tap: TapSpec,
    teacher_tap: TapSpec,
    feat_dim: int,
    nce_k: int,
    nce_m: float,
    negatives: str,
) -> tuple[Embed, Embed, ContrastMemory]:
    """The student/teacher heads and the memory banks of a memory-bank term, from the probe shapes of ``ctx``."""
    if ctx.num_samples is None:
        raise ValueError(
            f"{term}: the memory banks need the training-set size, but it is unknown (the training dataloader's "
            "dataset has no len()); use a map-style dataset with __len__ (indices 0..n-1)"
        )
    n = int(ctx.num_samples)
    if n < 2:
        raise ValueError(f"{term}: needs a training set of at least 2 samples (got {n})")
    k = nce_k
    if k > n - 1:
        warnings.warn(
            f"{term}: nce_k={nce_k} negatives per anchor but the training set has {n} samples; using {n - 1}",
            UserWarning,
            stacklevel=3,
        )
        k = n - 1
    f_s, f_t = ctx.student[student_tap], ctx.teacher[teacher_tap]
    device = f_s.device
    embed_s = Embed(flat_dim(f_s), feat_dim, where=f"{term} student head ({student_tap})").to(device)
    embed_t = Embed(flat_dim(f_t), feat_dim, where=f"{term} teacher head ({teacher_tap})").to(device)
    memory = ContrastMemory(n, feat_dim, k, nce_m, negatives).to(device)
    return embed_s, embed_t, memory


class MemoryBankTerm(LossTerm):
    """Base of the memory-bank contrastive terms (``crd``, ``wcord``): the student/teacher heads and the banks built
    in :meth:`setup` from the probe shapes, negatives drawn for each anchor, the bank update after each step.

    A subclass implements :meth:`contrast_parts` (its losses from the embeddings and the drawn bank rows).

    Args:
        weight: weight of the term.
        feat_dim: width of the contrast embeddings.
        nce_k: negatives per anchor (capped at ``N − 1``).
        nce_t: temperature τ of the scores.
        nce_m: momentum of the memory-bank update.
        negatives: ``"other_class"`` (needs integer targets) or ``"instance"``.
        student_layer: student tap (flattened).
        teacher_layer: teacher tap (flattened).
    """

    def __init__(
        self,
        weight: float,
        feat_dim: int,
        nce_k: int,
        nce_t: float,
        nce_m: float,
        negatives: str,
        student_layer: str,
        teacher_layer: str,
    ) -> None:
        super().__init__(weight)
        name = self.term_name
        check_contrast_args(name, feat_dim, nce_k, nce_m, negatives)
        self.feat_dim = feat_dim
        self.nce_k = nce_k
        self.nce_t = check_temperature(name, nce_t)
        self.nce_m = float(nce_m)
        self.negatives = negatives
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.memory: ContrastMemory | None = None

    @property
    def term_name(self) -> str:
        """The registry name (for messages)."""
        return getattr(type(self), "registry_name", type(self).__name__)

    def setup(self, ctx: SetupContext) -> None:
        if self.memory is not None:  # already built (e.g. restored)
            return
        self.embed_s, self.embed_t, self.memory = build_memory(
            self.term_name,
            ctx,
            self.student_tap,
            self.teacher_tap,
            self.feat_dim,
            self.nce_k,
            self.nce_m,
            self.negatives,
        )

    def contrast_parts(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        w_s: torch.Tensor,
        w_t: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The term's losses (float32, autocast off) from the features ``f_s``/``f_t``, their embeddings ``s``/``t``
        ``[B, d]`` and the drawn bank rows ``w_s``/``w_t`` ``[B, K+1, d]`` (column 0 = the sample itself)."""
        raise NotImplementedError

    def contrast(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        indices: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        contrast_idx: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The losses for features ``f_s``, ``f_t`` of the samples ``indices``, then the bank update.

        ``contrast_idx`` (``[B, K+1]``, column 0 = ``indices``) replaces the drawn negatives (tests, parity).
        """
        if self.memory is None or self.embed_s is None or self.embed_t is None:
            raise RuntimeError(
                f"{self.term_name}: setup() was not called, so the heads and memory banks do not exist yet"
            )
        indices = self.memory.check_indices(indices, self.term_name)
        s = self.embed_s(f_s)
        t = self.embed_t(f_t.detach())  # the teacher feature never gets a gradient (its head does)
        if contrast_idx is None:
            contrast_idx = self.memory.draw(indices, targets)
        w_s, w_t = self.memory.rows(contrast_idx.long())
        with torch.autocast(device_type=s.device.type, enabled=False):
            parts = self.contrast_parts(f_s, f_t, s, t, w_s, w_t)
        self.memory.update(indices, s.detach(), t.detach(), targets)
        return parts

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        return self.contrast(
            batch.student[self.student_tap], batch.teacher[self.teacher_tap], batch.indices, batch.targets
        )

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
            f"nce_m={self.nce_m}, negatives={self.negatives!r}, student={self.student_tap}, teacher={self.teacher_tap}"
        )
