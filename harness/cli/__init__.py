"""`autodeco`: one command line, one subcommand per job. All command-line code lives in this package.

Each module here owns a few subcommands and exposes ``register(subparsers)``; ``bench`` registers
every ``autodeco bench <name>``. Handlers import heavy packages (torch, vllm, matplotlib) lazily
so that ``autodeco --help`` stays instant, and they raise `harness.core.errors.UserError` (or one
of its subclasses) for anything the user can fix: `main` catches it once, prints one line and
exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.core.errors import UserError

# Adding a job = adding its module here. Order is the order shown in --help.
COMMAND_MODULES = (
    "harness.cli.model",   # model prepare, construct, split, merge, generate
    "harness.cli.train",   # train, data reject-sample
    "harness.cli.tasks",   # tasks list/show/prepare, grade
    "harness.cli.eval",    # eval, sweep
    "harness.cli.scale",   # gather, launch ray (sharded runs)
    "harness.cli.steer",   # steer (T/P by natural-language commands)
    "harness.cli.report",  # report <kind>
    "harness.cli.view",    # view (every sample, token by token, in HTML)
    "harness.cli.demo",    # demo
    "harness.cli.bench",   # bench <name>
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error (no usage block):
    ``autodeco <command>: error: <message> (see --help)``, exit code 2. Subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="autodeco",
        description="AutoDeco harness: learned per-token temperature/top-p, evaluated the paper's way.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `autodeco <command> --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _command(args: argparse.Namespace) -> str:
    """``autodeco tasks show``, ``autodeco bench decode``, ...: the command as typed."""
    words = ["autodeco", args.command]
    for sub in ("tasks_command", "model_command", "data_command", "bench"):
        if getattr(args, sub, None):
            words.append(getattr(args, sub))
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as err:  # one line, whatever the message holds
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{_command(args)}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
