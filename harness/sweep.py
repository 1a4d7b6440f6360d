"""The oracle sweep: the paper's expert-guided tuning of a static temperature and top-p.

Per task: a temperature grid at top_p = 1, then a top-p grid at the best temperature, every grid
point scored on the test set with the same seeds × samples as an eval — the paper's "practical
upper bound" for static decoding. One backend (one engine load) serves the whole sweep; every
grid point is a normal ``evaluate`` call, so it reuses the sample store (a killed sweep resumes,
and (T*, 1.0) is not generated twice) and writes its own results file. The summary goes to
``<out>/<model_name>/sweep_summary_<task>.json``.

Sharded (``spec.shard``, ``sweep_shard``): a shard cannot pick T* from its part of the problems,
so a sharded sweep runs in two rounds — every shard generates its units of the temperature grid;
then, given the best temperature per task (``best_temperature`` on the gathered temperature grid,
`autodeco sweep --best-from`), the top-p grid. `autodeco gather` then replays ``sweep`` on the
merged stores and writes the same files as an unsharded sweep.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness.core.files import atomic_write
from harness.decoding import get_preset
from harness.runner import RunSpec, evaluate, generate_shard


def parse_grid(text: str, name: str = "grid") -> list[float]:
    """``"0.1:1.0:0.1"`` (start:stop:step, inclusive) or ``"0.3,0.6,1.0"`` → sorted floats."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 6) for i in range(count) if start + i * step <= stop + 1e-9]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad {name} {text!r}; use start:stop:step (e.g. 0.1:1.0:0.1) or a list 0.2,0.6,1.0") from None
    if not values:
        raise ValueError(f"empty {name} {text!r}")
    return sorted(set(values))


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


def best_temperature(backend, task, spec: RunSpec, out: str | Path, temperatures: list[float], *, group: str,
                     tracker_factory: Callable | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> tuple[list[dict], float]:
    """Stage 1 for one task: the temperature grid at top_p = 1 (one results file per point); return
    its rows and the best temperature (ties: the lowest T)."""
    grid = [_run_point(backend, task, spec, out, group, t, 1.0, tracker_factory, progress, log) for t in temperatures]
    return grid, max(grid, key=lambda r: r["pass@1"])["temperature"]


def sweep(backend, tasks: list, spec: RunSpec, out: str | Path, temperatures: list[float], top_ps: list[float], *,
          group: str, tracker_factory: Callable | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> list[Path]:
    """Run the two-stage grid per task; return the sweep summary paths."""
    summaries = []
    for task in tasks:
        temperature_grid, best_t = best_temperature(backend, task, spec, out, temperatures, group=group,
                                                    tracker_factory=tracker_factory, progress=progress, log=log)
        top_p_grid = [_run_point(backend, task, spec, out, group, best_t, p, tracker_factory, progress, log)
                      for p in top_ps]
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


def sweep_shard(backend, tasks: list, spec: RunSpec, out: str | Path, temperatures: list[float], top_ps: list[float],
                *, group: str, best_temperatures: dict[str, float] | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """A shard's part of the sweep: its units of the temperature grid, and — once the best
    temperature of each task is known (``best_temperatures``) — of the top-p grid. Generation only;
    return the totals."""
    totals = {"generated": 0, "tokens": 0, "seconds": 0.0}
    for task in tasks:
        points = [(t, 1.0) for t in temperatures]
        if best_temperatures is not None:
            points += [(best_temperatures[task.name], p) for p in top_ps]
        for temperature, top_p in points:
            stats = generate_shard(backend, [task], _point(spec, group, temperature, top_p), out,
                                   progress=progress, log=log)
            for key in totals:
                totals[key] += stats[key]
    return totals
