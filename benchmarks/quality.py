"""Quality of every loss on real data: a fixed teacher, a small student that sees few labels, CE-only vs each method.

Regime (chosen so that plain KD clearly beats CE-only):

- data: scikit-learn's ``digits`` (1,797 real 8×8 images, resized to 32×32), the package's fixed stratified
  70/15/15 split; the **teacher** trains on the whole training split (1,257 images), the **student** only on a fixed
  stratified ``--label-fraction`` (default 20 %, 251 images) of it — CE and distillation see the same images;
- models: timm ``resnet18`` topology (BasicBlock, 2-2-2-2) at two widths — teacher channels 32-64-128-256, student
  8-16-32-64 (``timm.create_model("resnet18", channels=..., stem_width=..., output_stride=16)``), so every feature
  stage exists on both; ``output_stride=16`` keeps the last stage at 2×2 instead of 1×1 on 32×32 inputs, so the
  methods that read spatial maps of the last stage (CAT-KD, e²KD, ICKD, TRG, SimKD) see real maps;
- optimisation (student and teacher): SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine schedule, batch 64,
  ``--epochs`` (default 30) epochs; teacher trained once (seed 0) and reused by every run;
- methods: every ``conf/loss/*.yaml`` with its shipped defaults (``task_weight`` + terms, most from CIFAR-100 papers;
  nothing is tuned for digits), plus ``ce`` (the student alone, cross-entropy); ``--seeds`` seeds each (student
  initialisation and data order);
- metrics on the 270-image test split: top-1 and teacher–student top-1 agreement; wall time per run.

Writes ``benchmarks/results/quality.md`` and ``quality.png`` (a bar plot of the table's top-1 column, same order; needs
matplotlib: ``pip install -e ".[bench]"``). Last line: ``RESULT methods=<n> beat_ce=<k>`` (k = methods whose mean
top-1 ≥ the CE-only mean).

    python benchmarks/quality.py | tee benchmarks/results/quality.txt
    python benchmarks/quality.py --smoke      # seconds: kd only, 1 seed, 1 epoch of 2 batches, temporary folder
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import timm
import torch
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Subset

from lightning_kd import DistillationModule
from lightning_kd.config import CONF_DIR
from lightning_kd.data import DigitsDataModule
from lightning_kd.data.base import IndexedDataset
from lightning_kd.engine import NonFiniteLossError
from lightning_kd.module import ClassifierModule

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import output_dir

TEACHER = {"channels": (32, 64, 128, 256), "stem_width": 32, "output_stride": 16}
STUDENT = {"channels": (8, 16, 32, 64), "stem_width": 8, "output_stride": 16}


def make_model(widths: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=10, **widths)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def trainer(epochs: int, batches: int | None = None) -> L.Trainer:
    """``batches``: training batches per epoch (``limit_train_batches``), all by default."""
    return L.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def loaders(fraction: float) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    """Teacher train loader (all), student train loader (stratified fraction, re-indexed 0..n-1), test loader."""
    dm = DigitsDataModule(batch_size=64, image_size=32, seed=0)
    dm.setup("fit")
    base = dm.train_set.dataset
    labels = np.array([int(base[i][1]) for i in range(len(base))])
    if fraction < 1.0:
        keep, _ = train_test_split(np.arange(len(base)), train_size=fraction, stratify=labels, random_state=0)
        keep = np.sort(keep)
    else:
        keep = np.arange(len(base))
    student_set = IndexedDataset(Subset(base, keep.tolist()))
    full = DataLoader(dm.train_set, batch_size=64, shuffle=True)
    part = DataLoader(student_set, batch_size=64, shuffle=True)
    return full, part, dm.test_dataloader(), len(student_set)


def evaluate(model: torch.nn.Module, teacher: torch.nn.Module, test: DataLoader) -> tuple[float, float]:
    model.eval()
    correct = agree = total = 0
    with torch.no_grad():
        for x, y, _ in test:
            pred = model(x).argmax(-1)
            correct += int((pred == y).sum())
            agree += int((pred == teacher(x).argmax(-1)).sum())
            total += len(y)
    return correct / total, agree / total


def run_method(
    method: str, seed: int, teacher, part: DataLoader, test: DataLoader, epochs: int, batches: int | None = None
) -> tuple:
    L.seed_everything(seed, workers=True)
    student = make_model(STUDENT, seed)
    if method == "ce":
        module = ClassifierModule(student, optimizer)
    else:
        cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / f"{method}.yaml"))
        module = DistillationModule(student, teacher, cfg["terms"], cfg["task_weight"], optimizer)
    start = time.perf_counter()
    try:
        trainer(epochs, batches).fit(module, part)
    except NonFiniteLossError as err:  # reported as a diverged run, not hidden
        return None, None, time.perf_counter() - start, str(err).split(".")[0]
    wall = time.perf_counter() - start
    acc, agreement = evaluate(module, teacher, test)
    return acc, agreement, wall, None


def mean_or_zero(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def write_plot(rows: list[tuple[str, list[float]]], ce_mean: float, path: Path, fraction: float) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot written"
    names = [r[0] for r in rows]
    means = [100 * mean_or_zero(r[1]) for r in rows]
    stds = [100 * statistics.stdev(r[1]) if len(r[1]) > 1 else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
    colors = [
        "tab:gray" if n == "ce" else ("tab:blue" if m >= 100 * ce_mean else "tab:red") for n, m in zip(names, means)
    ]
    ax.bar(names, means, yerr=stds, color=colors, capsize=2)
    ax.axhline(100 * ce_mean, color="k", lw=0.8, ls="--", label="CE only")
    ax.set_ylabel("student top-1 on digits test (%)")
    ax.set_ylim(max(0, min(m for m in means if m > 0) - 10), 100)
    ax.tick_params(axis="x", rotation=60)
    ax.legend(loc="lower right")
    ax.set_title(
        f"Distillation on digits: student sees {fraction:.0%} of the labels (mean ± std over seeds; 0 = diverged)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="loss config names (default: every conf/loss/*.yaml)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--label-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None, help="folder of quality.md/.png (default benchmarks/results)")
    parser.add_argument("--batches", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument(
        "--smoke", action="store_true", help="kd only, 1 seed, 1 epoch of 2 batches; output in a temporary folder"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.methods, args.seeds, args.epochs, args.batches = args.methods or ["kd"], 1, 1, 2
    args.out = output_dir(args.out, args.smoke)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1 if args.smoke else (os.cpu_count() or 1))  # smoke: robust on a loaded machine
    methods = args.methods or sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
    full, part, test, n_student = loaders(args.label_fraction)
    print(
        f"# digits: teacher trains on {len(full.dataset)} images, student on {n_student} "
        f"({args.label_fraction:.0%}); test {len(test.dataset)}; {args.seeds} seeds, {args.epochs} epochs; "
        f"cores {os.cpu_count()}, torch {torch.__version__}"
    )

    start = time.perf_counter()
    teacher = make_model(TEACHER, 0)
    L.seed_everything(0, workers=True)
    trainer(args.epochs, args.batches).fit(ClassifierModule(teacher, optimizer), full)
    teacher.eval()
    t_acc, _ = evaluate(teacher, teacher, test)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in make_model(STUDENT, 0).parameters())
    print(
        f"teacher: {n_t / 1e6:.2f} M params, top-1 {100 * t_acc:.1f} % ({time.perf_counter() - start:.0f} s); "
        f"student: {n_s / 1e6:.3f} M params"
    )

    results: dict[str, tuple[list[float], list[float], list[float]]] = {}
    diverged: dict[str, list[str]] = {}
    for method in ["ce", *methods]:
        accs, agrees, walls = [], [], []
        for seed in range(args.seeds):
            acc, agree, wall, failure = run_method(method, seed, teacher, part, test, args.epochs, args.batches)
            walls.append(wall)
            if failure is None:
                accs.append(acc), agrees.append(agree)
            else:
                diverged.setdefault(method, []).append(f"seed {seed}: {failure}")
        results[method] = (accs, agrees, walls)
        note = f"  DIVERGED in {len(diverged[method])}/{args.seeds} runs" if method in diverged else ""
        print(
            f"{method:10s} top-1 {fmt(accs):>12s}  agreement {fmt(agrees):>12s}  {statistics.fmean(walls):5.1f} s/run"
            f"{note}",
            flush=True,
        )

    ce_mean = statistics.fmean(results["ce"][0])
    order = sorted(results, key=lambda m: -mean_or_zero(results[m][0]))
    beat = [m for m in methods if m not in diverged and statistics.fmean(results[m][0]) >= ce_mean]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Distillation quality on digits",
        "",
        (
            f"Generated by `python benchmarks/quality.py` ({args.seeds} seeds, {args.epochs} epochs, label fraction "
            f"{args.label_fraction:.0%}) on {os.cpu_count()} CPU cores, torch {torch.__version__}. Regime: see the "
            "script's docstring — teacher timm resnet18 topology (output stride 16) at widths 32-64-128-256 trained on all 1,257 training "
            f"images ({n_t / 1e6:.2f} M params, test top-1 {100 * t_acc:.1f} %); student the same topology at widths "
            f"8-16-32-64 ({n_s / 1e6:.3f} M params) trained on {n_student} of them; every method with the defaults of "
            "its `conf/loss/*.yaml` (not tuned for digits). Test split: 270 images."
        ),
        "",
        "| method | top-1 (%) | Δ vs CE | agreement with teacher (%) | wall s/run |",
        "|---|---|---|---|---|",
    ]
    for m in order:
        accs, agrees, walls = results[m]
        delta = f"{100 * (statistics.fmean(accs) - ce_mean):+.1f}" if accs else "—"
        top1 = fmt(accs) + (f" (diverged {len(diverged[m])}/{args.seeds})" if m in diverged else "")
        lines.append(f"| {m} | {top1} | {delta} | {fmt(agrees)} | {statistics.fmean(walls):.1f} |")
    lines += [
        "",
        (
            f"{len(beat)} of {len(methods)} methods reach at least the CE-only mean top-1 (a method with a "
            "diverged run does not count)."
        ),
    ]
    if diverged:
        lines += ["", "Diverged runs (training stopped by the engine's non-finite-loss check):", ""]
        lines += [f"- {m}, {d}" for m in diverged for d in diverged[m]]
    lines.append("")
    (args.out / "quality.md").write_text("\n".join(lines))
    print(write_plot([(m, results[m][0]) for m in order], ce_mean, args.out / "quality.png", args.label_fraction))
    print(f"total {time.perf_counter() - start:.0f} s; table: {args.out / 'quality.md'}")
    print(f"RESULT methods={len(methods)} beat_ce={len(beat)}")
    if not math.isfinite(ce_mean):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
