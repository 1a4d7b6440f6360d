"""`autodeco steer`: do natural-language commands move the predicted T and P? (the paper's Table 4)
`autodeco train-steer`: train the heads to follow them (the paper's targeted ranking-loss training).

The options are one dataclass per command (`SteerOptions`, `heads.training.steer_config.SteerTrainingConfig`):
``--config`` holds the prompts and commands (steer: default configs/steer/default.yaml) or the
training fields (train-steer: configs/train/smollm2_steer.yaml) and may set any other option;
flags given here win. `harness.steer` measures every model (or training-run candidate) in turn on
one engine; `heads.training.steering` trains.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from harness.cli.common import MAX_PROBLEMS, MAX_SEEDS, MAX_TOKENS, EngineOptions, log
from harness.core import config as configs
from harness.core.config import FieldError
from heads.training.steer_config import SteerTrainingConfig

EPILOG = """\
examples:
  autodeco steer --model runs/train1/final                       # configs/steer/default.yaml, 24 prompts
  autodeco steer --model runs/train1/final --limit 4 --max-tokens 32 --seeds 2
  autodeco steer --model MERGED --backend vllm --config my_commands.yaml
  autodeco steer --model runs/train1/final,runs/steer1 --config configs/steer/heldout.yaml   # before vs after

writes <out>/<model_name>/steer_<timestamp>.json (schema: harness/steer.py, DESIGN.md);
`autodeco report steering --runs <out> --out DIR` turns it into Table 4 + Figure 5 next to the paper's.
A training run folder measures every checkpoint-*/ and final/ (one file each); several models
separated by commas are measured in turn on one engine (heads swapped in when they share a base).
"""

TRAIN_EPILOG = """\
examples:
  autodeco train-steer --config configs/train/smollm2_steer.yaml          # after `make demo` (its heads + rows)
  autodeco train-steer --config configs/train/smollm2_steer.yaml --init_from runs/train1/final \\
      --train_file data/arith_rs.jsonl --output_dir runs/steer1
  autodeco steer --model runs/steer1 --config configs/steer/heldout.yaml  # held-out prompts and wordings

writes output_dir/final/ (heads-only AutoDeco folder + steering_training.json), log_history.jsonl,
steer_train_config.yaml and steer_data.pt (the sampled completions' hidden states: a second run with
other loss settings reuses it).
"""


@dataclass
class SteerOptions(EngineOptions):
    limit: int | None = field(default=None, metadata={"help": "only the first N prompts"})
    seeds: int = field(default=1, metadata={"help": "seeds 0..S-1 per (prompt, command)"})
    max_tokens: int = field(default=128, metadata={"help": "tokens per sample"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "a prompt (repeatable; usually from --config)"})
    commands: dict = field(default_factory=dict, metadata={"help": "name -> {text, direction} (from --config)"})

    def check(self) -> None:
        for name, high in (("limit", MAX_PROBLEMS), ("seeds", MAX_SEEDS), ("max_tokens", MAX_TOKENS)):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= high:
                raise FieldError(name, f"must be in 1..{high}, got {value}")


def cmd_steer(args) -> int:
    from harness import steer
    from harness.backends import check_backend, loaded_in_turn
    from harness.core.files import check_output_folder
    from harness.models import require_autodeco, resolve_targets

    source = Path(args.config or steer.DEFAULT_CONFIG)
    cfg = configs.from_args(SteerOptions, args, config_path=source)
    config = steer.parse_config({"prompts": cfg.prompts, "commands": cfg.commands}, source)
    config.prompts = config.prompts[: cfg.limit] if cfg.limit else config.prompts
    seeds = list(range(cfg.seeds))
    options = cfg.engine_options()
    check_backend(cfg.backend, options)
    check_output_folder(cfg.out, "--out")
    targets = [t for model in cfg.model.split(",") if model.strip() for t in resolve_targets(model.strip())]
    for target in targets:  # refuse a plain model before loading anything
        require_autodeco(target.path, "steering measures the AutoDeco heads' T and P")

    with closing(loaded_in_turn([t.path for t in targets], cfg.backend, options)) as backends:
        for target, backend in zip(targets, backends, strict=True):
            print(f"steer {target.name}: {len(config.prompts)} prompts × {len(config.commands)} commands × "
                  f"{len(seeds)} seeds, {cfg.max_tokens} tokens, {cfg.backend}", file=sys.stderr)
            measured = steer.measure_steering(backend, config.prompts, config.commands, seeds, cfg.max_tokens,
                                              progress=not cfg.no_progress, log=log)
            block = steer.run_config(target.given, target.path, target.name, cfg.backend, config, seeds, cfg.max_tokens)
            out = steer.write_steering(cfg.out, block, measured)
            _print_summary(target.name, measured["summary"], out)
    return 0


def _print_summary(name: str, summary: dict, path) -> None:
    print(f"{name} → {path}")
    print(f"  {'command':<10} {'avg T':>7} {'ΔT':>7} {'cons. T':>7} {'avg P':>7} {'ΔP':>7} {'cons. P':>7}")
    fmt = lambda v: "      –" if v is None else f"{v:7.3f}"  # noqa: E731
    for command, s in summary.items():
        print(f"  {command:<10} {fmt(s['temperature_mean'])} {fmt(s['delta_temperature'])} "
              f"{fmt(s['consistency_temperature'])} {fmt(s['top_p_mean'])} {fmt(s['delta_top_p'])} "
              f"{fmt(s['consistency_top_p'])}")


def cmd_train_steer(args) -> int:
    from heads.training.steering import train_steering

    cfg = configs.from_args(SteerTrainingConfig, args)
    final = train_steering(cfg, log=log)
    print(f"steered heads: {final}")
    return 0


def register(subparsers) -> None:
    """Add `steer` and `train-steer` to the `autodeco` parser."""
    p = subparsers.add_parser("steer", help="steer T/P by natural-language commands: Table 4 (avg, Δ, consistency)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                              description="Run every prompt of a config under every command (baseline, "
                                          "'as certain as possible',\n'more innovative and diverse') with the "
                                          "autodeco preset and measure the heads' predicted T and P.")
    p.add_argument("--config", help="steering YAML: prompts, commands, and any option below "
                                    "(default: configs/steer/default.yaml); flags given here win")
    configs.add_arguments(p, SteerOptions, skip=("commands",))
    p.set_defaults(func=cmd_steer)

    t = subparsers.add_parser(
        "train-steer", help="train the heads to follow decoding commands (ranking loss; Table 4's targeted training)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG,
        description="Continue a trained AutoDeco model's heads so that a 'lower randomness' command in the prompt "
                    "lowers the mean predicted T and P and a 'higher diversity' command raises them: a pairwise "
                    "ranking loss over the same sampled completion under three contexts, plus the AutoDeco loss on "
                    "the heads' usual training rows. The base stays frozen; its hidden states are computed once.")
    t.add_argument("--config", help="YAML of the fields below (configs/train/smollm2_steer.yaml); flags given here win")
    configs.add_arguments(t, SteerTrainingConfig, underscore_aliases=True)
    t.set_defaults(func=cmd_train_steer)
