"""Peak memory and time of a token-level divergence over a large vocabulary: lightning_kd's chunked computation
(:func:`lightning_kd.lm.divergences.token_divergence`) against a naive full-tensor implementation and TRL's
``generalized_jsd_loss``.

Each implementation computes the generalized JSD (β = 0.5, the GKD default) between random float32 student and
teacher logits ``[batch, sequence, vocabulary]`` (default 4 × 1,024 × 50,257, GPT-2's vocabulary) with labels that
mask the first 10 % of every row, then backward to the student's logits — forward + backward, as in training:

  chunked   ``token_divergence(..., "generalized_jsd", beta=0.5)``: float32 chunks of positions, closed-form gradient
            written into one logits-sized buffer;
  naive     :func:`~lightning_kd.lm.divergences.dense_token_divergence`: the same formula on the whole tensor at once,
            autograd through it (what a straightforward implementation does);
  trl       ``GKDTrainer.generalized_jsd_loss`` from TRL (installed with the ``test`` extra), on the shifted logits.

Every implementation runs in its own fresh process (``--child NAME``), so peaks cannot mix: the process builds the
inputs, reads its resident set (``VmRSS``), resets the kernel's high-water mark (``/proc/self/clear_refs``), runs
``--repeats`` forward + backward passes timing each, and reads the high-water mark (``VmHWM``). Reported per
implementation: the inputs' RSS, the peak RSS, the peak *above the inputs* (what the divergence itself needs: its
intermediates and the gradient of the student's logits, which any implementation must produce), and the median time.
The implementations run in ``--rounds`` interleaved rounds (chunked, naive, trl, chunked, ...); each reports its
largest peak and its fastest round, so a change of machine load between children does not decide the time ratio.

    memory_ratio = (chunked peak − inputs) / (naive peak − inputs)      target ≤ 0.25
    time_ratio   = chunked median time / naive median time             target ≤ 1.2

The total-peak ratio (inputs included) is printed too. The values of the three are cross-checked (same loss).

    python benchmarks/llm_loss_memory.py | tee benchmarks/results/llm_loss_memory.txt
    python benchmarks/llm_loss_memory.py --smoke     # seconds: vocabulary 2,000, sequence 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cores, loadavg, result_line

IMPLEMENTATIONS = ("chunked", "naive", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50_257, help="vocabulary size")
    p.add_argument("--seq", type=int, default=1024, help="sequence length")
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--beta", type=float, default=0.5, help="β of the generalized JSD")
    p.add_argument("--repeats", type=int, default=2, help="timed forward + backward passes per child process")
    p.add_argument("--rounds", type=int, default=2, help="rounds of one child per implementation, interleaved")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma list of implementations to run")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (seconds)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.seq, args.batch, args.repeats, args.rounds = 2_000, 64, 2, 1, 1
    return args


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> dict[str, float]:
    """Measure one implementation in this (fresh) process."""
    import torch

    from lightning_kd.lm.divergences import dense_token_divergence, next_token_mask, token_divergence

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=g) * 2
    teacher = torch.randn(shape, generator=g) * 2
    labels = torch.randint(0, args.vocab, shape[:2], generator=g)
    labels[:, : args.seq // 10] = -100
    mask = next_token_mask(labels)

    if args.child == "chunked":

        def loss(s: torch.Tensor) -> torch.Tensor:
            return token_divergence(s, teacher, mask, "generalized_jsd", beta=args.beta)
    elif args.child == "naive":

        def loss(s: torch.Tensor) -> torch.Tensor:
            return dense_token_divergence(s, teacher, mask, "generalized_jsd", beta=args.beta)
    elif args.child == "trl":
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer

        def loss(s: torch.Tensor) -> torch.Tensor:
            return GKDTrainer.generalized_jsd_loss(s[:, :-1], teacher[:, :-1], labels[:, 1:], beta=args.beta)
    else:
        raise ValueError(f"unknown implementation {args.child!r}")

    inputs_rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, value = [], float("nan")
    for _ in range(args.repeats):
        leaf = student.detach().requires_grad_()
        start = time.perf_counter()
        out = loss(leaf)
        out.backward()
        times.append(time.perf_counter() - start)
        value = float(out.detach())
        del out, leaf
    return {"inputs": inputs_rss, "peak": _status("VmHWM"), "time": statistics.median(times), "value": value}


def run_child(name: str, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    child_argv = [a for a in argv if a != "--smoke"]
    if args.smoke:
        child_argv += ["--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--repeats", "1"]
    impls = [x for x in args.impls.split(",") if x]
    gib = 1024**3
    print(f"# llm_loss_memory: generalized JSD (beta {args.beta}), forward + backward, float32 logits "
          f"[{args.batch}, {args.seq}, {args.vocab}] = {args.batch * args.seq * args.vocab * 4 / gib:.2f} GiB each")  # fmt: skip
    print(f"# cores {cores()}, threads {args.threads}, load {loadavg()}, repeats {args.repeats} per child, "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in impls}
    for round_ in range(args.rounds):  # interleaved, so a change in machine load hits every implementation
        for name in impls:
            r = run_child(name, child_argv)
            runs[name].append(r)
            print(f"round {round_}  {name:8s} inputs {r['inputs'] / gib:6.2f} GiB  peak {r['peak'] / gib:6.2f} GiB  "
                  f"above inputs {(r['peak'] - r['inputs']) / gib:6.2f} GiB  time {r['time']:7.2f} s  "
                  f"loss {r['value']:.6f}  load {loadavg()}")  # fmt: skip
    # per implementation: the largest peak above its inputs, the fastest round (the least disturbed by other load)
    rows = {}
    for name, rs in runs.items():
        worst = max(rs, key=lambda r: r["peak"] - r["inputs"])
        rows[name] = {**worst, "time": min(r["time"] for r in rs)}
        print(f"{name:8s} peak above inputs {(worst['peak'] - worst['inputs']) / gib:6.2f} GiB (max over rounds)  "
              f"time {rows[name]['time']:7.2f} s (min over rounds)")  # fmt: skip
    values = [r["value"] for r in rows.values()]
    spread = max(values) - min(values)
    print(f"# loss agreement across implementations: max difference {spread:.2e}")
    if spread > 1e-4:
        raise RuntimeError(f"the implementations disagree on the loss (spread {spread:.2e})")
    result: dict[str, float] = {}
    if "chunked" in rows and "naive" in rows:
        ours, naive = rows["chunked"], rows["naive"]
        result["memory_ratio"] = (ours["peak"] - ours["inputs"]) / max(naive["peak"] - naive["inputs"], 1)
        result["time_ratio"] = ours["time"] / naive["time"]
        result["total_peak_ratio"] = ours["peak"] / naive["peak"]
        if "trl" in rows:
            trl = rows["trl"]
            result["memory_ratio_trl"] = (ours["peak"] - ours["inputs"]) / max(trl["peak"] - trl["inputs"], 1)
            result["time_ratio_trl"] = ours["time"] / trl["time"]
        result["chunked_peak_above_inputs_gib"] = (ours["peak"] - ours["inputs"]) / gib
        result["naive_peak_above_inputs_gib"] = (naive["peak"] - naive["inputs"]) / gib
    print(result_line(**result))
    return result


if __name__ == "__main__":
    main()
