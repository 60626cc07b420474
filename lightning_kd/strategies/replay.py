"""Replayable augmentation
^^^^^^^^^^^^^^^^^^^^^^^

Random augmentation whose every choice is a pure function of ``(seed, slot, dataset index)``, so the exact view a
sample got in an epoch can be produced again later — in another epoch, in another run, on another rank, with another
batch composition or worker count, after a resume. This is what makes stored teacher outputs valid under
augmentation: CED's "consistent teaching" (Dinkel, Wang, Yan, Zhang, Wang, "CED: Consistent Ensemble Distillation
for Audio Tagging", ICASSP 2024, arXiv:2308.11957) stores each sample's augmentation seed next to the teacher's
top-k logits and replays the augmentation from that seed when training the student (checked against
RicherMans/CED: ``dataset.py`` ``SequentialHDF5DataLoader`` draws and stores a seed per chunk, ``LogitsReader``
re-applies the transforms under ``FixSeedContext(seed)``). Here the seed is not stored but derived: each sample's
random numbers come from an integer hash of ``(seed, slot, index)`` (murmur3's 32-bit finaliser, computed exactly in
int64 tensor arithmetic on the batch's device, no global RNG), so nothing per sample needs storing and the cache's
manifest only records :meth:`ReplayAugment.signature`.

``slot`` is the epoch (every epoch a new view), or ``epoch % period`` (``period`` views, cycled: CED cycles through
its ~40 stored augmented epochs the same way, ``LogitsReader._set_epoch``).

:class:`ReplayAugment` is a Lightning callback: in ``on_train_batch_start`` (after the batch is on its device, before
``training_step``) it replaces the batch's inputs in place, so the teacher — live or cached — and the student see the
same view. Batches must be a list ``[inputs, targets, indices, ...]`` (what the default collate makes of this
package's ``(input, target, index)`` samples) or a dict with an input key and an ``index`` key.

Transforms (batched, ``[B, C, H, W]``): :class:`RandomShift` (translation with replicated borders, the seeded and
batched version of :class:`lightning_kd.data.digits.RandomShift`) and :class:`RandomCropFlip` (CIFAR's pad-4 random
crop + horizontal flip).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_kd.engine import _INPUT_KEYS, unpack_batch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: the stride between a sample's successive draws

IntLike = Any  # a Python int or an int64 tensor holding values in [0, 2^32)


# --------------------------------------------------------------------------------------------------------------------
# Counter-based per-sample random numbers
# --------------------------------------------------------------------------------------------------------------------
def _mul32(h: IntLike, m: int) -> IntLike:
    """``(h * m) mod 2^32`` for ``h`` in ``[0, 2^32)`` without overflowing int64 (the product is split at 16 bits)."""
    return (h * (m & 0xFFFF) + (((h * (m >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(h: IntLike) -> IntLike:
    """murmur3's 32-bit finaliser, a bijection of ``[0, 2^32)`` with full avalanche; works on Python ints and on int64
    tensors alike (same value either way)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sample_keys(indices: torch.Tensor, seed: int, slot: int) -> torch.Tensor:
    """One 32-bit key per sample (int64 tensor on ``indices``' device), a function of ``(seed, slot, index)`` only."""
    if indices.dtype.is_floating_point or indices.dim() != 1:
        raise TypeError(
            f"dataset indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    idx = indices.long()
    if bool((idx < 0).any()):
        raise ValueError("dataset indices must be >= 0")
    base = fmix32(fmix32(int(seed) & _M32) ^ (int(slot) & _M32))
    return fmix32(fmix32(idx & _M32) ^ fmix32((idx >> 32) & _M32) ^ base)


def draw(keys: torch.Tensor, j: int) -> torch.Tensor:
    """The ``j``-th 32-bit random integer of each sample (``j`` = 0, 1, ... names independent draws)."""
    return fmix32((keys + (j * _GOLDEN & _M32)) & _M32)


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------
class ReplayTransform:
    """A batched augmentation whose random choices come from per-sample keys (:func:`sample_keys`).

    Subclasses implement :meth:`__call__` ``(inputs [B, ...], keys [B]) -> [B, ...]`` using only :func:`draw` for
    randomness, and :meth:`signature` (JSON-serialisable; stored in a teacher cache's manifest).
    """

    def __call__(self, inputs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signature(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.signature().items() if k != "name")
        return f"{type(self).__name__}({args})"


class RandomCrop(ReplayTransform):
    """Pad each side by ``padding`` and crop back to the input size at a random offset (each of the
    ``(2·padding + 1)²`` offsets equally likely); optionally flip horizontally with probability 1/2.

    Args:
        padding: pixels added on each side (the largest translation).
        padding_mode: ``"constant"`` (value ``fill``), ``"replicate"`` or ``"reflect"`` (as ``F.pad``).
        fill: the padding value for ``"constant"``. This package's datamodules normalise before augmenting, so 0 is
            the dataset's mean colour (torchvision pads the un-normalised image with black).
        flip: also flip horizontally with probability 1/2.
    """

    def __init__(self, padding: int, padding_mode: str = "constant", fill: float = 0.0, flip: bool = False) -> None:
        if int(padding) != padding or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        if padding_mode not in ("constant", "replicate", "reflect"):
            raise ValueError(f"padding_mode must be 'constant', 'replicate' or 'reflect', got {padding_mode!r}")
        self.padding = int(padding)
        self.padding_mode = padding_mode
        self.fill = float(fill)
        self.flip = bool(flip)

    def offsets(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's ``(top, left, flipped)``: the crop's corner in the padded image and whether it is flipped."""
        span = 2 * self.padding + 1
        top, left = draw(keys, 0) % span, draw(keys, 1) % span
        flipped = (draw(keys, 2) & 1).bool() if self.flip else torch.zeros_like(keys, dtype=torch.bool)
        return top, left, flipped

    def __call__(self, inputs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images [B, C, H, W], got shape {tuple(inputs.shape)}")
        if len(keys) != len(inputs):
            raise ValueError(f"{len(keys)} keys for a batch of {len(inputs)} samples")
        b, c, h, w = inputs.shape
        p = self.padding
        top, left, flipped = self.offsets(keys.to(inputs.device))
        if p == 0 and not self.flip:
            return inputs
        if p:
            pad = (p, p, p, p)
            if self.padding_mode == "constant":
                padded = F.pad(inputs, pad, mode="constant", value=self.fill)
            else:
                padded = F.pad(inputs, pad, mode=self.padding_mode)
        else:
            padded = inputs
        rows = top[:, None] + torch.arange(h, device=inputs.device)  # [B, H]
        span = torch.arange(w, device=inputs.device)
        cols = left[:, None] + torch.where(flipped[:, None], w - 1 - span, span)  # [B, W]
        # one gather over the flattened padded planes (several times faster than 4-D advanced indexing on CPU)
        flat = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.flatten(2).gather(2, flat).view(b, c, h, w)

    def signature(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "padding": self.padding,
            "padding_mode": self.padding_mode,
            "fill": self.fill,
            "flip": self.flip,
        }


class RandomShift(RandomCrop):
    """Translate by up to ``max_shift`` pixels in each direction, replicating the border (the seeded, batched
    counterpart of :class:`lightning_kd.data.digits.RandomShift`)."""

    def __init__(self, max_shift: int = 2) -> None:
        super().__init__(max_shift, padding_mode="replicate")

    def signature(self) -> dict[str, Any]:
        return {"name": "RandomShift", "max_shift": self.padding}


class RandomCropFlip(RandomCrop):
    """CIFAR's standard augmentation: pad ``padding`` pixels (``fill``), random crop back to size, random horizontal
    flip."""

    def __init__(self, padding: int = 4, fill: float = 0.0) -> None:
        super().__init__(padding, padding_mode="constant", fill=fill, flip=True)

    def signature(self) -> dict[str, Any]:
        return {"name": "RandomCropFlip", "padding": self.padding, "fill": self.fill}


# --------------------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------------------
class ReplayAugment(Callback):
    """Augment the training batch with a transform whose choices depend only on ``(seed, slot, dataset index)``.

    Args:
        transform: a :class:`ReplayTransform` (e.g. ``RandomShift(2)``, ``RandomCropFlip(4)``).
        seed: the augmentation seed (the Hydra app passes ``${seed}``).
        period: ``None``: every epoch is its own slot (a new view each epoch); ``P``: slot = ``epoch % P``, so the
            views repeat every ``P`` epochs (a teacher cache then needs ``P`` teacher passes in total).

    Example::

        >>> aug = ReplayAugment(RandomShift(2), seed=0, period=2)
        >>> x = torch.randn(4, 3, 8, 8)
        >>> a = aug.apply(x, torch.tensor([0, 1, 2, 3]), epoch=0)
        >>> b = aug.apply(x[[2, 0]], torch.tensor([2, 0]), epoch=2)   # same slot, other batch
        >>> torch.equal(a[[2, 0]], b)
        True
    """

    def __init__(self, transform: ReplayTransform, seed: int = 0, period: int | None = None) -> None:
        if not isinstance(transform, ReplayTransform):
            raise TypeError(
                "transform must be a ReplayTransform (RandomShift, RandomCropFlip, ...), got "
                f"{type(transform).__name__}"
            )
        if period is not None and (int(period) != period or period < 1):
            raise ValueError(f"period must be None (a new view every epoch) or an integer >= 1, got {period!r}")
        self.transform = transform
        self.seed = int(seed)
        self.period = None if period is None else int(period)

    def slot(self, epoch: int) -> int:
        """The augmentation slot of ``epoch``."""
        return int(epoch) if self.period is None else int(epoch) % self.period

    def signature(self) -> dict[str, Any]:
        """What determines each slot's views (JSON): the transform with its parameters and the seed. The period is
        not part of it: it only says which slot an epoch uses, and slot ``s`` shows the same views whatever it is."""
        return {"transform": self.transform.signature(), "seed": self.seed}

    def apply(self, inputs: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """The augmented view of ``inputs`` (samples ``indices`` of the dataset) in ``epoch``."""
        keys = sample_keys(indices.to(inputs.device), self.seed, self.slot(epoch))
        return self.transform(inputs, keys)

    def augment_batch(self, batch: Any, epoch: int) -> None:
        """Replace the inputs of ``batch`` (a list or a mutable mapping) by their view in ``epoch``, in place."""
        if isinstance(batch, (torch.Tensor, tuple)) or not isinstance(batch, (list, Mapping)):
            raise TypeError(
                f"ReplayAugment replaces the inputs of the batch in place, which needs a list [inputs, targets, "
                f"indices] or a dict with an input key and an 'index' key; got a {type(batch).__name__}. Return a "
                f"list (the default collate turns (input, target, index) samples into one) or a dict from your "
                f"dataloader's collate_fn"
            )
        inputs, _, indices = unpack_batch(batch)
        if indices is None:
            raise ValueError(
                "ReplayAugment needs each sample's dataset index in the batch (its augmentation is a function of the "
                "index): yield (input, target, index) samples (wrap your dataset in lightning_kd.data.IndexedDataset, "
                "as this package's datamodules do) or put an 'index' key in dict batches"
            )
        view = self.apply(inputs, indices, epoch)
        if isinstance(batch, list):
            batch[0] = view
        elif isinstance(batch, MutableMapping):
            batch[next(k for k in _INPUT_KEYS if k in batch)] = view
        else:
            raise TypeError(f"cannot replace the inputs of a read-only {type(batch).__name__} batch; use a dict")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.augment_batch(batch, trainer.current_epoch)

    def __repr__(self) -> str:
        return f"ReplayAugment({self.transform!r}, seed={self.seed}, period={self.period})"


__all__ = [
    "RandomCrop",
    "RandomCropFlip",
    "RandomShift",
    "ReplayAugment",
    "ReplayTransform",
    "draw",
    "fmix32",
    "sample_keys",
]
