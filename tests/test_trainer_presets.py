"""Trainer presets (``trainer=cpu|gpu|ddp|ddp_spawn|fsdp``) and Hydra multirun under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_APP, tiny

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.multirun import job_argv

PRESETS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


def test_presets_present_and_compose() -> None:
    assert {"default", "cpu", "gpu", "ddp", "ddp_spawn", "fsdp"} <= set(PRESETS)
    expected = {
        "cpu": {"accelerator": "cpu", "devices": 1, "strategy": "auto"},
        "gpu": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"},
        "ddp": {"strategy": "ddp", "devices": "auto", "sync_batchnorm": False},
        "ddp_spawn": {"strategy": "ddp_spawn", "devices": "auto"},
        "fsdp": {"strategy": "fsdp", "accelerator": "gpu", "precision": "bf16-mixed"},
    }
    default = compose([]).trainer
    for name, keys in expected.items():
        trainer = compose([f"trainer={name}"]).trainer
        for key, value in keys.items():
            assert trainer[key] == value, (name, key)
        assert set(trainer) >= set(default), f"trainer={name} must extend default.yaml"
        assert trainer.max_epochs == default.max_epochs  # the rest comes from default.yaml


def test_job_argv_drops_the_sweep() -> None:
    argv = job_argv("/x/run.py", ["loss=kd", "trainer=ddp", "hparams_search=kd_optuna"])
    assert argv == ["/x/run.py", "loss=kd", "trainer=ddp", "hparams_search=kd_optuna", "hydra.mode=RUN"]
    assert "-m" not in argv and "--multirun" not in argv


@pytest.mark.slow
def test_multirun_with_ddp_children_join_their_job(tmp_path: Path) -> None:
    """``-m`` over two losses with ``trainer=ddp`` (2 CPU processes): each job's rank-1 child runs that job's config
    in that job's directory, instead of re-running the sweep (which would start 2 more jobs per child)."""
    from lightning_kd.models import save_model_file

    teacher = save_model_file(tiny("test_resnet", seed=1), tmp_path / "teacher.pt", {"model": "test_resnet"})
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "lightning_kd.run", "-m",
        "loss=kd,dist",
        "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        *TINY_APP,
        "model=test_resnet", "teacher=test_resnet", f"teacher.checkpoint={teacher}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"], sorted(p.name for p in sweep.iterdir())
    for job, loss in zip(jobs, ["kd", "dist"]):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["loss"] == loss
        # the child of this job logged into this job's directory (hydra.job.name set by Lightning's launcher)
        assert (sweep / job / "train_ddp_process_1.log").is_file(), sorted(p.name for p in (sweep / job).iterdir())
    assert proc.stdout.count("lightning_kd results") == 2  # rank 0 of each job prints; children do not
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
