"""W&B-style comparison of any set of runs: one row per run (results file or W&B run), one grouped bar plot."""

from __future__ import annotations

from pathlib import Path

from reports.pass1 import INTERVAL_NOTE, SCALE, interval
from reports.render import Table, mark_best, new_figure, save_figure, write_table
from reports.runs import Run


def run_name(run: Run) -> str:
    return f"{run.model_name} · {run.label}"


def run_source(run: Run) -> str:
    """Where a row came from: `results: <out folder>`, `W&B <project>/<name> (<id>)` or `W&B offline <id>`."""
    info = run.raw.get("wandb")
    if not info:
        return f"results: {run.path.parent.parent.name or run.path.parent}"
    if info.get("name"):
        where = "/".join(x for x in (info.get("project"), info["name"]) if x)
        return f"W&B {where} ({info['id']})"
    return f"W&B {info['source']} {info['id']}"


def report_compare(runs: list[Run], out: Path, metric: str = "pass@1", name: str = "compare") -> list[Path]:
    if not runs:
        raise ValueError("no evaluation runs in the given inputs (results files or W&B runs)")
    tasks = sorted({t for r in runs for t in r.tasks})
    rows = []
    for run in runs:
        row = [run_name(run), run_source(run), f"{len(run.seeds)}×{run.samples}"]
        values = []
        for task in tasks:
            result = run.tasks.get(task)
            cell = interval(result, metric) if result else None
            values.append(None if cell is None else cell.mean)
            row.append(cell)
        present = [v for v in values if v is not None]
        row.append(sum(present) / len(present) if len(present) == len(tasks) else None)
        row.append(run.raw.get("total_evaluation_time_seconds"))
        rows.append(row)
    table = Table(name=name, title=f"Run comparison ({metric}, %)",
                  columns=["Run", "Source", "seeds×samples", *tasks, "Average", "time (s)"], rows=rows,
                  notes=[INTERVAL_NOTE.replace("within a model", "over all runs"),
                         "One row per run (results file or W&B run). Sources: " + ", ".join(str(r.path) for r in runs)])
    mark_best(table, list(range(3, 3 + len(tasks) + 1)))
    paths = write_table(table, out)
    fig, axes = new_figure(1, size=(max(5.0, 1.2 * len(tasks) * max(1, len(runs)) ** 0.5), 3.4))
    ax, width = axes[0], 0.8 / len(runs)
    for j, run in enumerate(runs):
        xs, ys, errs = [], [], []
        for i, task in enumerate(tasks):
            result = run.tasks.get(task)
            if result and result.get(metric) is not None:
                xs.append(i + (j - (len(runs) - 1) / 2) * width)
                ys.append(result.get(metric) * SCALE)
                errs.append((result.get(f"{metric}_std") or 0.0) * SCALE)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=run_name(run))
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Run comparison")
    ax.legend(fontsize=6)
    return paths + save_figure(fig, out, name)
