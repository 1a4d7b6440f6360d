"""`autodeco eval` and `autodeco sweep`: configs in, `harness.runner` / `harness.sweep` called, results printed.

Each command's options are one dataclass (`EvalConfig`, `SweepConfig`): a ``--config`` YAML may set
any field, flags given on the command line win (harness.core.config).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import closing
from dataclasses import dataclass, field
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
                                                              "(default: sweep-<model>-<time>)"})

    def check(self) -> None:
        from harness.sweep import check_grid

        super().check()
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
                       base=cfg.engine_options().get("base"))
        spec.check()
        specs.append(spec)
    return specs


def cmd_eval(args) -> int:
    """Every (model or candidate) × preset: one results file each, one model load per model.

    The candidates of a training run share their base, so after the first one is loaded the
    others only swap head weights into it (``Backend.load_heads``) where the backend can.
    """
    from harness.backends import check_backend, loaded_in_turn
    from harness.core.files import check_output_folder
    from harness.decoding import parse_specs
    from harness.models import resolve_targets
    from harness.runner import check_output, evaluate

    cfg = configs.from_args(EvalConfig, args)
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
    with closing(loaded_in_turn([t.path for t in targets], cfg.backend, options)) as backends:
        for target_specs, backend in zip(specs, backends, strict=True):
            for spec in target_specs:
                result = evaluate(backend, tasks, spec, cfg.out, progress=not cfg.no_progress,
                                  tracker_factory=tracker_factory(cfg.wandb, "eval"), log=log)
                _print_results(result)
    return 0


def _print_results(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"{data['config']['model_name']}  {data['config']['decoding']['key']}  → {path}")
    for task, m in data["results"].items():
        ks = "  ".join(f"{k}={m[k]:.4f}" for k in m if k.startswith("pass@") and k[5:].isdigit() and k != "pass@1")
        print(f"  {task:<16} pass@1 = {m['pass@1']:.4f} ± {m['pass@1_std']:.4f}  {ks}  "
              f"(docs={m['n_docs']}, samples/doc={m['n_samples_per_doc']})")


def cmd_sweep(args) -> int:
    from harness.backends import check_backend, get_backend
    from harness.core.errors import UserError
    from harness.core.files import check_output_folder
    from harness.decoding import get_preset
    from harness.models import resolve_targets
    from harness.runner import check_output
    from harness.sweep import parse_grid, sweep

    cfg = configs.from_args(SweepConfig, args)  # checks the grids: finite, in range, at most MAX_GRID_POINTS
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
    check_output(cfg.out, spec)
    group = cfg.group or f"sweep-{target.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    backend = get_backend(cfg.backend, target.path, **options)  # one engine load for the whole sweep
    try:
        summaries = sweep(backend, tasks, spec, cfg.out, temperatures, top_ps, group=group,
                          tracker_factory=tracker_factory(cfg.wandb, "sweep", group),
                          progress=not cfg.no_progress, log=log)
    finally:
        backend.close()
    for summary in summaries:
        data = json.loads(summary.read_text())
        print(f"{data['task']}: best T={data['best_temperature']} P={data['best_top_p']} "
              f"pass@1={data['best_pass@1']:.4f} → {summary}")
    return 0


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
