"""Layer taps
^^^^^^^^^^

Capture the output (or the input) of any submodule of any ``nn.Module`` by dotted path, with forward hooks: no model
rewrite, works on every timm model and on a user's LightningModule.

A tap is written as ``"path"`` (the module's output) or ``"path:input"`` (its first positional input), e.g.
``"layer3"``, ``"stages.2"``, ``"blocks.5.mlp"``, ``"fc:input"``. Two symbolic taps are resolved per model:

- ``"embedding"``: the penultimate embedding, i.e. the input of the classifier (timm's ``get_classifier()``, which
  equals ``forward_head(x, pre_logits=True)``; otherwise the last ``nn.Linear``);
- ``"logits"``: the output of that classifier;
- ``"stage:N"``: the module of timm's ``feature_info[N]`` (``N`` may be negative: ``stage:-1`` is the last stage).

A :class:`LayerTaps` keeps only the tensors of the current step: each hook overwrites its slot, :meth:`LayerTaps.pop`
hands them over and empties the slots, and nothing is stored while capture is off.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

EMBEDDING = "embedding"
LOGITS = "logits"
_STAGE_PREFIX = "stage:"


class TapError(LookupError):
    """A tap path that does not resolve on a model."""


@dataclass(frozen=True)
class TapSpec:
    """Where to tap: a module path (or symbolic name) and whether to keep the module's ``input`` or ``output``."""

    path: str
    io: str = "output"

    @classmethod
    def parse(cls, spec: str | TapSpec) -> TapSpec:
        """Parse ``"path"``, ``"path:input"``, ``"path:output"``, ``"embedding"``, ``"logits"`` or ``"stage:N"``."""
        if isinstance(spec, TapSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise TapError(f"a tap must be a non-empty module path such as 'layer3' or 'fc:input', got {spec!r}")
        spec = spec.strip()
        path, sep, io = spec.rpartition(":")
        if spec.startswith(_STAGE_PREFIX) and not (path.startswith(_STAGE_PREFIX) and io in ("input", "output")):
            return cls(spec)  # "stage:N" (its colon is not an io suffix)
        if sep and io in ("input", "output"):
            return cls(path, io)
        if sep:
            raise TapError(f"tap {spec!r}: the part after ':' must be 'input' or 'output', got {io!r}")
        return cls(spec)

    def __str__(self) -> str:
        return self.path if self.io == "output" else f"{self.path}:{self.io}"


#: attribute prefix under which DistillCallback attaches its engine to a LightningModule; never a tap target.
INTERNAL_PREFIX = "_lkd_"


def _public_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not n.startswith(INTERNAL_PREFIX)]


def module_paths(model: nn.Module) -> list[str]:
    """All dotted submodule paths of ``model`` (the root and the package's own attachments excluded)."""
    return [name for name, _ in _public_modules(model)]


def find_classifier(model: nn.Module) -> str:
    """Dotted path of the classifier of ``model``: timm's ``get_classifier()`` if some submodule has it, else the last
    ``nn.Linear``. Raises :class:`TapError` when there is none."""
    for prefix, module in [("", model), *_public_modules(model)]:
        get_classifier = getattr(module, "get_classifier", None)
        if callable(get_classifier):
            try:
                head = get_classifier()
            except Exception:  # noqa: BLE001 - some models implement it only partially
                continue
            if isinstance(head, nn.Module):
                for name, sub in module.named_modules():
                    if sub is head and name:
                        return f"{prefix}.{name}" if prefix else name
    linears = [name for name, m in _public_modules(model) if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise TapError(
        f"cannot find the classifier of {type(model).__name__}: it has no timm `get_classifier()` and no nn.Linear. "
        "Name the layer explicitly, e.g. student_logits='head' or a tap 'head:input' for the embedding."
    )


def feature_stage_path(model: nn.Module, index: int) -> str:
    """Module path of timm's ``feature_info[index]`` (searching submodules for a timm model)."""
    for prefix, module in [("", model), *_public_modules(model)]:
        info = getattr(module, "feature_info", None)
        if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict) and "module" in info[0]:
            try:
                name = info[index]["module"]
            except IndexError:
                raise TapError(
                    f"{type(module).__name__} has {len(info)} feature stages; 'stage:{index}' is out of range"
                ) from None
            return f"{prefix}.{name}" if prefix else name
    raise TapError(
        f"{type(model).__name__} has no timm `feature_info`, so 'stage:{index}' cannot be resolved; "
        "give a module path instead (e.g. 'layer3')."
    )


def resolve(model: nn.Module, spec: str | TapSpec) -> TapSpec:
    """Turn a symbolic tap into a concrete one on ``model`` and check that its module exists."""
    spec = TapSpec.parse(spec)
    if spec.path == EMBEDDING:
        spec = TapSpec(find_classifier(model), "input")
    elif spec.path == LOGITS:
        spec = TapSpec(find_classifier(model), "output")
    elif spec.path.startswith(_STAGE_PREFIX):
        try:
            index = int(spec.path[len(_STAGE_PREFIX) :])
        except ValueError:
            raise TapError(f"tap {spec.path!r}: expected 'stage:<int>', e.g. 'stage:-1'") from None
        spec = TapSpec(feature_stage_path(model, index), spec.io)
    get_module(model, spec.path)
    check_not_compiled(model, spec.path)
    return spec


def _is_compiled(module: nn.Module) -> bool:
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    return compiled is not None and isinstance(module, compiled.OptimizedModule)


def check_not_compiled(model: nn.Module, path: str) -> None:
    """Raise :class:`TapError` when the module at ``path`` is, or sits inside, a ``torch.compile``'d module: forward
    hooks inside a compiled graph do not run as eager hooks (graph breaks or stale captures), so taps are refused."""
    parts = path.split(".") if path else []
    for depth in range(len(parts) + 1):
        prefix = ".".join(parts[:depth])
        module = model.get_submodule(prefix) if prefix else model
        if _is_compiled(module):
            where = f"'{prefix}'" if prefix else f"the model ({type(model).__name__})"
            raise TapError(
                f"cannot tap '{path}': {where} is a torch.compile'd module, and layer taps (forward hooks) are not "
                "supported inside compiled graphs. Distil the eager model and compile it afterwards, or compile only "
                "submodules that no tap reads (taps need the classifier for 'logits'/'embedding')."
            )


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the model class and the closest valid paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        paths = module_paths(model)
        close = difflib.get_close_matches(path, paths, n=5, cutoff=0.5)
        if not close:  # fall back to siblings of the deepest valid parent
            parent = path
            while parent and parent not in paths:
                parent = parent.rpartition(".")[0]
            close = [p for p in paths if p.startswith(parent + ".") and p.count(".") == parent.count(".") + 1][:8] or [
                p for p in paths if "." not in p
            ][:8]
        raise TapError(
            f"{type(model).__name__} has no layer {path!r}. Closest valid paths: {', '.join(close) or '(none)'}. "
            "List them all with [n for n, _ in model.named_modules()]."
        ) from None


class LayerTaps:
    """Forward hooks on a set of submodules, keeping the current step's tensors only.

    Args:
        model: the model to tap.
        specs: taps to install (paths, symbolic names or :class:`TapSpec`).
        detach: store detached tensors (used for the teacher).

    Example::

        >>> import torch, timm
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> taps = LayerTaps(model, ["layer3", "embedding"])
        >>> with taps.capture():
        ...     _ = model(torch.randn(2, 3, 32, 32))
        >>> {str(k): tuple(v.shape) for k, v in taps.pop().items()}
        {'layer3': (2, 256, 2, 2), 'embedding': (2, 512)}
        >>> taps.remove()
    """

    def __init__(self, model: nn.Module, specs: Iterable[str | TapSpec], *, detach: bool = False) -> None:
        self.model = model
        self.detach = detach
        self.requested: dict[TapSpec, TapSpec] = {}
        for spec in specs:
            parsed = TapSpec.parse(spec)
            self.requested[parsed] = resolve(model, parsed)
        self._slots: dict[TapSpec, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._capturing = False
        self.attach()

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> None:
        """Install one hook per distinct (module, io); idempotent."""
        if self._handles:
            return
        for concrete in set(self.requested.values()):
            module = get_module(self.model, concrete.path)
            if concrete.io == "input":
                handle = module.register_forward_pre_hook(self._make_hook(concrete, from_input=True))
            else:
                handle = module.register_forward_hook(self._make_hook(concrete, from_input=False))
            self._handles.append(handle)

    def _make_hook(self, key: TapSpec, *, from_input: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
            if not self._capturing:
                return
            if from_input and not args:
                raise TapError(f"tap {key}: {type(module).__name__} was called without positional input")
            value = args[0] if from_input else output
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                value = value[0]
            if not isinstance(value, torch.Tensor):
                raise TapError(
                    f"tap {key} on {type(module).__name__} produced {type(value).__name__}, not a tensor; "
                    "tap a submodule that returns a tensor"
                )
            self._slots[key] = value.detach() if self.detach else value

        if from_input:
            return lambda module, args: hook(module, args)
        return hook

    def start(self) -> None:
        """Start capturing (clears what is left from an earlier step)."""
        self._slots.clear()
        self._capturing = True

    def stop(self) -> None:
        """Stop capturing; captured tensors stay until :meth:`pop` or :meth:`clear`."""
        self._capturing = False

    @contextmanager
    def capture(self) -> Iterator[LayerTaps]:
        """Capture during the ``with`` block."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def pop(self) -> dict[TapSpec, torch.Tensor]:
        """Hand over this step's tensors, keyed by the requested spec, and empty the slots."""
        missing = [str(req) for req, concrete in self.requested.items() if concrete not in self._slots]
        if missing:
            self._slots.clear()
            raise TapError(
                f"no value captured for tap(s) {missing} on {type(self.model).__name__} in this step: "
                "the layer did not run in the forward pass (is it used by forward()?)"
            )
        out = {req: self._slots[concrete] for req, concrete in self.requested.items()}
        self._slots.clear()
        return out

    def clear(self) -> None:
        """Drop captured tensors."""
        self._slots.clear()

    def remove(self) -> None:
        """Remove every hook and drop captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._slots.clear()
        self._capturing = False

    def __len__(self) -> int:
        return len(self._slots)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with ``requires_grad`` off and none of this package's attachments: no ``_lkd_*``
    submodules (a callback's engine with its connectors), no instance-level ``training_step`` wrap, no tap hooks
    (which would otherwise fire, and capture, on the copy's forward); the user's own hooks are kept. Safe on a
    LightningModule: its trainer reference is not copied (``LightningModule.__getstate__`` drops it). Used for
    teachers made from the student (an EMA teacher, the frozen initial student of data-partitioned KD)."""
    saved = dict(model._modules)
    for name in saved:
        if name.startswith(INTERNAL_PREFIX):
            del model._modules[name]
    try:
        clone = copy.deepcopy(model)
    finally:
        model._modules.clear()
        model._modules.update(saved)
    clone.__dict__.pop("training_step", None)
    for module in clone.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None) or {}
            for key in [k for k, fn in hooks.items() if getattr(fn, "__module__", None) == __name__]:
                for other in _HOOK_DICTS:
                    getattr(module, other, {}).pop(key, None)
    return clone.requires_grad_(False)
