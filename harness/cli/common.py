"""What several commands share: the options of every command that loads a model, W&B tracker
factories, the log line writer."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

# Upper bounds on sizes a user gives: far above any real run, low enough that a typo
# (seeds=100000, --limit 100000000) fails at once instead of planning for hours or filling memory.
MAX_SEEDS = 1024
MAX_SAMPLES = 4096           # per problem and seed (the paper: 16; Pass@64 needs 64)
MAX_PROBLEMS = 1_000_000     # --limit
MAX_TOKENS = 1_048_576       # generation budget per sample
MAX_SAMPLES_PER_RUN = 50_000_000  # problems x seeds x samples of one evaluation

MODEL_HELP = ("smollm2 (embedded), a configs/models/ preset, a local folder, a hub id, or a training run "
              "folder holding checkpoint-*/ (every candidate)")


@dataclass
class EngineOptions:
    """Options of every command that loads a model on a backend (eval, sweep, steer)."""

    model: str = field(default="smollm2", metadata={"help": MODEL_HELP})
    backend: str = field(default="hf", metadata={"help": "hf (transformers) or vllm"})
    backend_arg: list[str] = field(default_factory=list, metadata={
        "help": "KEY=VALUE passed to the backend, e.g. tensor_parallel_size=2, max_batch_size=16 (repeatable)",
        "metavar": "KEY=VALUE"})
    out: str = field(default="outputs", metadata={"help": "output root"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})
    base: str | None = field(default=None, metadata={
        "help": "load a heads-only AutoDeco folder on this base (smollm2, a preset, a folder, a hub id) instead of "
                "its config's base_model_name_or_path (e.g. a published checkpoint naming an internal path)"})

    def engine_options(self) -> dict:
        """The backend's options: ``--backend-arg`` pairs, plus the resolved ``--base``."""
        from harness.backends import parse_options
        from harness.models import resolve_model

        return parse_options(self.backend_arg) | ({"base": resolve_model(self.base)} if self.base else {})


def tracker_factory(mode: str, job_type: str, group: str | None = None):
    """A function (folder, config, name) -> W&B tracker, or None for ``--wandb off``."""
    if mode == "off":
        return None
    from harness.tracking import start_run

    def factory(folder, config, name=None):
        return start_run(folder, config, mode=mode, job_type=job_type, group=group, name=name)

    return factory


def log(message: str) -> None:
    print(message, file=sys.stderr)


def int_at_least(low: int, high: int | None = None):
    """An argparse ``type``: an integer in [low, high] (the error names the value and the bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float, low_open: bool = False):
    """An argparse ``type``: a finite float in [low, high] (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value

    parse.__name__ = "float"
    return parse
