"""What several commands share: the options of every command that loads a model, W&B tracker
factories, the log line writer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

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
