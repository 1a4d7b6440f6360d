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

from harness.cli.common import MAX_PROBLEMS, MAX_SAMPLES, MAX_SEEDS, MAX_TOKENS
from harness.core import config as configs
from harness.core.config import FieldError
from harness.core.errors import UserError
from harness.core.files import atomic_write_json, read_json

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
        """Every size, the grid, the tasks and the preset: a bad value fails before step 1, not
        twenty minutes in."""
        from harness.decoding import PresetError, parse_spec
        from harness.sweep import check_grid
        from tasks import expand
        from tasks.data import ARITH_MAX_N

        for name, high in (("train_problems", ARITH_MAX_N), ("reject_samples", MAX_SAMPLES),
                           ("train_steps", 1_000_000), ("eval_limit", MAX_PROBLEMS), ("seeds", MAX_SEEDS),
                           ("samples", MAX_SAMPLES), ("max_tokens", MAX_TOKENS), ("bench_limit", MAX_PROBLEMS),
                           ("steer_prompts", MAX_PROBLEMS)):
            if not 1 <= getattr(self, name) <= high:
                raise FieldError(name, f"must be in 1..{high}, got {getattr(self, name)}")
        try:
            check_grid(self.sweep_grid, 1.0)  # the same grid serves T and top-p
        except ValueError as err:
            raise FieldError("sweep_grid", str(err)) from None
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
        # SimpleDeco's MeanShift: the base model at the mean T and P that AutoDeco itself predicted here.
        autodeco(eval_args(cfg, MODEL, IN_DOMAIN, meanshift_spec(runs / trained.name), runs, cfg.eval_limit))
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
        ("evaluate greedy / default / autodeco (+ ablations) / meanshift", evaluate_all),
        ("static sweep: greedy + T at P=1, then P at best T (test-set oracle + cross-validated)",
         lambda: autodeco(sweep)),
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

    runs = find_runs([out / "runs"])
    sweeps = [s for s in find_sweeps([out / "runs"]) if s.task == IN_DOMAIN]
    for run in runs:  # the trained heads' folder is `final`: put it in SmolLM2's block
        run.model_name = MODEL if run.model_name == "final" else run.model_name
    cells = {}
    for run in runs:
        if not run.sweep and IN_DOMAIN in run.tasks:
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
    lines.append("  paired differences (AutoDeco − baseline, same problems, 95% CI, paired t-test):")
    try:
        lines += ["    " + text for text in paired_lines(runs, sweeps, IN_DOMAIN, "autodeco", MODEL)]
    except ReportInputError as err:
        lines.append(f"    ({err})")
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
    atomic_write_json(out / "demo_timings.json", {"steps_s": timings, "total_s": total}, indent=1)
    viewer = out / "reports" / "viewer.html"
    print(f"\nDemo finished in {total / 60:.1f} min. Open {out / 'reports' / 'index.md'}"
          + (f" and, in a browser, {viewer}" if viewer.exists() else ""))
    print(f"Headline (held-out {IN_DOMAIN}, SmolLM2-135M-Instruct, measured):")
    print("\n".join(headline(out)) or "  (no in-domain results found)")
    return 0


def cmd_demo(args) -> int:
    from harness.core.files import check_output_folder

    config = configs.from_args(DemoConfig, args)
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
                    "evaluate every training checkpoint, measure efficiency and steering by commands, "
                    "and write every report with an index.md. Numbers are whatever is measured "
                    "(about 24 min on 2 idle CPU cores with the defaults).")
    demo.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    configs.add_arguments(demo, DemoConfig)
    demo.set_defaults(func=cmd_demo)
