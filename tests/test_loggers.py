"""The ``logger`` group (CSV, TensorBoard, W&B offline), the validation metrics the loggers receive
(``val/agreement``, ``val/ece`` on both faces) and the app's objective ``student_val_acc``."""

from __future__ import annotations

import csv
import struct
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_APP, GapNet, SmallCNN, UserModule, fast_trainer, make_loader
from omegaconf import OmegaConf
from torchmetrics.classification import MulticlassCalibrationError
from wandb_offline import offline_wandb, read_run

import lightning_kd
from lightning_kd import loggers
from lightning_kd.app import make_trainer
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.run import train

TINY = [*TINY_APP, "model=test_resnet", "teacher=test_resnet", "teacher_epochs=1"]


def tensorboard_tags(directory: Path) -> set[str]:
    """Scalar tags of the TensorBoard event files in ``directory`` (TFRecord framing: length uint64, its masked CRC,
    the serialized ``Event``, its masked CRC; CRCs not checked here)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:
        from tensorboardX.proto.event_pb2 import Event
    tags = set()
    files = list(directory.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            pos += 12 + length + 4
    return tags


def csv_columns(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f))


# --------------------------------------------------------------------------------------------------------------------
# The app with every logger at once
# --------------------------------------------------------------------------------------------------------------------
def test_csv_tensorboard_and_wandb_offline_through_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One job with logger=[csv,tensorboard,wandb]: CSV and TensorBoard files in the documented places (the
    student's in the run directory, the teacher's under teacher/), and one offline W&B run holding the resolved
    config, the loss terms and validation metrics (the teacher's under teacher/), results.json as summary and file,
    and the student's checkpoint as a model artifact."""
    wandb_dir = offline_wandb(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = compose(
        [
            *TINY,
            "logger=[csv,tensorboard,wandb]",
            "logger.wandb.upload_checkpoint=true",
            "loss.terms.kd.temperature=3.0",
            f"cache_dir={tmp_path / 'store'}",  # an empty teacher store: the teacher trains in this job
        ]
    )
    results = train(cfg)
    assert sys.modules["wandb"].run is None  # finished with the job

    # CSV: <dir>/logs/metrics.csv for the student and the teacher
    columns = csv_columns(run_dir / "logs" / "metrics.csv")
    assert {"train/kd", "val/acc", "val/agreement", "val/ece"} <= set(columns)
    assert "val/acc" in csv_columns(run_dir / "teacher" / "logs" / "metrics.csv")
    # TensorBoard: <dir>/tensorboard/events.out.tfevents.*
    assert {"train/kd", "val/acc", "val/agreement", "val/ece"} <= tensorboard_tags(run_dir / "tensorboard")
    assert "val/acc" in tensorboard_tags(run_dir / "teacher" / "tensorboard")
    assert str(run_dir / "logs" / "metrics.csv") in results["logs"]

    # W&B: one offline run under WANDB_DIR for the whole job
    run = read_run(wandb_dir)
    assert run.exit_code == 0
    assert str(run.path.parent) in results["logs"]
    assert run.config["loss.terms.kd.temperature"] == 3.0  # resolved config, dotted Hydra keys
    assert run.config["loss"] == "kd" and run.config["model.name"] == "test_resnet"
    assert run.config["trainer.max_steps"] == 2
    logged = run.history_keys()
    assert {"train/kd", "train/ce", "val/acc", "val/agreement", "val/ece", "trainer/global_step"} <= logged
    assert {"teacher/train/ce", "teacher/val/acc"} <= logged  # the teacher's trainer, same run, own section
    assert not any(k.startswith("teacher/train/kd") for k in logged)
    for key in ("student_val_acc", "student_acc", "teacher_acc", "agreement"):
        assert run.summary[key] == pytest.approx(results[key])
    assert 0.0 <= run.summary["val/ece"] <= 1.0 and 0.0 <= run.summary["val/agreement"] <= 1.0
    assert "results.json" in run.files
    (artifact,) = run.artifacts
    assert artifact["type"] == "model" and artifact["name"] == f"model-{run.run_id}"
    assert artifact["paths"] == ["last.ckpt"]


def test_failed_job_finishes_its_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails still finishes its W&B run, marked failed, so the next job of a multirun opens its own."""
    import lightning_kd.app

    wandb_dir = offline_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)

    def broken_strategy(cfg, datamodule, out_dir):
        make_trainer(cfg, out_dir, checkpoints=False)  # a trainer logging into the job's run
        raise RuntimeError("boom")

    monkeypatch.setattr(lightning_kd.app, "run_distill", broken_strategy)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose([*TINY, "logger=wandb"]))
    assert sys.modules["wandb"].run is None
    assert read_run(wandb_dir).exit_code == 1


# --------------------------------------------------------------------------------------------------------------------
# Building loggers
# --------------------------------------------------------------------------------------------------------------------
def test_loggers_write_under_each_trainers_directory(tmp_path: Path) -> None:
    """Within a job, a trainer's CSV/TensorBoard loggers write under its own directory;
    ~logger gives none; hparams.yaml holds the resolved config as dotted keys and the group choices."""
    cfg = compose([*TINY, "logger=[csv,tensorboard]"])
    with loggers.job_logging(cfg, tmp_path):
        student = make_trainer(cfg, tmp_path, checkpoints=False)
        teacher = make_trainer(cfg, tmp_path / "teacher", checkpoints=False)
    assert [type(x).__name__ for x in student.loggers] == ["CSVLogger", "TensorBoardLogger"]
    assert Path(student.loggers[0].log_dir) == tmp_path / "logs"
    assert Path(student.loggers[1].log_dir) == tmp_path / "tensorboard"
    assert Path(teacher.loggers[0].log_dir) == tmp_path / "teacher" / "logs"
    assert Path(teacher.loggers[1].log_dir) == tmp_path / "teacher" / "tensorboard"
    student.loggers[0].save()
    hparams = (tmp_path / "logs" / "hparams.yaml").read_text()
    assert "loss.terms.kd.temperature: 4.0" in hparams and "loss: kd" in hparams
    assert make_trainer(compose([*TINY, "~logger"]), tmp_path, checkpoints=False).loggers == []


@pytest.mark.parametrize(("choice", "extra"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_logger_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str, extra: str
) -> None:
    monkeypatch.setattr(loggers, "_installed", lambda name: False)
    cfg = OmegaConf.create({"logger": OmegaConf.load(CONF_DIR / "logger" / f"{choice}.yaml")})
    with pytest.raises(ModuleNotFoundError, match=rf'pip install "lightning-kd\[{extra}\]"'):
        loggers.build_loggers(cfg, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Validation metrics of both faces, and the objective
# --------------------------------------------------------------------------------------------------------------------
class ValidatedUserModule(UserModule):
    def validation_step(self, batch, batch_idx):
        self.log("user/val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())


@pytest.mark.parametrize("face", ["module", "callback"])
def test_validation_agreement_and_calibration_on_both_faces(face: str) -> None:
    """val/agreement (student vs teacher top-1) and val/ece (15 bins, L1) equal the values computed from the trained
    student and the teacher over the validation data."""
    teacher = GapNet(classes=10, seed=3)
    val = make_loader(n=24, batch=8, seed=1)
    L.seed_everything(0)
    if face == "module":
        module = lightning_kd.DistillationModule(SmallCNN(), teacher, loss="kd")
        trainer = fast_trainer(max_epochs=1)
        trainer.fit(module, make_loader(), val)
        student = module.model
        prefix = "val/"
    else:
        module = ValidatedUserModule()
        trainer = fast_trainer(max_epochs=1, callbacks=[lightning_kd.DistillCallback(teacher, loss="kd", name="t")])
        trainer.fit(module, make_loader(), val)
        student = module.net
        prefix = "val/t/"
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
    ece = MulticlassCalibrationError(10, n_bins=15, norm="l1")(s.softmax(-1), y)
    metrics = trainer.callback_metrics
    assert float(metrics[f"{prefix}agreement"]) == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    assert float(metrics[f"{prefix}ece"]) == pytest.approx(float(ece), abs=1e-6)
    assert 0 < float(ece) < 1


def test_main_returns_the_validation_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hydra entry point's return value (the sweep/Optuna objective) is student_val_acc, not the test accuracy."""
    from lightning_kd import run

    monkeypatch.setattr(run, "train", lambda cfg: {"student_acc": 0.25, "student_val_acc": 0.75})
    assert run.main.__wrapped__(OmegaConf.create({})) == 0.75
