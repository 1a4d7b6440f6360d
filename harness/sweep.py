"""The oracle sweep: the paper's expert-guided tuning of a static temperature and top-p, plus an
honest, cross-validated version of it.

Per task: greedy (T = 0, the paper's T axis starts there) and a temperature grid at top_p = 1, then
a top-p grid at the best temperature (skipped when greedy wins: it has no P; the best P is chosen
among the grid and P = 1, the temperature grid's point, so the oracle is never below it), every grid point
scored on the test set with the same seeds × samples as an eval — the paper's "practical upper
bound" for static decoding, which it calls hacking the test set. One backend (one engine load)
serves the whole sweep; every grid point is a normal ``evaluate`` call, so it reuses the sample
store (a killed sweep resumes, and (T*, 1.0) is not generated twice) and writes its own results
file. The summary goes to ``<out>/<model_name>/sweep_summary_<task>.json``.

Cross-validated static baseline (``cross_validated`` in the summary): problems are split into k
folds (dealt round-robin in the order of a stable hash of their id); for each fold the grid point with the best Pass@1 on the
*other* folds is chosen and scored on this fold only. The baseline's per-problem accuracies (kept
in the summary for paired tests) are the chosen points' accuracies on held-out problems. The
selection runs over the evaluated points; the only information the held-out fold leaks is where
the top-p grid was placed (at the temperature that was best on all problems).

Sharded (``spec.shard``, ``sweep_shard``): a shard cannot pick T* from its part of the problems,
so a sharded sweep runs in two rounds — every shard generates its units of the temperature grid
(greedy included); then, given the best temperature per task (``best_temperature`` on the gathered
temperature grid, `autodeco sweep --best-from`), the top-p grid. `autodeco gather` then replays
``sweep`` on the merged stores and writes the same files as an unsharded sweep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness.core.files import atomic_write, read_jsonl
from harness.core.seeds import stable_seed
from harness.decoding import get_preset
from harness.runner import RunSpec, evaluate, generate_shard
from harness.stats import pass1_estimate, problem_accuracies, verdicts_by_doc

CV_FOLDS = 5

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
    preset = get_preset("greedy") if temperature == 0 else get_preset("static", temperature=temperature, top_p=top_p)
    return replace(spec, preset=preset, sweep={"group": group, "temperature": temperature, "top_p": top_p})


def _score(path: Path, task: str) -> tuple[float, float, dict[str, float]]:
    """(Pass@1, its std over seeds, per-problem accuracy) of one grid point's files."""
    metrics = json.loads(path.read_text())["results"][task]
    samples = path.with_name(f"samples_{task}_{path.stem.removeprefix('results_')}.jsonl")
    return metrics["pass@1"], metrics["pass@1_std"], problem_accuracies(verdicts_by_doc(read_jsonl(samples)))


def _run_point(backend, task, spec: RunSpec, out, group: str, temperature: float, top_p: float,
               tracker_factory: Callable | None, progress: bool, log: Callable[[str], None]) -> dict:
    """Evaluate one grid point (a normal eval run of one task); return its grid row."""
    point = _point(spec, group, temperature, top_p)
    factory = None
    if tracker_factory is not None:
        def factory(folder, config):
            return tracker_factory(folder, config, name=f"{task.name}-T{temperature}-P{top_p}")
    path = evaluate(backend, [task], point, out, tracker_factory=factory, progress=progress, log=log)
    mean, std, per_doc = _score(path, task.name)
    log(f"sweep {task.name}: {'greedy' if temperature == 0 else f'T={temperature} P={top_p}'} "
        f"pass@1={mean:.4f} ± {std:.4f}")
    return {"temperature": temperature, "top_p": top_p, "pass@1": mean, "pass@1_std": std,
            "results_file": path.name, "per_doc": per_doc}


def fold_of(docs: list[str], folds: int) -> dict[str, int]:
    """Each problem's fold: problems in the order of a stable hash of their id, dealt round-robin, so
    the folds differ in size by at most one and none is empty while there are >= ``folds`` problems."""
    order = sorted(docs, key=lambda doc: (stable_seed("cv-fold", doc), doc))
    return {doc: i % folds for i, doc in enumerate(order)}


def cross_validate(points: list[dict], folds: int = CV_FOLDS) -> dict:
    """The k-fold static baseline over evaluated grid points (see the module docstring)."""
    docs = sorted(points[0]["per_doc"])
    if len(docs) < 2:
        return {"folds": 0, "choices": [], "pass@1": None, "ci_low": None, "ci_high": None, "n_problems": len(docs),
                "per_doc": {}, "note": "needs at least 2 problems"}
    folds = max(2, min(folds, len(docs)))
    fold = fold_of(docs, folds)
    chosen, per_doc = [], {}
    for f in range(folds):
        held_out = [d for d in docs if fold[d] == f]
        train = [d for d in docs if fold[d] != f]
        if not held_out or not train:
            continue
        best = max(points, key=lambda p: sum(p["per_doc"][d] for d in train))  # ties: the first (lowest T, P)
        chosen.append({"fold": f, "temperature": best["temperature"], "top_p": best["top_p"],
                       "n_problems": len(held_out)})
        per_doc.update({d: best["per_doc"][d] for d in held_out})
    estimate = pass1_estimate(per_doc)  # per-problem accuracies (floats)
    return {"folds": folds, "choices": chosen, "pass@1": estimate.mean, "ci_low": estimate.ci_low,
            "ci_high": estimate.ci_high, "n_problems": estimate.n, "per_doc": per_doc}


def best_temperature(backend, task, spec: RunSpec, out: str | Path, temperatures: list[float], *, group: str,
                     tracker_factory: Callable | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> tuple[list[dict], float]:
    """Stage 1 for one task: greedy (T = 0) and the temperature grid at top_p = 1 (one results file
    per point); return its rows and the best temperature (ties: the lowest T; 0 = greedy)."""
    grid = [_run_point(backend, task, spec, out, group, t, 1.0, tracker_factory, progress, log)
            for t in [0.0, *temperatures]]
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
                      for p in top_ps] if best_t > 0 else []  # greedy has no P
        at_best_t = next(r for r in temperature_grid if r["temperature"] == best_t)  # its P = 1 point
        candidates = sorted(top_p_grid + [at_best_t], key=lambda r: r["top_p"])  # (a grid's own P = 1 is the same point)
        best = max(candidates, key=lambda r: r["pass@1"])  # ties: the lowest P
        points = temperature_grid + top_p_grid
        oracle = pass1_estimate(best["per_doc"])
        summary = {
            "task": task.name, "model_name": spec.model_name, "model": spec.model, "group": group,
            "seeds": list(spec.seeds), "samples": spec.samples, "limit": spec.limit,
            "temperature_grid": temperature_grid, "best_temperature": best_t,
            "top_p_grid": top_p_grid, "best_top_p": best["top_p"], "best_pass@1": best["pass@1"],
            "best_pass@1_std": best["pass@1_std"], "best_ci_low": oracle.ci_low, "best_ci_high": oracle.ci_high,
            "cross_validated": cross_validate(points),
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
        points = [(t, 1.0) for t in [0.0, *temperatures]]  # T = 0 is greedy
        best_t = None if best_temperatures is None else best_temperatures[task.name]
        if best_t:  # greedy (0) has no top-p grid
            points += [(best_t, p) for p in top_ps]
        for temperature, top_p in points:
            stats = generate_shard(backend, [task], _point(spec, group, temperature, top_p), out,
                                   progress=progress, log=log)
            for key in totals:
                totals[key] += stats[key]
    return totals
