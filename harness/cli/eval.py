"""`autodeco eval` and `autodeco sweep`: configs in, `harness.runner` / `harness.sweep` called, results printed.

Each command's options are one dataclass (`EvalConfig`, `SweepConfig`): a ``--config`` YAML may set
any field, flags given on the command line win (harness.core.config).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.cli.common import (
    MAX_PROBLEMS,
    MAX_SAMPLES,
    MAX_SAMPLES_PER_RUN,
    MAX_SEEDS,
    MAX_TOKENS,
    EngineOptions,
    log,
    tracker_factory,
)
from harness.core import config as configs
from harness.core.config import FieldError
from harness.core.errors import UserError
from harness.shards import FORMAT as SHARD_FORMAT
from harness.shards import ShardError, parse_shard

EVAL_EPILOG = """\
examples:
  autodeco eval --model smollm2 --tasks arith --decoding greedy --seeds 1 --samples 1 --limit 20
  autodeco eval --model path/to/autodeco-merged --tasks aime,brumo25 --decoding autodeco --seeds 8 --samples 16
  autodeco eval --model runs/train1 --tasks arith     # a training run: every checkpoint-*/ and final/
  autodeco eval --model smollm2 --tasks aime24 --decoding static:temperature=0.6,top_p=0.95
  autodeco eval --model MODEL --tasks aime --backend vllm --backend-arg data_parallel_size=8   # vLLM's own DP
  autodeco eval --model MODEL --tasks aime --seeds 8 --samples 16 --shard 3/8 --out shards   # one of 8 shards
  autodeco gather --runs shards --out outputs                                                 # ... merged

decoding presets: {presets}

outputs: <out>/<model_name>/results_<ts>.json and samples_<task>_<ts>.jsonl (lm-eval layout),
sample_store.jsonl (every finished sample; a re-run resumes from it), W&B files under
<out>/<model_name>/wandb (offline unless you are logged in; --wandb off to skip).
--shard I/N: generate only every N-th (task, doc, seed) unit from I into
<out>/<model_name>/sample_store.shard-I-of-N.jsonl, no results; `autodeco gather` merges the shards
into the files of one unsharded run (see README "Running at scale").
--config FILE: a YAML whose keys are the option names below (e.g. configs/sweeps/*.yaml);
flags given on the command line win over it.
"""

SWEEP_EPILOG = """\
example:
  autodeco sweep --model smollm2 --tasks arith --temperatures 0.1:1.0:0.1 --top-ps 0.1:1.0:0.1 --seeds 8 --samples 16
  autodeco sweep --config configs/sweeps/paper.yaml --model r1-distill-qwen-7b

Greedy (T = 0) is always a grid point, so the oracle is never below greedy; when greedy wins, the
top-p grid is skipped (greedy has no P). The summary also holds a cross-validated static baseline:
5 folds of problems, each scored with the grid point that was best on the other folds (honest,
unlike the test-set oracle); `autodeco report oracle` and `report paired` show both.
Writes one results file per grid point and <out>/<model_name>/sweep_summary_<task>.json.

Sharded (--shard I/N), in two rounds: every shard runs greedy and the temperature grid; then every
shard runs again with --best-from <the shards' --out folders> (the top-p grid at the best
temperature, found by grading the gathered temperature grid); then `autodeco gather`.
"""


@dataclass
class RunOptions(EngineOptions):
    """What every evaluation of tasks takes (eval, sweep)."""

    tasks: str = field(default="", metadata={"help": "comma-separated tasks or groups (see `autodeco tasks list`); "
                                                     "required; a YAML list works too"})
    seeds: int = field(default=1, metadata={"help": "number of seeds, 0..N-1 (paper: 8)"})
    samples: int = field(default=1, metadata={"help": "samples per seed and problem (paper: 16)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems of each task"})
    max_tokens: int | None = field(default=None, metadata={"help": "generation budget per sample (default: the task's)"})
    data_dir: str | None = field(default=None, metadata={"help": "local benchmark files (else $AUTODECO_DATA_DIR, "
                                                                 "else the hub)"})
    wandb: str = field(default="auto", metadata={"help": "W&B logging: auto = online if logged in, else offline files",
                                                  "choices": ("auto", "offline", "online", "off")})
    grading: str = field(default="default", metadata={
        "help": "default = each task's own grader; official = the paper's boxed-answer check (math and "
                "multiple-choice tasks), for numbers like-for-like with its tables", "choices": ("default", "official")})
    shard: str | None = field(default=None, metadata={
        "help": "I/N: only shard I (0..N-1) of N: every N-th (task, doc, seed) unit, into its own sample store, "
                "no results (merge with `autodeco gather`)", "metavar": "I/N"})

    def check(self) -> None:
        """Everything that can be checked without data or a model: names, sizes, the presets."""
        from harness.backends import BackendError, parse_options
        from tasks import expand

        if not self.tasks:
            raise FieldError("tasks", "is required (a flag or a --config that sets tasks)")
        for name, high in (("seeds", MAX_SEEDS), ("samples", MAX_SAMPLES), ("limit", MAX_PROBLEMS),
                           ("max_tokens", MAX_TOKENS)):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= high:
                raise FieldError(name, f"must be in 1..{high}, got {value}")
        try:
            expand(self.tasks)
        except UserError as err:
            raise FieldError("tasks", str(err)) from None
        try:
            parse_options(self.backend_arg)
        except BackendError as err:
            raise FieldError("backend_arg", str(err).removeprefix("--backend-arg ")) from None
        try:
            parse_shard(self.shard)
        except ShardError:
            raise FieldError("shard", f"is {self.shard!r}; {SHARD_FORMAT}") from None


@dataclass
class EvalConfig(RunOptions):
    decoding: str = field(default="autodeco", metadata={
        "help": "preset, optionally with parameters: name[:key=value,...]; several presets comma-separated "
                "(greedy,default,static:temperature=0.6,top_p=0.95) share one model load and write one "
                "results file each"})

    def check(self) -> None:
        from harness.decoding import PresetError, parse_specs

        super().check()
        try:
            parse_specs(self.decoding)
        except PresetError as err:
            raise FieldError("decoding", str(err)) from None


MAX_TEMPERATURE = 100.0


@dataclass
class SweepConfig(RunOptions):
    temperatures: str = field(default="0.1:1.0:0.1", metadata={
        "help": f"start:stop:step or a list, each in (0, {MAX_TEMPERATURE:g}]"})
    top_ps: str = field(default="0.1:1.0:0.1", metadata={"help": "start:stop:step or a list, each in (0, 1]"})
    group: str | None = field(default=None, metadata={"help": "W&B group shared by the sweep's runs "
                                                              "(default: sweep-<model>-<time>; sharded: "
                                                              "sweep-<model>-<settings hash>)"})
    best_from: list[str] = field(default_factory=list, metadata={
        "help": "with --shard: the --out folders of every shard's temperature-grid round; run the top-p grid "
                "at the best temperature of the gathered grid", "nargs": "+", "metavar": "DIR"})

    def check(self) -> None:
        from harness.sweep import check_grid

        super().check()
        if self.best_from and not self.shard:
            raise FieldError("best_from", "goes with --shard (an unsharded sweep finds its best temperature itself)")
        for name, high in (("temperatures", MAX_TEMPERATURE), ("top_ps", 1.0)):
            try:
                check_grid(getattr(self, name), high)
            except ValueError as err:
                raise FieldError(name, str(err)) from None


def _check_presets(model_path: str, presets: list) -> None:
    """What a model must have for this run, known from its files: heads for the AutoDeco presets,
    a chat template for the tasks' prompts."""
    from harness.backends import BackendError
    from harness.models import has_chat_template, is_autodeco

    needs_heads = [p.key for p in presets if p.heads is not None]
    if needs_heads and not is_autodeco(model_path):
        raise BackendError(f"--decoding {', '.join(needs_heads)} needs an AutoDeco model; {model_path} is a plain "
                           f"causal LM (use greedy/default/static/..., or `autodeco construct`)")
    if has_chat_template(model_path) is False:
        raise BackendError(f"{model_path} has no chat template (chat_template.jinja, or chat_template in "
                           f"tokenizer_config.json): the tasks' prompts are chat messages")


def _load_data(cfg: RunOptions) -> list:
    """The tasks with their docs loaded (a missing file or a bad row fails here, before any model
    is loaded), and the run's size bounded: problems x seeds x samples."""
    from harness.runner import RunError
    from tasks import load_tasks

    tasks = load_tasks(cfg.tasks, cfg.data_dir, grading=cfg.grading)
    problems = sum(len(task.docs(cfg.limit)) for task in tasks)
    total = problems * cfg.seeds * cfg.samples
    if total > MAX_SAMPLES_PER_RUN:
        raise RunError(f"{problems} problems x {cfg.seeds} seeds x {cfg.samples} samples = {total} samples, more "
                       f"than {MAX_SAMPLES_PER_RUN} in one run; lower --limit, --seeds or --samples")
    return tasks


def _specs(cfg: RunOptions, target, presets: list):
    """The run's settings per preset, checked by ``RunSpec.check`` (the one place that knows the bounds)."""
    from harness.decoding import for_model
    from harness.runner import RunSpec

    specs = []
    for preset in presets:
        preset = for_model(preset, target.path, log=log)
        spec = RunSpec(model=cfg.model, model_path=target.path, model_name=target.name, backend=cfg.backend,
                       preset=preset, seeds=list(range(cfg.seeds)), samples=cfg.samples, limit=cfg.limit,
                       max_tokens=cfg.max_tokens, candidate=target.candidate,
                       base=cfg.engine_options().get("base"), shard=parse_shard(cfg.shard))
        spec.check()
        specs.append(spec)
    return specs


def _hold_outputs(stack: ExitStack, cfg: RunOptions, specs) -> None:
    """Refuse a conflicting output dir, and take each store's writer lock, before any model loads."""
    from harness.runner import check_output, store_path
    from harness.store import writer_lock

    for spec in specs:
        check_output(cfg.out, spec)
        stack.enter_context(writer_lock(store_path(cfg.out, spec)))


def _recorder(cfg: RunOptions, command: str, config: dict, models: list[str]):
    """For a shard: a function writing its manifest at a given progress (harness.gather); else a no-op."""
    from harness.gather import record_shard

    shard = parse_shard(cfg.shard)
    if shard is None:
        return lambda progress: None
    return lambda progress: record_shard(cfg.out, command, config, shard, progress=progress, models=models)


def _shard_done(cfg: RunOptions, command: str, stats: dict, what: str) -> None:
    log(f"shard {cfg.shard} of {command}: {stats['generated']} samples generated ({what}) → {cfg.out}; when every "
        f"shard is done: autodeco gather --runs <each shard's --out> --out DIR")


def cmd_eval(args) -> int:
    run_eval(configs.from_args(EvalConfig, args))
    return 0


def run_eval(cfg: EvalConfig, engines=None) -> list[Path]:
    """Every (model or candidate) × preset: one results file each, one model load per model; a shard
    (``--shard``) only generates its units. Returns the results files.

    The candidates of a training run share their base, so after the first one is loaded the
    others only swap head weights into it (``Backend.load_heads``) where the backend can.
    ``engines(paths, backend, options)`` yields a loaded backend per path (default
    ``harness.backends.loaded_in_turn``; `autodeco gather` passes engine-free stored ones).
    """
    from harness.backends import check_backend, loaded_in_turn
    from harness.core.files import check_output_folder
    from harness.decoding import parse_specs
    from harness.models import resolve_targets
    from harness.runner import check_output, evaluate, generate_shard

    presets = parse_specs(cfg.decoding)
    options = cfg.engine_options()
    check_backend(cfg.backend, options)
    check_output_folder(cfg.out, "--out")
    tasks = _load_data(cfg)
    targets = resolve_targets(cfg.model)
    specs = [_specs(cfg, target, presets) for target in targets]
    for target, target_specs in zip(targets, specs, strict=True):  # before loading any model:
        check_output(cfg.out, target_specs[0])  # a conflicting output dir
        _check_presets(target.path, presets)  # an AutoDeco preset for a plain model
    record = _recorder(cfg, "eval", configs.to_dict(cfg), [t.name for t in targets])
    paths = []
    with ExitStack() as stack:
        _hold_outputs(stack, cfg, [target_specs[0] for target_specs in specs])  # conflicting outputs, locks
        record("started")
        backends = stack.enter_context(closing((engines or loaded_in_turn)([t.path for t in targets], cfg.backend,
                                                                           options)))
        for target_specs, backend in zip(specs, backends, strict=True):
            for spec in target_specs:
                if spec.shard is not None:
                    stats = generate_shard(backend, tasks, spec, cfg.out, progress=not cfg.no_progress, log=log)
                    _shard_done(cfg, "eval", stats, f"{spec.model_name} {spec.preset.key}")
                    continue
                paths.append(evaluate(backend, tasks, spec, cfg.out, progress=not cfg.no_progress,
                                      tracker_factory=tracker_factory(cfg.wandb, "eval"), log=log))
                _print_results(paths[-1])
        record("done")
    return paths


def _print_results(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"{data['config']['model_name']}  {data['config']['decoding']['key']}  → {path}")
    for task, m in data["results"].items():
        ks = "  ".join(f"{k}={m[k]:.4f}" for k in m if k.startswith("pass@") and k[5:].isdigit() and k != "pass@1")
        print(f"  {task:<16} pass@1 = {m['pass@1']:.4f} ± {m['pass@1_std']:.4f}  {ks}  "
              f"(docs={m['n_docs']}, samples/doc={m['n_samples_per_doc']})")


def cmd_sweep(args) -> int:
    run_sweep(configs.from_args(SweepConfig, args))  # checks the grids: finite, in range, at most MAX_GRID_POINTS
    return 0


def run_sweep(cfg: SweepConfig, engine=None) -> list[Path]:
    """The oracle sweep (one engine load); a shard (``--shard``) generates its units of greedy and the
    temperature grid, or with ``--best-from`` of both grids. Returns the summary files.
    ``engine(backend, path, **options)`` loads the backend (default ``get_backend``)."""
    from harness.backends import check_backend, get_backend
    from harness.core.files import check_output_folder
    from harness.decoding import get_preset
    from harness.gather import digest
    from harness.models import resolve_targets
    from harness.sweep import parse_grid, sweep, sweep_shard

    temperatures, top_ps = parse_grid(cfg.temperatures), parse_grid(cfg.top_ps)
    options = cfg.engine_options()
    check_backend(cfg.backend, options)
    check_output_folder(cfg.out, "--out")
    tasks = _load_data(cfg)
    targets = resolve_targets(cfg.model)
    if len(targets) != 1 or targets[0].candidate is not None:
        raise UserError(f"--model {cfg.model}: sweep takes one model, not a training run folder (pick one of "
                        f"its checkpoints: {', '.join(t.path for t in targets)})")
    (target,) = targets
    (spec,) = _specs(cfg, target, [get_preset("default")])
    config = configs.to_dict(cfg)
    if cfg.group:
        group = cfg.group
    elif spec.shard is not None:  # every shard (and gather) must name the same group
        group = f"sweep-{target.name}-{digest('sweep', config)[:8]}"
    else:
        group = f"sweep-{target.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config["group"] = group
    record = _recorder(cfg, "sweep", config, [target.name])
    with ExitStack() as stack:
        _hold_outputs(stack, cfg, [spec])
        best = _best_temperatures(cfg, config, tasks, target, spec, temperatures, group) if cfg.best_from else None
        record("started")
        backend = (engine or get_backend)(cfg.backend, target.path, **options)  # one engine load for the whole sweep
        stack.callback(backend.close)
        if spec.shard is not None:
            stats = sweep_shard(backend, tasks, spec, cfg.out, temperatures, top_ps, group=group,
                                best_temperatures=best, progress=not cfg.no_progress, log=log)
            record("done" if best is not None else "temperature-grid")
            _shard_done(cfg, "sweep", stats, "both grids" if best is not None else
                        "the temperature grid; next: every shard again with --best-from <the shards' --out>")
            return []
        summaries = sweep(backend, tasks, spec, cfg.out, temperatures, top_ps, group=group,
                          tracker_factory=tracker_factory(cfg.wandb, "sweep", group),
                          progress=not cfg.no_progress, log=log)
    for summary in summaries:
        data = json.loads(summary.read_text())
        print(f"{data['task']}: best T={data['best_temperature']} P={data['best_top_p']} "
              f"pass@1={data['best_pass@1']:.4f} → {summary}")
    return summaries


def _best_temperatures(cfg: SweepConfig, config: dict, tasks: list, target, spec, temperatures: list[float],
                       group: str) -> dict[str, float]:
    """The best temperature per task of the temperature grid gathered from every shard's first round
    (``--best-from``): merged into a temporary folder and graded as an unsharded sweep would."""
    import tempfile

    from harness.backends.stored import StoredBackend
    from harness.gather import digest, find_jobs, merge_stores
    from harness.sweep import best_temperature

    (job,) = find_jobs(cfg.best_from, need="temperature-grid", digest_only=digest("sweep", config))
    backend = StoredBackend(target.path)
    best = {}
    with tempfile.TemporaryDirectory(prefix="autodeco-best-from-") as tmp:
        merge_stores(job, tmp, warn=lambda message: None)  # other shards may be appending their second round
        for task in tasks:
            _, best[task.name] = best_temperature(backend, task, replace(spec, shard=None), tmp, temperatures,
                                                  group=group, progress=False, log=lambda message: None)
    log(f"best temperatures over all {job.count} shards' temperature grids: "
        + ", ".join(f"{name} T={value}" for name, value in best.items()))
    return best


def register(subparsers) -> None:
    """Add `eval` and `sweep` to the `autodeco` parser."""
    from harness.decoding import PRESET_HELP

    presets = "\n".join(f"  {name:<15} {text}" for name, text in PRESET_HELP.items())
    p = subparsers.add_parser("eval", help="evaluate a model: tasks × seeds × samples → Pass@1 ± std, Pass@k",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=EVAL_EPILOG.format(presets="\n" + presets))
    p.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    configs.add_arguments(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("sweep", help="static-decoding sweep: greedy + T grid at P=1, then P grid at the best T; "
                                            "test-set oracle and a cross-validated baseline",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG)
    s.add_argument("--config", help="YAML whose keys are the options below (configs/sweeps/); flags given here win")
    configs.add_arguments(s, SweepConfig)
    s.set_defaults(func=cmd_sweep)
