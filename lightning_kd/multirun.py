"""Hydra multirun + Lightning DDP
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Lightning's default DDP launcher (``strategy=ddp``, the subprocess-script launcher) starts ranks 1..N-1 by running
the command line again: ``sys.argv`` plus ``hydra.run.dir=<run dir> hydra.job.name=train_ddp_process_<r>
hydra.output_subdir=null`` (``lightning/fabric/strategies/launchers/subprocess_script.py``, ``_hydra_subprocess_cmd``).
Under ``python -m lightning_kd.run -m ...`` that command is the whole sweep, so every child would run the sweep again
instead of joining its parent's job (Lightning PR #11617; lightning-hydra-template issue #393).

:func:`job_command_line` fixes this for the duration of one multirun job: ``sys.argv`` becomes this job's own command
(the overrides Hydra resolved for it, ``hydra.overrides.task``, plus ``hydra.mode=RUN`` so that a config that switches
to multirun, such as ``hparams_search=``, does not either), and Hydra's ``run.dir`` becomes this job's output
directory, so the children compose the same config and write next to their parent. At the end of the job the process
group is destroyed and the launcher's environment variables (``LOCAL_RANK``, ``MASTER_PORT``...) are restored: the
next job of the sweep starts its own children on a fresh group instead of talking to the previous job's exited ones
(Lightning reads a set ``LOCAL_RANK`` as "processes are created externally"). Outside multirun nothing changes.
``ddp_spawn`` needs none of this (it never re-runs the command); W&B sweeps start one single-run process per trial.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: environment variables Lightning's subprocess launcher sets in the parent process.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def job_argv(argv0: str, task_overrides: list[str]) -> list[str]:
    """The command line of one multirun job: the program, the job's own overrides, and ``hydra.mode=RUN``."""
    return [argv0, *task_overrides, "hydra.mode=RUN"]


@contextmanager
def job_command_line() -> Iterator[None]:
    """Within a Hydra multirun job, make ``sys.argv`` and ``hydra.run.dir`` those of this single job (see the module
    docstring); restore both afterwards. A no-op outside Hydra or in single runs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_run_dir = list(sys.argv), hydra_cfg.run.dir
    saved_env = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    sys.argv = job_argv(sys.argv[0], list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        end_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir


def end_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group if one is up (its peers belong to a finished job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_global_zero() -> bool:
    """Whether this process is rank 0 (Lightning's view: set by the strategy, else read from the launcher's
    environment variables); results files and the summary table are written by rank 0 only."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
