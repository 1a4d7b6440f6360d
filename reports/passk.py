"""Tables 5-7: Pass@k (%) for each k present, with the relative error reduction of AutoDeco.

Relative error reduction = (err_default − err_autodeco) / err_default with err = 1 − Pass@k;
the paper's argument is that an equal absolute gain is a larger relative gain at large k.
Beside them: maj@k tables (majority vote over extracted answers, harness.metrics.majority_at_k)
where the results files carry them, and one figure of pass@k and maj@k against k.
"""

from __future__ import annotations

import re
from pathlib import Path

from reports import paper
from reports.pass1 import SCALE, build_table, collect
from reports.render import new_figure, save_figure, write_table
from reports.runs import Run


def available_ks(runs: list[Run]) -> list[int]:
    ks = {int(m.group(1)) for r in runs for t in r.tasks.values() for key in t.metrics
          if (m := re.fullmatch(r"pass@(\d+)", key))}
    return sorted(ks)


def relative_error_reduction(base: float, new: float) -> float | None:
    """Percent of the baseline's error (100 − Pass@k, in %) removed by the new method."""
    err = 100.0 - base
    return None if err <= 0 else 100.0 * (err - (100.0 - new)) / err


def report_passk(runs: list[Run], out: Path, ks: list[int] | None = None, tasks: list[str] | None = None,
                 baseline: str = "default", method: str = "autodeco", with_paper: bool = False,
                 name: str = "passk") -> list[Path]:
    ks = ks or [k for k in available_ks(runs) if k > 1] or available_ks(runs)
    if not ks:
        raise ValueError("no pass@k metrics in the given runs")
    paths: list[Path] = []
    for k in ks:
        cells = {key: {t: v.mean for t, v in vals.items()} for key, vals in collect(runs, metric=f"pass@{k}").items()}
        if not cells:
            continue
        table = build_table(cells, f"{name}_k{k}", f"Pass@{k} (%) by model and decoding method", tasks)
        table.notes = [f"Unbiased Pass@{k} over all samples per problem (%); bold = best per column "
                       f"within a model. Last rows per model: relative error reduction (%) of "
                       f"{method} vs {baseline}."]
        n_cols = len(table.columns)
        for model in sorted({m for m, _ in cells}):
            base, new = cells.get((model, baseline)), cells.get((model, method))
            if not base or not new:
                continue
            row = [model, f"err. red. {method} vs {baseline}"]
            for column in table.columns[2:-1]:
                b, n = base.get(column), new.get(column)
                row.append(None if b is None or n is None else relative_error_reduction(b, n))
            b_avg = [r for r in table.rows if r[0] == model and r[1] == baseline][0][-1]
            n_avg = [r for r in table.rows if r[0] == model and r[1] == method][0][-1]
            row.append(None if b_avg is None or n_avg is None else relative_error_reduction(b_avg, n_avg))
            assert len(row) == n_cols
            table.rows.append(row)
        paths += write_table(table, out)
    paths += _majority(runs, out, tasks, name)
    if with_paper:
        paths += write_table(paper.paper_table("passk", f"{name}_paper"), out)
    return paths


def _majority(runs: list[Run], out: Path, tasks: list[str] | None, name: str) -> list[Path]:
    """maj@k tables beside pass@k, and one figure: pass@k and maj@k against k per model × method × task."""
    curves: dict[tuple[str, str, str], dict[str, dict[int, float]]] = {}
    for run in runs:
        if run.sweep:
            continue
        for task, result in run.tasks.items():
            if tasks and task not in tasks:
                continue
            curve = curves.setdefault((run.model_name, run.label, task), {"pass": {}, "maj": {}})
            for key, value in result.metrics.items():
                kind, _, k = key.partition("@")
                if kind in ("pass", "maj") and k.isdigit() and isinstance(value, (int, float)):
                    curve[kind][int(k)] = float(value) * SCALE
    ks = sorted({k for c in curves.values() for k in c["maj"]})
    if not ks:
        return []
    paths = []
    for k in ks:
        cells = {(m, meth): {} for (m, meth, _t) in curves}
        for (m, meth, t), curve in curves.items():
            if k in curve["maj"]:
                cells[(m, meth)][t] = curve["maj"][k]
        cells = {key: v for key, v in cells.items() if v}
        table = build_table(cells, f"{name}_maj{k}", f"maj@{k} (%) by model and decoding method", tasks)
        table.notes = [f"maj@{k}: the expected accuracy of a majority vote over the extracted answers of {k} "
                       f"of a problem's samples (every k-subset, or 200 seeded ones), ties split evenly (%)."]
        paths += write_table(table, out)
    shown = {key: c for key, c in curves.items() if len(c["pass"]) > 1 or c["maj"]}
    fig, axes = new_figure(len(shown), ncols=min(3, len(shown)))
    for ax, ((model, method, task), curve) in zip(axes, shown.items(), strict=False):
        for kind, style in (("pass", "o-"), ("maj", "s--")):
            points = sorted(curve[kind].items())
            if points:
                ax.plot(*zip(*points, strict=True), style, ms=3, label=f"{kind}@k")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k", ylabel="%", title=f"{model} · {method} · {task}")
        ax.title.set_fontsize(7)
        ax.legend(fontsize=7)
    return paths + save_figure(fig, out, f"{name}_vs_k")
