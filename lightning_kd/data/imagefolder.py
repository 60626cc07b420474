"""Any folder of images arranged one sub-folder per class (torchvision ``ImageFolder``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_kd.data.base import ClassificationDataModule, TransformSubset, stratified_split

__all__ = ["ImageFolderDataModule"]

#: ImageNet per-channel mean / std of images in [0, 1], used for normalisation.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_LAYOUT_HELP = (
    "Expected either <root>/<class>/<image> (split 70/15/15 automatically) or "
    "<root>/train/<class>/<image> and <root>/val/<class>/<image> (optionally <root>/test/<class>/<image>). "
    "Fix: set data.root=<that folder>."
)


def _list_classes(directory: Path) -> list[str]:
    """Sorted class sub-folder names, exactly as :class:`torchvision.datasets.ImageFolder` finds them."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _image_files(directory: Path) -> list[Path]:
    """Sorted image files (by the extensions ImageFolder accepts) below ``directory``."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(directory, followlinks=True)
        for name in names
        if name.lower().endswith(IMG_EXTENSIONS)
    )


class ImageFolderDataModule(ClassificationDataModule):
    """Images on disk in class sub-folders, read with :class:`torchvision.datasets.ImageFolder`.

    Two layouts are accepted:

    * ``root/train``, ``root/val`` and optionally ``root/test`` (falls back to val), each holding
      one sub-folder per class; the class lists must agree;
    * otherwise ``root`` itself holds one sub-folder per class and is split 70/15/15, stratified,
      with ``seed``.

    Images are converted to RGB, resized to ``image_size`` x ``image_size`` and normalised with
    ImageNet statistics. With ``image_size=None`` images keep their native size, which must then
    be the same for all images (``input_shape`` reads it from the first train image).

    Args:
        root: Dataset folder (see the layouts above).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        image_size: Side of the square inputs; ``None`` keeps the native size.
        seed: Seed of the split (single-folder layout only).
        augment: Random horizontal flip on the train split.

    Attributes:
        classes: Sorted class names; ``num_classes`` is their count.
        layout: ``"split"`` (train/val[/test] folders) or ``"flat"`` (one folder, split here).
        split_indices: After :meth:`setup`, for the flat layout, positions of the
            ``train``/``val``/``test`` samples in ``ImageFolder(root).samples``.

    Raises:
        FileNotFoundError: ``root`` (or ``root/val`` in the split layout) is missing or has no
            class folders.
        ValueError: The split folders have different class lists.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = 32,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        self.root_arg = str(root)
        self.root = Path(root).expanduser().resolve()
        self.augment = bool(augment)
        self.in_chans = 3
        self.split_indices: dict[str, np.ndarray] | None = None
        self._num_images: dict[str, int] | None = None
        self._native: tuple[int, int] | None = None

        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} (data.root={self.root_arg!r}) does not exist. {_LAYOUT_HELP}"
            )
        if (self.root / "train").is_dir():
            self.layout = "split"
            val_dir = self.root / "val"
            if not val_dir.is_dir():
                raise FileNotFoundError(
                    f"{self.root / 'train'} exists but {val_dir} does not: the split layout needs a val folder. "
                    f"{_LAYOUT_HELP}"
                )
            test_dir = self.root / "test"
            self.split_dirs = {
                "train": self.root / "train",
                "val": val_dir,
                "test": test_dir if test_dir.is_dir() else val_dir,
            }
        else:
            self.layout = "flat"
            self.split_dirs = {"all": self.root}
        self.classes = self._check_classes()
        self.num_classes = len(self.classes)

    def _check_classes(self) -> list[str]:
        listed = {split: _list_classes(directory) for split, directory in self.split_dirs.items()}
        for split, names in listed.items():
            if not names:
                raise FileNotFoundError(f"no class folders found in {self.split_dirs[split]}. {_LAYOUT_HELP}")
        reference_split = next(iter(listed))
        reference = listed[reference_split]
        for split, names in listed.items():
            if names != reference:
                only_ref = sorted(set(reference) - set(names))
                only_here = sorted(set(names) - set(reference))
                raise ValueError(
                    f"class folders differ between {self.split_dirs[reference_split]} and {self.split_dirs[split]}: "
                    f"only in {reference_split}: {only_ref}; only in {split}: {only_here}"
                )
        return reference

    # ------------------------------------------------------------------ description
    def _native_size(self) -> tuple[int, int]:
        if self._native is None:
            first_dir = next(iter(self.split_dirs.values()))
            files = _image_files(first_dir / self.classes[0]) or _image_files(first_dir)
            if not files:
                raise FileNotFoundError(f"no images found in {first_dir}. {_LAYOUT_HELP}")
            with Image.open(files[0]) as image:
                width, height = image.size
            self._native = (height, width)
        return self._native

    def num_images(self) -> dict[str, int]:
        """Number of image files per folder (``train``/``val``/``test`` or ``all``), counted once."""
        if self._num_images is None:
            self._num_images = {split: len(_image_files(directory)) for split, directory in self.split_dirs.items()}
        return self._num_images

    def signature(self) -> dict[str, Any]:
        """Name, image size, split seed, resolved root, layout, classes, image counts and augmentation."""
        return {
            **super().signature(),
            "root": str(self.root),
            "layout": self.layout,
            "classes": list(self.classes),
            "num_images": self.num_images(),
            "augment": self.augment,
        }

    # ------------------------------------------------------------------ splits
    def _transform(self, train: bool) -> transforms.Compose:
        steps: list[Any] = []
        if self.image_size is not None:
            steps.append(transforms.Resize((self.image_size, self.image_size), antialias=True))
        if train and self.augment:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return transforms.Compose(steps)

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        if self.layout == "split":
            train = datasets.ImageFolder(str(self.split_dirs["train"]), transform=self._transform(True))
            val = datasets.ImageFolder(str(self.split_dirs["val"]), transform=self._transform(False))
            test = datasets.ImageFolder(str(self.split_dirs["test"]), transform=self._transform(False))
            return train, val, test
        full = datasets.ImageFolder(str(self.root))
        train_idx, val_idx, test_idx = stratified_split(
            full.targets, val_fraction=0.15, test_fraction=0.15, seed=self.seed
        )
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        return (
            TransformSubset(full, train_idx, self._transform(True)),
            TransformSubset(full, val_idx, self._transform(False)),
            TransformSubset(full, test_idx, self._transform(False)),
        )
