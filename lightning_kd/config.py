"""Hydra configuration
^^^^^^^^^^^^^^^^^^^^

The configs live in the repository's top-level ``conf/`` and are shipped inside the wheel as ``lightning_kd/conf``
(see ``pyproject.toml``); :data:`CONF_DIR` finds whichever exists.

The ``model`` and ``teacher`` groups have one option per timm architecture (``model=resnet18``,
``teacher=convnext_atto``, ...): :func:`register_model_configs` stores them in Hydra's ``ConfigStore`` so that every
name of ``timm.list_models()`` is a valid choice without a YAML file per model. Each option is::

    name: <timm name>     # passed to timm.create_model
    pretrained: false     # timm hub weights (needs network)
    checkpoint: null      # local weights: Lightning .ckpt, state_dict, or a teacher saved by lightning_kd
    kwargs: {}            # extra timm.create_model arguments (drop_rate, ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

_PACKAGE_DIR = Path(__file__).resolve().parent
#: the config directory: inside the installed package (wheel), else the repository's ``conf/`` (editable/source).
CONF_DIR = _PACKAGE_DIR / "conf" if (_PACKAGE_DIR / "conf").is_dir() else _PACKAGE_DIR.parent / "conf"
MODEL_GROUPS = ("model", "teacher")

_registered = False


def loss_config_names(task: str = "classification") -> list[str]:
    """Names of the ``conf/loss/*.yaml`` options for ``task``: ``classification`` (image models; the default) or
    ``lm`` (language models: the configs that set ``task: lm``)."""
    from omegaconf import OmegaConf

    names = []
    for path in sorted((CONF_DIR / "loss").glob("*.yaml")):
        if (OmegaConf.load(path).get("task") or "classification") == task:
            names.append(path.stem)
    return names


def register_model_configs() -> None:
    """Add one ``model/<name>`` and ``teacher/<name>`` option per timm architecture to Hydra's ConfigStore."""
    global _registered
    if _registered:
        return
    import timm

    store = ConfigStore.instance()
    for name in timm.list_models():
        node: dict[str, Any] = {"name": name, "pretrained": False, "checkpoint": None, "kwargs": {}}
        for group in MODEL_GROUPS:
            store.store(group=group, name=name, node=node, provider="lightning_kd")
    _registered = True


def compose(overrides: list[str] | None = None, config_name: str = "train") -> Any:
    """Compose the app's config outside ``python -m lightning_kd.run`` (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_model_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
