"""Hyperparameter searches: the W&B sweeps of ``conf/sweep/`` and the Optuna studies of ``conf/hparams_search/``.

W&B sweeps: each file's parameter sets are turned into the command lines ``wandb agent`` would run, with wandb's own
expansion (``wandb/sdk/launch/sweeps/utils.py``: ``create_sweep_command`` for ``${envvar:...}``,
``create_sweep_command_args`` for ``${args_no_hyphens}``; the macro substitution of ``wandb/wandb_agent.py``
``Agent._command_run``). The parameter values come from a small local expansion: the product of ``values`` for
``method: grid``, seeded draws from each distribution for ``random``/``bayes`` (wandb's local controller package
``sweeps`` pins ``numpy<2``, so it cannot be installed next to this project's numpy). Every command line must compose
(Hydra validates keys and groups) with the parameter values in the config; one runs end to end with W&B offline and
must log the sweep's metric.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_APP, tiny
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError
from wandb_offline import offline_wandb, read_run

from lightning_kd.config import CONF_DIR, MODEL_GROUPS, compose
from lightning_kd.loggers import job_params
from lightning_kd.models import save_model_file
from lightning_kd.run import train

SWEEPS = sorted((CONF_DIR / "sweep").glob("*.yaml"))
TINY = [*TINY_APP, "model=test_resnet", "teacher=test_resnet", "teacher_epochs=1"]
SAMPLES = 3  # parameter sets drawn per random/bayes sweep


def load_sweep(path: Path) -> dict[str, Any]:
    """The sweep file as `wandb sweep` reads it."""
    from wandb.sdk.launch.sweeps.utils import load_sweep_config

    config = load_sweep_config(str(path))
    assert config, f"wandb could not read {path}"
    return config


def draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a W&B sweep parameter (the distributions these sweeps use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind, low, high = spec.get("distribution"), spec.get("min"), spec.get("max")
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "int_uniform":
        return rng.randint(low, high)
    raise NotImplementedError(f"teach this test the distribution {kind!r} ({spec})")


def parameter_sets(sweep: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """``method: grid``: every combination; ``random``/``bayes``: :data:`SAMPLES` seeded draws."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        for name, spec in params.items():
            if not ({"value", "values"} & spec.keys()):
                raise NotImplementedError(f"grid parameter {name}: only value/values are expanded here ({spec})")
        axes = [[spec["value"]] if "value" in spec else spec["values"] for spec in params.values()]
        return [dict(zip(params, combo)) for combo in itertools.product(*axes)]
    rng = random.Random(seed)
    return [{name: draw(spec, rng) for name, spec in params.items()} for _ in range(SAMPLES)]


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line `wandb agent` runs for ``params`` (wandb_agent.py, Agent._command_run, on Linux)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    macros |= {"interpreter": ["python"], "program": [sweep["program"]], "env": ["/usr/bin/env"]}
    line: list[str] = []
    for chunk in map(str, command):
        line += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return line


def app_overrides(line: list[str]) -> list[str]:
    """The Hydra overrides of an agent command line ``/usr/bin/env python -m lightning_kd.run ...``."""
    assert line[:4] == ["/usr/bin/env", "python", "-m", "lightning_kd.run"], line
    return line[4:]


def same(actual: Any, expected: Any) -> bool:
    return actual == pytest.approx(expected) if isinstance(expected, float) else actual == expected


def check_values(cfg: Any, params: dict[str, Any]) -> None:
    """Each sweep parameter reached the composed config: a group's option, or the value at the key."""
    choices = cfg.hydra.runtime.choices
    for name, value in params.items():
        key = name.lstrip("+")
        if key in choices:
            assert choices[key] == value, (name, choices[key])
        else:
            assert same(OmegaConf.select(cfg, key), value), (name, OmegaConf.select(cfg, key))


def test_sweep_files_exist() -> None:
    assert {p.stem for p in SWEEPS} >= {"loss_grid", "kd_search", "dkd_grid"}


def group_options(group: str) -> set[str]:
    """The options of a config group: its conf/<group>/*.yaml files, or timm's model names (model, teacher)."""
    if group in MODEL_GROUPS:
        import timm

        return set(timm.list_models())
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | set(MODEL_GROUPS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_command_lines_compose(path: Path) -> None:
    """Every command line the agent would run is `python -m lightning_kd.run logger=wandb <key=value ...>`; Hydra's
    override parser reads each one with the parameter values; every group option it selects is one of the group's
    options; and it composes with the app's config (unknown keys fail), carrying the values into it. Composing costs
    about a second (Hydra copies the ConfigStore of timm model options), so one line per distinct set of override
    keys is composed: lines with the same keys differ only in values and group options, checked above."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = load_sweep(path)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] == "maximize"
    assert "." not in sweep["metric"]["name"]  # W&B reads a dotted metric name as nested keys
    parser = OverridesParser.create()
    composed: set[tuple[str, ...]] = set()
    sets = parameter_sets(sweep)
    assert sets
    for params in sets:
        overrides = app_overrides(agent_command(sweep, params))
        assert "logger=wandb" in overrides
        parsed = {o.input_line.split("=", 1)[0]: o.value() for o in parser.parse_overrides(overrides)}
        for name, value in params.items():
            assert same(parsed[name], value), name
        for key, value in parsed.items():
            if key in GROUPS:
                assert value in group_options(key), f"{key}={value} is not an option of the {key} group"
        if tuple(parsed) not in composed:
            composed.add(tuple(parsed))
            check_values(compose(overrides), params)


def test_one_sweep_run_logs_the_metric_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first parameter set of conf/sweep/kd_search.yaml, run end to end with tiny settings and W&B offline: the
    run's summary holds every sweep's metric (student_val_acc) with the results.json value, and its config holds each
    sweep parameter under the same name (so W&B sees one value per parameter)."""
    wandb_dir = offline_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    teacher = save_model_file(
        tiny("test_resnet", seed=1), tmp_path / "t.pt", {"model": "test_resnet", "num_classes": 10}
    )
    sweep = load_sweep(CONF_DIR / "sweep" / "kd_search.yaml")
    params = parameter_sets(sweep)[0]
    results = train(compose([*app_overrides(agent_command(sweep, params)), *TINY, f"teacher.checkpoint={teacher}"]))
    run = read_run(wandb_dir)
    assert run.exit_code == 0
    for path in SWEEPS:
        metric = load_sweep(path)["metric"]["name"]
        assert run.summary[metric] == pytest.approx(results[metric]), metric
    for name, value in params.items():
        assert same(run.config[name.lstrip("+")], value), name


def test_sweep_files_are_not_hydra_configs() -> None:
    """Nothing selects conf/sweep/ by default, and composing one by mistake (+sweep=...) fails as soon as the app
    resolves its config: the agent's ${env}, ${args_no_hyphens} are not Hydra interpolations."""
    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
    assert not [d for d in defaults if isinstance(d, dict) and any("sweep" in k for k in d)]
    with pytest.raises(InterpolationKeyError, match="env"):
        job_params(compose([*TINY, "+sweep=kd_search"]))


# --------------------------------------------------------------------------------------------------------------------
# Optuna (hydra-optuna-sweeper)
# --------------------------------------------------------------------------------------------------------------------
#: Runs `python -m lightning_kd.run` with every import of wandb refused and recorded (file of the importing frame).
_RUN_WITHOUT_WANDB = """
import json, runpy, sys, traceback
importers = []
class RefuseWandb:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "wandb":
            return None
        frames = [f.filename for f in traceback.extract_stack() if not f.filename.startswith("<")]
        importers.append(frames[-1] if frames else "?")
        raise ModuleNotFoundError("wandb refused by the test")
sys.meta_path.insert(0, RefuseWandb())
sys.argv = ["lightning_kd.run", *json.loads(sys.argv[1])]
try:
    runpy.run_module("lightning_kd.run", run_name="__main__")
finally:
    print("WANDB_IMPORTERS=" + json.dumps(importers))
    print("WANDB_LOADED=" + json.dumps("wandb" in sys.modules))
"""


@pytest.mark.slow
def test_optuna_study_maximises_the_validation_accuracy(tmp_path: Path) -> None:
    """hparams_search=kd_optuna with 2 trials: two jobs, each with results.json; the teacher is trained by the first
    and reused from the teacher store by the second; optimization_results.yaml holds the best student_val_acc and its
    parameters. The study logs with the default CSV logger, and nothing imports wandb in it (timm 1.0's import-time
    `import wandb` in timm/utils/summary.py is answered by lightning_kd._lazy.import_timm with a proxy)."""
    sweep_dir = tmp_path / "study"
    overrides = ["hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "LIGHTNING_KD_CACHE": str(tmp_path / "store"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT_WANDB, json.dumps(overrides)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [p.name for p in trials] == ["0", "1"]
    results = [json.loads((p / "results.json").read_text()) for p in trials]
    assert "trained now" in results[0]["teacher_source"] and "reused" in results[1]["teacher_source"]
    assert all((p / "logs" / "metrics.csv").is_file() for p in trials)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    values = [r["student_val_acc"] for r in results]
    assert best["best_value"] == pytest.approx(max(values))
    searched = {"loss.terms.kd.temperature", "loss.terms.kd.weight", "loss.task_weight"}
    assert set(best["best_params"]) == searched
    chosen = [
        {
            k: float(v)
            for k, v in (o.split("=", 1) for o in yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text()))
            if k in searched
        }
        for p in trials
    ]
    assert any(c == pytest.approx(best["best_params"]) for c, v in zip(chosen, values) if v == max(values))
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("WANDB_"))
    assert json.loads(out["WANDB_IMPORTERS"]) == []  # timm's probe never reaches the import system either
    assert json.loads(out["WANDB_LOADED"]) is False
