"""A small, learnable, fully deterministic synthetic image dataset for tests and benchmarks."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_kd.data.base import ClassificationDataModule, TensorImageDataset, stratified_split

__all__ = ["SyntheticDataModule", "make_synthetic_images"]

#: Side of the random low-resolution pattern that is upsampled into each class prototype.
PROTOTYPE_GRID = 4


def make_synthetic_images(
    num_samples: int,
    num_classes: int,
    in_chans: int,
    image_size: int,
    noise_std: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generates class-prototype-plus-noise images, deterministically from ``seed``.

    Each class gets a smooth random prototype (a ``4x4`` gaussian pattern upsampled bilinearly to
    ``image_size`` and rescaled to unit standard deviation, plus a per-channel gaussian offset, so
    it survives pooling as well as linear read-out). Labels are balanced (``i % num_classes``,
    shuffled) and each sample is its prototype plus i.i.d. gaussian noise of ``noise_std``. The
    result is divided by ``sqrt(2 + noise_std**2)`` so inputs have roughly zero mean and unit
    variance per channel.

    Args:
        num_samples: Number of images.
        num_classes: Number of classes.
        in_chans: Channels per image.
        image_size: Side of the square images.
        noise_std: Standard deviation of the per-pixel noise.
        seed: Seed of the generator.

    Returns:
        ``FloatTensor[num_samples, in_chans, image_size, image_size]`` and ``LongTensor[num_samples]``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    grid = torch.randn(num_classes, in_chans, PROTOTYPE_GRID, PROTOTYPE_GRID, generator=generator)
    patterns = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    patterns = (patterns - patterns.mean(dim=(1, 2, 3), keepdim=True)) / patterns.std(dim=(1, 2, 3), keepdim=True)
    offsets = torch.randn(num_classes, in_chans, 1, 1, generator=generator)
    prototypes = patterns + offsets
    targets = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    noise = torch.randn(num_samples, in_chans, image_size, image_size, generator=generator)
    images = (prototypes[targets] + noise_std * noise) / math.sqrt(2.0 + noise_std**2)
    return images.float().contiguous(), targets.long()


class SyntheticDataModule(ClassificationDataModule):
    """Gaussian-noise samples around one random prototype image per class.

    The images and the stratified 70/15/15 train/val/test split are both drawn from ``seed``, so
    the data are identical across runs and machines; see :func:`make_synthetic_images`.

    Args:
        num_samples: Total number of images over the three splits.
        num_classes: Number of classes.
        image_size: Side of the square images (``None`` means 32; there is no native size).
        in_chans: Channels per image.
        noise_std: Standard deviation of the per-pixel noise added to the prototype.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the data and of the split.

    Attributes:
        split_indices: After :meth:`setup`, positions of the ``train``/``val``/``test`` samples in
            the generated tensor.
    """

    name = "synthetic"

    def __init__(
        self,
        num_samples: int = 512,
        num_classes: int = 10,
        image_size: int | None = 32,
        in_chans: int = 3,
        noise_std: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=32 if image_size is None else image_size,
            seed=seed,
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_samples < 3 * num_classes:
            raise ValueError(f"num_samples must be >= 3 * num_classes = {3 * num_classes}, got {num_samples}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.noise_std = float(noise_std)
        self.split_indices: dict[str, Any] | None = None

    def signature(self) -> dict[str, Any]:
        """Name, image size, seed, sample count, channels and noise level."""
        return {**super().signature(), "num_samples": self.num_samples, "noise_std": self.noise_std}

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        assert self.image_size is not None  # set in __init__
        images, targets = make_synthetic_images(
            self.num_samples, self.num_classes, self.in_chans, self.image_size, self.noise_std, self.seed
        )
        train, val, test = stratified_split(targets.numpy(), val_fraction=0.15, test_fraction=0.15, seed=self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}

        def subset(positions: Any) -> TensorImageDataset:
            index = torch.as_tensor(positions, dtype=torch.long)
            return TensorImageDataset(images[index], targets[index])

        return subset(train), subset(val), subset(test)
