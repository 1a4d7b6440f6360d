"""The results viewer: every sample of some runs, token by token, in static HTML pages.

`autodeco view --runs DIR... --out FILE.html` and the report kind `viewer` (`autodeco report all`)
call `write_viewer`. It reads results files and their samples files only (`reports.runs`) and
writes HTML with its script and style inline (`viewer.html`, `viewer.js`, `viewer.css` next to
this module) and the data embedded as JSON: no server, no network, it opens from disk.

What a page holds, per task: the problems (doc id; prompt and target from each doc's first samples
row, when the run recorded them), the methods (model × decoding; per (model, method, task) the
newest results file, sweep grid points left out), and per method × problem every sample: seed,
sample index, correct, tokens, finish reason, extracted answer, and — within the size budget — its
text and T/P trace (with the text under each trace point when the samples file has it). Tables:
Pass@1 per method over problems with a 95% t interval (`harness.stats.pass1_estimate`), and every
pair of methods' paired difference (`paired_difference`) with how many problems each side won.

Size: verdicts, lengths and finish reasons of all samples are always embedded (tables and filters
stay exact); texts and traces are added breadth first (each problem's first sample of every method,
then the second, ...) until the page reaches ``max_mb``. If every task fits in one page with all its
texts, FILE.html holds them all; otherwise FILE.html holds the tables and links, and each task gets
its own page ``FILE-<task>.html`` with its own budget; samples left without text say so.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness.core.files import atomic_write, iter_jsonl
from harness.stats import paired_difference, pass1_estimate, problem_accuracies
from reports.runs import ReportInputError, Run, TaskResult, latest_per_key

FORMAT = 1
DEFAULT_MAX_MB = 40.0
EXTRACTED_CHARS = 300  # an extracted answer longer than this (code) is cut in the page
ASSETS = Path(__file__).parent
# One sample in the page: [seed, sample_index, correct (1/0/null), n_tokens, finish_reason, extracted,
# text, trace]. text: the response; an int L when the trace's tokens hold it (response = the tokens
# joined, first L UTF-16 units); null when left out by the size budget. trace: the file's trace or null.
SAMPLE_FIELDS = ("seed", "index", "correct", "n_tokens", "finish", "extracted", "text", "trace")


@dataclass
class Method:
    """One column of the viewer: a model × decoding run of one task."""

    key: str  # "model · method", unique per task
    model: str
    label: str
    run: Run
    result: TaskResult


def methods_by_task(runs: list[Run], tasks: list[str] | None = None) -> dict[str, list[Method]]:
    """task -> its methods (the newest run per model × method × task that has a samples file)."""
    out: dict[str, list[Method]] = defaultdict(list)
    for (model, label, task), (run, result) in sorted(latest_per_key([r for r in runs if not r.sweep]).items()):
        if result.samples_path is not None and (not tasks or task in tasks):
            out[task].append(Method(f"{model} · {label}", model, label, run, result))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# One task's data


def _doc_order(doc_id: str) -> tuple:
    return (0, int(doc_id), "") if doc_id.isdigit() else (1, 0, doc_id)


def _finite(value):
    """JSON-safe: NaN/inf (an interval over one problem) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _estimate(est) -> dict:
    return {k: _finite(v) for k, v in est.to_dict().items()}


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _text_and_trace(row: dict) -> tuple[str | int | None, dict | None]:
    response = row.get("response")
    trace = row.get("trace") if isinstance(row.get("trace"), dict) else None
    tokens = (trace or {}).get("tokens")
    if isinstance(response, str) and tokens and "".join(tokens).startswith(response):
        return _utf16_len(response), trace  # the page rebuilds the response from the tokens
    return response if isinstance(response, str) else None, trace


class _Totals:
    """The per-method numbers of the table, summed while the samples file streams by."""

    def __init__(self):
        self.verdicts: dict[str, list[bool]] = defaultdict(list)
        self.seeds: set = set()
        self.samples = 0
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [sum, count]

    def add(self, row: dict) -> None:
        self.verdicts[str(row["doc_id"])].append(bool(row["correct"]))
        self.seeds.add(row.get("seed"))
        self.samples += 1
        finish = row.get("finish_reason")
        values = {"tokens": row.get("n_tokens"), "length": None if not finish else float(finish == "length"),
                  "T": row.get("temperature_mean"), "P": row.get("top_p_mean")}
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.sums[name][0] += value
                self.sums[name][1] += 1

    def mean(self, name: str) -> float | None:
        total, count = self.sums[name]
        return total / count if count else None

    def row(self, method: Method) -> dict:
        metrics = method.result.metrics
        return {"method": method.key, "pass1": _estimate(pass1_estimate(self.verdicts)),
                "file_pass1": _finite(metrics.get("pass@1")), "file_std": _finite(metrics.get("pass@1_std")),
                "seeds": len(self.seeds), "samples": self.samples, "mean_tokens": self.mean("tokens"),
                "length_share": self.mean("length"), "T": self.mean("T"), "P": self.mean("P")}


@dataclass
class TaskPage:
    """A task's page data (as JSON text: a paper-sized run holds several pages at once) and its numbers."""

    name: str
    payload: str  # the task's data block as JSON
    overview: dict  # the tables and counts every page shows
    scale: dict[str, list[float]]  # colour domain of the task's embedded T and P
    omitted: int  # samples whose text did not fit

    @property
    def size(self) -> int:
        return len(self.payload.encode())


def build_task(name: str, methods: list[Method], budget: int) -> TaskPage:
    """Problems, samples, Pass@1 with CIs and paired differences of one task, texts within ``budget``.

    Two passes over each samples file, so memory holds verdicts and the chosen texts, never a
    whole file: the first collects verdicts and each sample's text size, the second fetches the
    texts that fit (breadth first, see the module docstring).
    """
    problems: dict[str, dict] = {}
    samples: list[dict[str, list]] = []  # per method: doc id -> [(sample array, line number, text bytes)]
    totals: list[_Totals] = []
    traced: list[bool] = []
    for method in methods:
        path = method.result.samples_path
        by_doc: dict[str, list] = defaultdict(list)
        total, has_trace = _Totals(), False
        for number, row in iter_jsonl(path, error=ReportInputError):
            if not isinstance(row, dict) or "doc_id" not in row or "correct" not in row:
                raise ReportInputError(f"{path}:{number}: a samples row needs 'doc_id' and 'correct'")
            doc = str(row["doc_id"])
            problem = problems.setdefault(doc, {"id": doc, "prompt": None, "target": None})
            for field in ("prompt", "target"):
                if problem[field] is None and row.get(field) is not None:
                    problem[field] = str(row[field])
            text_and_trace = _text_and_trace(row)
            has_trace = has_trace or text_and_trace[1] is not None
            by_doc[doc].append((_sample(row), number, _size(list(text_and_trace))))
            total.add(row)
        for entries in by_doc.values():
            entries.sort(key=lambda e: (e[0][0] or 0, e[0][1] or 0))
        samples.append(by_doc)
        totals.append(total)
        traced.append(has_trace)
    order = sorted(problems, key=_doc_order)
    arrays = [{doc: [e[0] for e in entries] for doc, entries in by_doc.items()} for by_doc in samples]
    chosen, omitted = _choose_texts(order, samples, budget - _size(arrays) - _size(problems))
    for method, wanted in zip(methods, chosen, strict=True):
        if wanted:
            for number, row in iter_jsonl(method.result.samples_path, error=ReportInputError):
                if number in wanted:
                    wanted[number][6:8] = list(_text_and_trace(row))
    overview = {"name": name, "problems": len(order), "methods": [m.key for m in methods],
                "table": [t.row(m) for m, t in zip(methods, totals, strict=True)],
                "pairs": _pairs(methods, [t.verdicts for t in totals])}
    data = {
        "problems": [problems[d] for d in order],
        "methods": [{"key": m.key, "model": m.model, "method": m.label, "file": str(m.result.samples_path),
                     "traced": t} for m, t in zip(methods, traced, strict=True)],
        "samples": [[by_doc.get(d, []) for d in order] for by_doc in arrays],
        "omitted": omitted,
        "n_samples": sum(t.samples for t in totals),
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return TaskPage(name, payload, overview, colour_scale(data["samples"]), omitted)


def _sample(row: dict) -> list:
    correct = row.get("correct")
    extracted = row.get("extracted")
    if extracted is not None:
        extracted = str(extracted)
        if len(extracted) > EXTRACTED_CHARS:
            extracted = extracted[:EXTRACTED_CHARS] + "…"
    return [row.get("seed"), row.get("sample_index"), None if correct is None else int(bool(correct)),
            row.get("n_tokens"), row.get("finish_reason"), extracted, None, None]


def _size(value) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _choose_texts(order: list[str], samples: list[dict], budget: int) -> tuple[list[dict[int, list]], int]:
    """Which samples get their text: breadth first (rank 0 of every problem × method, then rank 1, ...)
    while the texts fit in ``budget`` bytes. Returns per method {line number: sample array}, and how
    many samples were left out."""
    deepest = max((len(v) for by_doc in samples for v in by_doc.values()), default=0)
    chosen: list[dict[int, list]] = [{} for _ in samples]
    omitted = 0
    for rank in range(deepest):
        for doc in order:
            for m, by_doc in enumerate(samples):
                entries = by_doc.get(doc, ())
                if rank >= len(entries):
                    continue
                array, number, cost = entries[rank]
                if cost + 1 <= budget:  # + the comma between the two fields it replaces
                    chosen[m][number] = array
                    budget -= cost + 1
                else:
                    omitted += 1
    return chosen, omitted


def _pairs(methods: list[Method], verdicts: list[dict[str, list[bool]]]) -> list[dict]:
    """Every pair (i < j): Pass@1(i) − Pass@1(j) paired over shared problems, and who won where."""
    out = []
    for i in range(len(methods)):
        for j in range(i + 1, len(methods)):
            acc_a, acc_b = problem_accuracies(verdicts[i]), problem_accuracies(verdicts[j])
            shared = set(acc_a) & set(acc_b)
            if not shared:
                continue
            out.append({"a": methods[i].key, "b": methods[j].key,
                        "diff": _estimate(paired_difference(verdicts[i], verdicts[j])),
                        "a_better": sum(acc_a[d] > acc_b[d] for d in shared),
                        "b_better": sum(acc_b[d] > acc_a[d] for d in shared)})
    return out


def colour_scale(samples: list[list[list]]) -> dict[str, list[float]]:
    """A task's colour domain of T and P: their 2nd and 98th percentiles over the embedded traces."""
    values: dict[str, list[float]] = {"T": [], "P": []}
    for method_samples in samples:
        for doc_samples in method_samples:
            for sample in doc_samples:
                trace = sample[7] or {}
                for name in values:
                    values[name].extend(v for v in trace.get(name) or [] if isinstance(v, (int, float)))
    scale = {}
    for name, found in values.items():
        if found:
            found.sort()
            lo, hi = found[int(0.02 * (len(found) - 1))], found[int(0.98 * (len(found) - 1))]
            if hi - lo < 0.02:  # nearly constant (fresh heads): widen so colours stay readable
                lo, hi = lo - 0.05, hi + 0.05
            scale[name] = [round(lo, 3), round(hi, 3)]
    return scale


# ---------------------------------------------------------------------------------------------
# The pages


def merged_scale(pages: list[TaskPage]) -> dict[str, list[float]]:
    """One colour domain for a page holding several tasks: it spans every task's."""
    names = {name for page in pages for name in page.scale}
    return {name: [min(p.scale[name][0] for p in pages if name in p.scale),
                   max(p.scale[name][1] for p in pages if name in p.scale)] for name in sorted(names)}


def render_page(header: dict, pages: list[TaskPage], title: str) -> str:
    """The HTML page with script, style and data inline: ``header`` + ``{"data": {task: payload}}``."""
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    blocks = ",".join(f"{json.dumps(p.name)}:{p.payload}" for p in pages)
    payload = f'{head[:-1]},"data":{{{blocks}}}}}'
    parts = {
        "title": title.replace("&", "&amp;").replace("<", "&lt;"),
        "css": (ASSETS / "viewer.css").read_text(encoding="utf-8"),
        "js": (ASSETS / "viewer.js").read_text(encoding="utf-8"),
        "data": payload.replace("<", "\\u003c"),  # no "</script>" can end the data block early
    }
    template = (ASSETS / "viewer.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)


def _page_name(out: Path, task: str) -> str:
    return f"{out.stem}-{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}{out.suffix or '.html'}"


def write_viewer(runs: list[Run], out: str | Path, tasks: list[str] | None = None,
                 max_mb: float = DEFAULT_MAX_MB, sources: list[str] | None = None) -> list[Path]:
    """Write the viewer for ``runs`` at ``out`` (plus one page per task when all do not fit in one)."""
    out = Path(out)
    if max_mb <= 0:
        raise ReportInputError(f"max_mb must be > 0, got {max_mb}")
    by_task = methods_by_task(runs, tasks)
    if not by_task:
        wanted = f" for tasks {', '.join(tasks)}" if tasks else ""
        raise ReportInputError(f"no results with samples files{wanted} (run `autodeco eval` first)")
    budget = int(max_mb * 1e6)
    pages = [build_task(name, methods, budget) for name, methods in by_task.items()]
    one_page = sum(p.size for p in pages) <= budget and not any(p.omitted for p in pages)
    header = {
        "format": FORMAT, "created": datetime.now().isoformat(timespec="seconds"),
        "sources": [str(s) for s in sources or sorted({str(m.run.path.parent) for ms in by_task.values()
                                                       for m in ms})],
        "max_mb": max_mb, "fields": list(SAMPLE_FIELDS),
    }
    title = "AutoDeco results viewer"
    if one_page:
        header.update(tasks=[{**p.overview, "href": None} for p in pages], scale=merged_scale(pages))
        return [atomic_write(out, render_page(header, pages, title))]
    header["tasks"] = [{**p.overview, "href": _page_name(out, p.name)} for p in pages]
    written = [atomic_write(out, render_page({**header, "scale": {}}, [], title))]
    for page in pages:
        written.append(atomic_write(out.with_name(_page_name(out, page.name)),
                                    render_page({**header, "scale": page.scale}, [page], f"{title} · {page.name}")))
    return written
