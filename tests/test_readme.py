"""The README's code examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


def test_drop_in_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(example("drop-in example"), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    metrics = namespace["trainer"].callback_metrics
    for key in ("train/ce", "train/kd", "train/fitnet", "train/distill", "train/agreement"):
        assert key in metrics, sorted(metrics)
    assert namespace["trainer"].global_step == 10
    model = namespace["trainer"].lightning_module
    assert "training_step" not in model.__dict__  # the user's module is left as it was
    assert "train/kd" in capsys.readouterr().out


def test_lm_drop_in_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(example("lm drop-in example"), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    metrics = namespace["trainer"].callback_metrics
    for key in ("train/jsd", "train/agreement", "train/distill"):
        assert key in metrics, sorted(metrics)
    assert namespace["trainer"].global_step == 3
    assert "train/jsd" in capsys.readouterr().out
