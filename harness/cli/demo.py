"""`autodeco demo`: the whole mini-paper on CPU with SmolLM2, composed from the other commands.

Every step is one `autodeco ...` command line run in-process through `harness.cli.main` (so the
demo shows exactly what a user would type), printed before it runs, under an outer progress
bar. Outputs land in one folder:

    <out>/autodeco-init/      constructed AutoDeco (untrained heads)
    <out>/data/train.jsonl    reject-sampled training data (arith train split)
    <out>/train/              trainer output: checkpoint-<step>/, final/, log_history.jsonl
    <out>/steer/              steering training (`autodeco train-steer`): final/ = train/final's heads
                              taught to follow decoding commands, log_history.jsonl
    <out>/runs/               eval + sweep results (results_*.json, samples_*.jsonl, sweep summaries),
                              steering measurements of train/final and steer/ (steer_*.json) on held-out
                              prompts and wordings, and steer/'s in-domain eval (runs/steer-final/)
    <out>/candidates/         every training checkpoint evaluated on the validation split
    <out>/efficiency/         efficiency.json
    <out>/reports/            every table and figure + index.md

The headline printed at the end (AutoDeco vs default vs greedy vs the oracle on held-out arith)
is read back from the result files: whatever was measured.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.cli.common import MAX_PROBLEMS, MAX_SAMPLES, MAX_SEEDS, MAX_TOKENS
from harness.core import config as configs
from harness.core.config import FieldError
from harness.core.errors import UserError
from harness.core.files import atomic_write_json, read_json
from harness.core.paths import CONFIGS_DIR

IN_DOMAIN = "arith"
DEV = "arith_dev"
MODEL = "smollm2"
METHODS = ("greedy", "default", "autodeco", "autodeco-temp", "autodeco-top-p")
BUDGET_MIN = 30  # the default profile's promise on 2 idle CPU cores


PROFILES_DIR = CONFIGS_DIR / "demo"


@dataclass
class DemoConfig:
    """The demo's sizes; every field is a flag and a --config YAML key. The defaults are the
    30-minute CPU profile; ``--profile full`` (configs/demo/full.yaml) is the paper-sized one."""

    out: str = field(default="outputs/demo", metadata={"help": "output folder"})
    # Training data. SmolLM2 solves ~4% of difficulty-2 arith at T=0.7 and ~40% of difficulty 1, so
    # the easy problems give most of the rows; the difficulty-2 ones keep the test's kind of problem in.
    train_problems: int = field(default=150, metadata={"help": "arith train problems (difficulty 2, as the test)"})
    easy_problems: int = field(default=130, metadata={
        "help": "arith train problems of difficulty 1 (at most ~140 exist; 0 to skip)"})
    reject_samples: int = field(default=4, metadata={"help": "samples per train problem"})
    reject_decoding: str = field(default="static:temperature=0.7", metadata={
        "help": "preset for reject sampling (SmolLM2 rarely solves arith at T=1)"})
    train_epochs: int = field(default=3, metadata={"help": "epochs over the training rows (a checkpoint each)"})
    # Evaluation: held-out arith (test split); checkpoints are compared on the dev split.
    eval_limit: int = field(default=150, metadata={"help": "held-out arith problems evaluated (test split)"})
    dev_limit: int = field(default=60, metadata={"help": "arith dev problems for comparing the checkpoints"})
    seeds: int = field(default=1, metadata={"help": "seeds per evaluation"})
    samples: int = field(default=3, metadata={"help": "samples per problem per seed"})
    max_tokens: int = field(default=128, metadata={"help": "max generated tokens per sample"})
    sweep_temperatures: str = field(default="0.25,0.5,0.75", metadata={
        "help": "static sweep's temperature grid at P = 1 (greedy is always added; T = 1 is default sampling, "
                "evaluated beside it)"})
    sweep_top_ps: str = field(default="0.5,0.75,0.9", metadata={"help": "top-p grid at the best temperature"})
    bench_tasks: str = field(default="aime24,mmlu_pro", metadata={
        "help": "real benchmarks for the slice (comma-separated; empty to skip)"})
    bench_limit: int = field(default=2, metadata={"help": "problems per real benchmark"})
    efficiency_repeats: int = field(default=5, metadata={
        "help": "paired repeats of the efficiency bench (the overhead's interval rests on them)"})
    steer_prompts: int = field(default=24, metadata={
        "help": "held-out prompts of configs/steer/heldout.yaml run under each steering command"})
    steer_seeds: int = field(default=4, metadata={
        "help": "samples per (held-out prompt, command) in the steering measurement: a prompt's mean T is "
                "over all of them"})
    steer_train_prompts: int = field(default=32, metadata={
        "help": "prompts of configs/steer/train.yaml that steering training samples completions for"})
    steer_train_steps: int = field(default=300, metadata={"help": "optimizer steps of steering training"})
    data_dir: str | None = field(default=None, metadata={
        "help": "local benchmark files (else $AUTODECO_DATA_DIR, else the hub)"})
    backend: str = field(default="vllm", metadata={"help": "generation backend", "choices": ("hf", "vllm")})

    def check(self) -> None:
        """Every size, the grids, the tasks and the preset: a bad value fails before step 1, not
        twenty minutes in."""
        from harness.decoding import PresetError, parse_spec
        from harness.sweep import check_grid
        from tasks import expand
        from tasks.data import ARITH_MAX_N

        for name, low, high in (("train_problems", 1, ARITH_MAX_N), ("easy_problems", 0, ARITH_MAX_N),
                                ("reject_samples", 1, MAX_SAMPLES), ("train_epochs", 1, 10_000),
                                ("eval_limit", 1, MAX_PROBLEMS), ("dev_limit", 1, MAX_PROBLEMS),
                                ("seeds", 1, MAX_SEEDS), ("samples", 1, MAX_SAMPLES), ("max_tokens", 1, MAX_TOKENS),
                                ("bench_limit", 1, MAX_PROBLEMS), ("efficiency_repeats", 1, 1000),
                                ("steer_prompts", 1, MAX_PROBLEMS), ("steer_seeds", 1, MAX_SEEDS),
                                ("steer_train_prompts", 1, MAX_PROBLEMS),
                                ("steer_train_steps", 1, 1_000_000)):
            if not low <= getattr(self, name) <= high:
                raise FieldError(name, f"must be in {low}..{high}, got {getattr(self, name)}")
        for name, high in (("sweep_temperatures", 100.0), ("sweep_top_ps", 1.0)):
            try:
                check_grid(getattr(self, name), high)
            except ValueError as err:
                raise FieldError(name, str(err)) from None
        try:
            if self.bench_tasks:
                expand(self.bench_tasks)
        except UserError as err:
            raise FieldError("bench_tasks", str(err)) from None
        try:
            parse_spec(self.reject_decoding)
        except PresetError as err:
            raise FieldError("reject_decoding", str(err)) from None


class DemoStepFailed(UserError, RuntimeError):
    """A step's command exited non-zero (its own message was printed above)."""


def autodeco(argv: list[str]) -> None:
    """Run one `autodeco` command line in this process; a non-zero exit stops the demo."""
    from harness.cli import main

    print("\n$ autodeco " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise DemoStepFailed(f"`autodeco {' '.join(argv)}` exited with {code}")


def eval_args(cfg: DemoConfig, model: str, tasks: str, decoding: str, out: Path, limit: int,
              samples: int | None = None) -> list[str]:
    args = ["eval", "--model", model, "--tasks", tasks, "--decoding", decoding, "--seeds", str(cfg.seeds),
            "--samples", str(samples or cfg.samples), "--limit", str(limit), "--max-tokens", str(cfg.max_tokens),
            "--backend", cfg.backend, "--out", str(out)]
    return args + (["--data-dir", cfg.data_dir] if cfg.data_dir else [])


def train_config(command: str = "train", name: str = "smollm2_cpu") -> list[str]:
    """`--config configs/train/<name>.yaml` when the repo ships it (run from the repo root)."""
    path = Path(f"configs/train/{name}.yaml")
    return [command, "--config", str(path)] if path.is_file() else [command]


def heldout_config() -> list[str]:
    """`--config configs/steer/heldout.yaml` (prompts and wordings steering training never saw)."""
    path = Path("configs/steer/heldout.yaml")
    return ["--config", str(path)] if path.is_file() else []


def reject_sample_args(cfg: DemoConfig, difficulty: int, problems: int, out: Path) -> list[str]:
    return ["data", "reject-sample", "--model", MODEL, "--task", IN_DOMAIN, "--difficulty", str(difficulty),
            "--limit", str(problems), "--samples", str(cfg.reject_samples), "--decoding", cfg.reject_decoding,
            "--max-tokens", str(cfg.max_tokens), "--backend", cfg.backend, "--out", str(out)]


def steps(cfg: DemoConfig) -> list[tuple[str, callable]]:
    """The pipeline as (title, thunk) pairs, in order."""
    out = Path(cfg.out)
    init, train, runs, steer = out / "autodeco-init", out / "train", out / "runs", out / "steer"
    trained = train / "final"
    data = [out / "data" / "train.jsonl"] + ([out / "data" / "train_easy.jsonl"] if cfg.easy_problems else [])

    def reject_sample():
        autodeco(reject_sample_args(cfg, 2, cfg.train_problems, data[0]))
        if cfg.easy_problems:
            autodeco(reject_sample_args(cfg, 1, cfg.easy_problems, data[1]))

    def evaluate_all():
        # One engine for every preset of the in-domain comparison: the AutoDeco model with its heads
        # off is the base model (greedy, default), on for autodeco and the two ablations.
        autodeco(eval_args(cfg, str(trained), IN_DOMAIN, ",".join(METHODS), runs, cfg.eval_limit))
        # SimpleDeco's MeanShift: the base model at the mean T and P that AutoDeco itself predicted here.
        autodeco(eval_args(cfg, str(trained), IN_DOMAIN, meanshift_spec(runs / trained.name), runs, cfg.eval_limit))
        if cfg.bench_tasks:  # the pipeline on real benchmarks: a handful of problems, anecdotal by design
            autodeco(eval_args(cfg, str(trained), cfg.bench_tasks, "greedy,default,autodeco", runs, cfg.bench_limit))

    def steering():
        # Both models on one engine: held-out prompts and wordings (configs/steer/heldout.yaml).
        autodeco(["steer", "--model", f"{trained},{steer}"] + heldout_config() + [
            "--limit", str(cfg.steer_prompts), "--seeds", str(cfg.steer_seeds), "--max-tokens", "48",
            "--backend", cfg.backend, "--out", str(runs)])
        # What steering training cost without a command: the same in-domain problems, seeds and samples
        # as train/final's autodeco evaluation above (the steering report pairs the two).
        autodeco(eval_args(cfg, str(steer), IN_DOMAIN, "autodeco", runs, cfg.eval_limit))

    def reports():
        from reports.index import Inputs, Options, run_all, write_index

        # The trained heads live in train/final, so the runner names that model "final": show it
        # in SmolLM2's block, as the paper's tables put AutoDeco under its base model.
        inputs = Inputs.scan([runs, out / "candidates", train, out / "efficiency"], {trained.name: MODEL})
        done = run_all(inputs, out / "reports", Options(paper="table1"))
        write_index(out / "reports", done, header=f"`autodeco demo` output; config: {cfg}")

    sweep = ["sweep", "--model", str(trained), "--tasks", IN_DOMAIN, "--temperatures", cfg.sweep_temperatures,
             "--top-ps", cfg.sweep_top_ps, "--seeds", str(cfg.seeds), "--samples", str(cfg.samples),
             "--limit", str(cfg.eval_limit), "--max-tokens", str(cfg.max_tokens), "--backend", cfg.backend,
             "--out", str(runs)]
    return [
        ("prepare SmolLM2", lambda: autodeco(["model", "prepare"])),
        ("construct AutoDeco", lambda: autodeco(["construct", "--base", MODEL, "--out", str(init)])),
        ("reject-sample training data (arith train split, difficulties 2 and 1)", reject_sample),
        ("train the heads", lambda: autodeco(
            train_config() + ["--model", str(init), "--train_file", ",".join(map(str, data)),
                              "--output_dir", str(train), "--num_train_epochs", str(cfg.train_epochs),
                              "--save_strategy", "epoch"])),
        ("compare the checkpoints on the dev split (never the test problems)", lambda: autodeco(
            eval_args(cfg, str(train), DEV, "autodeco", out / "candidates", cfg.dev_limit, samples=2))),
        ("evaluate greedy / default / autodeco / ablations / meanshift on held-out arith", evaluate_all),
        ("static sweep: greedy + T at P=1, then P at best T (test-set oracle + cross-validated)",
         lambda: autodeco(sweep)),
        ("efficiency bench", lambda: autodeco(
            ["bench", "efficiency", "--model", MODEL, "--heads", str(trained), "--prompt-lengths", "128,512",
             "--gen-tokens", "16", "--repeats", str(cfg.efficiency_repeats),
             "--out", str(out / "efficiency" / "efficiency.json")])),
        ("steering training: the heads taught to follow decoding commands (ranking loss)", lambda: autodeco(
            train_config("train-steer", "smollm2_steer") + [
                "--init_from", str(trained), "--train_file", ",".join(map(str, data)), "--output_dir", str(steer),
                # a third of the prompts: the no-command T drifts more, so a heavier anchor (measured:
                # README "Steering by commands")
                "--max_prompts", str(cfg.steer_train_prompts), "--anchor_weight", "3", "--completions_per_prompt", "1",
                "--max_steps", str(cfg.steer_train_steps), "--sample_backend", cfg.backend])),
        ("steering: T/P under held-out commands, before and after steering training (Table 4)", steering),
        ("write every report + index.md", reports),
    ]


def meanshift_spec(autodeco_runs: Path) -> str:
    """``meanshift:source=<the AutoDeco in-domain results file>,task=arith`` (its newest such file)."""
    found = sorted(autodeco_runs.glob("results_*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        decoding = read_json(path).get("config", {}).get("decoding", {})
        if decoding.get("name") == "autodeco" and IN_DOMAIN in read_json(path).get("results", {}):
            return f"meanshift:source={path},task={IN_DOMAIN}"
    raise DemoStepFailed(f"no autodeco results for {IN_DOMAIN} under {autodeco_runs} to take MeanShift's T and P from")


def headline(out: Path) -> list[str]:
    """Each method's Pass@1 with its 95% interval over problems, and AutoDeco's paired differences
    with every baseline (harness.stats), on held-out arith, read back from the result files."""
    from reports.paired import paired_lines
    from reports.pass1 import interval
    from reports.render import Interval
    from reports.runs import ReportInputError, find_runs, find_sweeps
    from reports.steering import find_steering, summary_lines

    runs = find_runs([out / "runs"])
    steering = find_steering([out / "runs"])  # its lines name the folders as they are: before the renaming below
    steering_lines = ["    " + text for text in summary_lines(steering, runs)] if steering else []
    sweeps = [s for s in find_sweeps([out / "runs"]) if s.task == IN_DOMAIN]
    for item in [*runs, *sweeps]:  # the trained heads' folder is `final`: put it in SmolLM2's block
        item.model_name = MODEL if item.model_name == "final" else item.model_name
    cells = {}
    for run in runs:  # SmolLM2's block only: the steering-trained heads' own eval (steer-final) is its report's
        if not run.sweep and IN_DOMAIN in run.tasks and run.model_name == MODEL:
            cells[run.label] = (interval(run.tasks[IN_DOMAIN]), run.tasks[IN_DOMAIN])
    lines = []

    def line(name: str, cell, how: str = "") -> None:
        ci = "" if cell.low is None else f" [{cell.low:5.1f}, {cell.high:5.1f}]"
        flag = "  (anecdotal: < 10 problems)" if cell.anecdotal else ""
        lines.append(f"  {name:<16} Pass@1 = {cell.mean:5.1f}%{ci}  n = {cell.n}{how}{flag}")

    for label, (cell, result) in sorted(cells.items(), key=lambda kv: _order(kv[0])):
        size = f" problems × {int(result.get('n_samples_per_doc') or 0)} samples"
        line(label, cell, size)
    for sweep in sweeps:
        cv = sweep.cross_validated
        if cv and cv.get("pass@1") is not None:
            line("static (CV)", Interval(100 * cv["pass@1"], None, 100 * cv["ci_low"], 100 * cv["ci_high"],
                                         cv["n_problems"]), "  (grid tuned on held-out folds)")
        best = "greedy" if sweep.best_temperature == 0 else f"T={sweep.best_temperature:g}, P={sweep.best_top_p:g}"
        lines.append(f"  {'oracle':<16} Pass@1 = {100 * sweep.best_pass1:5.1f}%  ({best}, tuned on the test "
                     f"problems themselves: optimistic)")
    lines.append("  paired differences (AutoDeco − baseline, same problems, 95% CI, paired t-test; * = p < 0.05):")
    try:
        lines += ["    " + text for text in paired_lines(runs, sweeps, IN_DOMAIN, "autodeco", MODEL)]
    except ReportInputError as err:
        lines.append(f"    ({err})")
    lines += verdict_lines(runs, sweeps)
    lines += efficiency_lines(out / "efficiency" / "efficiency.json")
    if steering_lines:
        lines.append("  steering by commands (held-out prompts and wordings; ΔT/ΔP vs no command, consistency):")
        lines += steering_lines
    return lines


def verdict_lines(runs, sweeps) -> list[str]:
    """What the comparisons say, in words: AutoDeco against default sampling and the best static setting."""
    from reports.paired import comparisons

    found = {baseline: est for model, _task, method, baseline, est in comparisons(runs, sweeps, [IN_DOMAIN])
             if method == "autodeco" and model == MODEL}
    lines = ["  verdict:"]
    default = found.get("default")
    if default is not None:
        lines.append(f"    AutoDeco vs default sampling: {_say(default)}")
    static = {name: est for name, est in found.items() if name in ("greedy", "static (CV)", "oracle")}
    if static:
        worst_name, worst = min(static.items(), key=lambda kv: kv[1].mean)
        below = [name for name, est in static.items() if est.significant and est.mean < 0]
        if below:
            lines.append(f"    AutoDeco is significantly BELOW the best static setting(s) {', '.join(below)} "
                         f"on SmolLM2 (a finding, not hidden): vs {worst_name} {_say(worst)}")
        else:
            lines.append(f"    AutoDeco is not significantly below any static setting (greedy, the cross-validated "
                         f"grid, the test-set oracle); closest: vs {worst_name} {_say(worst)}")
    return lines


def _say(est) -> str:
    p = "< 0.001" if est.p_value < 0.001 else f"{est.p_value:.3f}"
    where = "above" if est.mean > 0 else "below"
    how = f"significantly {where}" if est.significant else "no significant difference"
    return f"{how} ({100 * est.mean:+.1f} pp [{100 * est.ci_low:+.1f}, {100 * est.ci_high:+.1f}], p = {p}, n = {est.n})"


def efficiency_lines(path: Path) -> list[str]:
    """The heads' latency overhead with its interval over paired repeats (never a bare noisy number)."""
    if not path.is_file():
        return []
    from reports.efficiency import latency_overhead

    data = read_json(path)
    by = {(r["prompt_length"], r["method"]): r for r in data["rows"]}
    lines = [f"  efficiency (HF, {data.get('threads')} threads, {data['gen_tokens']} new tokens, "
             f"{data['repeats']} paired repeats): latency overhead of the heads"]
    for length in sorted({length for length, _ in by}):
        base, new = by.get((length, "default")), by.get((length, "autodeco"))
        if base and new:
            cell = latency_overhead(base, new)
            if getattr(cell, "low", None) is not None:
                noise = " (holds 0: not measurable)" if cell.low <= 0 <= cell.high else ""
                lines.append(f"    prompt {length}: {cell.mean:+.1f}% [95% CI {cell.low:+.1f}, {cell.high:+.1f}]{noise}")
    return lines


def _order(label: str) -> tuple[int, str]:
    order = ["greedy", "default", "meanshift", "autodeco-temp", "autodeco-top-p", "autodeco"]
    base = label.split("(")[0].split(":")[0]
    return (order.index(base) if base in order else len(order), label)


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
    load = os.getloadavg()[0]
    atomic_write_json(out / "demo_timings.json", {"steps_s": timings, "total_s": total, "load_avg_1min_end": load,
                                                  "cpus": os.cpu_count()}, indent=1)
    viewer = out / "reports" / "viewer.html"
    print(f"\nDemo finished in {total / 60:.1f} min (load average {load:.1f} on {os.cpu_count()} CPUs at the end; "
          f"the default profile's budget: {BUDGET_MIN} min on 2 idle cores). Open {out / 'reports' / 'index.md'}"
          + (f" and, in a browser, {viewer}" if viewer.exists() else ""))
    print(f"Headline (held-out {IN_DOMAIN}, SmolLM2-135M-Instruct, measured):")
    print("\n".join(headline(out)) or "  (no in-domain results found)")
    return 0


def profile_path(name: str) -> Path:
    """configs/demo/<name>.yaml, or a clear error listing the profiles."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise UserError(f"--profile {name}: no {path} (profiles: {known})")
    return path


def cmd_demo(args) -> int:
    from harness.core.files import check_output_folder

    if args.profile and args.config:
        raise UserError("--profile and --config both name a config: give one (a profile is configs/demo/NAME.yaml)")
    source = profile_path(args.profile) if args.profile else None
    config = configs.from_args(DemoConfig, args, config_path=source)
    check_output_folder(config.out, "--out")
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
                    "compare the training checkpoints on the dev split, measure efficiency and steering by "
                    "commands, and write every report with an index.md; the headline gives each method's "
                    "Pass@1 with its 95%% interval and AutoDeco's paired differences. Numbers are whatever "
                    "is measured. The defaults are the 30-minute CPU profile (2 idle cores); "
                    "--profile full is the paper-sized run (configs/demo/full.yaml: hours on CPU, a GPU "
                    "with --backend vllm).",
        epilog="examples:\n  autodeco demo                          # ~30 min on 2 CPU cores (make demo)\n"
               "  autodeco demo --profile full --out outputs/demo_full\n"
               "  autodeco demo --eval-limit 50 --samples 2   # a quicker look",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    demo.add_argument("--profile", help="a named config: configs/demo/NAME.yaml (full: paper-like sizes)")
    configs.add_arguments(demo, DemoConfig)
    demo.set_defaults(func=cmd_demo)
