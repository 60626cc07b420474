"""Tests of the datamodules in :mod:`lightning_kd.data` (CPU, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from lightning_kd.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassificationDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    IndexedDataset,
    SyntheticDataModule,
)


def _check_batch(dm: ClassificationDataModule, batch: tuple[torch.Tensor, ...], batch_size: int) -> None:
    assert isinstance(batch, (list, tuple)) and len(batch) == 3
    x, y, idx = batch
    assert x.dtype == torch.float32 and y.dtype == torch.long and idx.dtype == torch.long
    assert x.shape == (batch_size, *dm.input_shape)
    assert y.shape == (batch_size,) and idx.shape == (batch_size,)
    assert int(y.min()) >= 0 and int(y.max()) < dm.num_classes


# ---------------------------------------------------------------------------- base
def test_indexed_dataset_returns_index() -> None:
    base = TensorDataset(torch.arange(6, dtype=torch.float32).view(6, 1), torch.arange(6) % 2)
    ds = IndexedDataset(base)
    assert len(ds) == 6
    x, y, i = ds[4]
    assert float(x) == 4.0 and int(y) == 0 and i == 4 and isinstance(i, int)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[2].dtype == torch.long and batch[2].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_digits_sizes_disjoint_stratified(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    sets = {"train": digits.train_set, "val": digits.val_set, "test": digits.test_set}
    assert sum(len(s) for s in sets.values()) == 1797
    assert [len(s) for s in sets.values()] == [1257, 270, 270]
    split = digits.split_indices
    assert split is not None
    all_idx = np.concatenate([split["train"], split["val"], split["test"]])
    assert len(np.unique(all_idx)) == 1797  # disjoint and complete
    for name, ds in sets.items():
        assert len(split[name]) == len(ds)
        assert set(labels[split[name]].tolist()) == set(range(10)), name  # every class in every split
        # the split's labels are those of the original arrays at the recorded positions
        assert [ds[i][1] for i in range(0, len(ds), 37)] == labels[split[name]][::37].tolist()


def test_digits_batches(digits: DigitsDataModule) -> None:
    assert digits.name == "digits" and digits.num_classes == 10 and digits.in_chans == 3
    assert digits.input_shape == (3, 32, 32)
    train_batches = list(digits.train_dataloader())
    assert len(train_batches) == 1257 // 32  # drop_last
    for batch in train_batches[:2]:
        _check_batch(digits, batch, 32)
    seen = torch.cat([b[2] for b in digits.val_dataloader()])
    assert seen.tolist() == list(range(270))  # val: no shuffle, every sample once
    _check_batch(digits, next(iter(digits.test_dataloader())), 32)


def test_digits_setup_idempotent(digits: DigitsDataModule) -> None:
    train = digits.train_set
    digits.setup("test")
    assert digits.train_set is train


def test_digits_native_size() -> None:
    dm = DigitsDataModule(image_size=None, batch_size=16)
    assert dm.input_shape == (3, 8, 8)  # before setup
    dm.setup()
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 8, 8)
    # normalised: roughly zero mean, unit variance over the train split
    images = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert abs(float(images.mean())) < 0.1 and 0.8 < float(images.std()) < 1.2


def test_digits_determinism_and_seed(digits: DigitsDataModule) -> None:
    same = DigitsDataModule(batch_size=32, seed=0)
    same.setup()
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(same.split_indices[name], digits.split_indices[name])
    torch.testing.assert_close(same.train_set[5][0], digits.train_set[5][0])
    other = DigitsDataModule(batch_size=32, seed=1)
    other.setup()
    assert not np.array_equal(other.split_indices["val"], digits.split_indices["val"])


def test_digits_augment_only_on_train() -> None:
    dm = DigitsDataModule(augment=True, image_size=16)
    dm.setup()
    torch.manual_seed(0)
    draws = [dm.train_set[0][0] for _ in range(8)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_digits_signature() -> None:
    sig = DigitsDataModule().signature()
    json.dumps(sig)
    assert sig["name"] == "digits"
    assert DigitsDataModule(batch_size=7, num_workers=1).signature() == sig
    assert DigitsDataModule(image_size=16).signature() != sig
    assert DigitsDataModule(seed=3).signature() != sig


# ---------------------------------------------------------------------------- cifar
@pytest.mark.parametrize(
    ("cls", "folder", "classes"),
    [(CIFAR10DataModule, "cifar-10-batches-py", 10), (CIFAR100DataModule, "cifar-100-python", 100)],
)
def test_cifar_missing_data_raises(tmp_path: Path, cls: type, folder: str, classes: int) -> None:
    root = tmp_path / "nowhere"
    dm = cls(root=str(root), download=False)
    assert dm.num_classes == classes and dm.input_shape == (3, 32, 32)
    assert cls(root=str(root), image_size=None).input_shape == (3, 32, 32)
    json.dumps(dm.signature())
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(root) in message and "download" in message and folder in message
    assert not root.exists()  # nothing was downloaded or created


def _write_fake_cifar10(root: Path, per_batch: int = 40, test_size: int = 30) -> None:
    """Writes tiny files in the CIFAR-10 python format (their checksums are not the real ones)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 255, size=(n, 3072), dtype=np.uint8), "labels": [k % 10 for k in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))


def test_cifar_splits_with_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fake files, fake checksums
    _write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=50, batch_size=8, image_size=16)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (150, 50, 30)
    split = dm.split_indices
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert {dm.val_set[i][1] for i in range(len(dm.val_set))} == set(range(10))  # stratified hold-out
    _check_batch(dm, next(iter(dm.train_dataloader())), 8)
    _check_batch(dm, next(iter(dm.test_dataloader())), 8)
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # no augmentation outside train


def test_cifar_val_size_zero_is_the_published_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """val_size=0: every official train image trains, and validation runs on the official test set (RepDistiller /
    mdistiller protocol), without augmentation."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    _write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=0, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 30, 30)
    assert torch.equal(dm.val_set[3][0], dm.test_set[3][0]) and dm.val_set[3][1] == dm.test_set[3][1]
    assert dm.signature()["val_size"] == 0
    with pytest.raises(ValueError, match="val_size must be 0"):
        CIFAR10DataModule(root="somewhere", val_size=-1)


def test_cifar_signature() -> None:
    sig = CIFAR10DataModule(root="somewhere").signature()
    assert sig["name"] == "cifar10" and sig["val_size"] == 5000
    assert CIFAR10DataModule(root="somewhere", batch_size=3).signature() == sig
    assert CIFAR10DataModule(root="somewhere", seed=1).signature() != sig
    assert CIFAR10DataModule(root="somewhere", image_size=64).input_shape == (3, 64, 64)
    with pytest.raises(ValueError):
        CIFAR100DataModule(root="somewhere", val_size=50)


# ---------------------------------------------------------------------------- imagefolder
def _write_images(directory: Path, classes: list[str], per_class: int, size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (directory / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c % 3] = 255  # a class colour
            mode_image = Image.fromarray(pixels)
            if k % 3 == 0:
                mode_image = mode_image.convert("L")  # greyscale files are converted to RGB
            mode_image.save(directory / name / f"img{k}.png")


def test_imagefolder_flat_layout(tmp_path: Path) -> None:
    _write_images(tmp_path, ["cat", "dog", "emu"], per_class=10)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=4)
    assert dm.layout == "flat" and dm.num_classes == 3 and dm.classes == ["cat", "dog", "emu"]
    assert dm.input_shape == (3, 16, 16)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 30 and sizes[0] == 21
    split = dm.split_indices
    assert len(np.unique(np.concatenate(list(split.values())))) == 30
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert {ds[i][1] for i in range(len(ds))} == {0, 1, 2}  # stratified
    _check_batch(dm, next(iter(dm.train_dataloader())), 4)
    # the seed drives the split
    other = ImageFolderDataModule(root=str(tmp_path), image_size=16, seed=5)
    other.setup()
    assert not np.array_equal(other.split_indices["train"], split["train"])
    # native size (all images 12 wide, 10 high)
    native = ImageFolderDataModule(root=str(tmp_path), image_size=None, batch_size=2)
    assert native.input_shape == (3, 10, 12)
    native.setup()
    _check_batch(native, next(iter(native.val_dataloader())), 2)
    sig = dm.signature()
    json.dumps(sig)
    assert sig["num_images"] == {"all": 30} and sig["root"] == str(tmp_path.resolve())
    assert ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=9).signature() == sig


def test_imagefolder_split_layout(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", ["a", "b"], per_class=4)
    _write_images(tmp_path / "val", ["a", "b"], per_class=2)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=3, augment=True)
    assert dm.layout == "split" and dm.num_classes == 2
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 4, 4)  # test falls back to val
    _check_batch(dm, next(iter(dm.train_dataloader())), 3)
    assert len(list(dm.train_dataloader())) == 2  # drop_last
    _write_images(tmp_path / "test", ["a", "b"], per_class=3)
    with_test = ImageFolderDataModule(root=str(tmp_path), image_size=8)
    with_test.setup()
    assert len(with_test.test_set) == 6
    _write_images(tmp_path / "test", ["c"], per_class=1)
    with pytest.raises(ValueError, match="'c'"):
        ImageFolderDataModule(root=str(tmp_path))


def test_imagefolder_missing(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(root=str(missing))
    assert str(missing) in str(info.value) and "data.root" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataModule(root=str(empty))
    only_train = tmp_path / "only_train"
    _write_images(only_train / "train", ["a"], per_class=1)
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolderDataModule(root=str(only_train))


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism() -> None:
    dm = SyntheticDataModule(num_samples=200, num_classes=4, image_size=None, in_chans=2, batch_size=16, seed=3)
    assert dm.input_shape == (2, 32, 32) and dm.num_classes == 4 and dm.name == "synthetic"
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 200
    _check_batch(dm, next(iter(dm.train_dataloader())), 16)
    again = SyntheticDataModule(num_samples=200, num_classes=4, image_size=None, in_chans=2, seed=3)
    again.setup()
    torch.testing.assert_close(again.val_set[7][0], dm.val_set[7][0])
    assert again.val_set[7][1] == dm.val_set[7][1]
    other = SyntheticDataModule(num_samples=200, num_classes=4, image_size=None, in_chans=2, seed=4)
    other.setup()
    assert not torch.equal(other.val_set[7][0], dm.val_set[7][0])
    assert dm.signature() == again.signature() != other.signature()
    json.dumps(dm.signature())


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_samples=400, num_classes=10, image_size=16, batch_size=32, seed=0)
    dm.setup()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 0
    while steps < 30:
        for x, y, _ in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            if steps == 30:
                break
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in dm.val_dataloader())
    accuracy = correct / len(dm.val_set)
    assert accuracy > 0.5, accuracy  # chance is 0.1
