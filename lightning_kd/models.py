"""Models and weights
^^^^^^^^^^^^^^^^^^

Students and teachers are created with ``timm.create_model(name, num_classes=...)`` — every timm name works — and
weights come from timm's hub (``pretrained=True``, where the hub is reachable) or from a local file: a Lightning
``.ckpt``, a plain ``state_dict`` or a teacher saved by this package. Files are always read with
``torch.load(..., weights_only=True)``, so a checkpoint that needs arbitrary pickled code is refused.
"""

from __future__ import annotations

import difflib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: prefixes under which a model's weights are stored by Lightning modules and wrappers.
_PREFIXES = ("", "model.", "student.", "module.", "net.", "_orig_mod.")
METADATA_KEY = "lightning_kd"


class UnknownModelError(ValueError):
    """A model name that timm does not know."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or of another architecture."""


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, num_classes=num_classes, pretrained=...)``, then local weights if ``checkpoint``.

    ``None``-valued keyword arguments are dropped (timm's convention: ``null`` in a config means "timm's default").

    Raises:
        UnknownModelError: ``name`` is not a timm model; the message lists close names.
        CheckpointError: the checkpoint is unreadable, unsafe, or does not fit the architecture.
    """
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not timm.is_model(name):
        raise UnknownModelError(unknown_model_message(name))
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, arch=name)
    return model


def unknown_model_message(name: str) -> str:
    """Error text for an unknown timm name, with the closest valid names."""
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.6)
    return (
        f"unknown model {name!r}: not a timm model name. "
        f"Close matches: {', '.join(close) or '(none)'}. All {len(names)} names: timm.list_models()"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``, with errors that say what is wrong and how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path (teacher.checkpoint=...)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {str(path)!r}: it needs arbitrary pickled code, and checkpoints are read with "
            "torch.load(weights_only=True) for safety. Re-save only the weights from a trusted environment: "
            f"torch.save(model.state_dict(), path). ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # noqa: BLE001 - corrupt/truncated files raise many types
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint dict: Lightning's ``state_dict`` entry, this package's format, or the dict itself."""
    for key in ("state_dict", "model_state_dict", "model"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors (expected a state_dict or a Lightning checkpoint)")
    return tensors


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, where: str, arch: str) -> dict:
    """Pick the key prefix under which ``state`` fits ``model`` and check keys and shapes.

    Raises:
        CheckpointError: naming the missing/unexpected keys and shape mismatches, and the likely fix.
    """
    expected = model.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in _PREFIXES:
        candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if len(candidate.keys() & expected.keys()) > len(best.keys() & expected.keys()):
            best = candidate
    missing = sorted(expected.keys() - best.keys())
    unexpected = sorted(best.keys() - expected.keys()) if best else sorted(state)
    mismatched = [
        f"{k}: checkpoint {list(best[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(expected.keys() & best.keys())
        if best[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched or not best:
        details = []
        if missing:
            details.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatch(es) (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(
            f"checkpoint {where} does not fit architecture {arch!r} ({type(model).__name__}): "
            + ", ".join(details)
            + ". It was probably saved from another architecture or class count: pass the model name and "
            "num_classes it was trained with."
        )
    return {k: best[k] for k in expected}


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, arch: str | None = None) -> nn.Module:
    """Load weights from ``path`` into ``model`` (strict, shapes checked, ``weights_only=True``)."""
    state = state_dict_of(read_checkpoint(path))
    model.load_state_dict(match_state_dict(model, state, where=repr(str(path)), arch=arch or type(model).__name__))
    return model


def save_model_file(model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    """Atomically write ``{"state_dict": ..., "lightning_kd": metadata}`` (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, METADATA_KEY: dict(metadata)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model_file(path: str | os.PathLike[str], **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model_file` (architecture and class count from its metadata)."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get(METADATA_KEY)
    if not isinstance(meta, Mapping) or "model" not in meta or "num_classes" not in meta:
        raise CheckpointError(
            f"{str(path)!r} does not say which architecture it holds; give the model name too "
            "(e.g. DistillCallback(teacher='resnet50', teacher_checkpoint=path))"
        )
    model = create_model(meta["model"], int(meta["num_classes"]), **kwargs)
    model.load_state_dict(match_state_dict(model, state_dict_of(checkpoint), where=repr(str(path)), arch=meta["model"]))
    return model, dict(meta)
