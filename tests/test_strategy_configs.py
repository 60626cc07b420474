"""Every conf/strategy/*.yaml runs through the Hydra app's command line (`python -m lightning_kd.run strategy=NAME`).

One multirun process sweeps over all strategy configs with tiny settings (synthetic data, a saved teacher, two
training steps); each strategy is then checked as its own test case. A new strategy is covered by adding its YAML.
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

from lightning_kd.config import CONF_DIR
from lightning_kd.models import save_model_file

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
TINY = [
    "model=resnet18",
    "teacher=resnet18",
    "data=synthetic",
    "data.num_samples=96",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "teacher_epochs=1",
    "progress_bar=none",
]


def multirun(tmp: Path, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir = tmp / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_kd.run", "--multirun", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return sweep_dir, proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("strategy-sweep")
    teacher = save_model_file(tiny("resnet18", seed=1), tmp / "teacher.pt", {"model": "resnet18", "num_classes": 10})
    return multirun(tmp, f"strategy={','.join(STRATEGIES)}", f"teacher.checkpoint={teacher}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_config_runs_through_the_app(sweep, strategy: str) -> None:
    sweep_dir, proc = sweep
    runs = {}
    for path in sweep_dir.glob("*/.hydra/overrides.yaml"):
        chosen = [line for line in path.read_text().splitlines() if "strategy=" in line]
        runs[chosen[0].split("strategy=")[1].strip()] = path.parent.parent
    assert strategy in runs, f"no run for strategy={strategy}; exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    results = runs[strategy] / "results.json"
    assert results.is_file(), f"strategy={strategy} wrote no results; exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    res = json.loads(results.read_text())
    assert math.isfinite(res["student_acc"]) and 0 <= res["student_acc"] <= 1
