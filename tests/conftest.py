"""Shared fixtures: tiny timm models and in-memory data, and an isolated teacher store."""

from __future__ import annotations

import os

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get(
    "PYTEST_XDIST_WORKER"
):  # pytest -n 2: one intra-op thread per worker, so workers do not oversubscribe
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_teacher_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_KD_CACHE", str(tmp_path_factory.getbasetemp() / "teacher-store"))


#: Hydra overrides for a seconds-long in-process or subprocess run of the app: synthetic data, two training steps.
TINY_APP = [
    "data=synthetic",
    "data.num_samples=64",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "progress_bar=none",
]


def make_loader(n: int = 32, classes: int = 10, size: int = 16, batch: int = 8, seed: int = 0) -> DataLoader:
    """(x, y, index) batches of learnable synthetic data."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x = protos[y] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch)


def random_data(n: int = 8, size: int = 32, classes: int = 10, batch: int = 4) -> DataLoader:
    """(x, y, index) batches of random images, labels cycling through the classes (for a few smoke steps)."""
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size), y, torch.arange(n)), batch_size=batch)


def fit_pair(loss, teacher: str = "resnet34", n: int = 8, size: int = 32, steps: int = 1) -> tuple:
    """Fit ``DistillationModule(timm resnet18, timm <teacher>, loss)`` for ``steps`` steps on random
    (x, y, index) data; returns ``(module, trainer)``."""
    import lightning_kd

    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    module = lightning_kd.DistillationModule(student, timm.create_model(teacher, num_classes=10), loss=loss)
    trainer = fast_trainer(max_steps=steps)
    trainer.fit(module, random_data(n=n, size=size))
    return module, trainer


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


class GapNet(torch.nn.Module):
    """A tiny timm-like CNN: ``features`` (3×3 conv + ReLU) → global pooling → ``fc``, with ``forward_head`` and
    ``get_classifier`` (for terms that reuse a classifier or recompute class scores from the last map)."""

    def __init__(self, channels: int = 4, classes: int = 5, seed: int = 0, stride: int = 1, pool: str = "avg") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, stride=stride, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(channels, classes)
        self.pool = pool

    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3)) if self.pool == "avg" else a.amax(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.fc


class SmallCNN(torch.nn.Module):
    """conv(3→8) · ReLU · conv(8→16, stride 2) · ReLU · global average pool · fc(16→classes); no BatchNorm, so a
    batch of 2b samples and two accumulated batches of b give the same gradient."""

    def __init__(self, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class UserModule(L.LightningModule):
    """A LightningModule written the way users write them, knowing nothing of distillation: its own
    ``training_step`` (cross-entropy, ``self.log``) and ``configure_optimizers`` (SGD over ``self.parameters()``)."""

    def __init__(self, net: torch.nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net if net is not None else SmallCNN()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("user/ce", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


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
