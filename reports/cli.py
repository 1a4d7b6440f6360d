"""`autodeco report <kind>`, `autodeco demo`, `autodeco bench efficiency`.

Handlers import matplotlib / torch lazily so `autodeco --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPORT_KINDS = ("pass1", "passk", "oracle", "ablation", "efficiency", "traces", "steering", "training", "compare",
                "all")

REPORT_HELP = """\
Regenerate the paper's tables and figures from result files (never from the runner):
  pass1       Tables 1-2: rows model × method, columns tasks + average, mean ± std, best bold
  passk       Tables 5-7: Pass@k for every k present, with AutoDeco's relative error reduction
  oracle      Figure 3: accuracy vs T (P=1) and vs P (best T) per model × task, AutoDeco as a line
  ablation    Figure 4: default vs temp head only vs top-p head only vs both
  efficiency  Table 3 + plot from efficiency.json (`autodeco bench efficiency`)
  traces      Figure 5: per-token predicted T and P from the samples files' traces
  steering    Table 4 + Figure 5: T/P under natural-language commands (steer_*.json from
              `autodeco steer`) next to the paper's Table 4
  training    Figure 6: loss curves (log_history.jsonl) + evaluated checkpoint candidates
  compare     one table and one plot comparing any set of runs
  all         every kind that has inputs, plus index.md
Tables are written as .md, .tex (booktabs) and .csv; figures as .png and .pdf.

Inputs: --runs folders (results files and the rest), and/or --wandb runs logged by `autodeco
eval/sweep` (a wandb/offline-run-* folder, any folder holding such runs, or entity/project[/run_id]
through the W&B API). W&B runs give the results-file numbers (config + `<task>/<metric>` summary)
to every table; they hold no samples or sweep_summary files, so `traces` and `oracle` need --runs.
Training runs (job_type train) are skipped with a note.
"""


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    from harness.cli import CLIError

    out = {}
    for value in values or []:
        if "=" not in value:
            raise CLIError(f"{flag} takes OURS=OTHER, got '{value}'")
        key, other = value.split("=", 1)
        out[key] = other
    return out


def cmd_report(args) -> int:
    from harness.cli import CLIError
    from reports.index import REPORTS, Inputs, Options, run_all, write_index
    from reports.runs import ReportInputError

    if not args.runs and not args.wandb:
        raise CLIError("give --runs DIR... and/or --wandb SRC (see `autodeco report --help`)")
    try:
        inputs = Inputs.scan(args.runs or [], _pairs(args.alias, "--alias"))
        if args.wandb:
            from reports.wandb_runs import find_wandb_runs

            inputs.add_runs(find_wandb_runs(args.wandb, note=lambda line: print(line, file=sys.stderr)))
    except ReportInputError as err:
        raise CLIError(str(err)) from err
    options = Options(tasks=args.tasks.split(",") if args.tasks else None, paper=args.paper,
                      paper_model=_pairs(args.paper_model, "--paper-model"), pair=_pairs(args.pair, "--pair"),
                      ks=[int(k) for k in args.ks.split(",")] if args.ks else None, max_lines=args.max_lines)
    out = Path(args.out)
    if args.kind == "all":
        done = run_all(inputs, out, options)
        sources = [str(d) for d in inputs.dirs] + [f"W&B {w}" for w in args.wandb or []]
        index = write_index(out, done, header="Inputs: " + ", ".join(sources))
        print(f"wrote {index}")
        return 0
    try:
        paths = REPORTS[args.kind][1](inputs, out, options)
    except (ValueError, ReportInputError) as err:
        raise CLIError(f"{args.kind}: {err}") from err
    for path in paths:
        print(path)
    return 0


def cmd_demo(args) -> int:
    from reports.demo import DemoConfig, run_demo

    config = DemoConfig(out=Path(args.out), train_problems=args.train_problems, reject_samples=args.reject_samples,
                        reject_decoding=args.reject_decoding,
                        train_steps=args.train_steps, eval_limit=args.eval_limit, seeds=args.seeds,
                        samples=args.samples, max_tokens=args.max_tokens, bench_limit=args.bench_limit,
                        bench_tasks=args.bench_tasks.split(",") if args.bench_tasks else [],
                        sweep_grid=args.sweep_grid, steer_prompts=args.steer_prompts, data_dir=args.data_dir,
                        backend=args.backend)
    from harness.cli import CLIError
    from reports.demo import DemoStepFailed

    try:
        return run_demo(config)
    except DemoStepFailed as err:
        raise CLIError(f"{err} (see its message above; a step with no training rows needs more "
                       f"--reject-samples / --max-tokens)") from err


def cmd_bench_efficiency(args) -> int:
    from harness.cli import CLIError
    from reports.efficiency import PAPER_LENGTHS, measure_efficiency, parse_lengths

    try:
        lengths = parse_lengths(PAPER_LENGTHS if args.paper_sizes else args.prompt_lengths)
    except ValueError as err:
        raise CLIError(str(err)) from err
    gen_tokens = 1000 if args.paper_sizes and args.gen_tokens is None else (args.gen_tokens or 32)
    if gen_tokens < 1 or args.repeats < 1:
        raise CLIError("--gen-tokens and --repeats must be >= 1")
    try:
        result = measure_efficiency(args.model, lengths, gen_tokens, args.repeats, args.device, args.dtype,
                                    args.heads, args.threads, Path(args.out))
    except ValueError as err:
        raise CLIError(str(err)) from err
    by = {(r["prompt_length"], r["method"]): r for r in result["rows"]}
    print(f"{'prompt':>7} {'method':>9} {'FLOPs':>10} {'s/1k tok':>9} {'peak MB':>8}")
    for (length, method), r in sorted(by.items()):
        print(f"{length:>7} {method:>9} {r['flops']:>10.3e} {r['latency_s_per_1k']:>9.2f} {r['peak_memory_mb']:>8.0f}")
    for length in lengths:
        base, new = by[(length, "default")], by[(length, "autodeco")]
        print(f"prompt {length}: latency ratio autodeco/default = "
              f"{new['latency_s'] / base['latency_s']:.3f}, FLOPs ratio = {new['flops'] / base['flops']:.6f}, "
              f"peak memory +{new['peak_memory_mb'] - base['peak_memory_mb']:.1f} MB")
    for check in result["flops_check"]:
        print(f"FLOPs check ({check['method']}, full forward of {check['prompt_length']} tokens): "
              f"measured/analytic = {check['ratio']:.4f}")
    print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    """Add `report` and `demo` to the `autodeco` parser."""
    report = subparsers.add_parser("report", help="regenerate the paper's tables and figures from result files "
                                                   "or W&B runs",
                                   description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("kind", choices=REPORT_KINDS, help="which table/figure (see above)")
    report.add_argument("--runs", nargs="+", metavar="DIR",
                        help="folders (searched recursively) with results_*.json, samples_*.jsonl, "
                             "sweep_summary_*.json, efficiency.json, log_history.jsonl, steer_*.json")
    report.add_argument("--wandb", action="append", metavar="SRC",
                        help="W&B evaluation runs as rows: a wandb/offline-run-* folder, a folder holding "
                             "runs (searched recursively), or entity/project[/run_id] (W&B API); "
                             "repeatable; --runs may then be omitted")
    report.add_argument("--out", required=True, metavar="DIR", help="where tables and figures go")
    report.add_argument("--alias", action="append", metavar="NAME=SHOWN",
                        help="show model NAME as SHOWN, e.g. an AutoDeco folder as its base model so "
                             "greedy/default/autodeco share a block (repeatable)")
    report.add_argument("--tasks", help="comma-separated task columns (default: all present)")
    report.add_argument("--paper", choices=("table1", "table2"),
                        help="also write the paper's published table and ours-vs-paper deltas")
    report.add_argument("--paper-model", action="append", metavar="OURS=PAPER",
                        help="pair one of our model names with a paper model for the deltas "
                             "(e.g. r1-distill-qwen-7b=R1-Distill-Qwen-7B); repeatable")
    report.add_argument("--pair", action="append", metavar="BASE=AUTODECO",
                        help="oracle: which AutoDeco model's line to draw on a base model's sweep")
    report.add_argument("--ks", help="passk: comma-separated k values (default: every k > 1 present)")
    report.add_argument("--max-lines", type=int, default=6, help="traces: generations to draw")
    report.set_defaults(func=cmd_report)

    from reports.demo import DemoConfig  # light: no torch at import

    d = DemoConfig()
    demo = subparsers.add_parser(
        "demo", help="the whole mini-paper on CPU with SmolLM2 (prepare → train → eval → sweep → reports)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Prepare SmolLM2, construct AutoDeco, reject-sample training data on the synthetic "
                    "arith task, train the heads, evaluate greedy/default/autodeco (+ ablations) on the "
                    "held-out arith split and a slice of the real benchmarks, run a small oracle sweep, "
                    "evaluate every training checkpoint, measure efficiency and steering by commands, "
                    "and write every report with an index.md. Numbers are whatever is measured "
                    "(about 24 min on 2 idle CPU cores with the defaults).")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--train-problems", type=int, default=d.train_problems, help="arith train problems to sample")
    demo.add_argument("--reject-samples", type=int, default=d.reject_samples, help="samples per train problem")
    demo.add_argument("--reject-decoding", default=d.reject_decoding,
                      help="preset for reject sampling (default %(default)s; SmolLM2 rarely solves arith at T=1)")
    demo.add_argument("--train-steps", type=int, default=d.train_steps, help="optimizer steps for the heads")
    demo.add_argument("--eval-limit", type=int, default=d.eval_limit, help="held-out arith problems evaluated")
    demo.add_argument("--seeds", type=int, default=d.seeds, help="seeds per evaluation")
    demo.add_argument("--samples", type=int, default=d.samples, help="samples per problem per seed")
    demo.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max generated tokens per sample")
    demo.add_argument("--bench-tasks", default=",".join(d.bench_tasks),
                      help="real benchmarks for the slice (comma-separated; empty to skip)")
    demo.add_argument("--bench-limit", type=int, default=d.bench_limit, help="problems per real benchmark")
    demo.add_argument("--sweep-grid", default=d.sweep_grid, help="oracle grid for T and P (start:stop:step)")
    demo.add_argument("--steer-prompts", type=int, default=d.steer_prompts,
                      help="prompts of configs/steer/default.yaml run under each steering command")
    demo.add_argument("--data-dir", help="local benchmark files (else $AUTODECO_DATA_DIR, else the hub)")
    demo.add_argument("--backend", default=d.backend, choices=("hf", "vllm"), help="generation backend")
    demo.set_defaults(func=cmd_demo)


def register_bench(bench_subparsers) -> None:
    """`autodeco bench efficiency`."""
    bench = bench_subparsers.add_parser(
        "efficiency", help="FLOPs, latency per 1k tokens and peak memory with vs without the heads",
        description="Runs the same HF backend with the base model and with AutoDeco on the same weights "
                    "for each prompt length; writes efficiency.json for `autodeco report efficiency`. "
                    "Defaults are sized for a CPU; --paper-sizes uses the paper's 1k-24k prompts and "
                    "1000 generated tokens (GPU).")
    bench.add_argument("--model", default="smollm2", help="base model (name, folder or hub id)")
    bench.add_argument("--heads", help="a trained heads-only folder (default: freshly constructed heads)")
    bench.add_argument("--prompt-lengths", default="256,1k", help="comma-separated, k = 1024 (default 256,1k)")
    bench.add_argument("--paper-sizes", action="store_true", help="prompt lengths 1k,2k,4k,8k,16k,24k, 1000 tokens")
    bench.add_argument("--gen-tokens", type=int, help="generated tokens per run (default 32; 1000 with --paper-sizes)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per method and length (median)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    bench.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    bench.add_argument("--threads", type=int, help="torch CPU threads")
    bench.add_argument("--out", default="outputs/efficiency/efficiency.json", help="where efficiency.json goes")
    bench.set_defaults(func=cmd_bench_efficiency)
