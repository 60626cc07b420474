"""Datamodules for image classification that yield ``(inputs, targets, indices)`` batches.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (no download);
* :class:`CIFAR10DataModule` / :class:`CIFAR100DataModule`: torchvision CIFAR;
* :class:`ImageFolderDataModule`: any folder of images with one sub-folder per class;
* :class:`SyntheticDataModule`: deterministic prototype-plus-noise images for tests and benchmarks.
"""

from lightning_kd.data.base import ClassificationDataModule, IndexedDataset
from lightning_kd.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_kd.data.digits import DigitsDataModule
from lightning_kd.data.imagefolder import ImageFolderDataModule
from lightning_kd.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "IndexedDataset",
    "SyntheticDataModule",
]
