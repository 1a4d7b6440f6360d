"""`autodeco tasks list|show|prepare` and `autodeco grade`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.cli.common import int_at_least
from harness.core.errors import UserError
from harness.core.files import check_output_folder
from harness.core.paths import REPO_ROOT


def _task_options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--task-option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load_task(name: str, data_dir: str | None, options: list[str] | None):
    from tasks.registry import get_task

    task = get_task(name, data_dir=data_dir, **_task_options(options))
    task.docs()  # load now: a missing file, a malformed row or the hub fails here, clearly
    return task


def cmd_list(args) -> int:
    from tasks.registry import _index

    tasks, groups = _index()
    for name in sorted(tasks):
        print(f"{name:16s} {tasks[name].relative_to(REPO_ROOT)}")
    for name in sorted(groups):
        print(f"{name:16s} group: {', '.join(groups[name])}")
    return 0


def cmd_show(args) -> int:
    task = _load_task(args.task, args.data_dir, args.task_option)
    print(f"task: {task.name}  version: {task.version}  grader: {task.metadata['grader']}  source: {task.source}")
    print(f"options: {task.dataset_options}  generation: {task.generation_kwargs}")
    docs = task.docs()
    print(f"docs: {len(docs)} ({task.data_dir or 'hub'})")
    for doc in docs[: args.n]:
        print(f"\n--- doc_id {task.doc_id(doc)} ---")
        for message in task.messages(doc):
            print(f"[{message['role']}]\n{message['content']}")
    return 0


def cmd_prepare(args) -> int:
    from tasks.ifeval_grader import prepare_punkt
    from tasks.sandbox import isolation_mode

    folder = prepare_punkt(Path(args.nltk_dir) if args.nltk_dir else None)
    print(f"nltk punkt_tab (english): {folder}")
    mode = isolation_mode()
    note = "" if mode == "bwrap" else " (bubblewrap missing: fallback sandbox, see tasks/sandbox.py)"
    print(f"code sandbox: {mode}{note}")
    return 0


def cmd_grade(args) -> int:
    from harness.results import ResponsesError, grade_file

    responses, out = Path(args.responses), Path(args.out)
    if not responses.is_file():
        raise UserError(f"--responses {responses} {'is a folder, not a file' if responses.is_dir() else 'does not exist'}")
    check_output_folder(out, "--out")
    task = _load_task(args.task, args.data_dir, args.task_option)
    try:
        samples, results, metrics = grade_file(task, responses, out, workers=args.workers)
    except ResponsesError as err:
        raise UserError(str(err)) from None
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps({task.name: shown}, indent=2))
    print(f"verdicts: {samples}\nmetrics:  {results}")
    return 0


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="local benchmark files (named as in ../shared/data); "
                        "default $AUTODECO_DATA_DIR, else the Hugging Face hub")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                        help="override a dataset option, e.g. start_date=2025-01-01 (livecodebench), "
                             "split=train, n=500, difficulty=3 (arith); repeatable")


def register(subparsers) -> None:
    """`tasks` (list/show/prepare) and `grade`."""
    tasks = subparsers.add_parser("tasks", help="list, show and prepare the benchmark tasks",
                                  description="The benchmarks as lm-eval-style YAML tasks (tasks/*/*.yaml).")
    sub = tasks.add_subparsers(dest="tasks_command", metavar="<action>")
    p = sub.add_parser("list", help="all tasks and groups")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="a task's settings and its first prompts")
    p.add_argument("task")
    p.add_argument("-n", type=int_at_least(0), default=1, help="how many prompts to print (default 1)")
    _add_data_args(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("prepare", help="offline NLTK punkt data for IFEval; report the code sandbox (idempotent)")
    p.add_argument("--nltk-dir", help="where to write nltk_data (default $AUTODECO_HOME/nltk_data)")
    p.set_defaults(func=cmd_prepare)
    tasks.set_defaults(func=lambda args: tasks.print_help() or 2)

    grade = subparsers.add_parser(
        "grade", help="score responses generated elsewhere",
        description="Grade a JSONL of responses: each line has `doc_id` (index in the test split, or "
                    "IFEval's `key`) or `prompt`, and `response` (string) or `responses` (list). Writes "
                    "samples_<task>_<ts>.jsonl (per-response verdicts) and results_<ts>.json (metrics, "
                    "lm-eval names) under --out.")
    grade.add_argument("--task", required=True)
    grade.add_argument("--responses", required=True, help="JSONL file of responses")
    grade.add_argument("--out", required=True, help="output folder")
    grade.add_argument("--workers", type=int_at_least(1, 1024), default=None,
                       help="grading processes (default: CPU count)")
    _add_data_args(grade)
    grade.set_defaults(func=cmd_grade)
