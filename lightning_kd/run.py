"""Command-line entry point
^^^^^^^^^^^^^^^^^^^^^^^^^

``python -m lightning_kd.run [overrides]`` — Hydra composes the student (``model=``), the teacher (``teacher=``),
the loss (``loss=``), the data (``data=``), the Lightning trainer (``trainer.*``) and the strategy (``strategy=``:
who teaches whom; the pieces they share are in :mod:`lightning_kd.app`). The default strategy, ``distill``,

1. gets the teacher: its weights (``teacher.checkpoint`` / ``teacher.pretrained``), else a teacher trained earlier
   on the same data/seed/epochs (the teacher store), else trains one and stores it;
2. distils it into the student (``stage=all`` or ``stage=student``; ``stage=teacher`` stops after step 1): the
   student is a plain :class:`~lightning_kd.module.ClassifierModule` and the distillation is added by
   :class:`~lightning_kd.callback.DistillCallback`, the same callback a user drops into their own project;
3. optionally trains the student without distillation on the same seed (``baseline=true``);
4. prints a table and writes ``results.json`` in the run directory (accuracies are fractions on the test split,
   except ``student_val_acc``, the student's on the validation split: the objective of hyperparameter searches).

Tasks (``task=``): ``classification`` (the default: timm models, image data, every strategy) and ``lm``
(``task=lm``: causal language models on text, :func:`lightning_kd.lm.app.run_lm`, strategy ``distill`` only;
``results.json`` reports perplexities on the test split, and ``student_val_acc`` is the student's next-token top-1
accuracy on the validation split, so that searches maximise it in both tasks). A loss config marked ``task: lm`` is
refused by the image task and the other losses by the LM task.

Loggers: ``logger=csv`` (default), ``tensorboard``, ``wandb`` or a list (:mod:`lightning_kd.loggers`).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_kd.app import check_loss_task, print_summary, write_json_atomic
from lightning_kd.config import CONF_DIR, register_model_configs
from lightning_kd.loggers import job_logging, log_results
from lightning_kd.multirun import is_global_zero, job_command_line

STAGES = ("all", "teacher", "student")
#: ``task=NAME`` (``conf/task/NAME.yaml`` sets the ``task`` key): the image app with its strategies, or the LM app.
TASKS = ("classification", "lm")


# --------------------------------------------------------------------------------------------------------------------
# Strategies: who teaches whom (``strategy=NAME``); each is ``run_app(cfg, datamodule, out_dir) -> results``
# --------------------------------------------------------------------------------------------------------------------
STRATEGIES: dict[str, str] = {
    "distill": "lightning_kd.app:run_distill",
    "mutual": "lightning_kd.strategies.mutual:run_app",
    "born_again": "lightning_kd.strategies.born_again:run_app",
    "ema": "lightning_kd.strategies.ema:run_app",
    "multi_teacher": "lightning_kd.strategies.multi_teacher:run_app",
}


def strategy_runner(name: str) -> Callable[[DictConfig, Any, Path], dict[str, Any]]:
    """The ``run_app`` function of strategy ``name`` (imported on first use)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)} (strategy=NAME)")
    module, _, function = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def task_runner(cfg: DictConfig) -> Callable[[DictConfig, Any, Path], dict[str, Any]]:
    """The app of ``cfg.task`` after checking that the config fits it (raises before any data or model is built):
    ``classification`` runs the strategy's ``run_app``, ``lm`` runs :func:`lightning_kd.lm.app.run_lm`."""
    task = str(cfg.get("task") or "classification")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)} (task=NAME)")
    if task == "lm":
        from lightning_kd.lm.app import check_lm_config, run_lm

        check_lm_config(cfg)
        return run_lm
    check_loss_task(cfg, task)
    return strategy_runner(str(cfg.strategy.name))


# --------------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the job described by ``cfg``; returns (and writes) the results."""
    start = time.perf_counter()
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    runner = task_runner(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_logging(cfg, out_dir):  # the loggers' job: one W&B run, finished also when the job fails
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        with job_command_line():  # DDP children of a multirun job join this job instead of re-running the sweep
            results = {"strategy": str(cfg.strategy.name), **runner(cfg, datamodule, out_dir)}
        if cfg.get("published"):  # experiment=...: the published numbers this run is compared with
            results["published"] = OmegaConf.to_container(cfg.published, resolve=True)
        results["wall_s"] = time.perf_counter() - start
        results["results"] = str(out_dir / "results.json")
        if is_global_zero():  # under DDP every rank runs the job; one writes and prints
            write_json_atomic(out_dir / "results.json", results)
            log_results(cfg, results, out_dir / "results.json")
            print_summary(results)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the student's accuracy on the validation split, ``student_val_acc`` (the
    objective of ``hparams_search=`` studies and the metric of the W&B sweeps in ``conf/sweep/``: hyperparameters are
    chosen on validation data, never on the test split; with ``task=lm`` it is the next-token top-1 accuracy, so
    higher is better in both tasks), or ``None`` when no student was trained (``stage=teacher``)."""
    results = train(cfg)
    return results.get("student_val_acc")


register_model_configs()

if __name__ == "__main__":
    main()
