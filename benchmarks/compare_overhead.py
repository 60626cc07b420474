"""Per-step time of lightning_kd's KD step against timm's ``LogitDistillationTask``, torchdistill's KD and a plain
PyTorch KD loop: the same teacher/student pair, data, loss and optimizer, in one process, round-robin.

Every framework gets its own copy of the student (the same initial weights), of the frozen teacher (eval mode) and
its own ``SGD(lr 0.05, momentum 0.9, weight decay 5e-4)``; the loss is ``0.1 · CE + 0.9 · τ² · KL(p_T ‖ p_S)`` with
τ = 4 everywhere (``--task-weight``, ``--kd-weight``, ``--temperature``). One step of each framework:

  lightning_kd, DistillationModule (``--faces module``): one full iteration of a real ``lightning.Trainer`` fit
      (``logger=False``, no checkpointing, no progress bar, ``scheduler=None``) — the next batch's fetch, the
      callbacks' and module's hooks, ``training_step`` (teacher forward under no_grad, student forward, CE, the KD
      term, its finiteness check, ``self.log`` of the terms and teacher–student agreement), backward, optimizer step
      and zero_grad;
  lightning_kd, DistillCallback (``--faces callback``): the same iteration with ``ClassifierModule`` (CE) and
      ``DistillCallback(teacher, kd, task_weight=0.1)`` wrapping its ``training_step``;
  timm ``LogitDistillationTask`` (timm 1.0.31, ``timm/task/distillation.py``), as timm's ``train.py`` drives it:
      ``out = task(x, y)`` (student forward, CE, teacher input re-normalisation check, teacher forward under no_grad,
      KL) then ``zero_grad``, ``out["loss"].backward()``, ``step``;
  torchdistill (1.1.5) ``DistillationBox`` built from a Python dict (no YAML file) with ``WeightedSumLoss`` over one
      ``KDLoss(alpha=0.1, beta=0.9)`` on the models' outputs (module path ``.``), as torchdistill's example
      ``train_one_epoch`` drives it: ``loss = box.forward_process(x, y, {})`` (teacher forward under no_grad, student
      forward, io-dict extraction, loss) then ``box.post_forward_process(loss=loss)`` (backward, step, zero_grad);
  plain PyTorch: teacher forward under no_grad, student forward, CE + KD, zero_grad, backward, step.

Round-robin: a callback's ``on_train_batch_start`` runs one step of each peer (timm, torchdistill, plain; their
order rotates every round) on the batch Lightning just fetched, then marks the time; the Lightning step is the time
from that mark to the next ``on_train_batch_start`` (the last one is closed in ``on_train_end``). So in every round
each framework takes one step on the same batch, and slow drifts of the machine (other processes on shared cores)
hit all of them alike: the headline numbers are medians of per-round ratios; absolute ms are only as good as the
machine was idle (the load average is printed at start and end). The first ``--warmup`` rounds are discarded. One fit
per face; the peers are rebuilt from the same initial weights for each.

Loss cross-check: in round 0 all students have the same weights and see the same batch, so the total loss of the
step (and its KD part: timm's ``kd_loss``, the lightning_kd term's value, torchdistill's ``KDLoss`` soft part × τ²,
the plain one) must agree across frameworks; printed with the largest relative difference, also over all rounds
(the weights then drift apart only by float rounding).

    python benchmarks/compare_overhead.py | tee benchmarks/results/compare_overhead.txt   # + compare_overhead.png
    python benchmarks/compare_overhead.py --smoke      # seconds: tiny models and data, output in a temp dir
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    SMOKE_STUDENT,
    SMOKE_TEACHER,
    bar_plot,
    busy_warning,
    cores,
    loadavg,
    output_dir,
    result_line,
    summary,
    versions,
)

FACES = {"module": "lightning_kd DistillationModule", "callback": "lightning_kd DistillCallback"}
PEERS = {"timm": "timm LogitDistillationTask", "torchdistill": "torchdistill DistillationBox", "plain": "plain PyTorch"}
#: relative difference of the round-0 losses below which the frameworks count as computing the same loss
LOSS_RTOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=None, help="timm model name of the student (default resnet18)")
    p.add_argument("--teacher", default=None, help="timm model name of the teacher (default resnet50)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--size", type=int, default=32, help="input height/width")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--rounds", type=int, default=30, help="measured rounds per face (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="discarded rounds at the start of each fit")
    p.add_argument("--faces", default="module,callback", help="lightning_kd faces to measure: module, callback")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature τ (all frameworks)")
    p.add_argument("--task-weight", type=float, default=0.1, help="weight of the cross-entropy (all frameworks)")
    p.add_argument("--kd-weight", type=float, default=0.9, help="weight of τ²·KL (all frameworks)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder of the PNG (default benchmarks/results)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny settings (seconds; 1 thread), output in a temporary folder"
    )
    args = p.parse_args(argv)
    args.student = args.student or (SMOKE_STUDENT if args.smoke else "resnet18")
    args.teacher = args.teacher or (SMOKE_TEACHER if args.smoke else "resnet50")
    if args.smoke:
        args.batch, args.size, args.rounds, args.warmup = 8, 16, 2, 1
        args.threads = args.threads or 1  # robust on a loaded machine (oversubscribed threads spin)
    args.faces = [f.strip() for f in args.faces.split(",") if f.strip()]
    unknown = [f for f in args.faces if f not in FACES]
    if unknown or not args.faces:
        p.error(f"--faces: unknown {unknown or 'empty list'}; choose from {', '.join(FACES)}")
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be >= 1")
    return args


@dataclass
class Peer:
    """One framework's training step, ``step(x, y) -> (total loss, KD part)``, and its records. The KD part may be a
    callable that computes it later (outside the timed step)."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]] | None = None
    times: list[float] = field(default_factory=list)
    losses: list[tuple[torch.Tensor, object]] = field(default_factory=list)

    def loss(self, i: int) -> tuple[float, float]:
        total, kd = self.losses[i]
        return float(total), float(kd() if callable(kd) else kd)


def sgd(params) -> torch.optim.Optimizer:
    """The optimizer of every framework (lightning_kd's default)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def timm_peer(student: nn.Module, teacher: nn.Module, args: argparse.Namespace) -> Peer:
    from timm.task import LogitDistillationTask

    task = LogitDistillationTask(
        student,
        teacher,
        criterion=nn.CrossEntropyLoss(),
        task_loss_weight=args.task_weight,
        distill_loss_weight=args.kd_weight,
        temperature=args.temperature,
        verbose=False,
    ).train()  # the task keeps its teacher in eval mode
    optimizer = sgd(task.trainable_module.parameters())  # timm's train.py optimises the student only

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = task(x, y)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        return out["loss"].detach(), out["kd_loss"].detach()

    return Peer("timm", step)


def torchdistill_peer(student: nn.Module, teacher: nn.Module, args: argparse.Namespace) -> Peer:
    import torchdistill.core.interfaces  # noqa: F401 - registers the forward-process functions the box looks up
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.losses.mid_level import KDLoss

    kd_kwargs = {
        "student_module_path": ".",  # the model's own output (torchdistill's SELF_MODULE_PATH)
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": args.temperature,
    }
    config = {
        "num_epochs": 1,
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {**kd_kwargs, "alpha": args.task_weight, "beta": args.kd_weight},
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }
    box = get_distillation_box(teacher, student, {}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)  # student.train(), io dicts cleared
    kd_term = box.criterion.term_dict["kd"][0]
    soft = KDLoss(**kd_kwargs, alpha=0)  # alpha=0: torchdistill's soft part alone, KL(batchmean) without τ²
    seen: list[tuple[dict, dict]] = []
    kd_term.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], inputs[1])))

    def kd_part(s_io: dict, t_io: dict) -> Callable[[], torch.Tensor]:
        return lambda: soft(s_io, t_io).detach() * args.temperature**2  # evaluated after the timing

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, object]:
        loss = box.forward_process(x, y, {})
        box.post_forward_process(loss=loss)
        return loss.detach(), kd_part(*seen.pop())

    return Peer("torchdistill", step)


def plain_peer(student: nn.Module, teacher: nn.Module, args: argparse.Namespace) -> Peer:
    optimizer = sgd(student.parameters())
    student.train()
    tau = args.temperature

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            z_t = teacher(x)
        z_s = student(x)
        kd = F.kl_div(
            F.log_softmax(z_s / tau, -1), F.log_softmax(z_t / tau, -1), reduction="batchmean", log_target=True
        )
        kd = kd * tau**2
        loss = args.task_weight * F.cross_entropy(z_s, y) + args.kd_weight * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach(), kd.detach()

    return Peer("plain", step)


@dataclass
class FaceRun:
    """The measurements of one fit: lightning_kd's face and the peers, round by round."""

    face: str
    ours: Peer
    peers: list[Peer]
    fit_s: float = 0.0


def run_face(face: str, args: argparse.Namespace, init: dict, teacher: nn.Module, loader: DataLoader) -> FaceRun:
    import lightning as L
    import timm

    from lightning_kd import DistillCallback
    from lightning_kd.module import ClassifierModule, DistillationModule

    def student() -> nn.Module:
        model = timm.create_model(args.student, num_classes=args.classes)
        model.load_state_dict(init)
        return model

    def frozen() -> nn.Module:
        return copy.deepcopy(teacher).eval()

    peers = [
        timm_peer(student(), frozen(), args),
        torchdistill_peer(student(), frozen(), args),
        plain_peer(student(), frozen(), args),
    ]
    loss = {"kd": {"weight": args.kd_weight, "temperature": args.temperature}}
    callbacks: list[L.Callback] = []
    if face == "module":
        module = DistillationModule(student(), frozen(), loss=loss, task_weight=args.task_weight, scheduler=None)
        get_term = lambda: module.engine.terms["kd"]
    else:
        module = ClassifierModule(student(), scheduler=None)
        distill = DistillCallback(frozen(), loss=loss, task_weight=args.task_weight)
        callbacks.append(distill)
        get_term = lambda: distill.engine.terms["kd"]
    ours = Peer(face)  # timed and fed by the Trainer

    class RoundRobin(L.Callback):
        def __init__(self) -> None:
            self.mark: float | None = None
            self.kd: list[torch.Tensor] = []

        def on_train_start(self, trainer, pl_module) -> None:
            get_term().register_forward_hook(lambda m, inputs, out: self.kd.append(out.detach()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._close(time.perf_counter())
            x, y = batch[0], batch[1]
            shift = batch_idx % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                t0 = time.perf_counter()
                total, kd = peer.step(x, y)
                peer.times.append(time.perf_counter() - t0)
                peer.losses.append((total, kd))
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            ours.losses.append((outputs["loss"].detach(), self.kd[-1]))

        def _close(self, now: float) -> None:
            if self.mark is not None:
                ours.times.append(now - self.mark)
                self.mark = None

        def on_train_end(self, trainer, pl_module) -> None:
            self._close(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=args.warmup + args.rounds,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, RoundRobin()],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    run = FaceRun(face, ours, peers, time.perf_counter() - start)
    steps = args.warmup + args.rounds
    for peer in [ours, *peers]:
        if len(peer.times) != steps or len(peer.losses) != steps:
            raise RuntimeError(f"{peer.name}: expected {steps} rounds, got {len(peer.times)} times")
    return run


def loss_check(run: FaceRun) -> tuple[float, float, list[str]]:
    """Largest relative difference to lightning_kd of the round-0 loss and of the losses over all rounds, with the
    round-0 lines to print."""
    lines = [f"# {'framework':<34} {'total loss':>12} {'KD part':>12}   (round 0: same weights, same batch)"]
    first = max_all = 0.0
    ref0 = run.ours.loss(0)
    for peer in [run.ours, *run.peers]:
        values = peer.loss(0)
        name = FACES[peer.name] if peer is run.ours else PEERS[peer.name]
        lines.append(f"# {name:<34} {values[0]:>12.6f} {values[1]:>12.6f}")
        first = max(first, *(abs(v - r) / abs(r) for v, r in zip(values, ref0)))
        for mine, ref in zip(peer.losses, run.ours.losses):
            max_all = max(max_all, abs(float(mine[0]) - float(ref[0])) / abs(float(ref[0])))
    return first, max_all, lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import lightning as L
    import timm

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    threads = args.threads or cores()
    torch.set_num_threads(threads)
    out = output_dir(args.out, args.smoke)

    print(
        "# step time of KD: lightning_kd vs timm LogitDistillationTask vs torchdistill vs plain PyTorch (one process)"
    )
    print(f"# {versions()}  torchdistill {version('torchdistill')}")
    print(f"# torch.set_num_threads({threads}) -> {torch.get_num_threads()}; lightning {L.__version__}")
    print(
        f"# student {args.student}  teacher {args.teacher}  batch {args.batch}  size {args.size}  classes "
        f"{args.classes}  loss {args.task_weight}·CE + {args.kd_weight}·τ²·KL, τ={args.temperature}  SGD(0.05, 0.9, "
        f"5e-4)  rounds {args.rounds} + warmup {args.warmup} per face  faces {args.faces}{'  (smoke)' if args.smoke else ''}"
    )
    print(
        "# absolute ms depend on what else runs on the machine (other processes share its cores); the per-round "
        "ratios are robust to that"
    )
    print(f"# loadavg at start (1/5/15 min): {loadavg()}", flush=True)
    if warning := busy_warning(threads):
        print(warning, flush=True)

    torch.manual_seed(args.seed)
    init = timm.create_model(args.student, num_classes=args.classes).state_dict()
    teacher = timm.create_model(args.teacher, num_classes=args.classes).eval().requires_grad_(False)
    steps = args.warmup + args.rounds
    n = args.batch * (steps + 1)
    g = torch.Generator().manual_seed(args.seed)
    dataset = TensorDataset(
        torch.randn(n, 3, args.size, args.size, generator=g),
        torch.randint(0, args.classes, (n,), generator=g),
        torch.arange(n),
    )
    # whole batches gathered by one indexing op (no per-sample collation)
    sampler = BatchSampler(SequentialSampler(dataset), batch_size=args.batch, drop_last=True)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)

    runs = [run_face(face, args, init, teacher, loader) for face in args.faces]

    w = args.warmup
    ratios: dict[str, float] = {}
    match_first = match_all = 0.0
    plot_ms: dict[str, list[float]] = {}
    bars: list[tuple[str, float, float, float, str]] = []  # (label, median, p25, p75, face) of ours / peer
    for run in runs:
        print()
        print(f"## face: {FACES[run.face]}  (trainer.fit {run.fit_s:.1f} s)")
        print(f"{'framework':<34} {'median ms':>10} {'p25 ms':>8} {'p75 ms':>8} {'IQR/med %':>10} {'n':>4}")
        ms = {p.name: [t * 1e3 for t in p.times[w:]] for p in [run.ours, *run.peers]}
        for peer in [run.ours, *run.peers]:
            med, p25, p75, spread, count = summary(ms[peer.name])
            name = FACES[peer.name] if peer is run.ours else PEERS[peer.name]
            print(f"{name:<34} {med:>10.2f} {p25:>8.2f} {p75:>8.2f} {spread:>10.1f} {count:>4}")
            plot_ms.setdefault(name, []).extend(ms[peer.name])
        print(f"{'per-round ratio':<34} {'median':>10} {'p25':>8} {'p75':>8} {'median difference ms':>21}")
        pairs = [(run.face, "timm"), (run.face, "torchdistill"), (run.face, "plain"), ("timm", "plain")]
        pairs.append(("torchdistill", "plain"))
        for num, den in pairs:
            r = [a / b for a, b in zip(ms[num], ms[den])]
            med, p25, p75, _, _ = summary(r)
            diff = float(np.median([a - b for a, b in zip(ms[num], ms[den])]))
            label = f"{'ours' if num == run.face else num} / {den}"
            print(f"{label:<34} {med:>10.3f} {p25:>8.3f} {p75:>8.3f} {diff:>+21.2f}")
            prefix = "ours" if run.face == "module" else "callback"
            if num == run.face:
                ratios[f"{prefix}_over_{den}"] = med
                bars.append((f"{run.face.capitalize()}\n/ {den}", med, p25, p75, run.face))
        first, over_all, lines = loss_check(run)
        print("\n".join(lines))
        verdict = "same loss" if first < LOSS_RTOL else "MISMATCH"
        print(
            f"# loss cross-check: largest relative difference to lightning_kd in round 0 {first:.2e} ({verdict}, "
            f"tolerance {LOSS_RTOL:g}); of the total loss over all {steps} rounds {over_all:.2e}"
        )
        match_first, match_all = max(match_first, first), max(match_all, over_all)

    pair = f"{args.teacher} → {args.student}, batch {args.batch}, {args.size}², {threads} CPU threads"
    title = (
        f"KD step time of lightning_kd / peer in the same round: {pair}\nmedian and p25–p75 over {args.rounds} "
        "rounds per fit; Module = DistillationModule, Callback = DistillCallback (Lightning Trainer)"
    )
    print(
        bar_plot(
            out / "compare_overhead.png",
            [b[0] for b in bars],
            [b[1] for b in bars],
            errors=[[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]],
            ylabel="step time ratio (1 = same time)",
            title=title,
            colors=["tab:blue" if b[4] == "module" else "tab:cyan" for b in bars],
            reference=(1.0, "equal step time"),
            annotate="{:.3f}",
        )
    )
    print(f"# loadavg at end (1/5/15 min): {loadavg()} (this benchmark's own threads included)")
    print(
        result_line(
            **ratios,
            **{f"{f}_ms": float(np.median(plot_ms[FACES[f]])) for f in args.faces},
            **{f"{p}_ms": float(np.median(plot_ms[PEERS[p]])) for p in PEERS},
            loss_rel_diff=f"{match_first:.1e}",
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
