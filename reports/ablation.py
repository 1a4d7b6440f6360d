"""Figure 4: default vs temperature head only vs top-p head only vs both heads."""

from __future__ import annotations

from pathlib import Path

from reports.pass1 import build_table, collect
from reports.render import new_figure, save_figure, write_table
from reports.runs import Run

ABLATION = ["default", "autodeco-temp", "autodeco-top-p", "autodeco"]
LABELS = {"default": "default", "autodeco-temp": "temp head", "autodeco-top-p": "top-p head",
          "autodeco": "both heads"}


def report_ablation(runs: list[Run], out: Path, tasks: list[str] | None = None,
                    name: str = "ablation") -> list[Path]:
    cells = {k: v for k, v in collect(runs).items() if k[1] in ABLATION}
    if not cells:
        raise ValueError(f"none of {ABLATION} in the given runs")
    table = build_table(cells, name, "Ablation: which heads act (Pass@1 %)", tasks)
    paths = write_table(table, out)
    groups = sorted({(m, t) for (m, _), v in cells.items() for t in v})
    fig, axes = new_figure(1, size=(max(4.5, 1.6 * len(groups)), 3.4))
    ax, width = axes[0], 0.8 / len(ABLATION)
    for j, method in enumerate(ABLATION):
        xs, ys, errs = [], [], []
        for i, (model, task) in enumerate(groups):
            value = cells.get((model, method), {}).get(task)
            if value is not None:
                xs.append(i + (j - (len(ABLATION) - 1) / 2) * width)
                ys.append(value.mean)
                errs.append(value.half_width or value.std or 0.0)
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=LABELS[method])  # error bars: 95% CI
    ax.set_xticks(range(len(groups)), [f"{m}\n{t}" for m, t in groups], fontsize=7)
    ax.set_ylabel("Pass@1 (%)")
    ax.set_title("AutoDeco ablation")
    ax.legend(fontsize=7)
    return paths + save_figure(fig, out, name)
