"""`autodeco report <kind>`: the kinds and their help come from `reports.index.REPORTS`.

Handlers import matplotlib / torch lazily so `autodeco --help` stays instant.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from harness.cli.common import int_at_least
from harness.core.errors import UserError

REPORT_INTRO = """\
Regenerate the paper's tables and figures from result files (never from the runner):
{kinds}
  all         every kind that has inputs, plus index.md
Tables are written as .md, .tex (booktabs) and .csv; figures as .png and .pdf.

Inputs: --runs folders (results files and the rest), and/or --wandb runs logged by `autodeco
eval/sweep` (a wandb/offline-run-* folder, any folder holding such runs, or entity/project[/run_id]
through the W&B API). W&B runs give the results-file numbers (config + `<task>/<metric>` summary)
to every table; they hold no samples or sweep_summary files, so `traces` and `oracle` need --runs.
Training runs (job_type train) are skipped with a note.
"""


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        if "=" not in value:
            raise UserError(f"{flag} takes OURS=OTHER, got '{value}'")
        key, other = value.split("=", 1)
        out[key] = other
    return out


def _ks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--ks {text!r}: expected comma-separated integers, e.g. 4,16,64") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--ks {text!r}: every k must be >= 1")
    return ks


def _has_inputs(inputs) -> bool:
    from reports.runs import find_files

    return bool(inputs.runs or inputs.sweeps or inputs.steering
                or find_files(inputs.dirs, "efficiency.json") or find_files(inputs.dirs, "log_history.jsonl"))


def cmd_report(args) -> int:
    """Damaged inputs (a truncated results file, one of the wrong shape) are skipped with one
    warning line each and the rest is reported; with nothing usable left it is an error, and
    nothing is written."""
    from harness.core.files import check_output_folder
    from reports.index import REPORTS, Inputs, Options, run_all, write_index

    if not args.runs and not args.wandb:
        raise UserError("give --runs DIR... and/or --wandb SRC (see `autodeco report --help`)")
    aliases, pair, paper_model = _pairs(args.alias, "--alias"), _pairs(args.pair, "--pair"), _pairs(
        args.paper_model, "--paper-model")
    ks = _ks(args.ks)
    out = Path(args.out)
    check_output_folder(out, "--out")
    for folder in args.runs or []:
        if not Path(folder).exists():
            raise UserError(f"--runs {folder}: no such results file or folder")
    damaged: list[str] = []
    inputs = Inputs.scan(args.runs or [], aliases, on_error=damaged.append)
    if args.wandb:
        from reports.wandb_runs import find_wandb_runs

        inputs.add_runs(find_wandb_runs(args.wandb, note=lambda line: print(line, file=sys.stderr)))
    if not _has_inputs(inputs):
        where = ", ".join(args.runs or []) + "".join(f", W&B {w}" for w in args.wandb or [])
        if damaged:
            raise UserError(f"no usable inputs under {where.lstrip(', ')}: " + "; ".join(damaged))
        raise UserError(f"no result files (results_*.json, sweep_summary_*.json, steer_*.json, efficiency.json, "
                        f"log_history.jsonl) under {where.lstrip(', ')}")
    for message in damaged:
        print(f"autodeco report: warning: {message}; skipped", file=sys.stderr)
    options = Options(tasks=args.tasks.split(",") if args.tasks else None, paper=args.paper,
                      paper_model=paper_model, pair=pair, ks=ks, max_lines=args.max_lines)
    created = not out.exists()
    try:
        if args.kind == "all":
            done = run_all(inputs, out, options)
            if all(isinstance(result, str) for result in done.values()):
                reasons = "; ".join(f"{kind}: {result.removeprefix('skipped: ')}" for kind, result in done.items())
                raise UserError(f"no report has inputs ({reasons})")
            sources = [str(d) for d in inputs.dirs] + [f"W&B {w}" for w in args.wandb or []]
            index = write_index(out, done, header="Inputs: " + ", ".join(sources))
            print(f"wrote {index}")
            return 0
        try:
            paths = REPORTS[args.kind].build(inputs, out, options)
        except ValueError as err:
            raise UserError(f"{args.kind}: {err}") from err
    except BaseException:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)  # nothing of a report that failed
        raise
    for path in paths:
        print(path)
    return 0


def register(subparsers) -> None:
    """Add `report` and `demo` to the `autodeco` parser."""
    from reports.index import REPORTS  # light: matplotlib is imported when a report is drawn

    kinds = "\n".join(f"  {kind.name:<11} {kind.help}" for kind in REPORTS.values())
    report = subparsers.add_parser("report", help="regenerate the paper's tables and figures from result files "
                                                   "or W&B runs",
                                   description=REPORT_INTRO.format(kinds=kinds), formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("kind", choices=[*REPORTS, "all"], help="which table/figure (see above)")
    report.add_argument("--runs", nargs="+", metavar="DIR",
                        help="folders (searched recursively) with results_*.json, samples_*.jsonl, "
                             "sweep_summary_*.json, efficiency.json, log_history.jsonl, steer_*.json")
    report.add_argument("--wandb", action="append", metavar="SRC",
                        help="W&B evaluation runs as rows: a wandb/offline-run-* folder, a folder holding "
                             "runs (searched recursively), or entity/project[/run_id] (W&B API); "
                             "repeatable; --runs may then be omitted")
    report.add_argument("--out", required=True, metavar="DIR", help="where tables and figures go")
    report.add_argument("--alias", action="append", metavar="NAME=SHOWN",
                        help="show model NAME as SHOWN, e.g. an AutoDeco folder as its base model so "
                             "greedy/default/autodeco share a block (repeatable)")
    report.add_argument("--tasks", help="comma-separated task columns (default: all present)")
    report.add_argument("--paper", choices=("table1", "table2"),
                        help="also write the paper's published table and ours-vs-paper deltas")
    report.add_argument("--paper-model", action="append", metavar="OURS=PAPER",
                        help="pair one of our model names with a paper model for the deltas "
                             "(e.g. r1-distill-qwen-7b=R1-Distill-Qwen-7B); repeatable")
    report.add_argument("--pair", action="append", metavar="BASE=AUTODECO",
                        help="oracle: which AutoDeco model's line to draw on a base model's sweep")
    report.add_argument("--ks", help="passk: comma-separated k values (default: every k > 1 present)")
    report.add_argument("--max-lines", type=int_at_least(1, 1000), default=6, help="traces: generations to draw")
    report.set_defaults(func=cmd_report)
