"""`autodeco`: one command line, one subcommand per job.

This module only builds the parser and dispatches. Each area owns its subcommands in its own
``cli`` module, which exposes ``register(subparsers)`` and, optionally,
``register_bench(bench_subparsers)`` for ``autodeco bench <name>``. Handlers import heavy
packages (torch, vllm) lazily so that ``autodeco --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Adding a job = adding its module here. Order is the order shown in --help.
COMMAND_MODULES = (
    "heads.cli",        # model prepare, construct, split, merge, generate
    "heads.train_cli",  # train, data reject-sample
    "tasks.cli",        # tasks list/show/prepare, grade
    "harness.run_cli",  # eval, sweep
    "harness.steer_cli",  # steer (T/P by natural-language commands)
    "reports.cli",      # report <kind>, demo
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autodeco",
        description="AutoDeco harness: learned per-token temperature/top-p, evaluated the paper's way.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `autodeco <command> --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    bench = sub.add_parser("bench", help="benchmarks that print measured ratios (speed, memory)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="<benchmark>")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
        if hasattr(module, "register_bench"):
            module.register_bench(bench_sub)
    bench.set_defaults(func=lambda args: bench.print_help() or 2)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except CLIError as err:
        print(f"autodeco {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
