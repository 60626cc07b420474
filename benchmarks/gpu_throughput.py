"""Training throughput (images/s) on a CUDA GPU: student-only training vs lightning_kd KD, with bf16 mixed precision,
channels_last and optionally ``torch.compile``.

Both modes go through a real ``lightning.Trainer`` (``precision=--precision``, ``logger=False``, no checkpointing,
no progress bar, no validation):

  (a) student only: ``ClassifierModule(student)`` (cross-entropy);
  (b) KD: ``DistillationModule(student, teacher, loss="kd")`` (teacher forward under no_grad inside the autocast of
      the precision plugin, student forward, CE + KD, backward, optimizer step).

The fits alternate (a, b, a, b, ...) for ``--rounds`` rounds, each of ``--warmup`` + ``--steps`` steps; a fit's
measured window spans its last ``--steps`` steps, with ``torch.cuda.synchronize()`` only at the window's two ends, and
images/s = steps × batch / window. The two modules are built once (same initial student weights) and fitted again in
every round, so ``--compile`` (``nn.Module.compile()`` on student and teacher, in place) compiles once per mode;
compilation falls in the first fit's warm-up. Inputs are ``--batches`` distinct synthetic batches created on the device
up front (channels_last when asked) and cycled: no host-to-device copies or loader workers in the measurement.
Headline: median images/s over rounds per mode and their ratio ``kd_over_student`` (< 1: what distillation costs).
The peak memory the CUDA caching allocator saw (``torch.cuda.max_memory_allocated``) is printed per mode.

Without a CUDA device the script says so and ends with ``RESULT skipped=no_cuda`` (exit status 0). ``--device cpu``
runs the same code on the CPU (bf16 autocast on CPU; the smoke test uses it so the GPU path's code is exercised).

    python benchmarks/gpu_throughput.py                       # on a machine with a CUDA GPU
    python benchmarks/gpu_throughput.py --compile             # + torch.compile
    python benchmarks/gpu_throughput.py --smoke --device cpu  # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOKE_STUDENT, SMOKE_TEACHER, cores, loadavg, result_line, versions

MODES = ("student only", "KD (DistillationModule)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda if present")
    p.add_argument("--student", default=None, help="timm model name of the student (default resnet18)")
    p.add_argument("--teacher", default=None, help="timm model name of the teacher (default resnet50)")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--size", type=int, default=224, help="input height/width")
    p.add_argument("--classes", type=int, default=1000, help="number of classes")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision (bf16-mixed, 16-mixed, 32-true)")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last models/inputs"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (nn.Module.compile)")
    p.add_argument("--steps", type=int, default=50, help="measured steps per fit")
    p.add_argument("--warmup", type=int, default=15, help="steps per fit before the measured window")
    p.add_argument("--rounds", type=int, default=3, help="fits per mode, alternating")
    p.add_argument("--batches", type=int, default=8, help="distinct synthetic batches, cycled")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds): tiny models, 32x32, 1 round")
    args = p.parse_args(argv)
    args.student = args.student or (SMOKE_STUDENT if args.smoke else "resnet18")
    args.teacher = args.teacher or (SMOKE_TEACHER if args.smoke else "resnet50")
    if args.smoke:
        args.batch, args.size, args.classes, args.steps, args.warmup, args.rounds, args.batches = 8, 32, 10, 2, 1, 1, 2
        args.threads = args.threads or 1
    if min(args.steps, args.warmup, args.rounds, args.batches) < 1:
        p.error("--steps, --warmup, --rounds and --batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device in ("auto", "cuda") and not cuda:
        print("# no CUDA device: torch.cuda.is_available() is False; this benchmark needs a GPU (or --device cpu)")
        print(result_line(skipped="no_cuda"), flush=True)
        return
    device = torch.device("cpu" if args.device == "cpu" else "cuda")

    import lightning as L
    import timm
    from torch.utils.data import DataLoader, Dataset

    from lightning_kd.module import ClassifierModule, DistillationModule

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    threads = args.threads or cores()
    torch.set_num_threads(threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"

    print("# training throughput: student only vs lightning_kd KD, through lightning.Trainer")
    print(f"# {versions()}  device {gpu}")
    print(
        f"# student {args.student}  teacher {args.teacher}  batch {args.batch}  size {args.size}  classes "
        f"{args.classes}  precision {args.precision}  channels_last {args.channels_last}  compile {args.compile}  "
        f"steps {args.steps} + warmup {args.warmup} per fit  rounds {args.rounds}{'  (smoke)' if args.smoke else ''}"
    )
    print(f"# loadavg at start (1/5/15 min): {loadavg()}", flush=True)

    torch.manual_seed(args.seed)
    student_a = timm.create_model(args.student, num_classes=args.classes)
    student_b = timm.create_model(args.student, num_classes=args.classes)
    student_b.load_state_dict(student_a.state_dict())
    teacher = timm.create_model(args.teacher, num_classes=args.classes).eval().requires_grad_(False)
    for model in (student_a, student_b, teacher):
        model.to(device=device, memory_format=fmt)
        if args.compile:
            model.compile()
    modules = {
        MODES[0]: ClassifierModule(student_a, scheduler=None),
        MODES[1]: DistillationModule(student_b, teacher, loss="kd", task_weight=0.1, scheduler=None),
    }

    g = torch.Generator(device=device).manual_seed(args.seed)
    batches = [
        (
            torch.randn(args.batch, 3, args.size, args.size, device=device, generator=g).contiguous(memory_format=fmt),
            torch.randint(0, args.classes, (args.batch,), device=device, generator=g),
            torch.arange(args.batch, device=device),
        )
        for _ in range(args.batches)
    ]
    per_fit = args.warmup + args.steps

    class Cycled(Dataset):
        """``per_fit`` whole batches, already on the device (``batch_size=None`` in the loader)."""

        def __len__(self) -> int:
            return per_fit

        def __getitem__(self, i: int):
            return batches[i % len(batches)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Window(L.Callback):
        def __init__(self) -> None:
            self.start = self.seconds = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                sync()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == per_fit - 1:
                sync()
                self.seconds = time.perf_counter() - self.start

    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, int] = {}
    for _ in range(args.rounds):
        for mode, module in modules.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            window = Window()
            trainer = L.Trainer(
                accelerator=device.type if device.type == "cpu" else "gpu",
                devices=1,
                precision=args.precision,
                max_steps=per_fit,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                callbacks=[window],
            )
            trainer.fit(module, DataLoader(Cycled(), batch_size=None, num_workers=0))
            if trainer.global_step != per_fit or window.seconds <= 0:
                raise RuntimeError(f"{mode}: expected {per_fit} steps, ran {trainer.global_step}")
            rates[mode].append(args.steps * args.batch / window.seconds)
            if device.type == "cuda":
                peaks[mode] = max(peaks.get(mode, 0), torch.cuda.max_memory_allocated(device))

    print()
    print(f"{'mode':<26} {'median img/s':>13} {'min':>9} {'max':>9} {'peak GPU MiB':>13}   per round")
    for mode, values in rates.items():
        peak = f"{peaks[mode] / 2**20:.0f}" if mode in peaks else "n/a"
        per = " ".join(f"{v:.0f}" for v in values)
        print(f"{mode:<26} {np.median(values):>13.1f} {min(values):>9.1f} {max(values):>9.1f} {peak:>13}   {per}")
    student_rate, kd_rate = (float(np.median(rates[m])) for m in MODES)
    print(f"# KD / student-only throughput: {kd_rate / student_rate:.3f}")
    print(f"# loadavg at end (1/5/15 min): {loadavg()}")
    print(
        result_line(
            student_img_s=student_rate,
            kd_img_s=kd_rate,
            kd_over_student=kd_rate / student_rate,
            device=device.type,
            compile=int(args.compile),
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
