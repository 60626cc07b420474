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
from conftest import TINY_APP, tiny

from lightning_kd.config import CONF_DIR
from lightning_kd.models import save_model_file

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
TINY = [*TINY_APP, "model=test_resnet", "teacher=test_resnet", "teacher_epochs=1"]


def multirun(tmp: Path, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir = tmp / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_kd.run", "--multirun", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
        check=False,
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
    teacher = save_model_file(
        tiny("test_resnet", seed=1), tmp / "teacher.pt", {"model": "test_resnet", "num_classes": 10}
    )
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
    assert 0 <= res["student_val_acc"] <= 1  # the sweep objective, for every strategy


@pytest.mark.slow
def test_option_groups_combine_through_the_app(tmp_path: Path) -> None:
    """augment=, teacher_cache= and averaging= together on the command line: the teacher runs over the training set
    in the first epoch under the replayed augmentation (prefill) and not in the second (period 1: the same views),
    whose steps read the cache; the student is weight-averaged."""
    teacher = save_model_file(
        tiny("test_resnet", seed=1), tmp_path / "t.pt", {"model": "test_resnet", "num_classes": 10}
    )
    sweep_dir, proc = multirun(
        tmp_path,
        "augment=shift,crop_flip",
        "++augment.period=1",
        "teacher_cache=disk",
        "averaging=wakd",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        f"teacher.checkpoint={teacher}",
    )
    results = sorted(sweep_dir.glob("*/results.json"))
    assert len(results) == 2, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    for path in results:
        metrics = (path.parent / "logs" / "metrics.csv").read_text().splitlines()
        header = metrics[0].split(",")
        rows = [row.split(",") for row in metrics[1:]]
        computed, read = header.index("train/teacher_cache/computed"), header.index("train/teacher_cache/read")
        per_epoch = [(float(r[computed]), float(r[read])) for r in rows if r[computed]]
        assert len(per_epoch) == 2 and per_epoch[0][0] > 0 and per_epoch[1] == (0.0, per_epoch[0][1]), per_epoch
