"""Helpers shared by the benchmark scripts (not a benchmark itself): machine description, robust statistics, the
``RESULT`` line, where outputs go, and bar plots.

The scripts import it with ``from _common import ...`` after putting their own directory on ``sys.path``, so they run
as ``python benchmarks/<script>.py`` from anywhere and load by path (``importlib``) in ``tests/test_benchmarks.py``.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: where the committed outputs of real runs live
RESULTS = Path(__file__).resolve().parent / "results"
#: the pair of every ``--smoke`` run: timm's tiny test EfficientNet (0.1 M parameters) taught by resnet10t; both use the
#: ImageNet mean/std (timm's LogitDistillationTask re-normalises the teacher's input when they differ)
SMOKE_STUDENT, SMOKE_TEACHER = "test_efficientnet", "resnet10t"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loadavg() -> str:
    """``os.getloadavg()`` as text (1/5/15 min), ``n/a`` where the platform has none."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return "n/a"


def busy_warning(threads: int) -> str | None:
    """A warning line when the 1-minute load average exceeds half the usable cores and the process runs several
    threads: intra-op threads that wait for each other while other processes hold the cores make step times jump
    (seen here: the same step 0.3 s or 4 s), and then even round-robin ratios are noisy."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    if threads > 1 and load > cores() / 2:
        return (
            f"# WARNING: the machine is busy (1-min load {load:.2f} on {cores()} cores) and this process runs "
            f"{threads} threads: step times are erratic, ratios noisy; rerun on an idle machine or with --threads 1"
        )
    return None


def versions() -> str:
    """Python, torch, lightning and timm versions, machine and cores, for a header line."""
    import lightning
    import timm
    import torch

    return (
        f"python {platform.python_version()}  torch {torch.__version__}  lightning {lightning.__version__}  "
        f"timm {timm.__version__}  machine {platform.machine()}  cores {cores()}"
    )


def summary(values: Sequence[float]) -> tuple[float, float, float, float, int]:
    """``(median, p25, p75, IQR / median in %, n)``."""
    v = np.asarray(values, dtype=float)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return float(med), float(p25), float(p75), float((p75 - p25) / med * 100.0) if med else float("nan"), len(v)


def result_line(**values: float | str) -> str:
    """The last line every benchmark prints: ``RESULT key=value ...`` (floats with 3 decimals)."""
    parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    return "RESULT " + " ".join(parts)


def output_dir(out: Path | None, smoke: bool) -> Path:
    """``--out`` if given; else a fresh temporary directory for ``--smoke`` (never the committed results), else
    ``benchmarks/results``. Created if missing."""
    path = out if out is not None else (Path(tempfile.mkdtemp(prefix="lkd-bench-")) if smoke else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bar_plot(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    errors: Sequence[Sequence[float]] | None = None,
    ylabel: str,
    title: str,
    colors: Sequence[str] | None = None,
    reference: tuple[float, str] | None = None,
    annotate: str = "{:.1f}",
) -> str:
    """A bar chart written to ``path`` (PNG). ``errors``: ``[lower, upper]`` distances for asymmetric error bars;
    ``reference``: ``(y, label)`` of a dashed horizontal line. Returns a line to print (where the plot went, or why
    there is none: matplotlib is the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed (pip install -e ".[bench]"): no plot written'
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(labels) + 1.5), 4.2))
    bars = ax.bar(labels, values, yerr=errors, capsize=3, color=colors)
    for bar, value in zip(bars, values):  # the value inside the bar, clear of the error bars
        ax.annotate(
            annotate.format(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
            ha="center",
            va="center",
            fontsize=9,
            color="white",
            fontweight="bold",
        )
    if reference is not None:
        ax.axhline(reference[0], color="k", lw=0.8, ls="--", label=reference[1])
        ax.legend(loc="lower right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(values) * 1.18 if len(values) else 1)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
