"""Per-step overhead of a lightning_kd distillation step against plain PyTorch, in one process.

Measured round-robin, one round per Lightning training iteration (so slow drift of the machine cancels):

  (a) student-only training step, plain PyTorch, on a separate copy of the student:
      zero_grad + forward + cross-entropy + backward + SGD step;
  (b) teacher inference step: a separate copy of the teacher, eval mode, ``torch.no_grad()``, forward;
  (c) one full Lightning iteration of ``DistillationModule`` (data fetch, training_step with teacher forward, student
      forward, losses and logging, backward, optimizer step, hooks), trained by a real ``lightning.Trainer``.

A callback's ``on_train_batch_start`` runs (a) then (b) on the batch Lightning just fetched, then marks the time; (c)
is the time from that mark to the next ``on_train_batch_start`` (the last one is closed in ``on_train_end``).
The first ``--warmup`` rounds are discarded.

The headline number is the median over rounds of the per-round ratio ``c_i / (a_i + b_i)``; a plain PyTorch KD loop
(teacher forward + student training step + KD loss) is ~1.04 on this kind of machine, the target is <= 1.05.

    python benchmarks/step_overhead.py | tee benchmarks/results/step_overhead.txt
    python benchmarks/step_overhead.py --smoke      # seconds: tiny models and data, 1 thread
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOKE_STUDENT, SMOKE_TEACHER, cores, loadavg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=None, help="timm model name of the student (default resnet18)")
    p.add_argument("--teacher", default=None, help="timm model name of the teacher (default resnet50)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--size", type=int, default=32, help="input height/width")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--rounds", type=int, default=30, help="measured rounds (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="discarded rounds at the start")
    p.add_argument("--loss", default="kd", help="a registered loss name or a comma list, e.g. kd,rkd")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: the number of cores this process may use)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="tiny settings (seconds): tiny models, 16x16, 3 rounds, 1 thread"
    )
    args = p.parse_args(argv)
    args.student = args.student or (SMOKE_STUDENT if args.smoke else "resnet18")
    args.teacher = args.teacher or (SMOKE_TEACHER if args.smoke else "resnet50")
    if args.smoke:
        args.batch, args.size, args.rounds, args.warmup = 8, 16, 2, 1
        args.threads = args.threads or 1
    return args


def summary(values: list[float]) -> tuple[float, float, float, float, int]:
    v = np.asarray(values, dtype=float)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return med, p25, p75, (p75 - p25) / med * 100.0, len(v)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        raise SystemExit("--rounds and --warmup must be >= 1")

    import lightning as L
    import timm

    from lightning_kd.module import DistillationModule

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`.*")

    threads = args.threads or cores()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    losses = [name.strip() for name in args.loss.split(",") if name.strip()]

    print("# lightning_kd step overhead: student-only step (a), teacher inference (b), Lightning KD step (c)")
    print(
        f"# python {platform.python_version()}  torch {torch.__version__}  lightning {L.__version__}  "
        f"timm {timm.__version__}  machine {platform.machine()}  cores {cores()}"
    )
    print(f"# torch.set_num_threads({threads}) -> torch.get_num_threads() = {torch.get_num_threads()}")
    print(
        f"# student {args.student}  teacher {args.teacher}  batch {args.batch}  size {args.size}  "
        f"classes {args.classes}  loss {losses}  rounds {args.rounds}  warmup {args.warmup}"
    )
    print(f"# loadavg at start (1/5/15 min): {loadavg()}", flush=True)

    # ---- models -----------------------------------------------------------------------------------------------------
    student = timm.create_model(args.student, num_classes=args.classes)
    teacher = timm.create_model(args.teacher, num_classes=args.classes)
    student_a = timm.create_model(args.student, num_classes=args.classes)  # (a): same architecture, separate copy
    student_a.load_state_dict(student.state_dict())
    student_a.train()
    teacher_b = copy.deepcopy(teacher).eval().requires_grad_(False)  # (b): separate copy, plain forward
    # same optimizer as DistillationModule's default
    opt_a = torch.optim.SGD(student_a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step_a(x: torch.Tensor, y: torch.Tensor) -> None:
        opt_a.zero_grad()
        loss = F.cross_entropy(student_a(x), y)
        loss.backward()
        opt_a.step()

    def step_b(x: torch.Tensor) -> None:
        with torch.no_grad():
            teacher_b(x)

    # ---- data: whole batches gathered by one indexing op (no per-sample collation) ---------------------------------
    steps = args.warmup + args.rounds
    n = args.batch * (steps + 1)
    g = torch.Generator().manual_seed(args.seed)
    dataset = TensorDataset(
        torch.randn(n, 3, args.size, args.size, generator=g),
        torch.randint(0, args.classes, (n,), generator=g),
        torch.arange(n),
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(dataset), batch_size=args.batch, drop_last=True),
        num_workers=0,
    )

    # ---- the round-robin callback ------------------------------------------------------------------------------------
    class RoundRobin(L.Callback):
        def __init__(self) -> None:
            self.a: list[float] = []
            self.b: list[float] = []
            self.c: list[float] = []
            self.cpu: dict[str, list[float]] = {"a": [], "b": [], "c": []}  # process CPU time / wall time
            self.mark: float | None = None
            self.mark_cpu = 0.0
            self.threads_seen: set[int] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now, now_cpu = time.perf_counter(), time.process_time()
            self._close_c(now, now_cpu)
            self.threads_seen.add(torch.get_num_threads())
            x, y = batch[0], batch[1]
            t0, u0 = time.perf_counter(), time.process_time()
            step_a(x, y)
            t1, u1 = time.perf_counter(), time.process_time()
            step_b(x)
            t2, u2 = time.perf_counter(), time.process_time()
            self.a.append(t1 - t0)
            self.b.append(t2 - t1)
            self.cpu["a"].append((u1 - u0) / (t1 - t0))
            self.cpu["b"].append((u2 - u1) / (t2 - t1))
            self.mark_cpu = time.process_time()
            self.mark = time.perf_counter()

        def _close_c(self, now: float, now_cpu: float) -> None:
            if self.mark is not None:
                self.c.append(now - self.mark)
                self.cpu["c"].append((now_cpu - self.mark_cpu) / (now - self.mark))
                self.mark = None

        def on_train_end(self, trainer, pl_module) -> None:
            self._close_c(time.perf_counter(), time.process_time())

    rr = RoundRobin()
    module = DistillationModule(student, teacher, loss=losses, task_weight=0.1, scheduler=None)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[rr],
    )
    t_fit = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    t_fit = time.perf_counter() - t_fit

    if not (len(rr.a) == len(rr.b) == len(rr.c) == steps):
        raise RuntimeError(f"expected {steps} rounds, got a={len(rr.a)} b={len(rr.b)} c={len(rr.c)}")
    w = args.warmup
    a = [v * 1e3 for v in rr.a[w:]]
    b = [v * 1e3 for v in rr.b[w:]]
    c = [v * 1e3 for v in rr.c[w:]]
    ab = [x + y for x, y in zip(a, b)]
    ratios = [ci / abi for ci, abi in zip(c, ab)]

    print("# per round (ms; cpu = process CPU time / wall time, ~threads when the process has the cores to itself):")
    print(f"# {'round':>5} {'a':>8} {'b':>8} {'c':>8} {'c/(a+b)':>8} {'cpu a':>6} {'cpu b':>6} {'cpu c':>6}")
    for i in range(steps):
        ai, bi, ci = rr.a[i] * 1e3, rr.b[i] * 1e3, rr.c[i] * 1e3
        tag = "  warmup" if i < w else ""
        print(
            f"# {i:>5} {ai:>8.1f} {bi:>8.1f} {ci:>8.1f} {ci / (ai + bi):>8.3f} {rr.cpu['a'][i]:>6.2f} "
            f"{rr.cpu['b'][i]:>6.2f} {rr.cpu['c'][i]:>6.2f}{tag}"
        )
    print(f"# torch.get_num_threads() seen during training: {sorted(rr.threads_seen)}")
    print(f"# trainer.fit wall time {t_fit:.1f} s, global_step {trainer.global_step}")
    cpu_med = {k: float(np.median(v[w:])) for k, v in rr.cpu.items()}
    print(
        f"# median CPU utilisation (measured rounds): a {cpu_med['a']:.2f}  b {cpu_med['b']:.2f}  "
        f"c {cpu_med['c']:.2f}  (of {threads} threads)"
    )
    print(f"# the last (c) is closed in on_train_end, so it also holds the epoch-end hooks ({c[-1]:.1f} ms)")
    print()
    print(f"{'step':<36} {'median ms':>10} {'p25 ms':>10} {'p75 ms':>10} {'IQR/med %':>10} {'n':>4}")
    rows = [
        ("(a) student step, plain PyTorch", a),
        ("(b) teacher forward, no_grad", b),
        ("(c) Lightning DistillationModule", c),
        ("(a+b) per round", ab),
    ]
    for name, values in rows:
        med, p25, p75, spread, count = summary(values)
        print(f"{name:<36} {med:>10.2f} {p25:>10.2f} {p75:>10.2f} {spread:>10.1f} {count:>4}")
    print()

    r_med, r_p25, r_p75, r_spread, r_n = summary(ratios)
    rng = np.random.default_rng(args.seed)
    c_arr, ab_arr = np.asarray(c), np.asarray(ab)
    idx = rng.integers(0, len(c_arr), size=(2000, len(c_arr)))
    boot = np.median(c_arr[idx], axis=1) / np.median(ab_arr[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(
        f"c/(a+b) per-round ratios: median {r_med:.3f}  p25 {r_p25:.3f}  p75 {r_p75:.3f}  "
        f"IQR/med {r_spread:.1f}%  n {r_n}"
    )
    print(
        f"median(c)/median(a+b) = {np.median(c_arr) / np.median(ab_arr):.3f}  "
        f"(bootstrap 95% CI over rounds {lo:.3f} .. {hi:.3f}, 2000 resamples)"
    )
    print("target: <= 1.05 (a plain PyTorch KD loop is ~1.04)")
    print(f"# loadavg at end (1/5/15 min): {loadavg()}")
    print(
        f"RESULT overhead={r_med:.3f} c_ms={np.median(c_arr):.2f} a_ms={np.median(a):.2f} b_ms={np.median(b):.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
