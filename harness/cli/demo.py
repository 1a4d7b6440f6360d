"""`autodeco demo`: the whole mini-paper on CPU with SmolLM2, composed from the other commands.

Every step is one `autodeco ...` command line run in-process through `harness.cli.main` (so the
demo shows exactly what a user would type), printed before it runs, under an outer progress
bar. Outputs land in one folder:

    <out>/autodeco-init/      constructed AutoDeco (untrained heads)
    <out>/data/train.jsonl    reject-sampled training data (arith train split)
    <out>/train/              trainer output: checkpoint-<step>/, final/, log_history.jsonl
    <out>/runs/               eval + sweep results (results_*.json, samples_*.jsonl, sweep summaries),
                              steering measurements (steer_*.json)
    <out>/candidates/         every training checkpoint evaluated on the validation split
    <out>/efficiency/         efficiency.json
    <out>/reports/            every table and figure + index.md

The headline printed at the end (AutoDeco vs default vs greedy vs the oracle on held-out arith)
is read back from the result files: whatever was measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.core import config as configs
from harness.core.config import FieldError
from harness.core.errors import UserError
from harness.core.files import atomic_write_json

IN_DOMAIN = "arith"
MODEL = "smollm2"
METHODS = ("greedy", "default", "autodeco", "autodeco-temp", "autodeco-top-p")


@dataclass
class DemoConfig:
    """The demo's sizes; every field is a flag and a --config YAML key."""

    out: str = field(default="outputs/demo", metadata={"help": "output folder"})
    train_problems: int = field(default=64, metadata={"help": "arith train problems to sample"})
    reject_samples: int = field(default=4, metadata={"help": "samples per train problem"})
    # SmolLM2 solves ~3% of arith at T=1 and ~11% at T=0.6: a cooler sampler yields training rows.
    reject_decoding: str = field(default="static:temperature=0.7", metadata={
        "help": "preset for reject sampling (SmolLM2 rarely solves arith at T=1)"})
    train_steps: int = field(default=30, metadata={"help": "optimizer steps for the heads"})
    eval_limit: int = field(default=16, metadata={"help": "held-out arith problems evaluated"})
    seeds: int = field(default=2, metadata={"help": "seeds per evaluation"})
    samples: int = field(default=2, metadata={"help": "samples per problem per seed"})
    max_tokens: int = field(default=128, metadata={"help": "max generated tokens per sample"})
    bench_tasks: str = field(default="aime24,mmlu_pro", metadata={
        "help": "real benchmarks for the slice (comma-separated; empty to skip)"})
    bench_limit: int = field(default=2, metadata={"help": "problems per real benchmark"})
    sweep_grid: str = field(default="0.4:1.0:0.6", metadata={"help": "oracle grid for T and P (start:stop:step)"})
    steer_prompts: int = field(default=12, metadata={
        "help": "prompts of configs/steer/default.yaml run under each steering command"})
    data_dir: str | None = field(default=None, metadata={
        "help": "local benchmark files (else $AUTODECO_DATA_DIR, else the hub)"})
    backend: str = field(default="vllm", metadata={"help": "generation backend", "choices": ("hf", "vllm")})

    def check(self) -> None:
        for name in ("train_problems", "reject_samples", "train_steps", "eval_limit", "seeds", "samples",
                     "max_tokens", "bench_limit", "steer_prompts"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")


class DemoStepFailed(UserError, RuntimeError):
    """A step's command exited non-zero (its own message was printed above)."""


def autodeco(argv: list[str]) -> None:
    """Run one `autodeco` command line in this process; a non-zero exit stops the demo."""
    from harness.cli import main

    print("\n$ autodeco " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise DemoStepFailed(f"`autodeco {' '.join(argv)}` exited with {code}")


def eval_args(cfg: DemoConfig, model: str, tasks: str, decoding: str, out: Path, limit: int) -> list[str]:
    args = ["eval", "--model", model, "--tasks", tasks, "--decoding", decoding, "--seeds", str(cfg.seeds),
            "--samples", str(cfg.samples), "--limit", str(limit), "--max-tokens", str(cfg.max_tokens),
            "--backend", cfg.backend, "--out", str(out)]
    return args + (["--data-dir", cfg.data_dir] if cfg.data_dir else [])


def train_config() -> list[str]:
    """`--config configs/train/smollm2_cpu.yaml` when the repo ships it (run from the repo root)."""
    path = Path("configs/train/smollm2_cpu.yaml")
    return ["train", "--config", str(path)] if path.is_file() else ["train"]


def steps(cfg: DemoConfig) -> list[tuple[str, callable]]:
    """The pipeline as (title, thunk) pairs, in order."""
    out = Path(cfg.out)
    init, train, runs = out / "autodeco-init", out / "train", out / "runs"
    trained = train / "final"
    data = out / "data" / "train.jsonl"

    def evaluate_all():
        # One model load per (model, task set): the presets of a model share its engine.
        base, ours = ",".join(METHODS[:2]), ",".join(METHODS[2:])
        autodeco(eval_args(cfg, MODEL, IN_DOMAIN, base, runs, cfg.eval_limit))
        autodeco(eval_args(cfg, str(trained), IN_DOMAIN, ours, runs, cfg.eval_limit))
        if cfg.bench_tasks:
            tasks = cfg.bench_tasks
            autodeco(eval_args(cfg, MODEL, tasks, base, runs, cfg.bench_limit))
            autodeco(eval_args(cfg, str(trained), tasks, "autodeco", runs, cfg.bench_limit))

    def reports():
        from reports.index import Inputs, Options, run_all, write_index

        # The trained heads live in train/final, so the runner names that model "final": show it
        # in SmolLM2's block, as the paper's tables put AutoDeco under its base model.
        inputs = Inputs.scan([runs, out / "candidates", train, out / "efficiency"], {trained.name: MODEL})
        done = run_all(inputs, out / "reports", Options(paper="table1"))
        write_index(out / "reports", done, header=f"`autodeco demo` output; config: {cfg}")

    sweep = ["sweep", "--model", MODEL, "--tasks", IN_DOMAIN, "--temperatures", cfg.sweep_grid,
             "--top-ps", cfg.sweep_grid, "--seeds", str(cfg.seeds), "--samples", str(cfg.samples),
             "--limit", str(cfg.eval_limit), "--max-tokens", str(cfg.max_tokens), "--backend", cfg.backend,
             "--out", str(runs)]
    return [
        ("prepare SmolLM2", lambda: autodeco(["model", "prepare"])),
        ("construct AutoDeco", lambda: autodeco(["construct", "--base", MODEL, "--out", str(init)])),
        ("reject-sample training data", lambda: autodeco(
            ["data", "reject-sample", "--model", MODEL, "--task", IN_DOMAIN, "--limit", str(cfg.train_problems),
             "--samples", str(cfg.reject_samples), "--decoding", cfg.reject_decoding, "--max-tokens",
             str(cfg.max_tokens), "--backend", cfg.backend, "--out", str(data)])),
        ("train the heads", lambda: autodeco(
            train_config() + ["--model", str(init), "--train_file", str(data), "--output_dir", str(train),
                              "--max_steps", str(cfg.train_steps),
                              "--save_steps", str(max(1, cfg.train_steps // 3))])),
        ("evaluate greedy / default / autodeco (+ ablations)", evaluate_all),
        ("oracle sweep (T at P=1, then P at best T)", lambda: autodeco(sweep)),
        ("evaluate every training checkpoint (candidates)", lambda: autodeco(
            eval_args(cfg, str(train), IN_DOMAIN, "autodeco", out / "candidates", cfg.eval_limit // 2))),
        ("efficiency bench", lambda: autodeco(
            ["bench", "efficiency", "--model", MODEL, "--heads", str(trained), "--prompt-lengths", "128,512",
             "--gen-tokens", "16", "--repeats", "2", "--out", str(out / "efficiency" / "efficiency.json")])),
        ("steering: T/P under natural-language commands (Table 4)", lambda: autodeco(
            ["steer", "--model", str(trained), "--limit", str(cfg.steer_prompts), "--max-tokens", "48",
             "--backend", cfg.backend, "--out", str(runs)])),
        ("write every report + index.md", reports),
    ]


def headline(out: Path) -> list[str]:
    """AutoDeco vs default vs greedy vs oracle on held-out arith, from the result files."""
    from reports.runs import find_runs, find_sweeps

    values = {}
    for run in find_runs([out / "runs"]):
        if not run.sweep and IN_DOMAIN in run.tasks:
            result = run.tasks[IN_DOMAIN]
            values[run.label] = (result.get("pass@1"), result.get("pass@1_std"))
    lines = []
    for method in METHODS:
        if method in values:
            mean, std = values[method]
            lines.append(f"  {method:<16} Pass@1 = {100 * mean:5.1f} ± {100 * (std or 0):.1f} %")
    for sweep in find_sweeps([out / "runs"]):
        if sweep.task == IN_DOMAIN:
            lines.append(f"  {'oracle':<16} Pass@1 = {100 * sweep.best_pass1:5.1f} %  "
                         f"(T={sweep.best_temperature:g}, P={sweep.best_top_p:g}, tuned on the test split)")
    return lines


def run_demo(cfg: DemoConfig) -> int:
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start, timings = time.time(), {}
    plan = steps(cfg)
    bar = tqdm(plan, desc="demo", unit="step", position=0)
    for title, thunk in bar:
        bar.set_postfix_str(title)
        tqdm.write(f"\n=== [{len(timings) + 1}/{len(plan)}] {title}")
        t0 = time.time()
        thunk()
        timings[title] = time.time() - t0
        tqdm.write(f"=== {title}: {timings[title]:.0f} s")
    total = time.time() - start
    atomic_write_json(out / "demo_timings.json", {"steps_s": timings, "total_s": total}, indent=1)
    viewer = out / "reports" / "viewer.html"
    print(f"\nDemo finished in {total / 60:.1f} min. Open {out / 'reports' / 'index.md'}"
          + (f" and, in a browser, {viewer}" if viewer.exists() else ""))
    print(f"Headline (held-out {IN_DOMAIN}, SmolLM2-135M-Instruct, measured):")
    print("\n".join(headline(out)) or "  (no in-domain results found)")
    return 0


def cmd_demo(args) -> int:
    config = configs.from_args(DemoConfig, args)
    try:
        return run_demo(config)
    except DemoStepFailed as err:
        raise DemoStepFailed(f"{err} (see its message above; a step with no training rows needs more "
                             f"--reject-samples / --max-tokens)") from err


def register(subparsers) -> None:
    """Add `demo` to the `autodeco` parser."""
    demo = subparsers.add_parser(
        "demo", help="the whole mini-paper on CPU with SmolLM2 (prepare → train → eval → sweep → reports)",
        description="Prepare SmolLM2, construct AutoDeco, reject-sample training data on the synthetic "
                    "arith task, train the heads, evaluate greedy/default/autodeco (+ ablations) on the "
                    "held-out arith split and a slice of the real benchmarks, run a small oracle sweep, "
                    "evaluate every training checkpoint, measure efficiency and steering by commands, "
                    "and write every report with an index.md. Numbers are whatever is measured "
                    "(about 24 min on 2 idle CPU cores with the defaults).")
    demo.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    configs.add_arguments(demo, DemoConfig)
    demo.set_defaults(func=cmd_demo)
