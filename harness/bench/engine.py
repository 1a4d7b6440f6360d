"""`autodeco bench overhead` and `autodeco bench backends`: the harness's own cost, and engines side by side.

- overhead: median wall time of a full `evaluate` (plan, store, grading, files) over the
  backend's raw ``generate`` on the same requests (target <= 1.05), interleaved repeats.
- backends: generated tokens per second of each backend on the same requests.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness.backends import get_backend, parse_options
from harness.bench import write_result
from harness.decoding import parse_spec
from harness.models import model_name_for, resolve_model
from harness.runner import RunSpec, build_requests, evaluate, plan
from tasks import load_tasks


def _setup(args, samples: int):
    tasks = load_tasks(args.task, args.data_dir)
    model = resolve_model(args.model)
    spec = RunSpec(model=args.model, model_path=model, model_name=model_name_for(model), backend=args.backend,
                   preset=parse_spec(args.decoding), seeds=list(range(args.seeds)), samples=samples,
                   limit=args.limit, max_tokens=args.max_tokens)
    spec.check()
    return tasks, spec


class _TimedBackend:
    """Wraps a backend and counts the seconds spent inside its generate (to isolate the harness's own time)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests):
        iterator = iter(self.inner.generate(requests))
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


def overhead(args) -> int:
    """Median wall time of a full eval (store, grading, files) / the backend's raw generate, same requests."""
    tasks, spec = _setup(args, args.samples)
    backend = get_backend(args.backend, spec.model_path, **parse_options(args.backend_arg))
    items = plan(tasks, backend.tokenizer, spec)
    requests = build_requests(items, spec)
    raw, full, raw_cpu, full_cpu, harness_only = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="autodeco-bench-") as tmp:
        for repeat in range(args.repeats):
            order = ("raw", "eval") if repeat % 2 == 0 else ("eval", "raw")  # interleave against drift
            for which in order:
                start, cpu = time.perf_counter(), time.process_time()
                if which == "raw":
                    tokens = sum(c.n_tokens for c in backend.generate(requests))
                    raw.append(time.perf_counter() - start)
                    raw_cpu.append(time.process_time() - cpu)
                else:
                    timed = _TimedBackend(backend)
                    evaluate(timed, tasks, spec, Path(tmp) / f"r{repeat}", progress=False, log=lambda m: None)
                    full.append(time.perf_counter() - start)
                    full_cpu.append(time.process_time() - cpu)
                    harness_only.append(full[-1] - timed.seconds)
            print(f"repeat {repeat}: raw {raw[-1]:.2f}s (cpu {raw_cpu[-1]:.2f}s)  eval {full[-1]:.2f}s "
                  f"(cpu {full_cpu[-1]:.2f}s, outside generate {harness_only[-1]:.3f}s)  ({tokens} tokens)",
                  file=sys.stderr)
    backend.close()
    ratio = statistics.median(full) / statistics.median(raw)
    cpu_ratio = statistics.median(full_cpu) / statistics.median(raw_cpu)
    # the harness's own time (plan, store, grading, files) added to the raw generate time:
    isolated_ratio = (statistics.median(raw) + statistics.median(harness_only)) / statistics.median(raw)
    result = {"bench": "overhead", "model": spec.model_name, "backend": args.backend, "task": args.task,
              "decoding": spec.preset.key, "requests": len(requests), "samples": args.samples,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "raw_seconds": raw,
              "eval_seconds": full, "raw_cpu_seconds": raw_cpu, "eval_cpu_seconds": full_cpu,
              "harness_only_seconds": harness_only, "ratio": ratio, "cpu_ratio": cpu_ratio,
              "isolated_ratio": isolated_ratio, "target": 1.05}
    print(f"harness overhead (CPU time of this process): eval / raw generate = {cpu_ratio:.3f}")
    print(f"harness overhead (raw generate + time outside generate) / raw generate = {isolated_ratio:.3f}")
    print(f"harness overhead: eval / raw generate = {ratio:.3f} (median of {args.repeats}; target <= 1.05)")
    write_result(args.out, "bench_overhead.json", result)
    return 0


def backends(args) -> int:
    """Generated tokens per second of each backend on the same requests (16 samples per problem)."""
    tasks, spec = _setup(args, args.samples)
    rows = {}
    for name in args.backends.split(","):
        backend = get_backend(name, spec.model_path)
        requests = build_requests(plan(tasks, backend.tokenizer, spec), spec)
        start = time.perf_counter()
        tokens = sum(c.n_tokens for c in backend.generate(requests))
        seconds = time.perf_counter() - start
        backend.close()
        rows[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
        print(f"{name:>6}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tok/s", file=sys.stderr)
    names = list(rows)
    result = {"bench": "backends", "model": spec.model_name, "task": args.task, "samples": args.samples,
              "limit": args.limit, "max_tokens": args.max_tokens, "decoding": spec.preset.key, "backends": rows}
    if len(names) == 2:
        ratio = rows[names[0]]["tokens_per_second"] / rows[names[1]]["tokens_per_second"]
        result["ratio"] = ratio
        print(f"throughput {names[0]} / {names[1]} = {ratio:.2f}")
    write_result(args.out, "bench_backends.json", result)
    return 0
