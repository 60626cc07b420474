"""Wall time of the default main job, cold (teacher trained) and warm (teacher reused from the store).

Runs ``python -m lightning_kd.run`` twice in subprocesses with a fresh, private teacher store, exactly as a user
would (all defaults), and prints each run's wall time (process start to exit) and results.

Targets on 2 CPU cores: cold <= 180 s, warm <= 60 s. Last line: ``RESULT cold_s=... warm_s=...``.

    python benchmarks/main_job.py | tee benchmarks/results/main_job.txt
    python benchmarks/main_job.py --smoke     # seconds: synthetic 16x16 data, 2 steps, tiny models, 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Hydra overrides of ``--smoke``: a seconds-long job (synthetic data, two steps, a one-epoch teacher, tiny models)
SMOKE = [
    "data=synthetic",
    "data.num_samples=64",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "teacher_epochs=1",
    "model=test_efficientnet",
    "teacher=resnet10t",
]


def run(args: list[str], cache: Path, out: Path, threads: int | None = None) -> tuple[float, dict]:
    env = {**os.environ, "LIGHTNING_KD_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_kd.run", *args, "progress_bar=none", f"hydra.run.dir={out}"],
        env=env,
        capture_output=True,
        check=False,  # a failure is reported below with the run's stderr
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: none, the default job)")
    parser.add_argument("--smoke", action="store_true", help="tiny job (seconds): prepends the SMOKE overrides")
    args = parser.parse_args(argv)
    if args.smoke:
        args.overrides = [*SMOKE, *args.overrides]
    print(f"# python -m lightning_kd.run {' '.join(args.overrides)}  (cores: {os.cpu_count()})")
    print(f"# loadavg at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        threads = 1 if args.smoke else None  # smoke: robust on a loaded machine
        cold, cold_res = run(args.overrides, tmp_path / "store", tmp_path / "cold", threads)
        warm, warm_res = run(args.overrides, tmp_path / "store", tmp_path / "warm", threads)
    print(f"{'run':6} {'wall s':>8} {'in-job s':>9} {'teacher_acc':>12} {'student_acc':>12} {'agreement':>10}  teacher")
    for name, wall, res in (("cold", cold, cold_res), ("warm", warm, warm_res)):
        print(
            f"{name:6} {wall:8.1f} {res['wall_s']:9.1f} {res['teacher_acc']:12.4f} {res['student_acc']:12.4f} "
            f"{res['agreement']:10.4f}  {res['teacher_source'].split(':')[0]}"
        )
    if not args.smoke:
        print("# targets: cold <= 180 s, warm <= 60 s (2 CPU cores)")
    if "(reused)" not in warm_res["teacher_source"].split(":")[0]:
        sys.exit(f"the warm run did not reuse the teacher: {warm_res['teacher_source']}")
    print(f"# loadavg at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"RESULT cold_s={cold:.1f} warm_s={warm:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
