"""timm without its import-time ``import wandb``.

timm imports wandb when it is imported (``timm/utils/summary.py``: ``try: import wandb``), about 1 s, although only
``logger=wandb`` needs it here. :func:`import_timm` imports timm with wandb hidden and gives ``timm.utils.summary`` a
proxy that imports wandb on first use, so timm's own ``update_summary(log_wandb=True)`` still works.
(``importlib.util.LazyLoader`` does not help: the import system reads ``wandb.__spec__`` on timm's ``import wandb``,
which loads a lazy module.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Any


class ModuleProxy:
    """Stands for module ``name``; imports it on the first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<ModuleProxy of {self._name!r}, imported on first use>"


def import_timm() -> None:
    """Import timm without importing wandb (see the module docstring). A no-op when timm or wandb is already
    imported."""
    if "timm" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]  # "import wandb" raises ImportError while timm loads
    try:
        import timm.utils.summary
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    if wandb_installed():
        timm.utils.summary.wandb = ModuleProxy("wandb")


def wandb_installed() -> bool:
    """Whether the wandb distribution is installed (package metadata only: nothing is imported)."""
    try:
        importlib.metadata.distribution("wandb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def is_loaded(name: str) -> bool:
    """Whether module ``name`` has been imported."""
    return sys.modules.get(name) is not None
