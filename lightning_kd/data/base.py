"""Shared building blocks for the classification datamodules.

Every datamodule in :mod:`lightning_kd.data` derives from :class:`ClassificationDataModule` and
yields batches ``(inputs, targets, indices)``:

* ``inputs``: ``FloatTensor[B, C, H, W]``, normalised per channel;
* ``targets``: ``LongTensor[B]`` class labels;
* ``indices``: ``LongTensor[B]`` position of each sample inside its split dataset
  (see :class:`IndexedDataset`), so that per-sample quantities such as cached teacher
  outputs can be looked up.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ClassificationDataModule",
    "IndexedDataset",
    "TensorImageDataset",
    "TransformSubset",
    "stratified_split",
]

Transform = Callable[[Any], Any]


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(input, target)`` pairs so that items also carry their index.

    Args:
        dataset: Any map-style dataset whose items are ``(input, target)``.

    Example:
        >>> ds = IndexedDataset([(torch.zeros(1), 3)])
        >>> ds[0]
        (tensor([0.]), 3, 0)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        """Returns ``(input, target, index)``; the index is a Python int (collates to ``LongTensor``)."""
        inputs, target = self.dataset[index]
        return inputs, target, int(index)


class TensorImageDataset(Dataset):
    """In-memory image dataset backed by two tensors.

    Args:
        images: ``FloatTensor[N, C, H, W]`` (already normalised).
        targets: Integer tensor ``[N]`` of class labels.
        transform: Optional callable applied to each image tensor on access (e.g. augmentation).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Transform | None = None) -> None:
        if len(images) != len(targets):
            raise ValueError(f"images ({len(images)}) and targets ({len(targets)}) differ in length")
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class TransformSubset(Dataset):
    """A subset of a dataset of ``(input, target)`` pairs with its own input transform.

    Lets several splits share one underlying dataset (loaded once, with no transform) while
    each split applies its own preprocessing, e.g. augmentation on train only.

    Args:
        dataset: Map-style dataset whose items are ``(input, target)``.
        indices: Positions in ``dataset`` that make up the subset.
        transform: Optional callable applied to each input.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Transform | None = None) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        inputs, target = self.dataset[self.indices[index]]
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, int(target)


def stratified_split(
    targets: Sequence[int] | np.ndarray,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits sample positions into train/val/test, stratified by class.

    Two calls to :func:`sklearn.model_selection.train_test_split`: first the hold-out
    (val + test) is split off the train part, then the hold-out is split into val and test.
    If the data are too small to stratify (a class with too few samples), a warning is issued
    and the split falls back to a plain seeded random split.

    Args:
        targets: Class label of every sample.
        val_fraction: Fraction of all samples that goes to val.
        test_fraction: Fraction of all samples that goes to test.
        seed: ``random_state`` for both calls.

    Returns:
        Sorted positions ``(train, val, test)`` into ``targets``; disjoint, covering every sample.
    """
    labels = np.asarray(targets)
    positions = np.arange(len(labels))
    holdout = val_fraction + test_fraction
    if not (0.0 < val_fraction and 0.0 < test_fraction and holdout < 1.0):
        raise ValueError(
            f"need 0 < val_fraction, 0 < test_fraction and their sum < 1, got {val_fraction}, {test_fraction}"
        )
    try:
        train, rest = train_test_split(positions, test_size=holdout, stratify=labels, random_state=seed)
        val, test = train_test_split(rest, test_size=test_fraction / holdout, stratify=labels[rest], random_state=seed)
    except ValueError as err:
        warnings.warn(f"cannot stratify the split ({err}); falling back to a non-stratified split", stacklevel=2)
        train, rest = train_test_split(positions, test_size=holdout, random_state=seed)
        val, test = train_test_split(rest, test_size=test_fraction / holdout, random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


class ClassificationDataModule(L.LightningDataModule):
    """Base class of the image-classification datamodules.

    Subclasses set the class attribute ``name``, set ``num_classes`` and ``in_chans`` in their
    constructor, implement :meth:`_build_splits` (and :meth:`_native_size` when ``image_size`` may be
    ``None``) and extend :meth:`signature` with whatever identifies their data.

    Args:
        batch_size: Samples per batch, for every split.
        num_workers: DataLoader worker processes (``0`` loads in the main process).
        image_size: Side of the square inputs; ``None`` keeps the dataset's native size.
        seed: Seed of the train/val/test split (not of training).

    Attributes:
        train_set: Train split as an :class:`IndexedDataset`, built by :meth:`setup`.
        val_set: Validation split, built by :meth:`setup`.
        test_set: Test split, built by :meth:`setup`.
    """

    name: str = "base"

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.image_size = None if image_size is None else int(image_size)
        self.seed = int(seed)
        self.num_classes: int = 0
        self.in_chans: int = 3
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None

    # ------------------------------------------------------------------ description
    def _native_size(self) -> tuple[int, int]:
        """Native ``(H, W)`` of the dataset, used when ``image_size`` is ``None``."""
        raise NotImplementedError(f"{type(self).__name__} has no native size; set image_size")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one input, known right after construction."""
        if self.image_size is None:
            height, width = self._native_size()
        else:
            height = width = self.image_size
        return (self.in_chans, height, width)

    def signature(self) -> dict[str, Any]:
        """JSON-serialisable description of the data, used as a cache key.

        It identifies what the data are (name, image size, split seed, and subclass-specific
        fields such as sizes or the root folder); it never depends on ``batch_size`` or
        ``num_workers``.
        """
        return {
            "name": self.name,
            "image_size": self.image_size,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
        }

    # ------------------------------------------------------------------ splits
    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Builds the ``(train, val, test)`` datasets of ``(input, target)`` pairs."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Builds ``train_set``, ``val_set`` and ``test_set`` (all stages at once; idempotent)."""
        if self.train_set is not None:
            return
        train, val, test = self._build_splits()
        self.train_set = IndexedDataset(train)
        self.val_set = IndexedDataset(val)
        self.test_set = IndexedDataset(test)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: IndexedDataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before requesting dataloaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches; drops the last incomplete batch when the set exceeds one batch."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, train=False)
