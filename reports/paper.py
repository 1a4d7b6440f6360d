"""The paper's published numbers (reports/paper_numbers.json) as tables, and ours-vs-paper deltas.

The JSON stores only numbers read in a cited source (see its `sources` and `not_found`); where
several sources hold a cell, `source_order` says which wins (the paper's full text first).
Task names of this harness map to the paper's benchmark columns through `PAPER_COLUMN`;
the paper's "AIME" is AIME24 and AIME25 together, so it maps from the mean of both.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from reports.render import Table

PAPER_FILE = Path(__file__).with_name("paper_numbers.json")

PAPER_COLUMN = {
    "aime24": "AIME", "aime25": "AIME", "brumo25": "BRUMO25", "hmmt25": "HMMT25",
    "beyondaime": "BeyondAIME", "gpqa": "GPQA-Diamond", "gpqa_diamond": "GPQA-Diamond",
    "mmlu_pro": "MMLU-Pro", "mmlu_pro_100": "MMLU-Pro", "livecodebench": "LiveCodeBench V6",
    "ifeval": "IFEval",
}


@lru_cache(maxsize=1)
def load_paper() -> dict:
    return json.loads(PAPER_FILE.read_text())


def paper_table(key: str, name: str) -> Table:
    """One of the paper's tables (table1, table2, passk) exactly as stored, source per row."""
    data = load_paper()[key]
    benchmarks = data.get("benchmarks") or sorted({b for r in data["rows"] for b in r["values"]})
    columns = ["Model", "Method"] + (["k"] if key == "passk" else []) + benchmarks + ["Source"]
    rows = []
    for r in data["rows"]:
        row = [r["model"], r["method"]] + ([r["k"]] if key == "passk" else [])
        row += [r["values"].get(b) for b in benchmarks] + [r["source"]]
        rows.append(row)
    sources = load_paper()["sources"]
    notes = [f"Published numbers ({load_paper()['paper']}). Sources: "
             + "; ".join(f"[{k}] {v}" for k, v in sources.items()) + ". '–' = not found in any source."]
    return Table(name=name, title=f"Paper — {data['title']}", columns=columns, rows=rows, notes=notes)


def paper_value(key: str, model: str, method: str, column: str, k: int | None = None) -> tuple[float, str] | None:
    """(value, source) of one published cell from the most primary source holding it (``source_order``:
    the paper's own text first, then the transcriptions); None if not published."""
    order = load_paper().get("source_order") or sorted(load_paper()["sources"])
    matches = [r for r in load_paper()[key]["rows"]
               if r["model"] == model and r["method"] == method and column in r["values"]
               and (k is None or r.get("k") == k)]
    matches.sort(key=lambda r: order.index(r["source"]) if r["source"] in order else len(order))
    return (matches[0]["values"][column], matches[0]["source"]) if matches else None


def to_paper_columns(task_values: dict[str, float]) -> dict[str, float]:
    """Our per-task numbers (percent) keyed by the paper's column names (AIME = mean of 24/25)."""
    grouped: dict[str, list[float]] = {}
    for task, value in task_values.items():
        column = PAPER_COLUMN.get(task)
        if column and value is not None:
            grouped.setdefault(column, []).append(value)
    return {c: sum(v) / len(v) for c, v in grouped.items()}


def delta_table(key: str, name: str, ours: dict[tuple[str, str], dict[str, float]],
                model_map: dict[str, str]) -> Table:
    """Ours vs paper vs difference for every (our model → paper model, method, column) both have."""
    rows = []
    for (model, method), values in sorted(ours.items()):
        paper_model = model_map.get(model)
        if not paper_model:
            continue
        columns = to_paper_columns(values)
        benchmarks = [b for b in load_paper()[key]["benchmarks"] if b != "Avg."]
        if all(b in columns for b in benchmarks):  # an average only over the paper's own columns
            columns["Avg."] = sum(columns[b] for b in benchmarks) / len(benchmarks)
        for column, value in sorted(columns.items()):
            found = paper_value(key, paper_model, method, column)
            if found:
                rows.append([model, paper_model, method, column, value, found[0], value - found[0], found[1]])
    return Table(name=name, title=f"Ours vs paper ({load_paper()[key]['title']})",
                 columns=["Model", "Paper model", "Method", "Column", "Ours", "Paper", "Δ", "Source"],
                 rows=rows, notes=["Δ = ours − paper, in percentage points."] if rows else
                 ["No (model, method, column) overlaps the published cells; pass --paper-model OURS=PAPER."])
