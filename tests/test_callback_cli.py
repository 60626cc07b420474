"""DistillCallback from a LightningCLI YAML config (``trainer.callbacks: [{class_path: lightning_kd.DistillCallback,
init_args: ...}]``), the way a user adds distillation to an existing LightningCLI project without editing code.

The model and data classes named in the configs live in ``tests/cli_models.py``.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import SmallCNN, tiny

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # needs jsonargparse

from lightning_kd import DistillCallback
from lightning_kd.losses.kd import KDLoss
from lightning_kd.models import save_model_file

TESTS = Path(__file__).parent

# What a user writes: their trainer, model and data sections, plus the callback. {callbacks} is filled per test.
CONFIG = """\
trainer:
  max_steps: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
{callbacks}
model:
  class_path: cli_models.CLIModule
  init_args:
    lr: 0.05
data:
  class_path: cli_models.SyntheticDataModule
  init_args:
    batch_size: 8
"""

KD = """\
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher: resnet18
        loss: kd
"""


def _write(tmp_path: Path, callbacks: str, name: str = "config.yaml", config: str = CONFIG) -> Path:
    path = tmp_path / name
    path.write_text(config.format(callbacks=callbacks.rstrip("\n") or "    []"))
    return path


def _fit(path: Path, *extra: str, **kwargs) -> LightningCLI:
    """``LightningCLI(args=[...])`` in-process, as from ``python main.py fit --config path`` (pytest's own
    command-line arguments hidden from it)."""
    kwargs.setdefault("save_config_callback", None)
    with mock.patch.object(sys, "argv", [sys.argv[0]]):
        return LightningCLI(args=["fit", "--config", str(path), *extra], **kwargs)


def _distill_callbacks(cli: LightningCLI) -> list[DistillCallback]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, DistillCallback)]


def _metric(cli: LightningCLI, key: str) -> float:
    value = cli.trainer.callback_metrics[key]
    assert math.isfinite(float(value)), f"{key} = {value}"
    return float(value)


def _assert_user_module_unchanged(model: torch.nn.Module) -> None:
    """The module after fit is the user's: no training_step override, no attached engine, no hooks left, and the
    same state_dict keys as a freshly built one."""
    from cli_models import CLIModule

    assert "training_step" not in model.__dict__
    assert not [n for n, _ in model.named_modules() if n.startswith("_lkd_")]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert model.state_dict().keys() == CLIModule().state_dict().keys()


def test_cli_yaml_callback_with_timm_teacher_trains_and_logs(tmp_path: Path) -> None:
    """The callback listed under trainer.callbacks is built from YAML, trains the student with a timm-name teacher,
    logs train/kd through the user's logger (CSVLogger), leaves the module as it was, and the config LightningCLI
    saves (SaveConfigCallback left on, as users do) runs again."""
    config = CONFIG.replace(
        "  logger: false\n",
        f"  log_every_n_steps: 1\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args:\n      save_dir: {tmp_path / 'logs'}\n",
    )
    cli = _fit(_write(tmp_path, KD, config=config), save_config_callback=SaveConfigCallback)
    (cb,) = _distill_callbacks(cli)
    assert cb.teacher == "resnet18" and cb.loss == "kd" and cb.name is None and cb.task_weight == 1.0
    assert cb.engine is not None and list(cb.engine.terms) == ["kd"]
    assert cb.engine.teacher.get_classifier().out_features == 10  # built with the student's class count
    assert cli.trainer.global_step == 2

    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/kd")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(math.isfinite(float(r["train/kd"])) and float(r["train/kd"]) > 0 for r in rows)
    assert all(float(r["train/distill"]) == pytest.approx(float(r["train/kd"])) for r in rows)
    _assert_user_module_unchanged(cli.model)

    # the same run without the callback ends with other weights: the distillation term took part in training
    plain = _fit(_write(tmp_path, "", name="plain.yaml"))
    assert not _distill_callbacks(plain) and "train/kd" not in plain.trainer.callback_metrics
    diff = max((a - b).abs().max() for a, b in zip(cli.model.parameters(), plain.model.parameters()))
    assert diff > 1e-7

    # the saved config.yaml lists the callback and reproduces it
    saved = log_dir / "config.yaml"
    assert "lightning_kd.DistillCallback" in saved.read_text()
    again = _fit(saved, "--trainer.logger=false", "--trainer.max_steps=1")
    (cb2,) = _distill_callbacks(again)
    assert (cb2.teacher, cb2.loss, cb2.task_weight, cb2.name) == ("resnet18", "kd", 1.0, None)
    assert _metric(again, "train/kd") > 0


def test_cli_loss_as_a_list(tmp_path: Path) -> None:
    callbacks = """\
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher: {class_path: conftest.SmallCNN, init_args: {seed: 1}}
        loss:
          - kd
          - fitnet: {student_layers: net.features.2, teacher_layers: features.2, weight: 2.0}
"""
    cli = _fit(_write(tmp_path, callbacks))
    (cb,) = _distill_callbacks(cli)
    spec = {"student_layers": "net.features.2", "teacher_layers": "features.2", "weight": 2.0}
    assert cb.loss == ["kd", {"fitnet": spec}]
    assert list(cb.engine.terms) == ["kd", "fitnet"] and cb.engine.terms["fitnet"].weight == 2.0
    assert cb.engine.terms["fitnet"].connector is not None
    kd, fitnet = _metric(cli, "train/kd"), _metric(cli, "train/fitnet")
    assert _metric(cli, "train/distill") == pytest.approx(kd + 2.0 * fitnet, rel=1e-5)
    _assert_user_module_unchanged(cli.model)


def test_cli_loss_as_a_dict(tmp_path: Path) -> None:
    callbacks = """\
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher:
          class_path: conftest.SmallCNN
          init_args: {seed: 1}
        task_weight: 0.5
        loss:
          fitnet:
            student_layers: net.features.2
            teacher_layers: features.2
            weight: 0.5
"""
    cli = _fit(_write(tmp_path, callbacks))
    (cb,) = _distill_callbacks(cli)
    assert isinstance(cb.loss, dict) and list(cb.loss) == ["fitnet"] and cb.task_weight == 0.5
    assert list(cb.engine.terms) == ["fitnet"] and cb.engine.terms["fitnet"].weight == 0.5
    assert "train/kd" not in cli.trainer.callback_metrics
    assert _metric(cli, "train/distill") == pytest.approx(0.5 * _metric(cli, "train/fitnet"), rel=1e-5)
    _assert_user_module_unchanged(cli.model)


def test_cli_teacher_from_a_saved_file(tmp_path: Path) -> None:
    teacher = tiny("resnet18", seed=3)
    path = save_model_file(teacher, tmp_path / "teacher.pt", {"model": "resnet18", "num_classes": 10})
    callbacks = KD.replace("teacher: resnet18", f"teacher: {path}")
    cli = _fit(_write(tmp_path, callbacks))
    (cb,) = _distill_callbacks(cli)
    assert str(cb.teacher) == str(path)
    loaded = cb.engine.teacher.state_dict()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(loaded[k], v, msg=k)
    assert _metric(cli, "train/kd") > 0
    _assert_user_module_unchanged(cli.model)


def test_cli_teacher_and_loss_given_by_class_path(tmp_path: Path) -> None:
    """jsonargparse also builds the ``nn.Module`` and ``LossTerm`` members of the signature's unions from
    ``class_path``: a teacher class of the user's and a loss term class with its own arguments."""
    callbacks = """\
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher:
          class_path: conftest.SmallCNN
          init_args: {seed: 1}
        loss:
          class_path: lightning_kd.losses.kd.KDLoss
          init_args: {temperature: 2.0, weight: 3.0}
"""
    cli = _fit(_write(tmp_path, callbacks))
    (cb,) = _distill_callbacks(cli)
    assert type(cb.teacher).__name__ == "SmallCNN"
    torch.testing.assert_close(cb.teacher.fc.weight, SmallCNN(seed=1).fc.weight)
    assert isinstance(cb.loss, KDLoss) and cb.loss.temperature == 2.0 and cb.loss.weight == 3.0
    assert _metric(cli, "train/distill") == pytest.approx(3.0 * _metric(cli, "train/kd"), rel=1e-5)
    _assert_user_module_unchanged(cli.model)


def test_cli_two_named_callbacks(tmp_path: Path) -> None:
    callbacks = """\
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher: {class_path: conftest.SmallCNN, init_args: {seed: 1}}
        loss: kd
        name: t1
    - class_path: lightning_kd.DistillCallback
      init_args:
        teacher: {class_path: conftest.SmallCNN, init_args: {seed: 2}}
        loss: {fitnet: {student_layers: net.features.2, teacher_layers: features.2}}
        name: t2
"""
    cli = _fit(_write(tmp_path, callbacks))
    t1, t2 = _distill_callbacks(cli)
    assert (t1.name, t2.name) == ("t1", "t2") and t1.state_key != t2.state_key
    for key in ("train/t1/kd", "train/t1/distill", "train/t2/fitnet", "train/t2/distill"):
        _metric(cli, key)
    assert "train/kd" not in cli.trainer.callback_metrics
    _assert_user_module_unchanged(cli.model)


MAIN = """\
from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI()
"""


@pytest.mark.slow
def test_cli_script_in_a_subprocess(tmp_path: Path) -> None:
    """``python main.py fit --config config.yaml`` with the stock ``LightningCLI()`` script."""
    (tmp_path / "main.py").write_text(MAIN)
    config = CONFIG.replace(
        "  logger: false\n",
        "  log_every_n_steps: 1\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        "    init_args:\n      save_dir: logs\n      version: 0\n",
    )
    _write(tmp_path, KD, config=config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", "config.yaml"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        kd = [float(r["train/kd"]) for r in csv.DictReader(f) if r.get("train/kd")]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)
