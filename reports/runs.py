"""Reading the runner's output files (DESIGN.md "Output files") into small typed records.

Everything in reports/ goes through this module: it finds `results_*.json`,
`samples_<task>_*.jsonl`, `sweep_summary_<task>.json` and `efficiency.json` under any set of
folders, and recomputes Pass@1 / Pass@k from the samples (the tables print the results-file
numbers; tests check they equal the recomputation).
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import UserError
from harness.core.files import read_json, read_jsonl
from harness.stats import verdicts_by_doc

RESULTS_GLOB = "results_*.json"
SWEEP_GLOB = "sweep_summary_*.json"


class ReportInputError(UserError, ValueError):
    """A result file is missing or malformed (the message names the file and field)."""


@dataclass
class TaskResult:
    """One task's metrics inside one results file."""

    task: str
    metrics: dict[str, float]
    samples_path: Path | None = None
    _verdicts: dict[str, list[bool]] | None = field(default=None, repr=False, compare=False)

    def get(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None else float(value)

    def verdicts_by_doc(self) -> dict[str, list[bool]]:
        """doc id -> every sample's verdict (pooled over seeds), from the samples file."""
        if self.samples_path is None:
            raise ReportInputError(f"task {self.task}: no samples file next to its results file")
        if self._verdicts is None:
            self._verdicts = verdicts_by_doc(read_samples(self.samples_path))
        return self._verdicts


@dataclass
class Run:
    """One `results_<timestamp>.json`: a model × decoding × seeds run over some tasks."""

    path: Path
    model_name: str
    model: str
    decoding: str
    decoding_params: dict
    seeds: list[int]
    samples: int
    sweep: dict | None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Method name as shown in tables: the preset, plus T/P for static and sweep points."""
        if self.sweep:
            return f"static(T={self.sweep.get('temperature')}, P={self.sweep.get('top_p')})"
        params = {k: v for k, v in (self.decoding_params or {}).items() if v is not None}
        if self.decoding == "static" and params:
            inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
            return f"static({inner})"
        return self.decoding

    @property
    def checkpoint_step(self) -> int | None:
        """Training step if this run evaluated a `checkpoint-<step>` folder, else None."""
        for text in (self.model, self.model_name):
            found = re.search(r"checkpoint-(\d+)", text or "")
            if found:
                return int(found.group(1))
        return None


def _read_json(path: Path) -> dict:
    return read_json(path, ReportInputError)


def _require(data: dict, key: str, path: Path):
    if key not in data:
        raise ReportInputError(f"{path}: missing field '{key}'")
    return data[key]


def load_run(path: Path) -> Run:
    """Parse one results file; link each task to its samples file (same timestamp). A file of
    the wrong shape raises `ReportInputError` naming it."""
    try:
        return _load_run(Path(path))
    except (AttributeError, TypeError, ValueError) as err:
        if isinstance(err, ReportInputError):
            raise
        raise ReportInputError(f"{path}: not a results file ({type(err).__name__}: {err})") from None


def _load_run(path: Path) -> Run:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    results = _require(data, "results", path)
    config = _require(data, "config", path)
    decoding = config.get("decoding") or {}
    run = Run(
        path=path,
        model_name=str(config.get("model_name") or path.parent.name),
        model=str(config.get("model") or ""),
        decoding=str(decoding.get("name") or "unknown"),
        decoding_params=dict(decoding.get("params") or {}),
        seeds=list(config.get("seeds") or []),
        samples=int(config.get("samples") or 0),
        sweep=config.get("sweep"),
        raw=data,
    )
    stamp = path.stem[len("results_"):]
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            raise ReportInputError(f"{path}: results.{task} is not an object")
        samples = path.parent / f"samples_{task}_{stamp}.jsonl"
        run.tasks[task] = TaskResult(task, dict(metrics), samples if samples.exists() else None)
    return run


def _load_each(paths, load, on_error):
    """``load`` every path; a damaged file raises, or with ``on_error`` is reported and skipped."""
    loaded = []
    for path in paths:
        try:
            loaded.append(load(path))
        except ReportInputError as err:
            if on_error is None:
                raise
            on_error(str(err))
    return loaded


def find_runs(dirs: list[str | Path], on_error=None) -> list[Run]:
    """Every results file under the given folders (recursively), oldest first; ``on_error(message)``
    skips a damaged one instead of failing."""
    paths: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name.startswith("results_"):
            paths.append(d)
        elif d.is_dir():
            paths.extend(d.rglob(RESULTS_GLOB))
        else:
            raise ReportInputError(f"{d}: no such results file or folder")
    return _load_each(sorted(set(paths), key=lambda p: (p.stat().st_mtime, str(p))), load_run, on_error)


def latest_per_key(runs: list[Run]) -> dict[tuple[str, str, str], tuple[Run, TaskResult]]:
    """(model_name, method label, task) -> the newest run holding it (later files win)."""
    table: dict[tuple[str, str, str], tuple[Run, TaskResult]] = {}
    for run in runs:
        for task, result in run.tasks.items():
            table[(run.model_name, run.label, task)] = (run, result)
    return table


# ---------------------------------------------------------------- samples and recomputation


def read_samples(path: Path) -> list[dict]:
    """Rows of a samples JSONL; a corrupt line is an error naming file and line."""
    return read_jsonl(path, error=ReportInputError)


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): probability that k of n samples (c correct) include a correct one."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass1_from_samples(rows: list[dict]) -> tuple[float, float, list[float]]:
    """Pass@1 as the runner defines it: per seed, the mean over docs of the doc's accuracy; then
    mean and sample std (ddof=1) over seeds."""
    by_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_seed[int(row["seed"])][str(row["doc_id"])].append(1.0 if row["correct"] else 0.0)
    per_seed = [statistics.fmean(statistics.fmean(v) for v in docs.values())
                for _, docs in sorted(by_seed.items())]
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return statistics.fmean(per_seed), std, per_seed


def pass_k_from_samples(rows: list[dict], k: int) -> float:
    """Unbiased Pass@k over all samples of each doc, averaged over docs."""
    by_doc: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_doc[str(row["doc_id"])].append(bool(row["correct"]))
    values = [unbiased_pass_at_k(len(v), sum(v), k) for v in by_doc.values()]
    return sum(values) / len(values)


# ---------------------------------------------------------------- sweeps and efficiency


@dataclass
class Sweep:
    """One `sweep_summary_<task>.json` (the oracle's two-stage grid)."""

    path: Path
    model_name: str
    task: str
    temperature_grid: list[dict]
    best_temperature: float
    top_p_grid: list[dict]
    best_top_p: float
    best_pass1: float
    best_std: float | None = None
    best_ci_low: float | None = None
    best_ci_high: float | None = None
    cross_validated: dict | None = None  # the k-fold static baseline (harness.sweep.cross_validate)


def load_sweep(path: Path) -> Sweep:
    try:
        return _load_sweep(Path(path))
    except (AttributeError, TypeError, ValueError) as err:
        if isinstance(err, ReportInputError):
            raise
        raise ReportInputError(f"{path}: not a sweep summary ({type(err).__name__}: {err})") from None


def _load_sweep(path: Path) -> Sweep:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    task = data.get("task") or path.stem[len("sweep_summary_"):]
    return Sweep(
        path=path,
        model_name=str(data.get("model_name") or path.parent.name),
        task=task,
        temperature_grid=list(_require(data, "temperature_grid", path)),
        best_temperature=float(_require(data, "best_temperature", path)),
        top_p_grid=list(_require(data, "top_p_grid", path)),
        best_top_p=float(_require(data, "best_top_p", path)),
        best_pass1=float(_require(data, "best_pass@1", path)),
        best_std=data.get("best_pass@1_std"),
        best_ci_low=data.get("best_ci_low"),
        best_ci_high=data.get("best_ci_high"),
        cross_validated=data.get("cross_validated"),
    )


def find_sweeps(dirs: list[str | Path], on_error=None) -> list[Sweep]:
    paths = sorted({p for d in dirs if Path(d).is_dir() for p in Path(d).rglob(SWEEP_GLOB)})
    return _load_each(paths, load_sweep, on_error)


def find_files(dirs: list[str | Path], name: str) -> list[Path]:
    """Files whose name matches `name` (a file name or a glob such as `steer_*.json`) under the
    folders, or the given paths themselves if they are such files."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and fnmatch.fnmatch(d.name, name):
            found.append(d)
        elif d.is_dir():
            found.extend(sorted(d.rglob(name)))
    return found
