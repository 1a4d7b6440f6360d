"""Tables 1-2 layout: rows model × method, columns tasks + average, Pass@1 (%) with its 95% interval.

Each cell is the mean over problems with a t interval over problems (harness.stats; each
problem's accuracy pooled over seeds and samples); a column header says how many problems ×
samples per problem stand behind it. The best cell per column within each model block is bold
(as in the paper), except cells from fewer than 10 problems: those are marked † (anecdotal) and
never bold. When sweep summaries are among the inputs, an `oracle` row per model holds the
test-set-tuned best static Pass@1 per task (the paper's Expert-Guided Tuning) and a `static (CV)`
row the cross-validated static baseline (tuned on held-out folds). Where a paper table is
reproduced (``paper_key``), a second table gives the paper's ± (population std over seeds).
"""

from __future__ import annotations

from pathlib import Path

from harness.stats import pass1_estimate, seed_std
from reports import paper
from reports.render import Interval, Table, mark_best, write_table
from reports.runs import Run, Sweep, TaskResult

SCALE = 100.0  # results files hold fractions; tables print percent
METHOD_ORDER = ["greedy", "default", "recommended", "static", "static (CV)", "meanshift", "min-p", "top-n-sigma",
                "edt", "eta", "autodeco-temp", "autodeco-top-p", "autodeco", "oracle"]
INTERVAL_NOTE = ("Pass@1 in %: mean over problems [95% t interval over problems; each problem's accuracy pooled "
                 "over its seeds and samples] (Miller 2024, arXiv 2411.00640); column headers give problems × "
                 "samples per problem; † = fewer than 10 problems (anecdotal, never bold); bold = best per column "
                 "within a model; Average = mean over the tasks (blank if a task is missing).")


def method_rank(label: str) -> tuple[int, str]:
    base = label.split("(")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def interval(result: TaskResult, metric: str = "pass@1") -> Interval | None:
    """The cell of one task result: its interval from the results file, else from its samples file."""
    value = result.get(metric)
    if value is None:
        return None
    std = result.get(f"{metric}_std")
    low, high, n = result.get(f"{metric}_ci_low"), result.get(f"{metric}_ci_high"), result.get("n_problems")
    if metric == "pass@1" and low is None and result.samples_path is not None:  # files older than the interval fields
        estimate = pass1_estimate(result.verdicts_by_doc())
        low, high, n = estimate.ci_low, estimate.ci_high, estimate.n
    scaled = [None if v is None or v != v else v * SCALE for v in (low, high)]  # NaN (one problem) -> no interval
    return Interval(value * SCALE, None if std is None else std * SCALE, scaled[0], scaled[1],
                    None if n is None else int(n))


def collect(runs: list[Run], metric: str = "pass@1", include_sweep_points: bool = False
            ) -> dict[tuple[str, str], dict[str, Interval]]:
    """(model, method) -> task -> `Interval` (%); later files override earlier ones."""
    cells: dict[tuple[str, str], dict[str, Interval]] = {}
    for run in runs:
        if run.sweep and not include_sweep_points:
            continue
        for task, result in run.tasks.items():
            cell = interval(result, metric)
            if cell is not None:
                cells.setdefault((run.model_name, run.label), {})[task] = cell
    return cells


def sizes(runs: list[Run]) -> dict[str, str]:
    """task -> "problems×samples" when every run agrees, else "problems×samples, ..." listed."""
    seen: dict[str, set[str]] = {}
    for run in runs:
        for task, result in run.tasks.items():
            n, k = result.get("n_docs"), result.get("n_samples_per_doc")
            if n is not None and k is not None:
                seen.setdefault(task, set()).add(f"{int(n)}×{int(k)}")
    return {task: "/".join(sorted(v)) for task, v in seen.items()}


def add_oracle(cells: dict, sweeps: list[Sweep]) -> None:
    for sweep in sweeps:
        std = sweep.best_std if sweep.best_std is not None else next(
            (g.get("pass@1_std") for g in sweep.top_p_grid if g.get("pass@1") == sweep.best_pass1), None)
        cv = sweep.cross_validated or {}
        n = cv.get("n_problems")
        cells.setdefault((sweep.model_name, "oracle"), {})[sweep.task] = Interval(
            sweep.best_pass1 * SCALE, None if std is None else std * SCALE,
            *((sweep.best_ci_low * SCALE, sweep.best_ci_high * SCALE) if sweep.best_ci_low is not None else (None, None)),
            n)
        if cv and cv.get("pass@1") is not None:
            cells.setdefault((sweep.model_name, "static (CV)"), {})[sweep.task] = Interval(
                cv["pass@1"] * SCALE, None, cv["ci_low"] * SCALE, cv["ci_high"] * SCALE, n)


def build_table(cells: dict, name: str, title: str, tasks: list[str] | None = None,
                sizes: dict[str, str] | None = None) -> Table:
    tasks = tasks or sorted({t for v in cells.values() for t in v})
    sizes = sizes or {}
    keys = sorted(cells, key=lambda k: (k[0], method_rank(k[1])))
    rows, midrules, blocks = [], set(), {}
    for model, method in keys:
        values = cells[(model, method)]
        row: list = [model, method]
        for task in tasks:
            row.append(values.get(task))
        present = [v[0] if isinstance(v, tuple) else v for t in tasks if (v := values.get(t)) is not None]
        row.append(sum(present) / len(present) if len(present) == len(tasks) else None)
        if model not in blocks:
            midrules.add(len(rows))
        blocks.setdefault(model, []).append(len(rows))
        rows.append(row)
    headers = [f"{t} ({sizes[t]})" if t in sizes else t for t in tasks]
    table = Table(name=name, title=title, columns=["Model", "Method", *headers, "Average"], rows=rows,
                  midrules=midrules, notes=[INTERVAL_NOTE])
    for block in blocks.values():
        mark_best(table, list(range(2, len(table.columns))), rows=block)
    return table


def report_pass1(runs: list[Run], sweeps: list[Sweep], out: Path, tasks: list[str] | None = None,
                 paper_key: str | None = None, model_map: dict[str, str] | None = None,
                 name: str = "pass1") -> list[Path]:
    """Write the Pass@1 table (+ the paper's table and ours-vs-paper deltas when `paper_key`)."""
    cells = collect(runs)
    add_oracle(cells, sweeps)
    if not cells:
        raise ValueError("no Pass@1 results in the given runs")
    table = build_table(cells, name, "Pass@1 (%) by model and decoding method", tasks, sizes(runs))
    paths = write_table(table, out)
    if paper_key:
        paths += write_table(seed_std_table(runs, f"{name}_seed_std", tasks), out)
        paths += write_table(paper.paper_table(paper_key, f"{name}_paper"), out)
        ours = {k: {t: v[0] for t, v in vals.items()} for k, vals in cells.items()}
        paths += write_table(paper.delta_table(paper_key, f"{name}_vs_paper", ours, model_map or {}), out)
    return paths


def seed_std_table(runs: list[Run], name: str, tasks: list[str] | None = None) -> Table:
    """The paper's layout: mean ± population std over seeds of the per-seed Pass@1 (its script's ±)."""
    cells: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for run in runs:
        if run.sweep:
            continue
        for task, result in run.tasks.items():
            per_seed = result.metrics.get("pass@1_per_seed")
            if per_seed:
                cells.setdefault((run.model_name, run.label), {})[task] = (
                    result.get("pass@1") * SCALE, seed_std(per_seed) * SCALE)
    table = build_table(cells, name, "Pass@1 (%), the paper's ± (population std over seeds)", tasks, sizes(runs))
    table.notes = ["Pass@1 in %, mean ± population std (ddof=0) over seeds of each seed's mean accuracy, as the "
                   "paper's evaluation script computes it: for comparing with the paper's tables, not for "
                   "judging differences (see the interval table)."]
    return table
