"""The oracle sweep: the paper's expert-guided tuning of a static temperature and top-p.

Per task: a temperature grid at top_p = 1, then a top-p grid at the best temperature, every grid
point scored on the test set with the same seeds × samples as an eval — the paper's "practical
upper bound" for static decoding. One backend (one engine load) serves the whole sweep; every
grid point is a normal ``evaluate`` call, so it reuses the sample store (a killed sweep resumes,
and (T*, 1.0) is not generated twice) and writes its own results file. The summary goes to
``<out>/<model_name>/sweep_summary_<task>.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness.core.files import atomic_write
from harness.decoding import get_preset
from harness.runner import RunSpec, evaluate

MAX_GRID_POINTS = 1000  # per grid; the paper's is 10 (0.1:1.0:0.1)


def parse_grid(text: str, name: str = "grid") -> list[float]:
    """``"0.1:1.0:0.1"`` (start:stop:step, inclusive) or ``"0.3,0.6,1.0"`` → sorted floats.

    Refused with a `ValueError` that says why (the caller names the option): not numbers,
    not finite, an empty or backwards range, more than `MAX_GRID_POINTS` points (counted before
    anything is expanded, so 0.1:100000:1e-7 fails at once instead of filling memory)."""
    text = str(text).strip()
    usage = "use start:stop:step (e.g. 0.1:1.0:0.1) or a list 0.2,0.6,1.0"
    parts = text.split(":") if ":" in text else [x for x in text.split(",") if x.strip()]
    try:
        numbers = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a grid; {usage}") from None
    if not numbers or (":" in text and len(numbers) != 3):
        raise ValueError(f"{text!r} is not a grid; {usage}")
    bad = [x for x in numbers if not math.isfinite(x)]
    if bad:
        raise ValueError(f"{text!r}: {bad[0]} is not a finite number")
    if ":" in text:
        start, stop, step = numbers
        if step <= 0 or stop < start:
            raise ValueError(f"{text!r}: needs step > 0 and stop >= start; {usage}")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_GRID_POINTS:
            raise ValueError(f"{text!r} has {count} points (at most {MAX_GRID_POINTS})")
        values = [round(start + i * step, 6) for i in range(count) if start + i * step <= stop + 1e-9]
    else:
        if len(numbers) > MAX_GRID_POINTS:
            raise ValueError(f"{text!r} has {len(numbers)} points (at most {MAX_GRID_POINTS})")
        values = numbers
    return sorted(set(values))


def check_grid(text: str, high: float) -> list[float]:
    """`parse_grid` with every value in (0, high] (temperatures: high = 100; top-p: 1)."""
    values = parse_grid(text)
    bad = [v for v in values if not 0 < v <= high]
    if bad:
        raise ValueError(f"{text!r}: {bad[0]:g} is outside (0, {high:g}]")
    return values


def _point(spec: RunSpec, group: str, temperature: float, top_p: float) -> RunSpec:
    preset = get_preset("static", temperature=temperature, top_p=top_p)
    return replace(spec, preset=preset, sweep={"group": group, "temperature": temperature, "top_p": top_p})


def _score(path: Path, task: str) -> tuple[float, float]:
    metrics = json.loads(path.read_text())["results"][task]
    return metrics["pass@1"], metrics["pass@1_std"]


def _run_point(backend, task, spec: RunSpec, out, group: str, temperature: float, top_p: float,
               tracker_factory: Callable | None, progress: bool, log: Callable[[str], None]) -> dict:
    """Evaluate one grid point (a normal eval run of one task); return its grid row."""
    point = _point(spec, group, temperature, top_p)
    factory = None
    if tracker_factory is not None:
        def factory(folder, config):
            return tracker_factory(folder, config, name=f"{task.name}-T{temperature}-P{top_p}")
    path = evaluate(backend, [task], point, out, tracker_factory=factory, progress=progress, log=log)
    mean, std = _score(path, task.name)
    log(f"sweep {task.name}: T={temperature} P={top_p} pass@1={mean:.4f} ± {std:.4f}")
    return {"temperature": temperature, "top_p": top_p, "pass@1": mean, "pass@1_std": std,
            "results_file": path.name}


def sweep(backend, tasks: list, spec: RunSpec, out: str | Path, temperatures: list[float], top_ps: list[float], *,
          group: str, tracker_factory: Callable | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> list[Path]:
    """Run the two-stage grid per task; return the sweep summary paths."""
    summaries = []
    for task in tasks:
        def run(temperature: float, top_p: float, task=task) -> dict:
            return _run_point(backend, task, spec, out, group, temperature, top_p, tracker_factory, progress, log)

        temperature_grid = [run(t, 1.0) for t in temperatures]
        best_t = max(temperature_grid, key=lambda r: r["pass@1"])["temperature"]  # ties: the lowest T
        top_p_grid = [run(best_t, p) for p in top_ps]
        best = max(top_p_grid, key=lambda r: r["pass@1"])  # ties: the lowest P
        summary = {
            "task": task.name, "model_name": spec.model_name, "model": spec.model, "group": group,
            "seeds": list(spec.seeds), "samples": spec.samples, "limit": spec.limit,
            "temperature_grid": temperature_grid, "best_temperature": best_t,
            "top_p_grid": top_p_grid, "best_top_p": best["top_p"], "best_pass@1": best["pass@1"],
            "best_pass@1_std": best["pass@1_std"],
        }
        path = Path(out) / spec.model_name / f"sweep_summary_{task.name}.json"
        atomic_write(path, json.dumps(summary, indent=2) + "\n")
        log(f"sweep {task.name}: best T={best_t}, best P={best['top_p']}, pass@1={best['pass@1']:.4f} → {path}")
        summaries.append(path)
    return summaries
