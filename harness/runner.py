"""The evaluation run: tasks × seeds × samples through a backend, into the store, then graded.

One call of ``evaluate`` is one results file:

1. plan: for every task, doc, seed and sample the store key; the prompts via the backend's
   tokenizer (chat template). Keys already in the store are skipped — that is how a killed run
   resumes.
2. generate the missing samples (one request = the missing samples of one (doc, seed)), each
   appended to the store the moment it is yielded; a progress bar shows samples, tokens/s, ETA.
3. grade every sample of the run (``task.grade_many``), compute Pass@1 mean ± std over seeds and
   pooled Pass@k, and write ``results_<ts>.json`` + ``samples_<task>_<ts>.jsonl`` under
   ``<out>/<model_name>/`` (layout in DESIGN.md), then log them to W&B.

The output folder remembers what produced its samples (``run_settings.json``); a run with other
settings (model, backend) is refused, as is a stored sample made from another prompt or token
budget. One process writes a store at a time (``harness.store.writer_lock``).

A sharded run (``spec.shard``, harness/shards.py) plans every doc but keeps only its own
(task, doc, seed) units, and ``generate_shard`` writes them to the shard's own store
(``sample_store.shard-I-of-N.jsonl``) without grading; `autodeco gather` merges the shards and
writes the results of the whole run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.backends import Backend, Request, token_texts
from harness.core.errors import UserError
from harness.core.files import atomic_write, timestamp
from harness.decoding import DecodingPreset
from harness.results import task_metrics, verdict_fields, write_samples
from harness.shards import Shard
from harness.store import SampleKey, SampleStore, writer_lock

SETTINGS_FILE = "run_settings.json"
STORE_FILE = "sample_store.jsonl"  # a shard's store: sample_store.shard-I-of-N.jsonl (``store_file``)
TRACE_POINTS = 256  # a compact trace keeps at most this many (T, P, token text) points per sample
DEFAULT_MAX_TOKENS = 2048
CHUNK_SAMPLES = 512  # samples per backend.generate call: engines batch inside a call, the store fills between


class RunError(UserError, ValueError):
    """Bad settings for a run (unknown model, conflicting output folder, ...)."""


@dataclass
class RunSpec:
    model: str  # as the user named it (``smollm2``, a path, a hub id)
    model_path: str  # what the backend loaded
    model_name: str  # the output sub-folder
    backend: str
    preset: DecodingPreset
    seeds: list[int]
    samples: int
    limit: int | None = None
    max_tokens: int | None = None  # overrides each task's max_gen_toks
    candidate: dict | None = None  # training-run candidate: {"run", "name", "step"}
    sweep: dict | None = None  # {"group", "temperature", "top_p"} for sweep grid points
    base: str | None = None  # the base a heads-only AutoDeco folder was loaded on, when overridden (--base)
    shard: Shard | None = None  # this process's part of the (task, doc, seed) units; None = all

    def check(self) -> None:
        if self.preset.name == "recommended" and not self.preset.params:
            raise RunError("preset `recommended` must be resolved for the model first (harness.decoding.for_model)")
        if not self.seeds:
            raise RunError("--seeds must be >= 1, got 0")
        if self.samples < 1:
            raise RunError(f"--samples must be >= 1, got {self.samples}")
        if self.limit is not None and self.limit < 1:
            raise RunError(f"--limit must be >= 1, got {self.limit}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RunError(f"--max-tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Planned:
    """One (task, doc) prompt and its generation settings."""

    task: object
    doc: dict
    doc_id: str
    prompt: str
    prompt_hash: str
    max_tokens: int
    stop: tuple[str, ...]


def plan(tasks: list, tokenizer, spec: RunSpec) -> list[Planned]:
    out = []
    for task in tasks:
        gen = task.generation_kwargs
        max_tokens = spec.max_tokens or int(gen.get("max_gen_toks") or DEFAULT_MAX_TOKENS)
        stop = tuple(s for s in (gen.get("until") or []) if s)
        for doc in task.docs(spec.limit):
            try:
                prompt = task.prompt(doc, tokenizer)
            except ValueError as err:  # no chat template, or one that cannot render these messages
                raise RunError(f"{spec.model_path}: cannot build the prompt of {task.name}/{doc.get('doc_id')} "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
            out.append(Planned(task, doc, task.doc_id(doc), prompt,
                               hashlib.sha256(prompt.encode()).hexdigest()[:16], max_tokens, stop))
    return out


def units(items: list[Planned], spec: RunSpec) -> list[tuple[Planned, int]]:
    """The (doc, seed) units this run generates, in the fixed order seed, task, doc; a shard keeps
    every N-th of them (``Shard.take``)."""
    everything = [(item, seed) for seed in spec.seeds for item in items]
    return everything if spec.shard is None else spec.shard.take(everything)


def sample_key(spec: RunSpec, item: Planned, seed: int, index: int) -> SampleKey:
    return SampleKey(spec.model_name, item.task.name, item.doc_id, spec.preset.key, seed, index)


def build_requests(items: list[Planned], spec: RunSpec, store: SampleStore | None = None) -> list[Request]:
    """One request per (doc, seed) unit of this run holding the samples the store lacks."""
    requests = []
    for item, seed in units(items, spec):
        keys = [sample_key(spec, item, seed, i) for i in range(spec.samples)]
        missing = keys if store is None else store.missing(keys)
        if store is not None:
            for key in keys:
                _check_stored(store.get(key), item, key)
        if missing:
            requests.append(Request(
                key=f"{item.task.name}/{item.doc_id}", prompt=item.prompt, preset=spec.preset, seed=seed,
                n=spec.samples, max_tokens=item.max_tokens, stop=item.stop,
                sample_indices=tuple(k.sample_index for k in missing),
            ))
    return requests


def _check_stored(record: dict | None, item: Planned, key: SampleKey) -> None:
    if record is None:
        return
    for field_name, now in (("prompt_hash", item.prompt_hash), ("max_tokens", item.max_tokens)):
        if record.get(field_name) != now:
            raise RunError(
                f"the sample store holds {key.task}/{key.doc_id} seed {key.seed} made with {field_name}="
                f"{record.get(field_name)!r}, this run uses {now!r}; use another --out (or remove the old run)"
            )


# ---------------------------------------------------------------------------------------------
# The output folder

def _settings(spec: RunSpec) -> dict:
    return {"model_path": str(spec.model_path), "backend": spec.backend} | ({"base": spec.base} if spec.base else {})


def check_output(out: str | os.PathLike, spec: RunSpec) -> Path:
    """Refuse ``<out>/<model_name>/`` if it holds a run made with other settings; return the folder."""
    folder = Path(out) / spec.model_name
    path = folder / SETTINGS_FILE
    for place in (Path(out), folder):
        if place.exists() and not place.is_dir():
            raise RunError(f"output {place} is a file, not a folder; use another --out")
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise RunError(f"{path} is not valid JSON ({err}); remove it or use another --out") from None
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in _settings(spec).items() if old.get(k) != v]
        if diff:
            raise RunError(f"output dir {folder} holds a run with other settings ({'; '.join(diff)}); "
                           f"use another --out")
    return folder


def store_file(shard: Shard | None) -> str:
    """``sample_store.jsonl``, or ``sample_store.shard-I-of-N.jsonl`` for a shard."""
    return STORE_FILE if shard is None else f"sample_store.{shard.tag}.jsonl"


def store_path(out: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(out) / spec.model_name / store_file(spec.shard)


@contextlib.contextmanager
def open_output(out: str | os.PathLike, spec: RunSpec) -> Iterator[tuple[Path, SampleStore]]:
    """Validate/create ``<out>/<model_name>/`` and open its (or this shard's) sample store, holding
    the store's writer lock for the ``with`` block: a second process gets a one-line error."""
    folder = check_output(out, spec)
    with writer_lock(folder / store_file(spec.shard)):
        if not (folder / SETTINGS_FILE).exists():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / SETTINGS_FILE, json.dumps(_settings(spec), indent=2) + "\n")
        yield folder, SampleStore(folder / store_file(spec.shard))


# ---------------------------------------------------------------------------------------------
# Generation with progress

def generate_into_store(backend: Backend, requests: list[Request], spec: RunSpec, store: SampleStore,
                        items_by_key: dict[str, Planned], progress: bool = True) -> dict:
    """Run the requests; every completion goes to the store as soon as it arrives."""
    from tqdm import tqdm

    total = sum(len(r.indices) for r in requests)
    stats = {"generated": 0, "tokens": 0, "seconds": 0.0}
    if not total:
        return stats
    start = time.perf_counter()
    with tqdm(total=total, unit="sample", desc=f"{spec.model_name} {spec.preset.key}", disable=not progress,
              dynamic_ncols=True) as bar:
        for completion in _generate_in_chunks(backend, requests):
            item = items_by_key[completion.key]
            store.append(_record(spec, item, completion, backend.tokenizer))
            stats["generated"] += 1
            stats["tokens"] += completion.n_tokens
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix_str(f"{stats['tokens'] / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
    stats["seconds"] = time.perf_counter() - start
    return stats


def _generate_in_chunks(backend: Backend, requests: list[Request], chunk: int = CHUNK_SAMPLES):
    """backend.generate over slices of about ``chunk`` samples, so engines that return a whole call at
    once (vLLM) still persist progress as they go; a killed run loses at most one slice."""
    batch, size = [], 0
    for request in requests:
        batch.append(request)
        size += len(request.indices)
        if size >= chunk:
            yield from backend.generate(batch)
            batch, size = [], 0
    if batch:
        yield from backend.generate(batch)


def _record(spec: RunSpec, item: Planned, completion, tokenizer=None) -> dict:
    record = dict(sample_key(spec, item, completion.seed, completion.sample_index)._asdict())
    record.update(prompt_hash=item.prompt_hash, max_tokens=item.max_tokens, response=completion.text,
                  n_tokens=completion.n_tokens, finish_reason=completion.finish_reason)
    if completion.temperatures:
        record["temperature_mean"] = sum(completion.temperatures) / len(completion.temperatures)
        record["trace"] = {"T": compact(completion.temperatures)}
    if completion.top_ps:
        record["top_p_mean"] = sum(completion.top_ps) / len(completion.top_ps)
        record.setdefault("trace", {})["P"] = compact(completion.top_ps)
    traced = completion.temperatures or completion.top_ps
    if traced and completion.token_ids and tokenizer is not None:  # the text under each trace point
        stride = trace_stride(len(traced))
        record["trace"].update(stride=stride, tokens=token_texts(tokenizer, completion.token_ids[:len(traced)], stride))
    return record


def trace_stride(n_values: int, points: int = TRACE_POINTS) -> int:
    """How many consecutive tokens one compact trace point stands for."""
    return max(1, -(-n_values // points))


def compact(values: list[float], points: int = TRACE_POINTS) -> list[float]:
    """At most ``points`` values: the mean of each run of ``trace_stride`` tokens, rounded to 3 decimals."""
    stride = trace_stride(len(values), points)
    return [round(sum(run) / len(run), 3) for run in (values[i : i + stride] for i in range(0, len(values), stride))]


# ---------------------------------------------------------------------------------------------
# Grading, metrics and the output files

def grade_and_summarize(items: list[Planned], spec: RunSpec, store: SampleStore) -> tuple[dict, dict]:
    """Per task: metrics (``summarize`` + ``task.aggregate``) and the sample rows, in a fixed order."""
    by_task: dict[str, list[Planned]] = defaultdict(list)
    for item in items:
        by_task[item.task.name].append(item)
    results, rows_by_task = {}, {}
    for name, task_items in by_task.items():
        task = task_items[0].task
        records, pairs = [], []
        for item in task_items:
            for seed in spec.seeds:
                for index in range(spec.samples):
                    record = store.get(sample_key(spec, item, seed, index))
                    if record is None:
                        raise RunError(f"sample {name}/{item.doc_id} seed {seed} #{index} is missing after generation")
                    records.append((item, record))
                    pairs.append((item.doc, record["response"]))
        verdicts = task.grade_many(pairs)
        rows, seen = [], set()
        for (item, record), verdict in zip(records, verdicts, strict=True):
            rows.append(_sample_row(record, verdict))
            if item.doc_id not in seen:  # the doc's prompt and reference answer, on its first row only
                seen.add(item.doc_id)
                rows[-1].update(prompt=item.prompt, target=_target(task, item.doc))
        metrics = task_metrics(task, rows, verdicts)
        metrics["mean_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows)
        for field_name in ("temperature_mean", "top_p_mean"):
            values = [r[field_name] for r in rows if r.get(field_name) is not None]
            if values:
                metrics[field_name] = sum(values) / len(values)
        results[name] = metrics
        rows_by_task[name] = rows
    return results, rows_by_task


def _sample_row(record: dict, verdict) -> dict:
    row = {
        "doc_id": record["doc_id"], "prompt_hash": record["prompt_hash"], "seed": record["seed"],
        "sample_index": record["sample_index"], "decoding": record["decoding"], "response": record["response"],
        **verdict_fields(verdict), "n_tokens": record["n_tokens"], "finish_reason": record["finish_reason"],
    }
    for name in ("temperature_mean", "top_p_mean", "trace"):
        if name in record:
            row[name] = record[name]
    return row


def _target(task, doc: dict) -> str | None:
    """The doc's reference answer as the task's lm-eval YAML names it (``doc_to_target``), if a field."""
    key = (getattr(task, "config", None) or {}).get("doc_to_target")
    return str(doc[key]) if isinstance(key, str) and doc.get(key) is not None else None


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_config(spec: RunSpec) -> dict:
    return {
        "model": spec.model, "model_path": spec.model_path, "model_name": spec.model_name,
        "backend": spec.backend, "decoding": spec.preset.describe(), "seeds": list(spec.seeds),
        "samples": spec.samples, "limit": spec.limit, "max_tokens": spec.max_tokens,
        "candidate": spec.candidate, "sweep": spec.sweep, "base": spec.base,
    }


def write_outputs(folder: Path, spec: RunSpec, tasks: list, results: dict, rows_by_task: dict,
                  seconds: float, stats: dict) -> Path:
    stamp = timestamp()
    for name, rows in rows_by_task.items():
        write_samples(folder / f"samples_{name}_{stamp}.jsonl", rows)
    doc = {
        "results": results,
        "configs": {t.name: _jsonable(t.config) for t in tasks},
        "versions": {t.name: t.version for t in tasks},
        "n-samples": {t.name: {"original": len(t.docs()), "effective": len(t.docs(spec.limit))} for t in tasks},
        "config": run_config(spec),
        "git_hash": git_hash(),
        "date": time.time(),
        "total_evaluation_time_seconds": seconds,
        "generation": stats,
    }
    path = folder / f"results_{stamp}.json"
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return path


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))




# ---------------------------------------------------------------------------------------------
# The whole run

def _plan(backend: Backend, tasks: list, spec: RunSpec, out: str | os.PathLike) -> list[Planned]:
    """Check the run and plan its items; nothing is written yet."""
    spec.check()
    backend.check_preset(spec.preset)
    check_output(Path(out), spec)
    items = plan(tasks, backend.tokenizer, spec)
    if not items:
        raise RunError("no documents to evaluate (empty task or --limit)")
    return items


def _generate(backend: Backend, items: list[Planned], spec: RunSpec, store: SampleStore, progress: bool,
              log: Callable[[str], None]) -> dict:
    """Generate what the store lacks of this run's units."""
    requests = build_requests(items, spec, store)
    total = len(units(items, spec)) * spec.samples
    todo = sum(len(r.indices) for r in requests)
    if todo < total:
        log(f"{total - todo} of {total} samples already in {store.path}; generating the other {todo}")
    items_by_key = {f"{i.task.name}/{i.doc_id}": i for i in items}
    return generate_into_store(backend, requests, spec, store, items_by_key, progress=progress)


def generate_shard(backend: Backend, tasks: list, spec: RunSpec, out: str | os.PathLike, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Generate shard ``spec.shard``'s units into its own store; return the generation stats.

    Nothing is graded and no results file is written: a shard's numbers are not the run's.
    `autodeco gather` merges the shards' stores and writes the results of the whole run.
    """
    if spec.shard is None:
        raise ValueError("generate_shard needs spec.shard")
    items = _plan(backend, tasks, spec, out)
    with open_output(out, spec) as (_, store):  # the first write: after everything is checked
        return _generate(backend, items, spec, store, progress, log)


def evaluate(backend: Backend, tasks: list, spec: RunSpec, out: str | os.PathLike, *,
             tracker_factory: Callable[[Path, dict], object] | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Run ``spec`` on ``tasks`` with a loaded ``backend``; return the results file path."""
    if spec.shard is not None:
        raise ValueError("a sharded spec only generates: use generate_shard, then `autodeco gather`")
    start = time.perf_counter()
    items = _plan(backend, tasks, spec, out)
    with open_output(out, spec) as (folder, store):  # the first write: after everything is checked
        stats = _generate(backend, items, spec, store, progress, log)
        results, rows_by_task = grade_and_summarize(items, spec, store)
        path = write_outputs(folder, spec, tasks, results, rows_by_task, time.perf_counter() - start, stats)
    if tracker_factory is not None:
        tracker = tracker_factory(folder, run_config(spec))
        try:
            tracker.log_results(json.loads(path.read_text()), rows_by_task, path)
        finally:
            tracker.finish()
    return path
