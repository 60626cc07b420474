"""Peak resident memory (RSS) of distillation vs student-only training, each configuration in its own process.

Every configuration trains the same student on the same data for ``--steps`` steps through a real
``lightning.Trainer`` (CPU, ``logger=False``, no checkpointing, no validation):

  student      ``ClassifierModule(student)``: cross-entropy only, no teacher in memory;
  <loss name>  ``DistillationModule(student, teacher, terms, task_weight)`` with the ``terms`` and ``task_weight`` of
               ``conf/loss/<name>.yaml`` (the shipped defaults): by default ``kd`` (logits), ``fitnet`` (a feature
               hint through a 1x1-conv connector), ``at`` (attention maps of three stages) and ``crd`` (two
               ``[N, 128]`` memory banks and 16,384 negatives per anchor, the CIFAR-100 settings).

Data: ``--samples`` (default 50,000, CIFAR's training-set size, which sets CRD's bank size) synthetic images generated
per index on the fly, so the dataset itself costs no memory; batches of ``--batch``, shuffled, the same in every
configuration. Each configuration runs in a fresh ``python benchmarks/memory.py --child <config>`` process, so peaks
of different configurations cannot mix; the process reads the kernel's high-water mark of its own RSS (no sampling
needed): ``VmHWM`` in ``/proc/self/status`` on Linux — reset to the current RSS through ``/proc/self/clear_refs``
just before ``trainer.fit`` to get the fit's own peak too —, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` elsewhere
(it is inherited across fork + exec, so a child of a large process over-reports there). It also reads its current
RSS (``VmRSS``) after the imports and after building models and data. The table shows the peaks, the fit's peak above
the imports' baseline (what models, data and training add) and the ratios to student-only training; psutil is not
needed.

    python benchmarks/memory.py | tee benchmarks/results/memory.txt   # + benchmarks/results/memory.png
    python benchmarks/memory.py --smoke      # seconds: tiny models, student + kd in parallel, temp output dir
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOKE_STUDENT, SMOKE_TEACHER, bar_plot, cores, loadavg, output_dir, result_line

DEFAULT_CONFIGS = "student,kd,fitnet,at,crd"
SMOKE_CONFIGS = "student,kd"
#: the arguments a child gets from its parent, verbatim
SHARED = ("student", "teacher", "batch", "size", "classes", "samples", "steps", "threads", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", default=None, help=f"comma list: student and conf/loss names (default {DEFAULT_CONFIGS})"
    )
    p.add_argument("--student", default=None, help="timm model name of the student (default resnet18)")
    p.add_argument("--teacher", default=None, help="timm model name of the teacher (default resnet50)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--size", type=int, default=32, help="input height/width")
    p.add_argument("--classes", type=int, default=100, help="number of classes")
    p.add_argument("--samples", type=int, default=50_000, help="training-set size (CRD's memory banks scale with it)")
    p.add_argument("--steps", type=int, default=20, help="training steps per configuration")
    p.add_argument("--jobs", type=int, default=1, help="configurations measured at the same time (own processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder of the PNG (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds), output in a temporary folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one configuration
    args = p.parse_args(argv)
    args.student = args.student or (SMOKE_STUDENT if args.smoke else "resnet18")
    args.teacher = args.teacher or (SMOKE_TEACHER if args.smoke else "resnet50")
    args.configs = args.configs or (SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    if args.smoke:
        args.batch, args.size, args.classes, args.samples, args.steps = 8, 16, 10, 256, 2
        args.threads = args.threads or 1
        args.jobs = max(args.jobs, len(args.configs.split(",")))
    args.threads = args.threads or cores()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if min(args.batch, args.samples, args.steps, args.jobs) < 1 or args.samples < args.batch:
        p.error("--batch, --steps and --jobs must be >= 1 and --samples >= --batch")
    if "student" not in args.configs:
        p.error("--configs must include 'student' (the ratios are to student-only training)")
    return args


def peak_mib() -> float:
    """This process's peak RSS so far, in MiB: ``VmHWM`` where there is procfs, else ``ru_maxrss`` (KiB on Linux,
    bytes on macOS). ``VmHWM`` first because ``ru_maxrss`` survives ``fork`` + ``execve`` (getrusage(2)): a child
    started by a large process (pytest) would report its parent's size."""
    hwm = proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def proc_status_mib(field: str) -> float | None:
    """``VmRSS`` (current RSS) or ``VmHWM`` (its high-water mark) from ``/proc/self/status`` in MiB; ``None`` where
    there is no procfs (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS: ``echo 5 > /proc/self/clear_refs``
    (Linux >= 4.0, ``Documentation/filesystems/proc.rst``). ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    """Measure one configuration in this (fresh) process; the last line is ``CHILD {json}``."""
    start = peak_mib()
    import lightning as L
    import timm
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset

    from lightning_kd.config import CONF_DIR
    from lightning_kd.module import ClassifierModule, DistillationModule

    torch.set_num_threads(args.threads)
    imported = proc_status_mib("VmRSS") or peak_mib()
    config = args.child
    size, classes, samples = args.size, args.classes, args.samples

    class OnTheFly(Dataset):
        """``(image, label, index)``: a fixed random image per index, generated when asked (no stored data)."""

        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(args.seed * samples + i)
            return torch.randn(3, size, size, generator=g), i % classes, i

    torch.manual_seed(args.seed)
    student = timm.create_model(args.student, num_classes=classes)
    if config == "student":
        module: L.LightningModule = ClassifierModule(student, scheduler=None)
    else:
        path = CONF_DIR / "loss" / f"{config}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
            raise SystemExit(f"unknown configuration {config!r}: use 'student' or a loss config, one of {names}")
        loss = OmegaConf.to_container(OmegaConf.load(path))
        teacher = timm.create_model(args.teacher, num_classes=classes)
        module = DistillationModule(student, teacher, loss["terms"], loss["task_weight"], scheduler=None)
    loader = DataLoader(
        OnTheFly(),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    built = proc_status_mib("VmRSS") or peak_mib()
    before_fit = peak_mib()
    reset = reset_peak()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0

    def mib(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    fit_peak = peak_mib()  # since the reset, if there was one; else the process's peak
    engine = getattr(module, "engine", None)
    result = {
        "config": config,
        "start_mib": start,
        "imported_mib": imported,
        "built_mib": built,
        "peak_mib": max(before_fit, fit_peak),
        "fit_peak_mib": fit_peak,
        "fit_peak_reset": reset,
        "steps": trainer.global_step,
        "fit_s": seconds,
        "student_mib": mib(student.parameters()),
        "teacher_mib": mib(engine.teacher.parameters()) if engine is not None else 0.0,
        "terms_mib": mib([*engine.parameters(), *engine.buffers()]) if engine is not None else 0.0,
    }
    print("CHILD " + json.dumps(result), flush=True)


def run_children(args: argparse.Namespace) -> dict[str, dict]:
    """Run one child process per configuration, ``--jobs`` at a time; their reports by configuration."""
    shared = [f"--{k}={getattr(args, k)}" for k in SHARED]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    pending = list(args.configs)
    running: list[tuple[str, subprocess.Popen]] = []
    results: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            config = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, *shared]
            running.append((config, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)))
        config, proc = running.pop(0)
        out, err = proc.communicate()
        lines = [line for line in out.decode().splitlines() if line.startswith("CHILD ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"configuration {config!r} failed (exit {proc.returncode}):\n{err.decode()[-3000:]}")
        results[config] = json.loads(lines[-1][len("CHILD ") :])
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    out = output_dir(args.out, args.smoke)
    print("# peak RSS of distillation vs student-only training, one process per configuration")
    print(
        f"# student {args.student}  teacher {args.teacher}  batch {args.batch}  size {args.size}  classes "
        f"{args.classes}  samples {args.samples}  steps {args.steps}  threads {args.threads}  jobs {args.jobs}"
        f"{'  (smoke)' if args.smoke else ''}  python {sys.version.split()[0]}  platform {sys.platform}"
    )
    print(f"# loadavg at start (1/5/15 min): {loadavg()}", flush=True)
    results = run_children(args)

    base = results["student"]
    print()
    print(
        f"{'config':<10} {'peak MiB':>9} {'imports':>8} {'built':>8} {'fit peak':>9} {'fit - imports':>14} "
        f"{'peak/student':>13} {'extra MiB':>10} {'teacher':>8} {'terms':>7} {'fit s':>6}"
    )
    ratios: dict[str, float] = {}
    extra: dict[str, float] = {}
    for config in args.configs:
        r = results[config]
        ratio = r["peak_mib"] / base["peak_mib"]
        more = r["peak_mib"] - base["peak_mib"]
        print(
            f"{config:<10} {r['peak_mib']:>9.1f} {r['imported_mib']:>8.1f} {r['built_mib']:>8.1f} "
            f"{r['fit_peak_mib']:>9.1f} {r['fit_peak_mib'] - r['imported_mib']:>14.1f} {ratio:>13.3f} {more:>10.1f} "
            f"{r['teacher_mib']:>8.1f} {r['terms_mib']:>7.1f} {r['fit_s']:>6.1f}"
        )
        if config != "student":
            ratios[f"{config}_over_student"] = ratio
            extra[f"{config}_extra_mib"] = more
    print(
        "# MiB: peak = the process's peak RSS (VmHWM, imports included); imports / built = RSS after importing "
        "torch, lightning, timm and lightning_kd / after creating the models and data; fit peak = peak RSS during "
        "trainer.fit (VmHWM reset through /proc/self/clear_refs before the fit; the process peak where that is not "
        "possible); extra = peak - student-only peak; teacher = its weights; terms = the loss terms' parameters and "
        "buffers (connectors, memory banks)"
    )
    print(
        bar_plot(
            out / "memory.png",
            [f"{c}\n×{results[c]['peak_mib'] / base['peak_mib']:.2f}" for c in args.configs],
            [results[c]["peak_mib"] for c in args.configs],
            ylabel="peak RSS (MiB)",
            title=(
                f"Peak RSS, {args.steps} training steps: {args.teacher} → {args.student}, batch {args.batch}, "
                f"{args.size}×{args.size}, {args.samples} samples\n(one process per configuration; dashed: "
                f"after imports, {base['imported_mib']:.0f} MiB)"
            ),
            colors=["tab:gray" if c == "student" else "tab:blue" for c in args.configs],
            reference=(base["imported_mib"], "after imports"),
            annotate="{:.0f}",
        )
    )
    print(f"# loadavg at end (1/5/15 min): {loadavg()}")
    peaks = {f"{c}_mib": results[c]["peak_mib"] for c in args.configs}
    print(result_line(**ratios, **extra, **peaks), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
