"""`autodeco steer`: do natural-language commands move the predicted T and P? (the paper's Table 4)

Parses arguments and calls `harness.steer`; model resolution and backend loading are the ones
`autodeco eval` uses. A plain (non-AutoDeco) model, a bad config or bad counts are `CLIError`s.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing

from harness.cli import CLIError

EPILOG = """\
examples:
  autodeco steer --model runs/train1/final                       # configs/steer/default.yaml, 24 prompts
  autodeco steer --model runs/train1/final --limit 4 --max-tokens 32 --seeds 2
  autodeco steer --model MERGED --backend vllm --config my_commands.yaml

writes <out>/<model_name>/steer_<timestamp>.json (schema: harness/steer.py, DESIGN.md);
`autodeco report steering --runs <out> --out DIR` turns it into Table 4 + Figure 5 next to the paper's.
A training run folder measures every checkpoint-*/ and final/ (one file each).
"""


def cmd_steer(args) -> int:
    from harness import steer
    from harness.backends import BackendError
    from harness.run_cli import _parse_backend_args, _targets, loaded_in_turn

    try:
        config = steer.load_config(args.config or steer.DEFAULT_CONFIG)
    except steer.SteerError as err:
        raise CLIError(str(err)) from None
    for flag, value in (("--limit", args.limit), ("--seeds", args.seeds), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    config.prompts = config.prompts[: args.limit] if args.limit else config.prompts
    seeds = list(range(args.seeds or config.seeds))
    max_tokens = args.max_tokens or config.max_tokens
    options = _parse_backend_args(args.backend_arg)
    targets = _targets(args.model)
    for path, _, _ in targets:  # refuse a plain model before loading anything
        _require_autodeco(path)

    paths = [path for path, _, _ in targets]
    with closing(loaded_in_turn(paths, args.backend, options)) as backends:
        for (path, name, _), backend in zip(targets, backends, strict=True):
            print(f"steer {name}: {len(config.prompts)} prompts × {len(config.commands)} commands × "
                  f"{len(seeds)} seeds, {max_tokens} tokens, {args.backend}", file=sys.stderr)
            try:
                measured = steer.measure_steering(backend, config.prompts, config.commands, seeds, max_tokens,
                                                  progress=not args.no_progress,
                                                  log=lambda m: print(m, file=sys.stderr))
            except (steer.SteerError, BackendError) as err:
                raise CLIError(str(err)) from None
            config_block = steer.run_config(args.model, path, name, args.backend, config, seeds, max_tokens)
            out = steer.write_steering(args.out, config_block, measured)
            _print_summary(name, measured["summary"], out)
    return 0


def _require_autodeco(path: str) -> None:
    from harness.backends import BackendError
    from harness.backends.hf import read_config

    try:
        model_type = read_config(path).get("model_type")
    except BackendError as err:
        raise CLIError(str(err)) from None
    if model_type != "autodeco":
        raise CLIError(f"{path} is a plain causal LM (model_type {model_type!r}): steering measures the AutoDeco "
                       f"heads' T and P; pass an AutoDeco folder (`autodeco construct` / a training run)")


def _print_summary(name: str, summary: dict, path) -> None:
    print(f"{name} → {path}")
    print(f"  {'command':<10} {'avg T':>7} {'ΔT':>7} {'cons. T':>7} {'avg P':>7} {'ΔP':>7} {'cons. P':>7}")
    fmt = lambda v: "      –" if v is None else f"{v:7.3f}"  # noqa: E731
    for command, s in summary.items():
        print(f"  {command:<10} {fmt(s['temperature_mean'])} {fmt(s['delta_temperature'])} "
              f"{fmt(s['consistency_temperature'])} {fmt(s['top_p_mean'])} {fmt(s['delta_top_p'])} "
              f"{fmt(s['consistency_top_p'])}")


def register(subparsers) -> None:
    """Add `steer` to the `autodeco` parser."""
    p = subparsers.add_parser("steer", help="steer T/P by natural-language commands: Table 4 (avg, Δ, consistency)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                              description="Run every prompt of a config under every command (baseline, "
                                          "'as certain as possible',\n'more innovative and diverse') with the "
                                          "autodeco preset and measure the heads' predicted T and P.")
    p.add_argument("--model", required=True,
                   help="an AutoDeco model: a folder (heads-only or merged), a preset, a hub id, or a training "
                        "run folder (every candidate)")
    p.add_argument("--config", help="steering YAML: prompts, commands, seeds, max_tokens "
                                    "(default: configs/steer/default.yaml)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--seeds", type=int, help="seeds 0..S-1 per (prompt, command) (default: the config's, else 1)")
    p.add_argument("--max-tokens", type=int, help="tokens per sample (default: the config's, else 128)")
    p.add_argument("--backend", default="hf", help="hf (transformers) or vllm (default: hf)")
    p.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the backend, e.g. max_batch_size=16 (repeatable)")
    p.add_argument("--out", default="outputs", help="output root (default: outputs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per command instead)")
    p.set_defaults(func=cmd_steer)
