"""Figure 6: training curves from the trainer's log_history.jsonl, and the candidates table.

Candidates: `autodeco eval` on a training run folder evaluates every `checkpoint-<step>/` (and
`final/`); each becomes a results file whose model path names the checkpoint. The table lists
each candidate's Pass@1 per validation task with the best one marked, so heads are picked by
measured accuracy rather than by the last step.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.core.files import read_jsonl
from reports.pass1 import interval
from reports.render import Table, mark_best, new_figure, save_figure, write_table
from reports.runs import ReportInputError, Run, find_files

CURVES = [("loss", "total"), ("temp_loss", "temperature"), ("top_p_loss", "top-p")]


def read_log_history(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path, error=ReportInputError) if isinstance(r, dict) and "step" in r]


def candidate_name(run: Run) -> str | None:
    """`checkpoint-<step>` or `final` if the run evaluated a training candidate (the runner's
    `config.candidate`, else the model path's last folder)."""
    config = run.raw.get("config", {})
    if "candidate" in config:  # the runner always says; null = not a training candidate
        return str(config["candidate"]["name"]) if config["candidate"] else None
    found = re.search(r"(checkpoint-\d+|final)$", (run.model or "").rstrip("/"))
    return found.group(1) if found else None


def training_root(run: Run) -> str:
    """The training run folder's name."""
    candidate = run.raw.get("config", {}).get("candidate")
    text = candidate.get("run") if candidate else str(Path(run.model.rstrip("/")).parent)
    return Path(text).name or text


def report_training(dirs: list[Path], runs: list[Run], out: Path, name: str = "training") -> list[Path]:
    logs = find_files(dirs, "log_history.jsonl")
    candidates = [r for r in runs if candidate_name(r)]
    if not logs and not candidates:
        raise ValueError("no log_history.jsonl and no evaluated checkpoints in the given folders")
    paths: list[Path] = []
    if logs:
        fig, axes = new_figure(2, ncols=2, size=(4.6, 3.2))
        for log in logs:
            history = read_log_history(log)
            tag = log.parent.name
            for key, label in CURVES:
                points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
                if points:
                    axes[0].plot(*zip(*points, strict=True), lw=1.2, label=f"{tag}: {label}")
            for key, label in (("temperature_mean", "mean T"), ("top_p_mean", "mean P")):
                points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
                if points:
                    axes[1].plot(*zip(*points, strict=True), lw=1.2, label=f"{tag}: {label}")
        axes[0].set(xlabel="step", ylabel="loss", title="Training loss")
        axes[1].set(xlabel="step", ylabel="predicted value", title="Mean predicted T and P")
        for ax in axes:
            ax.legend(fontsize=7)
        paths += save_figure(fig, out, name)
        paths += write_table(curves_table(logs, f"{name}_log"), out)
    if candidates:
        paths += write_table(candidates_table(candidates, f"{name}_candidates"), out)
    return paths


LOG_COLUMNS = ["step", "loss", "temp_loss", "top_p_loss", "temperature_mean", "top_p_mean", "tokens_per_second"]


def curves_table(logs: list[Path], name: str) -> Table:
    """The logged steps behind the figure, one row per (training run, step)."""
    rows = [[log.parent.name] + [r.get(c) for c in LOG_COLUMNS] for log in logs for r in read_log_history(log)]
    return Table(name=name, title="Training log (per logged step)", columns=["Training run", *LOG_COLUMNS],
                 rows=rows, precision=4)


def candidates_table(candidates: list[Run], name: str) -> Table:
    tasks = sorted({t for r in candidates for t in r.tasks})
    latest: dict[tuple[str, str], Run] = {}
    for run in candidates:
        latest[(training_root(run), candidate_name(run))] = run

    def order(key):
        cand = key[1]
        return (key[0], float("inf") if cand == "final" else int(cand.split("-")[1]))

    rows, blocks = [], {}
    for key in sorted(latest, key=order):
        run = latest[key]
        step = (run.raw.get("config", {}).get("candidate") or {}).get("step", run.checkpoint_step)
        row = [key[0], key[1], step]
        for task in tasks:
            result = run.tasks.get(task)
            row.append(interval(result) if result else None)
        blocks.setdefault(key[0], []).append(len(rows))
        rows.append(row)
    table = Table(name=name, title="Training candidates evaluated on validation tasks (Pass@1 %)",
                  columns=["Training run", "Candidate", "Step", *tasks], rows=rows,
                  notes=["Pass@1 in % [95% interval over problems]; † = fewer than 10 problems (anecdotal, never "
                         "bold). Bold = best candidate per task within a training run: pick heads by this, on "
                         "validation problems, not by the last step — and never on the test problems."])
    for block in blocks.values():
        mark_best(table, list(range(3, len(table.columns))), rows=block)
    return table
