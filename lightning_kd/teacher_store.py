"""Teacher store
^^^^^^^^^^^^^^^

When a run is given no teacher weights, it trains the teacher first and keeps it here, keyed by
``(teacher name, data signature, seed, epochs, ...)``, so the next run with the same key reuses it. Files are written
atomically (temporary file + ``os.replace``) and read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_kd.models import CheckpointError, load_model_file, save_model_file


def teacher_key(**parts: Any) -> str:
    """A short stable hash of the JSON-serialised key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class TeacherStore:
    """Trained teachers under ``root/teachers/<name>-<key>.pt``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser() / "teachers"

    def path(self, name: str, key: Mapping[str, Any]) -> Path:
        return self.root / f"{file_stem(name)}-{teacher_key(name=name, **key)}.pt"

    def load(self, name: str, key: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]] | None:
        """The stored teacher and its metadata, or ``None`` if this key was never trained (or the file is corrupt)."""
        path = self.path(name, key)
        if not path.is_file():
            return None
        try:
            return self.read(path)
        except CheckpointError:
            return None  # a corrupt entry is retrained and replaced

    def save(self, model: nn.Module, name: str, key: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
        meta = {"model": name, **dict(metadata), "key": json.dumps(dict(key), sort_keys=True, default=str)}
        return self.write(model, self.path(name, key), meta)

    def read(self, path: Path) -> tuple[nn.Module, dict[str, Any]]:
        """Rebuild a stored model (:func:`~lightning_kd.models.load_model_file`: a timm model)."""
        return load_model_file(path)

    def write(self, model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
        """Atomically write a model (:func:`~lightning_kd.models.save_model_file`)."""
        return save_model_file(model, path, metadata)


def file_stem(name: str) -> str:
    """``name`` as a flat file name: a local directory or hub name (``org/model``) has its other characters
    replaced (timm names are kept as they are)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "model"
