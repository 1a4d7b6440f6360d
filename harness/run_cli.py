"""`autodeco eval`, `autodeco sweep`, `autodeco bench overhead|backends`.

Handlers import torch, transformers and vllm lazily so that `autodeco --help` stays instant.
User errors (unknown task/preset/model/backend, bad counts, a conflicting output dir) become
`CLIError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from harness.cli import CLIError

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

EVAL_EPILOG = """\
examples:
  autodeco eval --model smollm2 --tasks arith --decoding greedy --seeds 1 --samples 1 --limit 20
  autodeco eval --model path/to/autodeco-merged --tasks aime,brumo25 --decoding autodeco --seeds 8 --samples 16
  autodeco eval --model runs/train1 --tasks arith     # a training run: every checkpoint-*/ and final/
  autodeco eval --model smollm2 --tasks aime24 --decoding static:temperature=0.6,top_p=0.95

decoding presets: {presets}

outputs: <out>/<model_name>/results_<ts>.json and samples_<task>_<ts>.jsonl (lm-eval layout),
sample_store.jsonl (every finished sample; a re-run resumes from it), W&B files under
<out>/<model_name>/wandb (offline unless you are logged in; --wandb off to skip).
"""


# ---------------------------------------------------------------------------------------------
# Argument helpers

def _common(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (embedded), a name from configs/models/, a local folder, a hub id, "
                             "or a training run folder holding checkpoint-*/ (default: smollm2)")
    parser.add_argument("--tasks", help="comma-separated tasks or groups (see `autodeco tasks list`); required")
    if not sweep:
        parser.add_argument("--decoding", default="autodeco",
                            help="preset, optionally with parameters: name[:key=value,...]; several presets "
                                 "comma-separated (greedy,default,static:temperature=0.6,top_p=0.95) share one "
                                 "model load and write one results file each (default: autodeco)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (paper: 8)")
    parser.add_argument("--samples", type=int, default=1, help="samples per seed and problem (paper: 16)")
    parser.add_argument("--backend", default="hf", help="hf (transformers) or vllm (default: hf)")
    parser.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the backend, e.g. tensor_parallel_size=2, max_batch_size=16 (repeatable)")
    parser.add_argument("--data-dir", help="local benchmark files (else $AUTODECO_DATA_DIR, else the hub)")
    parser.add_argument("--limit", type=int, help="only the first N problems of each task")
    parser.add_argument("--max-tokens", type=int, help="generation budget per sample (default: the task's)")
    parser.add_argument("--out", default="outputs", help="output root (default: outputs)")
    parser.add_argument("--wandb", default="auto", choices=("auto", "offline", "online", "off"),
                        help="W&B logging: auto = online if logged in, else offline files (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--config", help="YAML whose keys (tasks, seeds, samples, temperatures, ...) replace "
                                         "the defaults; explicit flags still win (see configs/sweeps/)")
    parser.set_defaults(_parser=parser)


def _apply_config(args) -> None:
    """Fill options the user left at their default from ``--config`` (YAML keys = long option names)."""
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise CLIError(f"--config {path}: expected a mapping of option names to values")
        for key, value in values.items():
            dest = key.replace("-", "_")
            if not hasattr(args, dest) or dest.startswith("_"):
                raise CLIError(f"--config {path}: unknown option {key!r}")
            if getattr(args, dest) == args._parser.get_default(dest):
                setattr(args, dest, ",".join(map(str, value)) if isinstance(value, list) else value)
    if not args.tasks:
        raise CLIError("--tasks is required (or a --config that sets tasks)")


def _parse_backend_args(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CLIError(f"--backend-arg {item!r}: expected KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    return options


def _load_tasks(names: str, data_dir: str | None) -> list:
    from harness.paths import data_dir as resolve_data_dir
    from tasks import expand, get_task

    try:
        folder = resolve_data_dir(data_dir)
        return [get_task(name, data_dir=folder) for name in expand(names)]
    except KeyError as err:
        raise CLIError(str(err.args[0] if err.args else err)) from None
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"cannot load tasks {names!r}: {err}") from None


def model_preset(name: str) -> dict | None:
    """configs/models/<name>.yaml, if there is one."""
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def resolve(model: str) -> str:
    """--model → a loadable path or hub id; unknown names fail here with the known presets listed."""
    from harness.paths import DEFAULT_MODEL, resolve_model

    if model == DEFAULT_MODEL:
        return resolve_model(model)
    preset = model_preset(model)
    if preset is not None:
        return preset.get("path") or preset["hub_id"]
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        known = ", ".join(sorted([DEFAULT_MODEL, *(p.stem for p in MODELS_DIR.glob("*.yaml"))]))
        raise CLIError(f"unknown model {model!r}: not a folder, a hub id (org/name) or a preset ({known})")
    return model


def candidates(folder: Path) -> list[tuple[str, Path, int | None]]:
    """(name, path, step) of every checkpoint-<step>/ (by step) and final/ in a training run folder."""
    found = []
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and (child / "config.json").is_file():
            step = child.name.removeprefix("checkpoint-")
            found.append((child.name, child, int(step) if step.isdigit() else None))
    found.sort(key=lambda c: (c[2] is None, c[2] or 0, c[0]))
    if (folder / "final" / "config.json").is_file():
        found.append(("final", folder / "final", None))
    return found


def _targets(model: str) -> list[tuple[str, str, dict | None]]:
    """(model_path, model_name, candidate) for a model, or one per candidate of a training run."""
    from harness.runner import model_name_for

    path = resolve(model)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        found = candidates(folder)
        if not found:
            raise CLIError(f"{folder} has no config.json and no checkpoint-*/ or final/ model folders")
        return [(str(p), f"{folder.name}-{name}", {"run": str(folder), "name": name, "step": step})
                for name, p, step in found]
    name = model if model_preset(model) is not None or model == "smollm2" else model_name_for(path)
    return [(path, name, None)]


def _spec(args, model_path: str, model_name: str, candidate: dict | None, preset):
    """The run's settings, checked by ``RunSpec.check`` (the one place that knows the bounds)."""
    from harness.runner import RunError, RunSpec

    spec = RunSpec(model=args.model, model_path=model_path, model_name=model_name, backend=args.backend,
                   preset=preset, seeds=list(range(max(args.seeds, 0))), samples=args.samples,
                   limit=args.limit, max_tokens=args.max_tokens, candidate=candidate)
    try:
        spec.check()
    except RunError as err:
        raise CLIError(str(err)) from None
    return spec


def _backend(name: str, model_path: str, options: dict):
    from harness.backends import BACKENDS, BackendError, get_backend

    if name not in BACKENDS:
        raise CLIError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    try:
        return get_backend(name, model_path, **options)
    except BackendError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"cannot load model {model_path!r}: {err}") from None


def _tracker_factory(args, job_type: str, group: str | None = None):
    if args.wandb == "off":
        return None
    from harness.tracking import start_run

    def factory(folder, config, name=None):
        return start_run(folder, config, mode=args.wandb, job_type=job_type, group=group, name=name)

    return factory


def _run_guarded(fn):
    """Map the harness's own error types onto CLIError."""
    from harness.backends import BackendError
    from harness.decoding import PresetError
    from harness.runner import RunError

    try:
        return fn()
    except (RunError, PresetError, BackendError) as err:
        raise CLIError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# eval

def cmd_eval(args) -> int:
    """Every (model or candidate) × preset: one results file each, one model load per model.

    The candidates of a training run share their base, so after the first one is loaded the
    others only swap head weights into it (``Backend.load_heads``) where the backend can.
    """
    from harness.decoding import parse_specs

    def body():
        _apply_config(args)
        presets = parse_specs(args.decoding)
        options = _parse_backend_args(args.backend_arg)
        tasks = _load_tasks(args.tasks, args.data_dir)
        targets = _targets(args.model)
        specs = [[_spec(args, path, name, cand, preset) for preset in presets] for path, name, cand in targets]
        from harness.runner import check_output, evaluate

        for spec in specs:  # refuse a conflicting output dir before loading any model
            check_output(args.out, spec[0])

        paths = [target_specs[0].model_path for target_specs in specs]
        with closing(loaded_in_turn(paths, args.backend, options)) as backends:
            for target_specs, backend in zip(specs, backends, strict=True):
                for spec in target_specs:
                    result = evaluate(backend, tasks, spec, args.out, progress=not args.no_progress,
                                      tracker_factory=_tracker_factory(args, "eval"),
                                      log=lambda m: print(m, file=sys.stderr))
                    _print_results(result)
        return 0

    return _run_guarded(body)


def loaded_in_turn(paths: list[str], backend_name: str, options: dict):
    """Yield a backend serving each model path in turn: where the loaded engine can take the next
    checkpoint's heads in place (``Backend.load_heads``) it is reused, else it is closed and the
    next model loaded. The last backend is closed when the generator is closed (use
    ``contextlib.closing``), so a failure in the caller's loop frees the engine too."""
    backend = None
    try:
        for path in paths:
            if backend is not None and backend.load_heads(path):
                print(f"{path}: heads swapped into the loaded {backend_name} engine", file=sys.stderr)
            else:
                if backend is not None:
                    backend.close()
                    backend = None
                backend = _backend(backend_name, path, options)
            yield backend
    finally:
        if backend is not None:
            backend.close()


def _print_results(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"{data['config']['model_name']}  {data['config']['decoding']['key']}  → {path}")
    for task, m in data["results"].items():
        ks = "  ".join(f"{k}={m[k]:.4f}" for k in m if k.startswith("pass@") and k[5:].isdigit() and k != "pass@1")
        print(f"  {task:<16} pass@1 = {m['pass@1']:.4f} ± {m['pass@1_std']:.4f}  {ks}  "
              f"(docs={m['n_docs']}, samples/doc={m['n_samples_per_doc']})")


# ---------------------------------------------------------------------------------------------
# sweep

def cmd_sweep(args) -> int:
    from harness.sweep import parse_grid, sweep

    def body():
        _apply_config(args)
        try:
            temperatures = parse_grid(str(args.temperatures), "--temperatures")
            top_ps = parse_grid(str(args.top_ps), "--top-ps")
        except ValueError as err:
            raise CLIError(str(err)) from None
        if min(temperatures) <= 0 or not all(0 < p <= 1 for p in top_ps):
            raise CLIError("temperatures must be > 0 and top-ps in (0, 1]")
        from harness.decoding import get_preset

        options = _parse_backend_args(args.backend_arg)
        tasks = _load_tasks(args.tasks, args.data_dir)
        targets = _targets(args.model)
        if len(targets) != 1:
            raise CLIError("sweep takes one model, not a training run folder")
        path, name, cand = targets[0]
        spec = _spec(args, path, name, cand, get_preset("default"))
        from harness.runner import check_output

        check_output(args.out, spec)
        group = args.group or f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        backend = _backend(args.backend, path, options)  # one engine load for the whole sweep
        try:
            summaries = sweep(backend, tasks, spec, args.out, temperatures, top_ps, group=group,
                              tracker_factory=_tracker_factory(args, "sweep", group),
                              progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
        finally:
            backend.close()
        for summary in summaries:
            data = json.loads(summary.read_text())
            print(f"{data['task']}: best T={data['best_temperature']} P={data['best_top_p']} "
                  f"pass@1={data['best_pass@1']:.4f} → {summary}")
        return 0

    return _run_guarded(body)


# ---------------------------------------------------------------------------------------------
# benchmarks

def _bench_setup(args, samples: int):
    from harness.decoding import parse_spec
    from harness.runner import RunSpec

    tasks = _load_tasks(args.task, args.data_dir)
    (path, name, cand), = _targets(args.model)[:1]
    preset = parse_spec(args.decoding)
    spec = RunSpec(model=args.model, model_path=path, model_name=name, backend=args.backend, preset=preset,
                   seeds=list(range(args.seeds)), samples=samples, limit=args.limit, max_tokens=args.max_tokens)
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


def cmd_bench_overhead(args) -> int:
    """Median wall time of a full eval (store, grading, files) / the backend's raw generate, same requests."""
    from harness.runner import build_requests, evaluate, plan

    def body():
        tasks, spec = _bench_setup(args, args.samples)
        backend = _backend(args.backend, spec.model_path, _parse_backend_args(args.backend_arg))
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
        _write_bench(args.out, "bench_overhead.json", result)
        return 0

    return _run_guarded(body)


def cmd_bench_backends(args) -> int:
    """Generated tokens per second of each backend on the same requests (16 samples per problem)."""
    from harness.runner import build_requests, plan

    def body():
        tasks, spec = _bench_setup(args, args.samples)
        rows = {}
        for name in args.backends.split(","):
            backend = _backend(name, spec.model_path, {})
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
        _write_bench(args.out, "bench_backends.json", result)
        return 0

    return _run_guarded(body)


def _write_bench(out: str | None, name: str, result: dict) -> None:
    if out:
        path = Path(out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# registration

def register(subparsers) -> None:
    """Add `eval` and `sweep` to the `autodeco` parser."""
    from harness.decoding import PRESET_HELP

    presets = "\n".join(f"  {name:<15} {text}" for name, text in PRESET_HELP.items())
    p = subparsers.add_parser("eval", help="evaluate a model: tasks × seeds × samples → Pass@1 ± std, Pass@k",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=EVAL_EPILOG.format(presets="\n" + presets))
    _common(p)
    p.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("sweep", help="oracle static-decoding sweep: T grid at P=1, then P grid at the best T",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n  autodeco sweep --model smollm2 --tasks arith --temperatures "
                                     "0.1:1.0:0.1 --top-ps 0.1:1.0:0.1 --seeds 8 --samples 16\n\n"
                                     "writes one results file per grid point and "
                                     "<out>/<model_name>/sweep_summary_<task>.json")
    _common(s, sweep=True)
    s.add_argument("--temperatures", default="0.1:1.0:0.1", help="start:stop:step or a list (default 0.1:1.0:0.1)")
    s.add_argument("--top-ps", default="0.1:1.0:0.1", help="start:stop:step or a list (default 0.1:1.0:0.1)")
    s.add_argument("--group", help="W&B group shared by the sweep's runs (default: sweep-<model>-<time>)")
    s.set_defaults(func=cmd_sweep)


def _bench_common(p: argparse.ArgumentParser, samples: int, max_tokens: int) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="arith", help="task (default: arith, synthetic, no data needed)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=2, help="problems (default 2)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--samples", type=int, default=samples, help=f"samples per problem (default {samples})")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per sample (default {max_tokens})")
    p.add_argument("--decoding", default="default")
    p.add_argument("--out", help="write the measurement as JSON into this folder")


def register_bench(bench_subparsers) -> None:
    """`autodeco bench overhead` and `autodeco bench backends`."""
    o = bench_subparsers.add_parser("overhead", help="wall time of a full eval / raw backend generate (target <= 1.05)")
    _bench_common(o, samples=4, max_tokens=32)
    o.add_argument("--backend", default="hf")
    o.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE")
    o.add_argument("--repeats", type=int, default=3)
    o.set_defaults(func=cmd_bench_overhead)

    b = bench_subparsers.add_parser("backends", help="throughput of vllm vs hf on the same requests")
    _bench_common(b, samples=16, max_tokens=64)
    b.add_argument("--backends", default="vllm,hf", help="comma-separated backends (default vllm,hf)")
    b.set_defaults(func=cmd_bench_backends, backend="hf")
