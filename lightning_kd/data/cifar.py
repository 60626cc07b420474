"""CIFAR-10 and CIFAR-100 through :mod:`torchvision.datasets`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from lightning_kd.data.base import ClassificationDataModule, TransformSubset

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule"]

#: Per-channel mean / std of the CIFAR-10 train images in [0, 1].
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Per-channel mean / std of the CIFAR-100 train images in [0, 1].
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

#: Native side of the images and size of the official train split (both datasets).
CIFAR_NATIVE_SIZE = 32
CIFAR_TRAIN_SIZE = 50_000


class CIFARDataModule(ClassificationDataModule):
    """Common implementation of the CIFAR datamodules (use a subclass).

    The official train set is split into train and a fixed, seeded, stratified hold-out of
    ``val_size`` images (the val split); the official test set is the test split. ``val_size=0``
    trains on all 50,000 images and validates on the test set: the protocol of the published
    CIFAR-100 distillation tables (RepDistiller, mdistiller), which is not a clean hold-out. Images are
    resized to ``image_size`` when it is not 32 (``None`` keeps 32x32) and normalised with the
    dataset's per-channel statistics.

    Args:
        root: Folder containing the extracted dataset folder (``cifar-10-batches-py`` or
            ``cifar-100-python``); the download target when ``download`` is true.
        download: Download the data into ``root`` in :meth:`prepare_data` when absent.
        val_size: Images held out from the official train set for validation; 0 validates on the
            test set (published-protocol reproductions only).
        augment: Random crop (32, padding 4) and horizontal flip on the train split.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        image_size: Side of the square inputs; ``None`` keeps the native 32x32.
        seed: Seed of the train/val split.

    Attributes:
        split_indices: After :meth:`setup`, positions of the ``train``/``val`` samples in the
            official train set.
    """

    dataset_cls: ClassVar[type[datasets.CIFAR10]]
    folder: ClassVar[str]
    pretty_name: ClassVar[str]
    required_files: ClassVar[tuple[str, ...]]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    classes: ClassVar[int]

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        self.num_classes = self.classes
        self.in_chans = 3
        if not (val_size == 0 or self.num_classes <= val_size < CIFAR_TRAIN_SIZE):
            raise ValueError(
                f"val_size must be 0 (validate on the test set) or between {self.num_classes} (one image per "
                f"class) and {CIFAR_TRAIN_SIZE - 1}, got {val_size}"
            )
        self.root_arg = str(root)
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)
        self.val_size = int(val_size)
        self.augment = bool(augment)
        self.split_indices: dict[str, np.ndarray] | None = None

    def _native_size(self) -> tuple[int, int]:
        return (CIFAR_NATIVE_SIZE, CIFAR_NATIVE_SIZE)

    def signature(self) -> dict[str, Any]:
        """Name, image size, split seed, val size, resolved root and augmentation."""
        return {
            **super().signature(),
            "root": str(self.root),
            "train_size": CIFAR_TRAIN_SIZE - self.val_size,
            "val_size": self.val_size,
            "augment": self.augment,
        }

    # ------------------------------------------------------------------ presence
    def is_present(self) -> bool:
        """Whether the extracted dataset folder (with its batch files) exists under ``root``."""
        folder = self.root / self.folder
        return folder.is_dir() and all((folder / name).is_file() for name in self.required_files)

    def _missing_error(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.pretty_name} data not found: expected the folder '{self.folder}' "
            f"(with {', '.join(self.required_files)}) under {self.root} (data.root={self.root_arg!r}). "
            f"Fix: set data.download=true to download it there, or "
            f"data.root=<dir containing {self.folder}>."
        )

    def _ensure_present(self) -> None:
        if self.is_present():
            return
        if not self.download:
            raise self._missing_error()
        self.root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            self.dataset_cls(str(self.root), train=train, download=True)
        if not self.is_present():
            raise self._missing_error()

    def prepare_data(self) -> None:
        """Checks that the data are present, downloading them first when ``download`` is true.

        Raises:
            FileNotFoundError: The data are absent and ``download`` is false.
        """
        self._ensure_present()

    # ------------------------------------------------------------------ splits
    def _transform(self, train: bool) -> transforms.Compose:
        steps: list[Any] = []
        if train and self.augment:
            steps += [transforms.RandomCrop(CIFAR_NATIVE_SIZE, padding=4), transforms.RandomHorizontalFlip()]
        _, height, width = self.input_shape
        if (height, width) != (CIFAR_NATIVE_SIZE, CIFAR_NATIVE_SIZE):
            steps.append(transforms.Resize((height, width), antialias=True))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        # Checked here too: setup() may run without prepare_data() (e.g. outside a Trainer).
        self._ensure_present()
        official_train = self.dataset_cls(str(self.root), train=True, download=False)
        official_test = self.dataset_cls(str(self.root), train=False, download=False, transform=self._transform(False))
        targets = np.asarray(official_train.targets)
        if self.val_size == 0:  # the published tables' protocol: all train images, validation on the test set
            self.split_indices = {"train": np.arange(len(targets)), "val": np.arange(0)}
            return (
                TransformSubset(official_train, np.arange(len(targets)), self._transform(True)),
                official_test,
                official_test,
            )
        train_idx, val_idx = train_test_split(
            np.arange(len(targets)), test_size=self.val_size, stratify=targets, random_state=self.seed
        )
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
        self.split_indices = {"train": train_idx, "val": val_idx}
        train = TransformSubset(official_train, train_idx, self._transform(True))
        val = TransformSubset(official_train, val_idx, self._transform(False))
        return train, val, official_test


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 60,000 32x32 colour images in 10 classes (see :class:`CIFARDataModule`)."""

    name = "cifar10"
    dataset_cls = datasets.CIFAR10
    folder = "cifar-10-batches-py"
    pretty_name = "CIFAR-10"
    required_files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    classes = 10


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 60,000 32x32 colour images in 100 classes (see :class:`CIFARDataModule`)."""

    name = "cifar100"
    dataset_cls = datasets.CIFAR100
    folder = "cifar-100-python"
    pretty_name = "CIFAR-100"
    required_files = ("train", "test")
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    classes = 100
