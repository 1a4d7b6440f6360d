"""Writing tables (Markdown, LaTeX booktabs, CSV) and figures (PNG, PDF).

A `Table` holds plain values; each writer formats them. Cells are numbers (formatted with the
table's precision), (mean, std) pairs (printed "mean ± std"), `Interval`s (printed
"mean [low, high]", with † when fewer than 10 problems stand behind it), strings, or None ("–").
`bold` marks cells (e.g. the best per column): `**x**` in Markdown, `\\textbf{x}` in LaTeX, and a
trailing `*` column flag in CSV is avoided — CSV keeps raw numbers plus a `best` list per row.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from harness.core.files import atomic_write
from harness.stats import ANECDOTAL_BELOW


class Interval(NamedTuple):
    """A mean with its 95% interval over ``n`` problems; ``std`` (over seeds) kept for old files and
    plots. Index 0 / 1 are mean / std, like the (mean, std) pairs."""

    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None
    n: int | None = None

    @property
    def anecdotal(self) -> bool:
        return self.n is not None and self.n < ANECDOTAL_BELOW

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


Cell = float | int | str | tuple[float, float] | Interval | None


@dataclass
class Table:
    name: str                       # file stem: <out>/<name>.md/.tex/.csv
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    bold: set[tuple[int, int]] = field(default_factory=set)   # (row, column) indices
    notes: list[str] = field(default_factory=list)
    precision: int = 2
    midrules: set[int] = field(default_factory=set)           # a rule before these row indices

    def fmt(self, cell: Cell, latex: bool = False) -> str:
        if cell is None:
            return "–" if not latex else "--"
        if isinstance(cell, Interval) and cell.low is not None:
            p = self.precision
            interval = f"{cell.mean:.{p}f} [{cell.low:.{p}f}, {cell.high:.{p}f}]"
            return interval + ("$^\\dagger$" if latex else "†") * cell.anecdotal
        if isinstance(cell, Interval):
            return f"{cell.mean:.{self.precision}f}" + ("" if cell.std is None else (
                (r" $\pm$ " if latex else " ± ") + f"{cell.std:.{self.precision}f}"))
        if isinstance(cell, tuple):
            mean, std = cell
            pm = r" $\pm$ " if latex else " ± "
            return f"{mean:.{self.precision}f}{pm}{std:.{self.precision}f}"
        if isinstance(cell, float):
            return f"{cell:.{self.precision}f}"
        return str(cell)


def mark_best(table: Table, columns: list[int], higher_is_better: bool = True,
              rows: list[int] | None = None) -> None:
    """Bold the best numeric cell of each given column (ties all marked); anecdotal cells (fewer than
    10 problems) are never marked."""
    rows = list(range(len(table.rows))) if rows is None else rows
    for c in columns:
        values = {}
        for r in rows:
            cell = table.rows[r][c]
            if isinstance(cell, Interval) and cell.anecdotal:
                continue
            value = cell[0] if isinstance(cell, tuple) else cell
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[r] = round(float(value), table.precision)
        if not values:
            continue
        best = max(values.values()) if higher_is_better else min(values.values())
        table.bold.update((r, c) for r, v in values.items() if v == best)


def to_markdown(table: Table) -> str:
    def line(cells):
        return "| " + " | ".join(cells) + " |"

    out = [f"**{table.title}**", "", line(table.columns), line(["---"] * len(table.columns))]
    for r, row in enumerate(table.rows):
        cells = [table.fmt(c) for c in row]
        cells = [f"**{s}**" if (r, i) in table.bold else s for i, s in enumerate(cells)]
        out.append(line(cells))
    out += [""] + [f"{n}" for n in table.notes]
    return "\n".join(out).rstrip() + "\n"


UNICODE_LATEX = {"±": r"$\pm$", "−": r"$-$", "Δ": r"$\Delta$", "·": r"$\cdot$", "–": "--", "—": "---",
                 "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "→": r"$\rightarrow$", "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                 ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\~{}"),
                 ("^", r"\^{}")):
        text = text.replace(a, b)
    for a, b in UNICODE_LATEX.items():
        text = text.replace(a, b)
    return "".join(ch if ord(ch) < 0x250 else "?" for ch in text)  # pdflatex lacks other scripts


def to_latex(table: Table) -> str:
    """A booktabs `table` environment (needs \\usepackage{booktabs})."""
    spec = "l" + "c" * (len(table.columns) - 1)
    out = [r"\begin{table}[t]", r"\centering", f"\\caption{{{latex_escape(table.title)}}}",
           f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for r, row in enumerate(table.rows):
        if r in table.midrules and r > 0:
            out.append(r"\midrule")
        cells = []
        for i, cell in enumerate(row):
            text = table.fmt(cell, latex=True)
            if not isinstance(cell, tuple):
                text = latex_escape(text) if isinstance(cell, str) else text
            cells.append(f"\\textbf{{{text}}}" if (r, i) in table.bold else text)
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        out.append(r"\par\smallskip{\footnotesize " + latex_escape(" ".join(table.notes)) + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


INTERVAL_FIELDS = ("std", "ci_low", "ci_high", "n")


def to_csv(table: Table) -> str:
    """Raw numbers: a (mean, std) cell becomes columns `<col>` and `<col>_std`; an `Interval` cell
    `<col>`, `<col>_std`, `<col>_ci_low`, `<col>_ci_high`, `<col>_n`."""
    kind = []
    for i in range(len(table.columns)):
        cells = [row[i] for row in table.rows]
        kind.append("interval" if any(isinstance(c, Interval) for c in cells)
                    else "pair" if any(isinstance(c, tuple) for c in cells) else "plain")
    header = []
    for name, k in zip(table.columns, kind, strict=True):
        extra = INTERVAL_FIELDS if k == "interval" else ("std",) if k == "pair" else ()
        header += [name, *(f"{name}_{e}" for e in extra)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header + ["best_columns"])
    for r, row in enumerate(table.rows):
        cells: list = []
        for i, cell in enumerate(row):
            if kind[i] == "interval":
                values = list(cell) if isinstance(cell, Interval) else (
                    [*cell, None, None, None] if isinstance(cell, tuple) else [cell, None, None, None, None])
                cells += ["" if v is None else v for v in values]
            elif kind[i] == "pair":
                cells += list(cell) if isinstance(cell, tuple) else [cell, ""]
            else:
                cells.append("" if cell is None else cell)
        best = ";".join(table.columns[i] for (rr, i) in sorted(table.bold) if rr == r)
        writer.writerow(cells + [best])
    return buf.getvalue()


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Write <name>.md, <name>.tex, <name>.csv; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table)), (".csv", to_csv(table))):
        paths.append(atomic_write(out_dir / f"{table.name}{suffix}", text))
    return paths


def new_figure(n_panels: int = 1, ncols: int | None = None, size: tuple[float, float] = (4.2, 3.2)):
    """A matplotlib figure with a grid of panels (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = ncols or min(n_panels, 3)
    nrows = (n_panels + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Save <name>.png and <name>.pdf and close the figure."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
