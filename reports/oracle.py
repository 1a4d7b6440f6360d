"""Figure 3: the oracle (Expert-Guided Tuning) sweep vs AutoDeco.

For each sweep summary (model × task): accuracy vs temperature at P=1, and accuracy vs top-p at
the best temperature, with AutoDeco's Pass@1 as a horizontal line and the gap in the title.
The table lists best T, best P, the test-set oracle next to the cross-validated static baseline
(tuned on held-out folds, harness.sweep.cross_validate: the honest number), AutoDeco, default and
the gaps per model × task. T = 0 on the temperature axis is greedy.
"""

from __future__ import annotations

from pathlib import Path

from reports.pass1 import SCALE
from reports.render import Interval, Table, new_figure, save_figure, write_table
from reports.runs import Run, Sweep


def find_method(runs: list[Run], sweep: Sweep, method: str, model_map: dict[str, str]) -> float | None:
    """Pass@1 (%) of `method` on the sweep's task for the model paired with the sweep's base model.

    Pairing: an explicit `model_map[base] = autodeco_model`; else the same model name; else the
    only model that ran `method` on that task; else one whose name contains the base name.
    """
    found: dict[str, float] = {}
    for run in runs:  # later files override earlier ones
        if run.sweep is None and run.label == method and sweep.task in run.tasks:
            value = run.tasks[sweep.task].get("pass@1")
            if value is not None:
                found[run.model_name] = value * SCALE
    if sweep.model_name in model_map:
        return found.get(model_map[sweep.model_name])
    if sweep.model_name in found:
        return found[sweep.model_name]
    if len(found) == 1:
        return next(iter(found.values()))
    close = [v for m, v in found.items() if sweep.model_name in m]
    return close[0] if len(close) == 1 else None


def _points(grid: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    grid = sorted(grid, key=lambda g: g[key])
    return ([g[key] for g in grid], [g["pass@1"] * SCALE for g in grid],
            [(g.get("pass@1_std") or 0.0) * SCALE for g in grid])


def report_oracle(runs: list[Run], sweeps: list[Sweep], out: Path, model_map: dict[str, str] | None = None,
                  name: str = "oracle") -> list[Path]:
    if not sweeps:
        raise ValueError("no sweep_summary_<task>.json in the given folders (run `autodeco sweep`)")
    model_map = model_map or {}
    sweeps = sorted(sweeps, key=lambda s: (s.model_name, s.task))
    fig, axes = new_figure(2 * len(sweeps), ncols=2)
    rows = []
    for i, sweep in enumerate(sweeps):
        autodeco = find_method(runs, sweep, "autodeco", model_map)
        default = find_method(runs, sweep, "default", {})
        oracle = sweep.best_pass1 * SCALE
        gap = None if autodeco is None else autodeco - oracle
        cv = sweep.cross_validated
        cv_cell = None if not cv or cv.get("pass@1") is None else Interval(cv["pass@1"] * SCALE, None, cv["ci_low"] * SCALE,
                                               cv["ci_high"] * SCALE, cv.get("n_problems"))
        choices = "" if not cv else "; ".join(
            "greedy" if c["temperature"] == 0 else f"T={c['temperature']:g},P={c['top_p']:g}"
            for c in cv["choices"])
        rows.append([sweep.model_name, sweep.task, "greedy" if sweep.best_temperature == 0 else sweep.best_temperature,
                     sweep.best_top_p, oracle, cv_cell, choices, autodeco, default, gap,
                     None if autodeco is None or cv_cell is None else autodeco - cv_cell.mean])
        for ax, key, label, fixed in ((axes[2 * i], "temperature", "temperature T", "P = 1"),
                                      (axes[2 * i + 1], "top_p", "top-p P", f"T = {sweep.best_temperature:g}")):
            grid = sweep.temperature_grid if key == "temperature" else sweep.top_p_grid
            if not grid:
                ax.set_title(f"{sweep.model_name} · {sweep.task}: greedy is best (no top-p grid)", fontsize=8)
                ax.axis("off")
                continue
            x, y, err = _points(grid, key)
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=f"static ({fixed})")
            if autodeco is not None:
                ax.axhline(autodeco, color="C3", ls="--", label=f"AutoDeco {autodeco:.1f}")
            if default is not None:
                ax.axhline(default, color="C7", ls=":", label=f"default {default:.1f}")
            ax.set_xlabel(label)
            ax.set_ylabel("Pass@1 (%)")
            gap_text = "" if gap is None else f", gap {gap:+.1f}"
            ax.set_title(f"{sweep.model_name} · {sweep.task} (oracle {oracle:.1f}{gap_text})", fontsize=8)
            ax.legend(fontsize=7)
    paths = save_figure(fig, out, name)
    table = Table(name=name, title="Oracle (test-set tuned static T, P) and the cross-validated static baseline "
                                   "vs AutoDeco, Pass@1 (%)",
                  columns=["Model", "Task", "best T", "best P", "Oracle (test-tuned)", "Static (CV)",
                           "CV choices per fold", "AutoDeco", "Default", "AutoDeco − Oracle",
                           "AutoDeco − Static (CV)"], rows=rows,
                  notes=["Oracle = two-stage sweep on the test set (greedy and T at P=1, then P at the best T): "
                         "tuned on the very problems it is scored on, so optimistic by selection. Static (CV) = the "
                         "same grid, each fold of problems scored with the point that was best on the other folds "
                         "[95% interval over problems]; † = fewer than 10 problems. Paired tests: `report paired`."])
    return paths + write_table(table, out)
