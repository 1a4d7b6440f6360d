"""`autodeco demo`: the whole mini-paper on CPU with SmolLM2, composed from the other areas' CLIs.

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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

IN_DOMAIN = "arith"
MODEL = "smollm2"
METHODS = ("greedy", "default", "autodeco", "autodeco-temp", "autodeco-top-p")


@dataclass
class DemoConfig:
    out: Path = Path("outputs/demo")
    train_problems: int = 64
    reject_samples: int = 4
    # SmolLM2 solves ~3% of arith at T=1 and ~11% at T=0.6: a cooler sampler yields training rows.
    reject_decoding: str = "static:temperature=0.7"
    train_steps: int = 30
    eval_limit: int = 16
    seeds: int = 2
    samples: int = 2
    max_tokens: int = 128
    bench_tasks: list[str] = field(default_factory=lambda: ["aime24", "mmlu_pro"])
    bench_limit: int = 2
    sweep_grid: str = "0.4:1.0:0.6"
    steer_prompts: int = 12
    data_dir: str | None = None
    backend: str = "vllm"


class DemoStepFailed(RuntimeError):
    pass


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
    out = cfg.out
    init, train, runs = out / "autodeco-init", out / "train", out / "runs"
    trained = train / "final"
    data = out / "data" / "train.jsonl"

    def evaluate_all():
        # One model load per (model, task set): the presets of a model share its engine.
        base, ours = ",".join(METHODS[:2]), ",".join(METHODS[2:])
        autodeco(eval_args(cfg, MODEL, IN_DOMAIN, base, runs, cfg.eval_limit))
        autodeco(eval_args(cfg, str(trained), IN_DOMAIN, ours, runs, cfg.eval_limit))
        if cfg.bench_tasks:
            tasks = ",".join(cfg.bench_tasks)
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

    cfg.out.mkdir(parents=True, exist_ok=True)
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
    (cfg.out / "demo_timings.json").write_text(json.dumps({"steps_s": timings, "total_s": total}, indent=1))
    print(f"\nDemo finished in {total / 60:.1f} min. Open {cfg.out / 'reports' / 'index.md'}")
    print(f"Headline (held-out {IN_DOMAIN}, SmolLM2-135M-Instruct, measured):")
    print("\n".join(headline(cfg.out)) or "  (no in-domain results found)")
    return 0
