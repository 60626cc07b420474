"""scikit-learn's bundled handwritten digits (no download needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from lightning_kd.data.base import ClassificationDataModule, TensorImageDataset, stratified_split

__all__ = ["DigitsDataModule", "RandomShift"]

#: Mean of the pixel values scaled to [0, 1], over all 1,797 images at 8x8 (same for each channel).
DIGITS_MEAN: tuple[float, float, float] = (0.3053, 0.3053, 0.3053)
#: Standard deviation of the pixel values scaled to [0, 1], over all images at 8x8 (same for each channel).
DIGITS_STD: tuple[float, float, float] = (0.3760, 0.3760, 0.3760)

#: Native side of the images.
DIGITS_NATIVE_SIZE = 8
#: Number of images in the dataset.
DIGITS_NUM_SAMPLES = 1797


class RandomShift:
    """Randomly translates a ``[C, H, W]`` tensor by up to ``max_shift`` pixels in each direction.

    Pads by ``max_shift`` (replicating the border) and crops back to the original size at a
    random offset.

    Args:
        max_shift: Largest translation, in pixels.
    """

    def __init__(self, max_shift: int = 2) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.max_shift == 0:
            return image
        pad = self.max_shift
        _, height, width = image.shape
        padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode="replicate").squeeze(0)
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        return padded[:, top : top + height, left : left + width]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_shift={self.max_shift})"


class DigitsDataModule(ClassificationDataModule):
    """The 1,797 real 8x8 greyscale digit images of :func:`sklearn.datasets.load_digits`, 10 classes.

    Pixel values 0..16 are scaled to [0, 1], the grey channel is repeated to 3 channels, the images
    are resized once with bilinear interpolation to ``image_size`` (``None`` keeps 8x8) and
    normalised with :data:`DIGITS_MEAN` / :data:`DIGITS_STD`. The whole tensor is precomputed in
    :meth:`setup`. The split is a fixed stratified 70/15/15 train/val/test split (1257/270/270
    images) drawn with ``seed``.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        image_size: Side of the square inputs; ``None`` keeps the native 8x8.
        seed: Seed of the split.
        augment: Randomly translate train images by up to 2 pixels.

    Attributes:
        split_indices: After :meth:`setup`, positions of the ``train``/``val``/``test`` samples in
            the arrays returned by :func:`~sklearn.datasets.load_digits`.
    """

    name = "digits"

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = 32,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        self.augment = bool(augment)
        self.num_classes = 10
        self.in_chans = 3
        self.split_indices: dict[str, np.ndarray] | None = None

    def _native_size(self) -> tuple[int, int]:
        return (DIGITS_NATIVE_SIZE, DIGITS_NATIVE_SIZE)

    def signature(self) -> dict[str, Any]:
        """Name, image size, split seed, dataset size, split fractions and augmentation."""
        return {
            **super().signature(),
            "num_samples": DIGITS_NUM_SAMPLES,
            "split": [0.7, 0.15, 0.15],
            "augment": self.augment,
        }

    def _load_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns normalised images ``[N, 3, H, W]`` and labels ``[N]``."""
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        _, height, width = self.input_shape
        if (height, width) != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
        images = images.repeat(1, self.in_chans, 1, 1)
        mean = torch.tensor(DIGITS_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(DIGITS_STD, dtype=torch.float32).view(1, -1, 1, 1)
        images = ((images - mean) / std).contiguous()
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        return images, targets

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        images, targets = self._load_tensors()
        train, val, test = stratified_split(targets.numpy(), val_fraction=0.15, test_fraction=0.15, seed=self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}

        def subset(positions: np.ndarray, transform: RandomShift | None = None) -> TensorImageDataset:
            index = torch.as_tensor(positions, dtype=torch.long)
            return TensorImageDataset(images[index], targets[index], transform=transform)

        return subset(train, RandomShift(2) if self.augment else None), subset(val), subset(test)
