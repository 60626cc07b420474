"""The Hydra app: composition, errors on bad names/keys, and end-to-end runs on digits in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf.errors import ConfigAttributeError

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "progress_bar=none",
    "data.image_size=16",
    "trainer.max_epochs=3",
    "teacher_epochs=3",
    "trainer.enable_model_summary=false",
]


def run_app(*overrides: str, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [python, "-m", "lightning_kd.run", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_defaults_compose_and_instantiate() -> None:
    cfg = compose()
    assert cfg.model.name == "resnet18" and cfg.teacher.name == "resnet34" and cfg.data.image_size == 32
    assert cfg.stage == "all" and cfg.baseline is False and cfg.seed == 0
    assert list(build_terms(cfg.loss.terms)) == ["kd"]
    assert instantiate(cfg.data).num_classes == 10


@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml")))
def test_every_loss_config_builds(loss: str) -> None:
    """Each YAML builds the terms it lists (one named after the file, except the LM recipes that pair a divergence
    with a generation callback: gkd = jsd + on-policy sampling...)."""
    cfg = compose([f"loss={loss}"])
    names = list(build_terms(cfg.loss.terms))
    assert names == list(cfg.loss.terms)
    assert names == [loss] or cfg.loss.get("generation") is not None


def test_loss_list_composes() -> None:
    cfg = compose(["loss=[kd,rkd,fitnet]", "loss.task_weight=0.5"])
    assert list(build_terms(cfg.loss.terms)) == ["kd", "rkd", "fitnet"]
    assert cfg.loss.task_weight == 0.5


def test_any_timm_name_is_a_model_option() -> None:
    cfg = compose(["model=convnext_atto", "teacher=efficientnet_b0"])
    assert (cfg.model.name, cfg.teacher.name) == ("convnext_atto", "efficientnet_b0")
    assert create_model(cfg.model.name, 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_names_list_valid_options() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)loss/nope.*fitnet.*kd.*rkd"):
        compose(["loss=nope"])
    with pytest.raises(MissingConfigException, match=r"(?s)data/nope.*cifar10.*digits"):
        compose(["data=nope"])
    with pytest.raises(MissingConfigException, match=r"(?s)model/resnet1800.*resnet18"):
        compose(["model=resnet1800"])


def test_config_typo_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match=r"max_epoch"):
        compose(["trainer.max_epoch=2"])
    with pytest.raises(ConfigAttributeError):
        compose().trainer.max_epoch  # noqa: B018 - struct mode


def test_missing_dataset_root(tmp_path) -> None:
    cfg = compose(["data=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"download"):
        instantiate(cfg.data).prepare_data()


def test_unknown_loss_exits_nonzero_with_names(tmp_path) -> None:
    proc = run_app("loss=nope", cwd=tmp_path)
    assert proc.returncode != 0
    assert "kd" in proc.stderr and "rkd" in proc.stderr and "fitnet" in proc.stderr


@pytest.mark.slow
def test_end_to_end_on_digits_then_resume_and_reuse(tmp_path) -> None:
    # 1. cold: trains and stores the teacher, distils, trains the baseline
    run_dir = tmp_path / "run"
    proc = run_app(
        *TINY, "model=resnet18", "teacher=resnet18", "baseline=true", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("teacher_acc", "student_acc", "agreement", "wall_s", "baseline_acc"):
        assert key in results, key
    assert results["student_acc"] > 0.6 and results["teacher_acc"] > 0.6  # chance is 0.1
    assert "trained now" in results["teacher_source"]
    assert "student accuracy" in proc.stdout

    # the checkpoint reloads: weights_only, and as a plain timm model
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] > 0
    student = create_model("resnet18", 10, checkpoint=last)
    assert student(torch.randn(2, 3, 16, 16)).shape == (2, 10)

    # 2. a run killed mid-way (SIGKILL, between or during checkpoint writes) leaves an intact last.ckpt ...
    killed_dir = tmp_path / "killed"
    killed_last = killed_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightning_kd.run",
            *TINY,
            "model=resnet18",
            "teacher=resnet18",
            "trainer.max_epochs=200",
            f"hydra.run.dir={killed_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        writes, last_mtime, deadline = 0, None, time.monotonic() + 300
        while writes < 3 and time.monotonic() < deadline and proc.poll() is None:
            if killed_last.exists() and killed_last.stat().st_mtime_ns != last_mtime:
                writes, last_mtime = writes + 1, killed_last.stat().st_mtime_ns
            time.sleep(0.05)
        time.sleep(0.4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert writes >= 3, "the run did not write last.ckpt three times"
    interrupted = torch.load(killed_last, weights_only=True)
    assert interrupted["global_step"] > 0

    # ... and ckpt_path=<last> resumes it, reusing the stored teacher
    resume_dir = tmp_path / "resume"
    proc = run_app(
        *TINY,
        "model=resnet18",
        "teacher=resnet18",
        f"trainer.max_epochs={interrupted['epoch'] + 2}",
        f"ckpt_path={killed_last}",
        f"hydra.run.dir={resume_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(resume_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] > interrupted["epoch"] and resumed["global_step"] > interrupted["global_step"]
    assert "reused" in json.loads((resume_dir / "results.json").read_text())["teacher_source"]

    # 3. another loss on the stored teacher, student stage only
    rkd_dir = tmp_path / "rkd"
    proc = run_app(
        *TINY,
        "loss=rkd",
        "model=resnet18",
        "teacher=resnet18",
        "stage=student",
        f"hydra.run.dir={rkd_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((rkd_dir / "results.json").read_text())["student_acc"] > 0.3


@pytest.mark.slow
def test_stage_student_without_teacher_fails_clearly(tmp_path) -> None:
    proc = run_app(*TINY, "stage=student", "teacher=resnet10t", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "stage=teacher" in proc.stderr


@pytest.mark.slow
def test_configs_found_from_installed_wheel(tmp_path) -> None:
    """Build the wheel, install it into a fresh venv, and run the app from outside the repository."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(dist.glob("lightning_kd-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=600
    )
    where = subprocess.run(
        [python, "-c", "import lightning_kd.config as c; print(c.CONF_DIR)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("lightning_kd/conf"), where
    proc = run_app(
        "data=synthetic",
        "data.num_samples=120",
        "stage=teacher",
        "teacher=resnet10t",
        "trainer.max_epochs=1",
        "progress_bar=none",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        python=python,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher_acc" in json.loads((tmp_path / "r" / "results.json").read_text())
