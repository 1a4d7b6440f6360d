"""`autodeco view`: every sample of some runs, token by token, in static HTML (`reports.viewer`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from harness.core import config as configs
from harness.core.config import FieldError

EPILOG = """\
examples:
  autodeco view --runs outputs/demo/runs --out viewer.html
  autodeco view --runs outputs/smollm2 outputs/final --tasks arith --max-mb 100 --out arith.html

One file that opens from disk (no server, no network): pick a task, a problem and a method; every
sample's response with its verdict, extracted answer vs target, length and finish reason; AutoDeco
samples coloured token by token by the predicted T (or P) with a T/P line; a second method side by
side on the same seed and sample; Pass@1 with 95% intervals and paired differences, whose cells open
the problems behind them. Runs that exceed --max-mb together get one page per task
(FILE-<task>.html) and FILE.html links them; within a page, texts beyond the budget are left out.
"""


@dataclass
class ViewOptions:
    runs: list[str] = field(default_factory=list, metadata={
        "help": "folders (searched recursively) or results_*.json files", "metavar": "DIR"})
    out: str = field(default="", metadata={"help": "the HTML file to write", "metavar": "FILE.html"})
    tasks: str = field(default="", metadata={"help": "comma-separated tasks to show (default: all found)"})
    max_mb: float = field(default=40.0, metadata={"help": "size budget of one page in MB"})

    def check(self) -> None:
        if not self.runs:
            raise FieldError("runs", "is required: one or more folders with results_*.json")
        if not self.out:
            raise FieldError("out", "is required: the HTML file to write")
        if not self.out.endswith((".html", ".htm")):
            raise FieldError("out", f"must name an .html file, got {self.out!r}")
        if not self.max_mb > 0:
            raise FieldError("max_mb", f"must be > 0, got {self.max_mb}")


def cmd_view(args) -> int:
    from reports.runs import find_runs
    from reports.viewer import write_viewer

    cfg = configs.from_args(ViewOptions, args)
    tasks = [t for t in cfg.tasks.split(",") if t] or None
    for path in write_viewer(find_runs(cfg.runs), cfg.out, tasks=tasks, max_mb=cfg.max_mb, sources=cfg.runs):
        print(path)
    return 0


def register(subparsers) -> None:
    """Add `view` to the `autodeco` parser."""
    p = subparsers.add_parser("view", help="every sample, token by token, in one static HTML page",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                              description="Write a self-contained HTML viewer of the samples of some runs.")
    p.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    p.add_argument("--runs", nargs="+", metavar="DIR", default=argparse.SUPPRESS,
                   help="folders (searched recursively) or results_*.json files")
    configs.add_arguments(p, ViewOptions, skip=("runs",))
    p.set_defaults(func=cmd_view)
