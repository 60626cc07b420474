"""Command-line entry point
^^^^^^^^^^^^^^^^^^^^^^^^^

``python -m lightning_kd.run [overrides]`` — Hydra composes the student (``model=``), the teacher (``teacher=``),
the loss (``loss=``), the data (``data=``) and the Lightning trainer (``trainer.*``). The run

1. gets the teacher: its weights (``teacher.checkpoint`` / ``teacher.pretrained``), else a teacher trained earlier
   on the same data/seed/epochs (the teacher store), else trains one and stores it;
2. distils it into the student (``stage=all`` or ``stage=student``; ``stage=teacher`` stops after step 1): the
   student is a plain :class:`~lightning_kd.module.ClassifierModule` and the distillation is added by
   :class:`~lightning_kd.callback.DistillCallback`, the same callback a user drops into their own project;
3. optionally trains the student without distillation on the same seed (``baseline=true``);
4. prints a table and writes ``results.json`` in the run directory (accuracies are fractions on the test split).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.callback import DistillCallback
from lightning_kd.config import CONF_DIR, register_model_configs
from lightning_kd.models import create_model
from lightning_kd.module import ClassifierModule
from lightning_kd.teacher_store import TeacherStore

log = logging.getLogger("lightning_kd")
STAGES = ("all", "teacher", "student")


# --------------------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------------------
def make_trainer(cfg: DictConfig, out_dir: Path, *, checkpoints: bool, extra: tuple[Any, ...] = ()) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` with a CSV logger, a progress bar, atomic checkpoints and the
    ``extra`` callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

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
        logger=CSVLogger(str(out_dir), name="logs", version=""),
        callbacks=callbacks,
        enable_checkpointing=checkpoints,
        enable_progress_bar=bar != "none",
    )


def evaluate(model: nn.Module, datamodule: L.LightningDataModule, teacher: nn.Module | None = None) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on the test split (plain loop, eval mode, no grad) and, with a ``teacher``, the
    teacher–student top-1 agreement."""
    device = next(model.parameters()).device
    correct = agree = total = 0
    model.eval()
    if teacher is not None:
        teacher.eval().to(device)
    with torch.no_grad():
        for inputs, targets, *_ in datamodule.test_dataloader():
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


def train_classifier(cfg: DictConfig, model: nn.Module, datamodule: Any, out_dir: Path, max_epochs: int) -> None:
    """Supervised training with cross-entropy (teacher or baseline)."""
    module = ClassifierModule(model, instantiate(cfg.optimizer), cfg.scheduler, cfg.label_smoothing)
    trainer_cfg = cfg.copy()
    OmegaConf.set_struct(trainer_cfg, False)
    trainer_cfg.trainer.max_epochs = max_epochs
    make_trainer(trainer_cfg, out_dir, checkpoints=False).fit(module, datamodule)


def obtain_teacher(cfg: DictConfig, datamodule: Any, out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load the configured teacher, reuse a stored one, or train and store it. Returns the model and a report."""
    num_classes = datamodule.num_classes
    if cfg.teacher.checkpoint or cfg.teacher.pretrained:
        teacher = build_model(cfg.teacher, num_classes)
        source = f"checkpoint {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else "timm pretrained weights"
        return teacher, {"teacher_source": source}
    epochs = int(cfg.teacher_epochs)
    store = TeacherStore(cfg.cache_dir)
    key = {
        "data": datamodule.signature(),
        "seed": int(cfg.seed),
        "epochs": epochs,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
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


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
        ("teacher-student agreement", results.get("agreement")),
        ("baseline accuracy (no KD)", results.get("baseline_acc")),
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


# --------------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the job described by ``cfg``; returns (and writes) the results."""
    start = time.perf_counter()
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")

    teacher, report = obtain_teacher(cfg, datamodule, out_dir)
    results: dict[str, Any] = {
        "teacher": cfg.teacher.name,
        **report,
        "teacher_acc": evaluate(teacher, datamodule)["acc"],
    }
    if cfg.stage != "teacher":
        L.seed_everything(cfg.seed, workers=True)
        student = build_model(cfg.model, datamodule.num_classes)
        module = ClassifierModule(student, instantiate(cfg.optimizer), cfg.scheduler, cfg.label_smoothing)
        distill = DistillCallback(teacher, loss=cfg.loss.terms, task_weight=cfg.loss.task_weight)
        trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=(distill,))
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        assert distill.engine is not None
        predictor = distill.engine.student_predictor(module) or student  # SimKD predicts with the teacher's head
        scores = evaluate(predictor, datamodule, teacher)
        results |= {
            "student": cfg.model.name,
            "loss": ",".join(distill.engine.terms),
            "student_acc": scores["acc"],
            "agreement": scores["agreement"],
            "checkpoint": str(out_dir / "checkpoints" / "last.ckpt"),
            "logs": str(Path(trainer.logger.log_dir) / "metrics.csv"),
        }
        if cfg.baseline:
            L.seed_everything(cfg.seed, workers=True)
            baseline = build_model(cfg.model, datamodule.num_classes)
            train_classifier(cfg, baseline, datamodule, out_dir / "baseline", int(cfg.trainer.max_epochs))
            results["baseline_acc"] = evaluate(baseline, datamodule)["acc"]
    results["wall_s"] = time.perf_counter() - start
    results["results"] = str(out_dir / "results.json")
    write_json_atomic(out_dir / "results.json", results)
    print_summary(results)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the student's test accuracy (the objective of sweeps)."""
    results = train(cfg)
    return results.get("student_acc")


register_model_configs()

if __name__ == "__main__":
    main()
