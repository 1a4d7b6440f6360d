"""Table 3: the cost of the heads — FLOPs, latency per 1k generated tokens, peak memory — from
``efficiency.json`` files written by `autodeco bench efficiency` (`harness.bench.efficiency`, whose
docstring gives the file's layout), with the paper's Table 3 alongside.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.stats import mean_estimate
from reports import paper
from reports.render import Interval, Table, new_figure, save_figure, write_table
from reports.runs import find_files

METHODS = ("default", "autodeco")


# ---------------------------------------------------------------- report


def report_efficiency(dirs: list[Path], out: Path, name: str = "efficiency") -> list[Path]:
    files = find_files(dirs, "efficiency.json")
    if not files:
        raise ValueError("no efficiency.json in the given folders (run `autodeco bench efficiency`)")
    rows, notes, series = [], [], {}
    for path in files:
        data = json.loads(path.read_text())
        by = {(r["prompt_length"], r["method"]): r for r in data["rows"]}
        for length in sorted({r["prompt_length"] for r in data["rows"]}):
            base, new = by.get((length, "default")), by.get((length, "autodeco"))
            for r in (base, new):
                if r is None:
                    continue
                overhead = latency_overhead(base, new) if r is new and base else None
                rows.append([data["model"], length, r["method"], r["flops"], r["latency_s_per_1k"],
                             overhead, r["peak_memory_mb"],
                             None if not (r is new and base) else new["peak_memory_mb"] - base["peak_memory_mb"]])
                series.setdefault((data["model"], r["method"]), []).append(
                    (length, r["flops"], r["latency_s_per_1k"], r["peak_memory_mb"]))
        check = "; ".join(f"{c['method']} L={c['prompt_length']}: measured/analytic = {c['ratio']:.3f}"
                          for c in data.get("flops_check", []))
        notes.append(f"{path}: {data['backend']} on {data['device']} ({data.get('threads')} threads), "
                     f"{data['gen_tokens']} generated tokens, median of {data['repeats']}, memory = "
                     f"{data['rows'][0]['memory_kind']}; heads add {data.get('heads_parameters')} parameters "
                     f"({data.get('heads_parameter_mb', float('nan')):.2f} MB). "
                     f"FLOPs check (full forward): {check}.")
    notes.append("Latency +%: the mean over repeats of the paired overhead (autodeco / default − 1, the "
                 "runs of one repeat back to back) with its 95% interval; an interval that holds 0 means no "
                 "overhead was measurable at this precision, whatever the sign of the mean.")
    table = Table(name=name, title="Efficiency: with vs without the AutoDeco heads",
                  columns=["Model", "Prompt", "Method", "FLOPs", "Latency s/1k tok", "Latency +%",
                           "Peak MB", "Memory +MB"], rows=rows, notes=notes)
    table.fmt = _fmt_efficiency(table)
    paths = write_table(table, out)
    paper_rows = [[paper.load_paper()["table3"]["model"], r["prompt_length"], r["method"], r.get("flops"),
                   r.get("latency_s_per_1k"), r.get("memory_mb"), r["source"]]
                  for r in paper.load_paper()["table3"]["rows"]]
    paper_table = Table(name=f"{name}_paper", title="Paper — " + paper.load_paper()["table3"]["title"],
                        columns=["Model", "Prompt", "Method", "FLOPs", "Latency s/1k tok", "Memory MB", "Source"],
                        rows=paper_rows, notes=["Only the cells found in a source are stored (see "
                                                "reports/paper_numbers.json)."])
    paper_table.fmt = _fmt_efficiency(paper_table)
    paths += write_table(paper_table, out)
    fig, axes = new_figure(3, ncols=3, size=(3.8, 3.0))
    for (model, method), points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        for ax, i in zip(axes, (1, 2, 3), strict=False):
            ax.plot(xs, [p[i] for p in points], marker="o", label=f"{model} · {method}")
    for ax, label in zip(axes, ("FLOPs per generation", "latency (s / 1k tokens)", "peak memory (MB)"), strict=False):
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    return paths + save_figure(fig, out, name)


def latency_overhead(base: dict, new: dict) -> Interval | float:
    """AutoDeco's latency overhead in % with its 95% interval over the paired repeats (repeat i of
    each method ran back to back, so machine noise hits both); a plain ratio of medians when the
    file has fewer than 2 repeats."""
    pairs = list(zip(base.get("latencies_s") or [], new.get("latencies_s") or [], strict=False))
    if len(pairs) < 2:
        return 100.0 * (new["latency_s_per_1k"] / base["latency_s_per_1k"] - 1.0)
    estimate = mean_estimate([100.0 * (b_new / b_base - 1.0) for b_base, b_new in pairs])
    return Interval(estimate.mean, None, estimate.ci_low, estimate.ci_high, None)


def _fmt_efficiency(table: Table):
    plain = Table.fmt

    def fmt(cell, latex: bool = False):
        if isinstance(cell, float) and abs(cell) >= 1e6:
            return f"{cell:.3e}"
        return plain(table, cell, latex)

    return fmt
