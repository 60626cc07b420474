"""Classes that LightningCLI configs in the tests name by ``class_path`` (``cli_models.CLIModule``...).

Importable by module name because pytest puts ``tests/`` on ``sys.path`` (no ``__init__.py``: rootdir conftest
insertion); a subprocess gets it through ``PYTHONPATH``.
"""

from __future__ import annotations

import lightning as L
from conftest import SmallCNN, UserModule, make_loader
from torch.utils.data import DataLoader


class CLIModule(UserModule):
    """The user's LightningModule (``UserModule``: CE + ``self.log`` + SGD over ``self.parameters()``) with
    CLI-friendly init args: a ``SmallCNN`` built from a seed instead of an ``nn.Module`` argument."""

    def __init__(self, lr: float = 0.05, classes: int = 10, seed: int = 0) -> None:
        super().__init__(SmallCNN(classes=classes, seed=seed), lr=lr)
        self.save_hyperparameters()


class SyntheticDataModule(L.LightningDataModule):
    """``(x, y, index)`` batches of learnable synthetic images (conftest's ``make_loader``)."""

    def __init__(self, n: int = 32, classes: int = 10, size: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.classes, self.size, self.batch_size = n, classes, size, batch_size

    def train_dataloader(self) -> DataLoader:
        return make_loader(n=self.n, classes=self.classes, size=self.size, batch=self.batch_size)
