"""Every conf/loss/*.yaml composes and trains through the Hydra app (`python -m lightning_kd.run loss=NAME`).

One multirun process sweeps over all loss configs with tiny settings (a saved teacher, synthetic data, one
training step); each loss is then checked as its own test case. A new loss is covered by adding its YAML.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny

from lightning_kd.config import loss_config_names
from lightning_kd.models import save_model_file

LOSSES = loss_config_names("classification")  # the image-model losses (task=lm ones: test_lm_loss_configs.py)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("loss-sweep")
    teacher = save_model_file(tiny("resnet18", seed=1), tmp / "teacher.pt", {"model": "resnet18", "num_classes": 10})
    sweep_dir = tmp / "multirun"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_kd.run",
            "--multirun",
            f"loss={','.join(LOSSES)}",
            "model=resnet18",
            "teacher=resnet18",
            f"teacher.checkpoint={teacher}",
            "data=synthetic",
            "data.num_samples=96",
            "data.image_size=16",
            "data.batch_size=16",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1",
            "progress_bar=none",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return sweep_dir, proc


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_config_trains_through_the_app(sweep, loss: str) -> None:
    sweep_dir, proc = sweep
    runs = {}
    for path in sweep_dir.glob("*/results.json"):
        runs[json.loads(path.read_text())["loss"]] = path.parent
    assert loss in runs, f"no results for loss={loss}; exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    res = json.loads((runs[loss] / "results.json").read_text())
    assert math.isfinite(res["student_acc"]) and 0 <= res["agreement"] <= 1
    header = (runs[loss] / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"train/{loss}" in header and "train/ce" in header
