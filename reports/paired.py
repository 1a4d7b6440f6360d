"""Paired comparisons: each method against each baseline on the same problems, with a 95% interval
of the difference and a paired t-test (harness.stats.paired_difference).

Within a model block (model names after ``--alias``), every method is compared with every baseline
present (a baseline with those listed before it: greedy − default, ...) — default sampling, greedy, the model's recommended setting, SimpleDeco's MeanShift and the
cross-validated static baseline from a sweep (``static (CV)``) and the sweep's best grid point
(``oracle``: tuned on the test problems, so optimistic) — on the problems both ran. A row says
how many problems the difference rests on; † marks fewer than 10 (anecdotal), ▲/▼ a difference
with p < 0.05. The figure draws each difference with its interval (a forest plot per task).
"""

from __future__ import annotations

from pathlib import Path

from harness.stats import paired_difference
from reports.pass1 import SCALE, method_rank
from reports.render import Interval, Table, new_figure, save_figure, write_table
from reports.runs import ReportInputError, Run, Sweep

BASELINES = ("default", "greedy", "recommended", "meanshift", "static (CV)", "oracle")
CV = "static (CV)"
ORACLE = "oracle"


def per_doc_by_method(runs: list[Run], sweeps: list[Sweep]) -> dict[tuple[str, str, str], dict]:
    """(model, method label, task) -> doc id -> verdicts (or the CV baseline's per-problem accuracy)."""
    found: dict[tuple[str, str, str], dict] = {}
    for run in runs:  # later files override earlier ones
        if run.sweep:
            continue
        for task, result in run.tasks.items():
            if result.samples_path is not None:
                found[(run.model_name, run.label, task)] = result.verdicts_by_doc()
    for sweep in sweeps:
        if sweep.cross_validated and sweep.cross_validated.get("per_doc"):
            found[(sweep.model_name, CV, sweep.task)] = sweep.cross_validated["per_doc"]
        best = oracle_point(sweep)
        if best is not None:
            found[(sweep.model_name, ORACLE, sweep.task)] = best["per_doc"]
    return found


def oracle_point(sweep: Sweep) -> dict | None:
    """The sweep's best grid point (tuned on the test problems themselves) with its per-problem
    accuracies, or None for summaries written before they were kept."""
    for row in sweep.top_p_grid + sweep.temperature_grid:
        if row.get("temperature") == sweep.best_temperature and row.get("per_doc") and (
                sweep.best_temperature == 0 or row.get("top_p") == sweep.best_top_p):
            return row
    return None


def comparisons(runs: list[Run], sweeps: list[Sweep], tasks: list[str] | None = None,
                baselines: tuple[str, ...] = BASELINES) -> list[tuple[str, str, str, str, object]]:
    """(model, task, method, baseline, Estimate) for every method × baseline sharing problems."""
    found = per_doc_by_method(runs, sweeps)
    out = []
    for (model, method, task), verdicts in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][2],
                                                                                  method_rank(kv[0][1]))):
        if tasks and task not in tasks:
            continue
        # a baseline is compared with the baselines listed before it (greedy − default), others with all
        against = baselines[: baselines.index(method)] if method in baselines else baselines
        for baseline in against:
            other = found.get((model, baseline, task))
            if other is None:
                continue
            try:
                out.append((model, task, method, baseline, paired_difference(verdicts, other)))
            except ValueError:  # no shared problem
                continue
    return out


def significance_mark(estimate) -> str:
    if not estimate.significant:
        return ""
    return "▲" if estimate.mean > 0 else "▼"


def report_paired(runs: list[Run], sweeps: list[Sweep], out: Path, tasks: list[str] | None = None,
                  name: str = "paired") -> list[Path]:
    rows_in = comparisons(runs, sweeps, tasks)
    if not rows_in:
        raise ValueError("no method shares problems with a baseline (default, greedy, recommended, meanshift, "
                         "or a sweep's static (CV) or oracle) in the same model block; samples files are needed")
    rows = []
    for model, task, method, baseline, est in rows_in:
        p_text = "–" if est.p_value is None else ("<0.001" if est.p_value < 0.001 else f"{est.p_value:.3f}")
        cell = Interval(est.mean * SCALE, None, *((None, None) if est.ci_low != est.ci_low else
                                                  (est.ci_low * SCALE, est.ci_high * SCALE)), est.n)
        rows.append([model, task, method, baseline, cell, p_text, est.n, significance_mark(est)])
    table = Table(name=name, title="Paired differences in Pass@1 (percentage points), method − baseline",
                  columns=["Model", "Task", "Method", "Baseline", "Δ [95% CI]", "p", "problems", "p < 0.05"],
                  rows=rows,
                  notes=["Δ = mean over shared problems of (accuracy of method − accuracy of baseline), each "
                         "problem's accuracy pooled over its seeds and samples; 95% t interval and two-sided paired "
                         "t-test over problems (harness.stats.paired_difference; Miller 2024, arXiv 2411.00640). "
                         "▲/▼ = significantly above/below at p < 0.05; † = fewer than 10 problems (anecdotal). "
                         "static (CV) = the sweep's grid tuned on held-out folds; oracle = the sweep's best grid "
                         "point, tuned on these very problems (optimistic)."])
    paths = write_table(table, out)
    return paths + _forest(rows_in, out, name)


def _forest(rows_in, out: Path, name: str) -> list[Path]:
    by_task: dict[str, list] = {}
    for model, task, method, baseline, est in rows_in:
        by_task.setdefault(f"{model} · {task}", []).append((f"{method} − {baseline}", est))
    fig, axes = new_figure(len(by_task), ncols=min(2, len(by_task)),
                           size=(5.0, 0.35 * max(len(v) for v in by_task.values()) + 1.2))
    for ax, (title, items) in zip(axes, by_task.items(), strict=False):
        for y, (_label, est) in enumerate(items):
            low = est.ci_low if est.ci_low == est.ci_low else est.mean
            high = est.ci_high if est.ci_high == est.ci_high else est.mean
            color = "C2" if est.significant and est.mean > 0 else "C3" if est.significant else "C7"
            ax.errorbar(est.mean * SCALE, y, xerr=[[(est.mean - low) * SCALE], [(high - est.mean) * SCALE]],
                        fmt="o", color=color, capsize=3, ms=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=7)
        ax.set_xlabel("Δ Pass@1 (pp), 95% CI")
        ax.set_title(title, fontsize=8)
    return save_figure(fig, out, name)


def paired_lines(runs: list[Run], sweeps: list[Sweep], task: str, method: str, model: str | None = None) -> list[str]:
    """One printable line per baseline: ``method − baseline = Δ [CI] (p, n)`` (the demo's headline)."""
    lines = []
    for m, _task, meth, baseline, est in comparisons(runs, sweeps, [task]):
        if meth != method or (model is not None and m != model):
            continue
        p = "<0.001" if est.p_value < 0.001 else f"{est.p_value:.3f}"
        ci = "" if est.ci_low != est.ci_low else f" [{est.ci_low * SCALE:+.1f}, {est.ci_high * SCALE:+.1f}]"
        flag = " (anecdotal: < 10 problems)" if est.anecdotal else " *" if est.significant else ""
        lines.append(f"{method} − {baseline:<12} {est.mean * SCALE:+6.1f} pp{ci}  p = {p}  n = {est.n}{flag}")
    if not lines:
        raise ReportInputError(f"no baseline shares problems with {method} on {task}")
    return lines
