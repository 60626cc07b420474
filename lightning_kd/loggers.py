"""Experiment loggers
^^^^^^^^^^^^^^^^^^^^

The ``logger`` config group picks Lightning loggers: ``logger=csv`` (the default), ``logger=tensorboard``,
``logger=wandb``, several at once with ``logger=[csv,wandb]``, none with ``~logger``. Each file of
``conf/logger/`` is one block ``<key>: {_target_: <a Lightning logger class>, <its arguments>}``, so a list of choices
merges into one ``logger`` node with a block per logger and each block is built with ``hydra.utils.instantiate``
(the layout of lightning-hydra-template: ``configs/logger/many_loggers.yaml``, ``src/utils/instantiators.py``).

**Where they write.** Every trainer of a job (the student's; a teacher trained first; the no-KD baseline; a
born-again generation) has an output directory ``<dir>``: the run directory for the student, ``<run dir>/teacher``,
``<run dir>/baseline``, ``<run dir>/gen<k>``... CSV writes ``<dir>/logs/metrics.csv`` and ``hparams.yaml``;
TensorBoard writes ``<dir>/tensorboard/events.out.tfevents.*`` (``tensorboard --logdir <run dir>`` shows each
trainer as its own run). A ``save_dir`` given in the config replaces the run directory (``<save_dir>/teacher``...).

**W&B: one run per job.** :func:`job_logging` (``lightning_kd.run.train`` wraps the job in it) opens the W&B run at
the start of the job, with the resolved Hydra config as its config (:func:`job_params`: dotted keys such as
``loss.terms.kd.temperature`` and the group choices such as ``loss: kd``, the same names a W&B sweep's parameters
use); every trainer of the job logs into that run, the student's keys as logged (``train/kd``, ``val/acc``...), the
other trainers' keys prefixed with their directory (``teacher/train/ce``, ``baseline/val/acc``, ``gen1/val/acc``),
so W&B shows them as separate panel sections. At the end :func:`log_results` puts ``results.json`` into the run's
summary (``student_val_acc``, ``student_acc``, ...) and files, and, with ``upload_checkpoint: true``, the student's
checkpoint as an artifact of type ``model`` (logged by lightning_kd, so it works with ``WANDB_MODE=offline``, where
Lightning's ``log_model`` is refused). The run is finished when the job ends, failed jobs included (exit code 1), as
lightning-hydra-template's ``task_wrapper`` does (``src/utils/utils.py``), so one failed job does not leave the run
open for the next job of a multirun or sweep.

wandb and tensorboard are imported only when their logger is chosen; a missing package is named with its
``pip install "lightning-kd[...]"`` command.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

#: keys of a logger block that lightning_kd reads itself; they are not passed to the logger class.
OWN_KEYS = ("upload_checkpoint",)

#: logger class name -> (import names, any of which is enough; the lightning-kd extra that installs one).
PACKAGES = {
    "WandbLogger": (("wandb",), "wandb"),
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
}

_job_dir: Path | None = None  # the run directory of the job in progress (set by job_logging)


# --------------------------------------------------------------------------------------------------------------------
# The job's hyperparameters
# --------------------------------------------------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def group_choices(cfg: DictConfig) -> dict[str, Any]:
    """The option chosen in each config group of the app (``{"loss": "kd", "logger": ["csv", "wandb"], ...}``),
    from Hydra's runtime record (``hydra/*`` groups left out)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    elif "hydra" in cfg and "runtime" in cfg.hydra:
        choices = cfg.hydra.runtime.choices
    else:
        return {}
    plain = OmegaConf.to_container(choices) if isinstance(choices, DictConfig) else dict(choices)
    return {str(k): v for k, v in plain.items() if not str(k).startswith("hydra")}


def job_params(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters the loggers record: the resolved config without Hydra's own node, flattened to dotted
    keys (``loss.terms.kd.temperature``, ``optimizer.lr``, ...), plus the group choices (``loss``, ``model``,
    ``data``...). The names are Hydra override keys, the same a W&B sweep's parameters use, so a sweep run's
    config holds each value once."""
    keys = [k for k in cfg if k != "hydra"]
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    assert isinstance(resolved, dict)
    return {**group_choices(cfg), **flatten(resolved)}


# --------------------------------------------------------------------------------------------------------------------
# Building the loggers of a trainer
# --------------------------------------------------------------------------------------------------------------------
def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def logger_class(key: str, node: Any) -> type:
    """The class of logger block ``key``, after checking that its package is installed."""
    if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
        raise ValueError(
            f"logger.{key} must be a block with a _target_ (a Lightning logger class), got {node!r}; pick loggers "
            "with logger=csv|tensorboard|wandb or logger=[csv,wandb]"
        )
    cls = get_class(str(node["_target_"]))
    for base in cls.__mro__:
        if base.__name__ in PACKAGES:
            modules, extra = PACKAGES[base.__name__]
            if not any(_installed(m) for m in modules):
                raise ModuleNotFoundError(
                    f"logger={key} ({base.__name__}) needs the {' or '.join(modules)} package: "
                    f'pip install "lightning-kd[{extra}]" (or choose another logger, e.g. logger=csv)'
                )
    return cls


def _is_wandb(cls: type) -> bool:
    return any(base.__name__ == "WandbLogger" for base in cls.__mro__)


def _blocks(cfg: DictConfig) -> dict[str, DictConfig]:
    node = cfg.get("logger")
    return {str(k): v for k, v in node.items()} if node else {}


def _wandb_blocks(cfg: DictConfig) -> list[DictConfig]:
    return [node for key, node in _blocks(cfg).items() if _is_wandb(logger_class(key, node))]


def _role(out_dir: Path, root: Path) -> str:
    """``out_dir`` relative to the job's run directory (``""``, ``"teacher"``, ``"teacher_x/teacher"``...)."""
    try:
        rel = out_dir.resolve().relative_to(root.resolve())
    except ValueError:
        return ""
    return "" if rel == Path(".") else rel.as_posix()


def _wandb_logger(kwargs: dict[str, Any], root: Path, role: str) -> Any:
    import wandb

    kwargs["save_dir"] = kwargs.get("save_dir") or str(root)
    kwargs["prefix"] = "/".join(p for p in (kwargs.get("prefix") or "", role) if p)
    run = {"experiment": wandb.run} if wandb.run is not None else {}  # the job's run (job_logging opened it)
    logger = instantiate(kwargs, _convert_="all", **run)
    logger.LOGGER_JOIN_CHAR = "/"  # prefix/key, e.g. teacher/train/ce (Lightning's default joins with "-")
    return logger


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Any]:
    """The loggers of the ``logger`` group for a trainer whose output directory is ``out_dir`` (see the module
    docstring for where each writes). CSV and TensorBoard record :func:`job_params` of ``cfg`` (the trainer's own
    config: a teacher's has its epochs); the W&B run records the job's config when it opens."""
    blocks = _blocks(cfg)
    if not blocks:
        return []
    root = _job_dir or out_dir
    role = _role(out_dir, root)
    loggers = []
    for key, node in blocks.items():
        cls = logger_class(key, node)
        kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in OWN_KEYS}
        if _is_wandb(cls):
            opened_here = "wandb" not in sys.modules or sys.modules["wandb"].run is None
            logger = _wandb_logger(kwargs, root, role)
            if opened_here:  # no job_logging around this trainer: its logger opens the run and records the config
                logger.log_hyperparams(job_params(cfg))
        else:  # the trainer's directory, or <save_dir>/<role> with a save_dir given
            kwargs["save_dir"] = str(Path(kwargs["save_dir"]) / role if kwargs.get("save_dir") else out_dir)
            logger = instantiate(kwargs, _convert_="all")
            logger.log_hyperparams(job_params(cfg))
        loggers.append(logger)
    return loggers


def logs_location(loggers: list[Any]) -> str:
    """Where a trainer's loggers wrote (``"; "``-separated): CSV's ``metrics.csv``, TensorBoard's directory, the W&B
    run's URL (online) or directory (offline)."""
    from lightning.pytorch.loggers import CSVLogger

    places = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            places.append(str(Path(logger.log_dir) / "metrics.csv"))
        elif _is_wandb(type(logger)):
            run = logger.experiment
            if getattr(run, "disabled", False):  # WANDB_MODE=disabled: nothing is written
                continue
            url = getattr(run, "url", None)
            run_dir = getattr(run, "dir", None)
            places.append(url or (str(Path(run_dir).parent) if run_dir else ""))
        else:
            places.append(str(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or ""))
    return "; ".join(p for p in places if p)


# --------------------------------------------------------------------------------------------------------------------
# The job: one W&B run, results, finish
# --------------------------------------------------------------------------------------------------------------------
def _wandb_run() -> Any:
    """The W&B run in progress, without importing wandb when nothing imported it."""
    module = sys.modules.get("wandb")
    return None if module is None else module.run


def finish_wandb(exit_code: int = 0) -> None:
    """Finish the W&B run in progress, if any (``exit_code`` 1 marks it failed)."""
    if _wandb_run() is not None:
        sys.modules["wandb"].finish(exit_code=exit_code)


@contextmanager
def job_logging(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """Around one job of the app: with a W&B logger configured, open its run now (on global rank 0) with the job's
    config (:func:`job_params`), and finish it when the job ends, also when it fails (exit code 1)."""
    global _job_dir
    previous, _job_dir = _job_dir, Path(run_dir)
    try:
        blocks = _wandb_blocks(cfg)
        if blocks and rank_zero_only.rank == 0:  # a run the caller opened (wandb.init) receives the job
            kwargs = {k: v for k, v in OmegaConf.to_container(blocks[0], resolve=True).items() if k not in OWN_KEYS}
            _wandb_logger(kwargs, Path(run_dir), "").log_hyperparams(job_params(cfg))
        yield
    except BaseException:
        finish_wandb(exit_code=1)
        raise
    else:
        finish_wandb()
    finally:
        _job_dir = previous


def summary_values(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results.json`` as W&B summary values: every key as is, the table rows as ``rows: {name: value}``."""
    values = {k: v for k, v in results.items() if k != "rows"}
    rows = results.get("rows") or []
    if rows:
        values["rows"] = {str(row[0]): row[1] for row in rows}
    return values


def log_results(cfg: DictConfig, results: Mapping[str, Any], path: Path) -> None:
    """Put the job's results into its W&B run (no-op without a W&B logger): the summary (:func:`summary_values`),
    the file ``results.json``, and with ``upload_checkpoint: true`` the student's checkpoint (``results
    ["checkpoint"]``) as an artifact ``model-<run id>`` of type ``model``."""
    run = _wandb_run()
    blocks = _wandb_blocks(cfg) if run is not None else []
    if not blocks:
        return
    import wandb

    run.summary.update(summary_values(results))
    run.save(str(path), base_path=str(Path(path).parent), policy="now")
    checkpoint = results.get("checkpoint")
    if any(node.get("upload_checkpoint") for node in blocks) and checkpoint and os.path.isfile(checkpoint):
        keys = ("strategy", "student", "teacher", "loss", "student_acc", "student_val_acc")
        artifact = wandb.Artifact(
            f"model-{run.id}", type="model", metadata={k: results[k] for k in keys if k in results}
        )
        artifact.add_file(str(checkpoint), name=Path(checkpoint).name)
        run.log_artifact(artifact, aliases=["latest"])


__all__ = [
    "build_loggers",
    "finish_wandb",
    "flatten",
    "job_logging",
    "job_params",
    "log_results",
    "logger_class",
    "logs_location",
    "summary_values",
]
