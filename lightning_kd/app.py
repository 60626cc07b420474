"""Pieces of the Hydra app
^^^^^^^^^^^^^^^^^^^^^^^^

What every strategy of ``python -m lightning_kd.run`` shares: the Lightning trainer built from ``cfg.trainer``, the
models built from ``model``/``teacher`` config nodes through ``timm.create_model``, supervised training, the teacher
(loaded, reused from the teacher store, or trained and stored), the optional callbacks selected by config groups
(``teacher_cache=``, ``averaging=``, ``augment=``), evaluation, and the ``results.json`` + table at the end.

A strategy (``strategy=NAME``, see :data:`lightning_kd.run.STRATEGIES`) is a function
``run_app(cfg, datamodule, out_dir) -> results`` that uses these pieces; :func:`run_distill` is the default one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.callback import DistillCallback
from lightning_kd.models import create_model
from lightning_kd.module import ClassifierModule
from lightning_kd.teacher_store import TeacherStore

log = logging.getLogger("lightning_kd")

#: Config groups whose node (when selected) is a Lightning callback built with ``hydra.utils.instantiate``.
CALLBACK_GROUPS = ("augment", "teacher_cache", "averaging")


# --------------------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------------------
def make_trainer(cfg: DictConfig, out_dir: Path, *, checkpoints: bool, extra: tuple[Any, ...] = ()) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` with the loggers of the ``logger`` group (writing under
    ``out_dir``; see :mod:`lightning_kd.loggers`), a progress bar, atomic checkpoints and the ``extra`` callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

    from lightning_kd.loggers import build_loggers

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    callbacks: list[Any] = list(extra)
    if checkpoints:
        # last.ckpt is rewritten at every epoch end, atomically (Lightning saves through an fsspec transaction: a
        # temporary file, then moved), so an interrupted run resumes with ckpt_path=.../last.ckpt. One write per
        # epoch: top-1 of "no monitor" is the newest epoch; save_last with save_top_k=0 would write only at the end.
        callbacks.append(
            ModelCheckpoint(
                dirpath=out_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
            )
        )
    bar = cfg.progress_bar
    if bar not in ("rich", "tqdm", "none"):
        raise ValueError(f"progress_bar must be rich, tqdm or none, got {bar!r}")
    if bar == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    return L.Trainer(
        **kwargs,
        default_root_dir=str(out_dir),
        logger=build_loggers(cfg, out_dir) or False,
        callbacks=callbacks,
        enable_checkpointing=checkpoints,
        enable_progress_bar=bar != "none",
    )


def evaluate(
    model: nn.Module, datamodule: L.LightningDataModule, teacher: nn.Module | None = None, split: str = "test"
) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on the ``split`` split (``"test"`` or ``"val"``; plain loop, eval mode, no grad)
    and, with a ``teacher``, the teacher–student top-1 agreement."""
    if split not in ("test", "val"):
        raise ValueError(f"evaluate: split must be 'test' or 'val', got {split!r}")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    device = next(model.parameters()).device
    correct = agree = total = 0
    model.eval()
    if teacher is not None:
        teacher.eval().to(device)
    with torch.no_grad():
        for inputs, targets, *_ in loader:
            logits = model(inputs.to(device))
            correct += int((logits.argmax(-1).cpu() == targets).sum())
            if teacher is not None:
                agree += int((logits.argmax(-1) == teacher(inputs.to(device)).argmax(-1)).sum())
            total += len(targets)
    out = {"acc": correct / max(total, 1)}
    if teacher is not None:
        out["agreement"] = agree / max(total, 1)
    return out


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The model of a ``model``/``teacher`` config node through ``timm.create_model``."""
    return create_model(
        cfg.name, num_classes, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **(cfg.get("kwargs") or {})
    )


def with_epochs(cfg: DictConfig, max_epochs: int) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer.max_epochs`` is ``max_epochs``."""
    copy = cfg.copy()
    OmegaConf.set_struct(copy, False)
    copy.trainer.max_epochs = int(max_epochs)
    return copy


def scheduler_of(cfg: DictConfig) -> Any:
    """``cfg.scheduler`` as :class:`ClassifierModule` takes it: ``"cosine"``, ``None``, or a Hydra node
    (``_target_`` + ``_partial_: true``) instantiated into a factory ``optimizer -> LRScheduler``."""
    node = cfg.scheduler
    return instantiate(node) if isinstance(node, DictConfig) else node


def classifier_module(cfg: DictConfig, model: nn.Module) -> ClassifierModule:
    """``model`` in a :class:`ClassifierModule` with the configured optimizer, scheduler and label smoothing."""
    return ClassifierModule(model, instantiate(cfg.optimizer), scheduler_of(cfg), cfg.label_smoothing)


def train_classifier(cfg: DictConfig, model: nn.Module, datamodule: Any, out_dir: Path, max_epochs: int) -> None:
    """Supervised training with cross-entropy (teacher or baseline)."""
    make_trainer(with_epochs(cfg, max_epochs), out_dir, checkpoints=False).fit(
        classifier_module(cfg, model), datamodule
    )


def obtain_teacher(cfg: DictConfig, datamodule: Any, out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load the configured teacher, reuse a stored one, or train and store it. Returns the model and a report."""
    num_classes = datamodule.num_classes
    if cfg.teacher.checkpoint or cfg.teacher.pretrained:
        teacher = build_model(cfg.teacher, num_classes)
        source = f"checkpoint {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else "timm pretrained weights"
        return teacher, {"teacher_source": source}
    epochs = int(cfg.teacher_epochs)
    store = TeacherStore(cfg.cache_dir)
    cfg = teacher_recipe(cfg)
    key = {
        "data": datamodule.signature(),
        "seed": int(cfg.seed),
        "epochs": epochs,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True)
        if isinstance(cfg.scheduler, DictConfig)
        else cfg.scheduler,
        "label_smoothing": float(cfg.label_smoothing),
        "kwargs": OmegaConf.to_container(cfg.teacher.kwargs, resolve=True),
    }
    path = store.path(cfg.teacher.name, key)
    stored = store.load(cfg.teacher.name, key)
    if stored is not None:
        log.info("teacher: reused %s from the teacher store (%s)", cfg.teacher.name, path)
        return stored[0], {"teacher_source": f"teacher store (reused): {path}"}
    if cfg.stage == "student":
        raise FileNotFoundError(
            f"stage=student needs a teacher, but {cfg.teacher.name} was never trained with this data/seed/epochs "
            f"(looked for {path}). Run stage=teacher (or stage=all) first, or give teacher.checkpoint=<file>."
        )
    log.info("teacher: no weights given and none stored; training %s for %d epochs", cfg.teacher.name, epochs)
    L.seed_everything(cfg.seed, workers=True)
    teacher = build_model(cfg.teacher, num_classes)
    train_classifier(cfg, teacher, datamodule, out_dir / "teacher", epochs)
    store.save(teacher.cpu(), cfg.teacher.name, key, {"num_classes": num_classes})
    log.info("teacher: trained and stored at %s", path)
    return teacher, {"teacher_source": f"teacher store (trained now): {path}"}


def teacher_recipe(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the teacher's optimizer: ``optimizer`` updated by the keys of ``teacher_optimizer`` (e.g.
    ``teacher_optimizer.lr=0.05`` while MobileNet/ShuffleNet students train at ``optimizer.lr=0.01``, as in the
    RepDistiller protocol). An empty or absent ``teacher_optimizer`` leaves ``cfg`` as it is."""
    override = cfg.get("teacher_optimizer")
    if not override:
        return cfg
    copy = cfg.copy()
    OmegaConf.set_struct(copy, False)
    copy.optimizer = OmegaConf.merge(cfg.optimizer, override)
    return copy


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_single_fit(cfg: DictConfig, strategy: str, reason: str, *, refuse_cache: bool = True) -> None:
    """For a strategy that has no separately trained frozen teacher: ``stage`` must be ``all`` (``reason`` says why)
    and, with ``refuse_cache``, no ``teacher_cache=`` (its stored outputs assume a teacher that does not change)."""
    if cfg.stage != "all":
        raise ValueError(f"stage={cfg.stage} does not apply to strategy={strategy}: {reason}; use stage=all")
    if refuse_cache and cfg.get("teacher_cache") is not None:
        raise ValueError(
            f"teacher_cache= replays stored outputs of a frozen teacher, but in strategy={strategy} the teacher trains "
            "and its outputs change every step; drop teacher_cache= (or use strategy=distill)"
        )


def check_loss_task(cfg: DictConfig, task: str = "classification") -> None:
    """Refuse a loss config written for another task: the ``task`` key of ``conf/loss/*.yaml`` (absent:
    ``classification``; ``lm``: token-level losses of language models) must be the run's ``task``."""
    found = str(cfg.loss.get("task") or "classification")
    if found == task:
        return
    from lightning_kd.loggers import group_choices

    choice = group_choices(cfg).get("loss")  # the option chosen (loss=gkd), else the names of the terms
    names = choice if isinstance(choice, str) else ",".join(str(name) for name in (cfg.loss.get("terms") or {}))
    if found == "lm":
        raise ValueError(f"loss={names} is a language-model loss: add task=lm (python -m lightning_kd.run task=lm ...)")
    from lightning_kd.config import loss_config_names

    raise ValueError(
        f"loss={names} is a {found} loss and does not apply to task={task}; choose one of the task={task} losses "
        f"({', '.join(loss_config_names(task))}) or use task={found}"
    )


def option_callbacks(cfg: DictConfig) -> list[Any]:
    """The callbacks selected by the optional config groups :data:`CALLBACK_GROUPS` (each node has a ``_target_``),
    in that order: augmentation first, so the teacher cache and the distillation see the augmented batch."""
    callbacks = []
    for group in CALLBACK_GROUPS:
        node = cfg.get(group)
        if node is not None:
            callbacks.append(instantiate(node, _convert_="all"))
    return callbacks


def run_distill(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """The default strategy: a frozen teacher (loaded, reused or trained) distilled into the student by
    :class:`~lightning_kd.callback.DistillCallback` on a plain :class:`ClassifierModule`; optional no-KD baseline."""
    check_loss_task(cfg)
    teacher, report = obtain_teacher(cfg, datamodule, out_dir)
    results: dict[str, Any] = {
        "teacher": cfg.teacher.name,
        **report,
        "teacher_acc": evaluate(teacher, datamodule)["acc"],
    }
    if cfg.stage == "teacher":
        return results
    L.seed_everything(cfg.seed, workers=True)
    student = build_model(cfg.model, datamodule.num_classes)
    module = classifier_module(cfg, student)
    distill = DistillCallback(teacher, loss=cfg.loss.terms, task_weight=cfg.loss.task_weight)
    trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=(*option_callbacks(cfg), distill))
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    assert distill.engine is not None
    predictor = distill.engine.student_predictor(module) or student  # SimKD predicts with the teacher's head
    scores = evaluate(predictor, datamodule, teacher)
    results |= {
        "student": cfg.model.name,
        "loss": ",".join(distill.engine.terms),
        "student_acc": scores["acc"],
        "student_val_acc": evaluate(predictor, datamodule, split="val")["acc"],
        "agreement": scores["agreement"],
        **fit_report(trainer, out_dir),
    }
    if cfg.baseline:
        results["baseline_acc"] = train_baseline(cfg, datamodule, out_dir)
    return results


def fit_report(trainer: L.Trainer, out_dir: Path) -> dict[str, str]:
    """Where a fit left its checkpoint and its logs (:func:`lightning_kd.loggers.logs_location`: CSV's
    ``metrics.csv``, TensorBoard's directory, the W&B run)."""
    from lightning_kd.loggers import logs_location

    return {"checkpoint": str(out_dir / "checkpoints" / "last.ckpt"), "logs": logs_location(trainer.loggers)}


def train_baseline(cfg: DictConfig, datamodule: Any, out_dir: Path) -> float:
    """Test accuracy of the student trained without distillation on the same seed (``baseline=true``)."""
    L.seed_everything(cfg.seed, workers=True)
    baseline = build_model(cfg.model, datamodule.num_classes)
    train_classifier(cfg, baseline, datamodule, out_dir / "baseline", int(cfg.trainer.max_epochs))
    return evaluate(baseline, datamodule)["acc"]


def summary_rows(results: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """Extra ``(name, value)`` rows a strategy put in ``results['rows']``."""
    return [tuple(row) for row in results.get("rows", [])]


def published_rows(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The published top-1 (%) an ``experiment=`` run is compared with (its ``published`` node), if any."""
    published = results.get("published") or {}
    labels = {"top1": "published student top-1 (%)", "teacher": "published teacher top-1 (%)",
              "student": "published student alone top-1 (%)"}  # fmt: skip
    return [(label, published[key]) for key, label in labels.items() if key in published]


def print_summary(results: dict[str, Any]) -> None:
    """The end-of-run table (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning_kd results", show_header=True)
    table.add_column("metric")
    table.add_column("value")
    rows = [
        ("teacher", f"{results['teacher']} ({results.get('teacher_source', '')})"),
        ("student", results.get("student", "")),
        ("loss", results.get("loss", "")),
        ("teacher accuracy", results.get("teacher_acc")),
        ("student accuracy", results.get("student_acc")),
        ("student accuracy (validation split)", results.get("student_val_acc")),
        ("teacher-student agreement", results.get("agreement")),
        ("baseline accuracy (no KD)", results.get("baseline_acc")),
        *summary_rows(results),
        *published_rows(results),
        ("wall time", f"{results['wall_s']:.1f} s"),
        ("checkpoint", results.get("checkpoint")),
        ("logs", results.get("logs")),
        ("results", results.get("results")),
    ]
    for name, value in rows:
        if value is None or value == "":
            continue
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
