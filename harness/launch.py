"""Shard commands as Ray tasks: one task = one `autodeco` process = one engine.

``run_on_ray(commands, ...)`` starts (or joins, with ``address``) a Ray cluster and runs each
command line (``autodeco`` arguments, e.g. ``eval ... --shard 2/8``) as a Ray task asking for
``cpus`` CPUs and ``gpus`` GPUs — Ray places the tasks and sets ``CUDA_VISIBLE_DEVICES`` for each.
Inside the task the command runs as a child process (``python -m harness.cli``), so every shard gets
a fresh process whose engine memory is freed when it exits; its output goes to a log file. A task
whose node dies is retried by Ray (``retries``); the shard then resumes from its own sample store.
A shard that exits non-zero is not retried: its error is the user's to fix, and it is reported.

The cluster needs the same Python environment and the same paths (a shared filesystem for the
``--out`` folders and the model) on every node; environment variables that steer the harness
(``FORWARDED_ENV``) are passed from the driver to every task.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

from harness.core.errors import UserError

FORWARDED_ENV = ("PYTHONPATH", "AUTODECO_HOME", "AUTODECO_DATA_DIR", "AUTODECO_MODELS_DIR", "HF_HOME",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "WANDB_MODE",
                 "WANDB_SILENT", "WANDB_DIR", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE",
                 "VLLM_ENABLE_V1_MULTIPROCESSING")


class LaunchError(UserError, RuntimeError):
    """A shard command that failed under the launcher (names the shard, its exit status and log)."""


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    seconds: float
    host: str
    log: Path
    last_line: str


def _run(argv: list[str], cwd: str, env: dict[str, str], log_file: str) -> tuple[int, float, str, str]:
    start = time.perf_counter()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"$ autodeco {' '.join(argv)}   (host {socket.gethostname()})\n".encode())
        log.flush()
        code = subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=cwd, env={**os.environ, **env},
                              stdout=log, stderr=subprocess.STDOUT).returncode
    lines = [line for line in Path(log_file).read_text(errors="replace").splitlines() if line.strip()]
    return code, time.perf_counter() - start, socket.gethostname(), lines[-1] if lines else ""


_run_task = ray.remote(_run)


@contextlib.contextmanager
def cluster(address: str | None, cpus: float) -> Iterator[None]:
    """Join the Ray cluster at ``address``, or start a local one with ``cpus`` CPUs (enough for every
    shard at once; GPUs are detected), for the ``with`` block; an initialised Ray is used as it is."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(1, math.ceil(cpus)), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_on_ray(commands: list[list[str]], logs: list[Path], *, cpus: float = 1.0, gpus: float = 0.0,
               retries: int = 1, log: Callable[[str], None] = print) -> list[Outcome]:
    """Run every command line as one Ray task (inside `cluster`); return their outcomes, or raise
    `LaunchError` naming the first shard that failed (after all have ended)."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    task = _run_task.options(num_cpus=cpus, num_gpus=gpus, max_retries=retries)
    futures = [task.remote(argv, os.getcwd(), env, str(path)) for argv, path in zip(commands, logs, strict=True)]
    outcomes = []
    for argv, path, future in zip(commands, logs, futures, strict=True):
        code, seconds, host, last = ray.get(future)
        outcomes.append(Outcome(argv, code, seconds, host, path, last))
        log(f"{'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s on {host}: autodeco {' '.join(argv)}")
    for outcome in outcomes:
        if outcome.returncode != 0:
            raise LaunchError(f"`autodeco {' '.join(outcome.argv)}` exited with {outcome.returncode}: "
                              f"{outcome.last_line} (log: {outcome.log}); fix it and launch again — finished "
                              f"samples are kept")
    return outcomes
