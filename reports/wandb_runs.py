"""W&B runs as `reports.runs.Run` records, so every report reads them like results files.

The runner's tracker (harness/tracking.py) logs `config = runner.run_config(spec)` and, in the
summary, every numeric task metric as `<task>/<metric>` (e.g. `arith/pass@1`, `arith/pass@1_std`).
That is all a `Run` needs except the samples files, so W&B rows have `samples_path=None` (the
`traces` report and recomputation from samples stay results-file only).

Sources:
- a local run folder (`wandb/offline-run-*`, or `wandb/run-*` of an online run), or any folder
  holding such folders (searched recursively); read with `harness.tracking.read_offline_run`;
- `entity/project` or `entity/project/run_id`: the public API (`wandb.Api`), needs a login.

Only evaluation runs become rows (job_type `eval` or `sweep`); training runs and evaluation runs
that never logged results are skipped with a note. A run missing what a row needs raises
`ReportInputError` naming the run and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from reports.runs import ReportInputError, Run, TaskResult

EVAL_JOB_TYPES = ("eval", "sweep")
NOT_TASKS = ("samples",)  # summary entries of the logged samples tables, not metrics
API_PATH = re.compile(r"^[\w.-]+/[\w.-]+(/[\w.-]+)?$")
RUN_FOLDER = re.compile(r"^(offline-)?run-(?P<stamp>\d{8}_\d{6})-(?P<id>\w+)$")


class SkippedRun(Exception):
    """A W&B run that is not an evaluation row (a training run, or one that logged no results)."""


def task_metrics(summary: dict) -> dict[str, dict[str, float]]:
    """`<task>/<metric>` numeric summary entries → {task: {metric: value}} (W&B's own keys dropped)."""
    tasks: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        task, sep, metric = key.partition("/")
        if not sep or not metric or "/" in metric or task.startswith("_") or task in NOT_TASKS:
            continue
        if isinstance(value, (int, float)):
            tasks.setdefault(task, {})[metric] = value
    return tasks


def run_from_wandb(config: dict, summary: dict, job_type: str | None, *, path: Path, where: str,
                   info: dict) -> Run:
    """One W&B run (its config, summary and job type) as a `Run`; `where` names it in errors.

    `info` (id, name, project, source) is kept in `Run.raw["wandb"]` so tables can say where a
    row came from; `Run.raw["config"]` is the runner's config, as in a results file.
    """
    if job_type not in EVAL_JOB_TYPES:
        raise SkippedRun(f"{where}: job_type {job_type!r} is not an evaluation ({'/'.join(EVAL_JOB_TYPES)})")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in ("model_name", "decoding"):
        if not config.get(key):
            raise ReportInputError(f"{where}: missing field 'config.{key}'")
    decoding = config["decoding"]
    if not isinstance(decoding, dict) or not decoding.get("name"):
        raise ReportInputError(f"{where}: missing field 'config.decoding.name'")
    tasks = task_metrics(summary)
    if not tasks:
        raise SkippedRun(f"{where}: no <task>/<metric> values in the summary (the run logged no results)")
    run = Run(
        path=path,
        model_name=str(config["model_name"]),
        model=str(config.get("model") or ""),
        decoding=str(decoding["name"]),
        decoding_params=dict(decoding.get("params") or {}),
        seeds=list(config.get("seeds") or []),
        samples=int(config.get("samples") or 0),
        sweep=config.get("sweep"),
        raw={"config": config, "results": tasks, "wandb": info},
    )
    run.tasks = {task: TaskResult(task, metrics) for task, metrics in tasks.items()}
    return run


# ---------------------------------------------------------------- local run folders


def run_folders(root: Path) -> list[Path]:
    """`root` itself if it holds a `run-*.wandb` file, else every such folder below it, oldest first."""
    root = root.resolve()  # wandb/latest-run is a link: name the run by its real folder
    if any(root.glob("run-*.wandb")):
        return [root]
    folders = {p.parent.resolve() for p in root.rglob("run-*.wandb")}

    def started(folder: Path) -> tuple[str, str]:
        found = RUN_FOLDER.match(folder.name)
        return (found.group("stamp") if found else "", str(folder))

    return sorted(folders, key=started)


def load_local_run(folder: Path) -> Run:
    """One local run folder (offline or online-synced) → `Run` (or `SkippedRun`)."""
    from google.protobuf.message import DecodeError

    from harness.tracking import read_offline_run

    try:
        logged = read_offline_run(folder)
    except (ValueError, OSError, DecodeError) as err:  # a foreign or corrupt .wandb file
        raise ReportInputError(f"{folder}: cannot read the W&B run file ({err})") from err
    found = RUN_FOLDER.match(folder.name)
    run_id = found.group("id") if found else folder.name
    kind = "offline" if folder.name.startswith("offline-") else "local"
    info = {"id": run_id, "name": None, "project": None, "source": kind, "dir": str(folder)}
    return run_from_wandb(logged["config"], logged["summary"], logged.get("job_type"), path=folder,
                          where=f"W&B run {folder}", info=info)


# ---------------------------------------------------------------- the public API


def load_api_runs(source: str, api=None) -> list[Run | SkippedRun]:
    """`entity/project` (every run) or `entity/project/run_id` via `wandb.Api()`."""
    if api is None:
        import wandb

        api = wandb.Api()
    try:
        found = [api.run(source)] if source.count("/") == 2 else list(api.runs(source))
    except Exception as err:  # network, auth, not found: wandb raises several types
        raise ReportInputError(f"W&B {source}: cannot read runs ({err})") from err
    out: list[Run | SkippedRun] = []
    for remote in found:
        path = "/".join(remote.path)
        info = {"id": remote.id, "name": remote.name, "project": remote.project, "source": "api", "dir": path}
        try:
            out.append(run_from_wandb(dict(remote.config), dict(remote.summary_metrics), remote.job_type,
                                      path=Path(path), where=f"W&B run {path}", info=info))
        except SkippedRun as skipped:
            out.append(skipped)
    return out


# ---------------------------------------------------------------- any mix of sources


def find_wandb_runs(sources: list[str | Path], note: Callable[[str], None] = print) -> list[Run]:
    """Evaluation runs from local folders and/or `entity/project[/run_id]`; `note` hears the skips."""
    runs: list[Run] = []
    for source in sources:
        local = Path(source)
        if local.is_file() and local.suffix == ".wandb":
            local = local.parent
        if local.is_dir():
            folders = run_folders(local)
            if not folders:
                raise ReportInputError(f"{local}: no W&B runs (no run-*.wandb file in it or below)")
            loaded: list[Run | SkippedRun] = []
            for folder in folders:
                try:
                    loaded.append(load_local_run(folder))
                except SkippedRun as skipped:
                    loaded.append(skipped)
        elif API_PATH.match(str(source)) and not local.exists():
            loaded = load_api_runs(str(source))
        else:
            raise ReportInputError(f"{source}: not a W&B run folder nor entity/project[/run_id]")
        for item in loaded:
            if isinstance(item, SkippedRun):
                note(f"skipped {item}")
            else:
                runs.append(item)
    return runs

