"""The benchmark scripts (``benchmarks/*.py``): each is importable, has ``main(argv)`` and a ``--smoke`` flag, and its
smoke run ends with exactly one ``RESULT`` line carrying the expected keys, writes its plots where it is told (never
into the committed ``benchmarks/results/``), and — where the smoke run measures something checkable — gets it right:
the loss cross-check of ``compare_overhead.py`` finds the same loss in all frameworks, distillation needs more memory
than student-only training, the GPU script skips cleanly without CUDA.

The scripts run in this process (loaded by path with importlib) except where measuring needs fresh processes
(``memory.py``'s configurations, ``main_job.py``'s app runs).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
EXPECTED_SCRIPTS = {
    "compare_overhead",
    "gpu_throughput",
    "llm_loss_memory",
    "main_job",
    "memory",
    "quality",
    "step_overhead",
    "teacher_cache",
}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def load(name: str) -> ModuleType:
    """A benchmark script as a module (its ``if __name__ == "__main__"`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def result(out: str) -> dict[str, str]:
    """The ``key=value`` pairs of the output's last line, which must be its only ``RESULT`` line."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("RESULT "), lines[-5:]
    assert sum(line.startswith("RESULT") for line in lines) == 1
    pairs = [item.split("=", 1) for item in lines[-1].split()[1:]]
    assert all(len(pair) == 2 and pair[0] and pair[1] for pair in pairs), lines[-1]
    return dict(pairs)


def positive(values: dict[str, str], *keys: str) -> None:
    for key in keys:
        assert key in values, f"{key} missing from {values}"
        number = float(values[key])
        assert math.isfinite(number) and number > 0, f"{key}={values[key]}"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    """``run(name, *argv)``: the script's ``main(argv)`` in this process, its stdout's RESULT pairs and its text;
    torch's thread count is restored afterwards (the scripts set it)."""
    threads = torch.get_num_threads()

    def call(name: str, *argv: str) -> tuple[dict[str, str], str]:
        load(name).main(list(argv))
        out = capsys.readouterr().out
        return result(out), out

    yield call
    torch.set_num_threads(threads)


def test_every_script_is_importable_with_main_and_smoke() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == EXPECTED_SCRIPTS
    for name in sorted(scripts):
        module = load(name)
        assert callable(module.main), name
        assert "--smoke" in (BENCH / f"{name}.py").read_text(), name


def test_result_line_format() -> None:
    common = load("_common")
    assert common.result_line(a=1.23456, b=2, c="x") == "RESULT a=1.235 b=2 c=x"
    tmp = common.output_dir(None, smoke=True)
    try:
        assert tmp.is_dir() and RESULTS.resolve() not in tmp.resolve().parents and tmp.resolve() != RESULTS.resolve()
    finally:
        shutil.rmtree(tmp)


def test_compare_overhead_smoke_same_loss_everywhere_plot_outside_results(run) -> None:
    values, out = run("compare_overhead", "--smoke")
    positive(
        values,
        *(f"{face}_over_{peer}" for face in ("ours", "callback") for peer in ("timm", "torchdistill", "plain")),
        "module_ms",
        "callback_ms",
        "timm_ms",
        "torchdistill_ms",
        "plain_ms",
    )
    # round 0: same weights, same batch -> the same 0.1·CE + 0.9·KD in lightning_kd (both faces), timm, torchdistill
    assert float(values["loss_rel_diff"]) < 1e-5, out
    assert out.count("(same loss, tolerance") == 2
    if HAS_MATPLOTLIB:  # no --out: a temporary folder, never benchmarks/results
        plot = Path(next(line for line in out.splitlines() if line.startswith("plot: ")).split(" ", 1)[1])
        assert plot.name == "compare_overhead.png" and plot.stat().st_size > 0
        assert plot.resolve().parent != RESULTS.resolve()
        shutil.rmtree(plot.parent)


def test_step_overhead_smoke(run) -> None:
    values, _ = run("step_overhead", "--smoke")
    positive(values, "overhead", "c_ms", "a_ms", "b_ms")


def test_gpu_throughput_smoke_on_cpu_and_skip_without_cuda(run) -> None:
    values, out = run("gpu_throughput", "--smoke", "--device", "cpu")
    positive(values, "student_img_s", "kd_img_s", "kd_over_student")
    assert values["device"] == "cpu" and values["compile"] == "0"
    assert "bf16-mixed" in out and "channels_last True" in out
    values, out = run("gpu_throughput", "--smoke")  # --device auto
    if torch.cuda.is_available():
        positive(values, "student_img_s", "kd_img_s", "kd_over_student")
        assert values["device"] == "cuda"
    else:
        assert values == {"skipped": "no_cuda"}
        assert "no CUDA device" in out


def test_quality_smoke_writes_table_and_plot(run, tmp_path: Path) -> None:
    values, _ = run("quality", "--smoke", "--out", str(tmp_path))
    assert values["methods"] == "1" and values["beat_ce"] in {"0", "1"}
    table = (tmp_path / "quality.md").read_text()
    assert "| kd |" in table and "| ce |" in table
    if HAS_MATPLOTLIB:
        assert (tmp_path / "quality.png").stat().st_size > 0


def test_teacher_cache_smoke(run) -> None:
    values, _ = run(
        "teacher_cache", "--smoke", "--threads", "1", "--student", "test_efficientnet", "--teacher", "resnet10t"
    )
    positive(values, "cached_over_student", "live_over_cached")


@pytest.mark.slow
def test_llm_loss_memory_smoke_same_loss_and_ratios(run) -> None:
    """Chunked and naive divergences in their own processes (the script raises when their losses disagree)."""
    values, out = run("llm_loss_memory", "--smoke", "--threads", "1", "--impls", "chunked,naive")
    positive(values, "memory_ratio", "time_ratio", "total_peak_ratio")
    assert "loss agreement" in out


@pytest.mark.slow
def test_memory_smoke_kd_needs_more_than_student(run, tmp_path: Path) -> None:
    values, out = run("memory", "--smoke", "--out", str(tmp_path))
    positive(values, "kd_over_student", "student_mib", "kd_mib")
    # the teacher's weights and activations come on top of the student's training
    assert float(values["kd_over_student"]) > 1.0, out
    if HAS_MATPLOTLIB:
        assert (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.slow
def test_main_job_smoke_cold_then_warm(run) -> None:
    values, out = run("main_job", "--smoke")
    positive(values, "cold_s", "warm_s")
    assert "teacher store (trained now)" in out and "teacher store (reused)" in out
