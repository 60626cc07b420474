"""Models through timm, weights through torch.load(weights_only=True), and the teacher store."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny

from lightning_kd.models import (
    CheckpointError,
    UnknownModelError,
    create_model,
    load_model_file,
    save_model_file,
)
from lightning_kd.teacher_store import TeacherStore


def test_create_model_any_timm_name() -> None:
    model = create_model("mobilenetv3_small_050", 7, drop_rate=None)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet1800'.*resnet18"):
        create_model("resnet1800", 10)


@pytest.mark.parametrize("prefix", ["", "model.", "student."])
def test_checkpoint_round_trip_with_prefixes(tmp_path, prefix) -> None:
    source = tiny("resnet18", seed=4)
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = create_model("resnet18", 10, checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_checkpoint_of_other_architecture(tmp_path) -> None:
    path = tmp_path / "r34.pt"
    torch.save(tiny("resnet34").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'resnet18'.*unexpected key"):
        create_model("resnet18", 10, checkpoint=path)


def test_checkpoint_of_other_class_count(tmp_path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(tiny("resnet18", classes=100).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \[100, 512\] vs model \[10, 512\]"):
        create_model("resnet18", 10, checkpoint=path)


@dataclasses.dataclass
class Arbitrary:
    payload: int = 1


def test_checkpoint_needing_pickled_code_is_refused(tmp_path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": tiny().state_dict(), "extra": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match=r"refused.*weights_only=True"):
        create_model("resnet18", 10, checkpoint=path)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("resnet18", 10, checkpoint=tmp_path / "nope.ckpt")


def test_model_file_and_store(tmp_path) -> None:
    store = TeacherStore(tmp_path)
    key = {"data": {"name": "digits"}, "seed": 0, "epochs": 2}
    assert store.load("resnet18", key) is None
    model = tiny("resnet18", seed=2)
    path = store.save(model, "resnet18", key, {"num_classes": 10})
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    loaded, meta = store.load("resnet18", key)
    assert meta["model"] == "resnet18" and meta["num_classes"] == 10
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert store.load("resnet18", {**key, "seed": 1}) is None  # another key, another teacher
    torch.load(path, weights_only=True)
    path.write_bytes(b"corrupt")
    assert store.load("resnet18", key) is None  # a corrupt entry is retrained, not trusted


def test_model_file_without_metadata(tmp_path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not say which architecture"):
        load_model_file(path)
    save_model_file(tiny(), tmp_path / "ok.pt", {"model": "resnet18", "num_classes": 10})
    assert load_model_file(tmp_path / "ok.pt")[1]["model"] == "resnet18"
