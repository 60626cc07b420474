"""Shared fixtures: tiny timm models and in-memory data, and an isolated teacher store."""

from __future__ import annotations

import os

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _isolated_teacher_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_KD_CACHE", str(tmp_path_factory.getbasetemp() / "teacher-store"))


def make_loader(n: int = 32, classes: int = 10, size: int = 16, batch: int = 8, seed: int = 0) -> DataLoader:
    """(x, y, index) batches of learnable synthetic data."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x = protos[y] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch)


def tiny(name: str = "resnet18", classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=classes)


def fast_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def layer_batch(term, student: list[torch.Tensor], teacher: list[torch.Tensor]):
    """A DistillBatch carrying one tensor per matched layer under the term's own taps (dummy logits)."""
    from lightning_kd.losses.base import DistillBatch, ModelOutputs

    b = len(student[0])
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), dict(zip(term.student_taps, student))),
        ModelOutputs(torch.zeros(b, 3), dict(zip(term.teacher_taps, teacher))),
    )


def total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of a term's named parts."""
    return sum(parts.values())
