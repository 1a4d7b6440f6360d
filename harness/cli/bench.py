"""`autodeco bench <name>`: every benchmark's options; the measurements live in `harness.bench`.

Each benchmark prints ratios (the quantity a target is stated in), not raw timings alone.
"""

from __future__ import annotations

import argparse
import importlib
import re

from harness.cli.common import MAX_PROBLEMS, MAX_SAMPLES, MAX_SEEDS, MAX_TOKENS, int_at_least

DTYPES = ("float32", "bfloat16", "float16")


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expects cpu, cuda or cuda:N, got {text!r}")
    return text


def _lengths(text: str) -> str:
    from harness.bench.efficiency import parse_lengths

    try:
        parse_lengths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _backend_names(text: str) -> str:
    from harness.backends import BACKENDS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(unknown) or repr(text)}; known: "
                                         f"{', '.join(BACKENDS)}")
    return ",".join(names)


def _run(target: str):
    """A handler that imports ``module:function`` of `harness.bench` only when the benchmark runs."""
    module, _, function = target.partition(":")

    def handler(args):
        return getattr(importlib.import_module(f"harness.bench.{module}"), function)(args)

    return handler


def _engine_common(p: argparse.ArgumentParser, samples: int, max_tokens: int) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2, a configs/models preset, a folder or a hub id")
    p.add_argument("--task", default="arith", help="task (default: arith, synthetic, no data needed)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int_at_least(1, MAX_PROBLEMS), default=2, help="problems (default 2)")
    p.add_argument("--seeds", type=int_at_least(1, MAX_SEEDS), default=1)
    p.add_argument("--samples", type=int_at_least(1, MAX_SAMPLES), default=samples,
                   help=f"samples per problem (default {samples})")
    p.add_argument("--max-tokens", type=int_at_least(1, MAX_TOKENS), default=max_tokens,
                   help=f"tokens per sample (default {max_tokens})")
    p.add_argument("--decoding", default="default")
    p.add_argument("--out", help="write the measurement as JSON into this folder")


def _items(text: str, kind, what: str) -> list:
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one of {what}")
    return values


def _floats(text: str) -> list[float]:
    values = _items(text, float, "numbers in (0, 1)")
    if not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every top-p must be in (0, 1), got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    values = _items(text, int, "positive integers")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every thread count must be >= 1, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    values = _items(text, str.strip, "names")
    unknown = [v for v in values if v not in ("hf", "vllm")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; choose from hf, vllm")
    return values


def register(subparsers) -> None:
    """Add `bench` and its benchmarks to the `autodeco` parser."""
    parent = subparsers.add_parser("bench", help="benchmarks that print measured ratios (speed, memory)")
    bench_subparsers = parent.add_subparsers(dest="bench", metavar="<benchmark>")
    parent.set_defaults(func=lambda args: parent.print_help() or 2)
    _decode(bench_subparsers)
    _nucleus(bench_subparsers)
    _engine(bench_subparsers)
    _precision(bench_subparsers)
    _training(bench_subparsers)
    _efficiency(bench_subparsers)
    _grading(bench_subparsers)


def _decode(bench_subparsers) -> None:
    bench = bench_subparsers.add_parser(
        "decode", help="wall time of AutoDeco sampling / default sampling (goal <= 1.01)",
        description="Same prompts, same number of generated tokens (no EOS stop), HF backend: time "
        "AutoDeco sampling (heads + exact nucleus inside forward) against default sampling (T=1, P=1) "
        "of the base, interleaving repeats; prints the median ratio and the per-step cost of the "
        "nucleus alone vs a naive full sort.",
    )
    bench.add_argument("--model", default="smollm2", help="base model (fresh heads are added)")
    bench.add_argument("--batch-size", type=int_at_least(1, 4096), default=16)
    bench.add_argument("--context", type=int_at_least(1, MAX_TOKENS), default=256, help="prompt length in tokens")
    bench.add_argument("--new-tokens", type=int_at_least(1, MAX_TOKENS), default=32,
                       help="generated tokens per sequence")
    bench.add_argument("--repeats", type=int_at_least(1, 1000), default=5, help="interleaved repeats (median reported)")
    bench.add_argument("--threads", type=int_at_least(0, 1024), default=0, help="torch threads (0: torch's default)")
    bench.add_argument("--seed", type=int_at_least(0), default=0)
    bench.set_defaults(func=_run("decode:run"))


def _nucleus(bench_subparsers) -> None:
    bench = bench_subparsers.add_parser(
        "nucleus", help="AutoDeco / default sampling with the top-p head forced to realistic P (goal <= 1.01)",
        description="Heads forced to T = 1 and each P of --top-ps (and, with --heads, a trained checkpoint's own "
        "T and P), SmolLM2's real logits from natural-text prompts; per engine and thread count a child process "
        "times AutoDeco sampling against default sampling (interleaved repeats: the median ratio and the 95% "
        "interval of the ratios' geometric mean; a cell meets the goal only when its whole interval is <= 1.01) "
        "and AutoDeco's decoding step as a share of a default step (per repeat: its median step in generation over "
        "the paired default run's median step; goal <= 1%%), and, on hf, that step alone on one step's logits, "
        "natively and by its torch steps.",
    )
    bench.add_argument("--model", default="smollm2", help="base model (the heads are written for it)")
    bench.add_argument("--top-ps", type=_floats, default=[0.8, 0.9, 0.95, 0.99], help="forced P values (default "
                       "0.8,0.9,0.95,0.99)")
    bench.add_argument("--heads", help="a trained AutoDeco checkpoint of the same base (e.g. outputs/demo/train/final): "
                       "adds its own T and P as a setting")
    bench.add_argument("--backends", type=_names, default=["hf", "vllm"], help="hf,vllm (default both)")
    bench.add_argument("--threads", type=_ints, default=[1, 2], help="thread counts (default 1,2)")
    bench.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it natively), float32, bfloat16")
    bench.add_argument("--batch-size", type=int_at_least(1, 4096), default=16)
    bench.add_argument("--context", type=int_at_least(1, MAX_TOKENS), default=256, help="prompt length in tokens")
    bench.add_argument("--new-tokens", type=int_at_least(2, MAX_TOKENS), default=32,
                       help="generated tokens per sequence (at least 2: a step is the spacing of two)")
    bench.add_argument("--repeats", type=int_at_least(1, 4096), default=5,
                       help="interleaved repeats (median and 95%% interval reported; 2 or more for an interval)")
    bench.add_argument("--seed", type=int_at_least(0), default=0)
    bench.add_argument("--out", help="write bench_nucleus.json into this folder")
    bench.set_defaults(func=_run("nucleus:run"))


def _precision(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "precision", help="bf16 / fp32 decode speed per engine and the greedy accuracy check (goal >= 1.4 on vllm)",
        description="One engine per dtype and backend: a fixed-shape decode (no EOS, prefill excluded) and "
        "greedy on the demo's held-out problems; prints the speed ratio and whether bf16 passes the accuracy "
        "check (accuracy within 12.5 points of fp32's, the same verdict on >= 80% of the problems).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--backends", default="vllm,hf", help="comma-separated backends (default vllm,hf)")
    p.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every backend (its dtype is set per run)")
    p.add_argument("--task", default="arith")
    p.add_argument("--limit", type=int_at_least(1, MAX_PROBLEMS), default=16, help="problems for the accuracy check (default 16, as the demo)")
    p.add_argument("--max-tokens", type=int_at_least(1, MAX_TOKENS), default=128, help="greedy budget per problem (default 128)")
    p.add_argument("--batch", type=int_at_least(1, 4096), default=16, help="rows of the decode measurement (default 16)")
    p.add_argument("--new-tokens", type=int_at_least(2, MAX_TOKENS), default=64, help="tokens of the decode measurement (default 64)")
    p.add_argument("--out", help="write bench_precision.json into this folder")
    p.set_defaults(func=_run("precision:run"))


def _engine(bench_subparsers) -> None:
    o = bench_subparsers.add_parser("overhead", help="wall time of a full eval / raw backend generate (target <= 1.05)")
    _engine_common(o, samples=4, max_tokens=32)
    o.add_argument("--backend", default="hf")
    o.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE")
    o.add_argument("--repeats", type=int_at_least(1, 1000), default=3)
    o.set_defaults(func=_run("engine:overhead"))

    b = bench_subparsers.add_parser(
        "backends", help="throughput of vllm vs hf on the same requests, and decode vs the memory-bandwidth bound",
        description="Tokens/s of each backend on the same eval requests; then each engine decodes a fixed batch "
        "(no EOS, prefill excluded) and is compared with the bound batch x read bandwidth / bytes per step "
        "(weights + KV cache), the bandwidth measured on this machine just before each repeat (on a shared host "
        "it drifts by tens of percent within minutes). Prints the bound and the fraction reached, with the "
        "fraction's 95% interval over the repeats; and the compute bound (the step's FLOPs at torch's matmul rate at that "
        "batch, its weight in cache), which is the lower one where the CPU cannot stream weights as fast as it reads.")
    _engine_common(b, samples=16, max_tokens=64)
    b.add_argument("--backends", type=_backend_names, default="vllm,hf",
                   help="comma-separated backends (default vllm,hf)")
    b.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every backend, e.g. dtype=float32 or cache=dynamic (repeatable)")
    b.add_argument("--decode-batch", type=int_at_least(1, 4096), default=16,
                   help="rows of the fixed-shape decode (default 16)")
    b.add_argument("--decode-tokens", type=int_at_least(2, MAX_TOKENS), default=64,
                   help="new tokens of the fixed-shape decode (default 64)")
    b.add_argument("--decode-repeats", type=int_at_least(1, 100), default=3,
                   help="fixed-shape decodes per engine, each against the read bandwidth measured just before "
                        "it (default 3; the median is printed with the 95%% interval of the fraction)")
    b.set_defaults(func=_run("engine:backends"), backend="hf")


def _training(bench_subparsers) -> None:
    loss = bench_subparsers.add_parser(
        "loss", help="soft top-p loss, direct vs chunked: time and extra peak memory (target <= 1 GiB)",
        description="Forward + backward of the top-p loss on synthetic LM-like logits [1, L, V]; each run in a "
        "fresh process, extra peak RSS over the inputs; repeats interleaved, medians reported.",
    )
    loss.add_argument("--length", type=int_at_least(1, MAX_TOKENS), default=4096)
    loss.add_argument("--vocab", type=int_at_least(2, 10_000_000), default=49152)
    loss.add_argument("--chunk", type=int_at_least(1, MAX_TOKENS), default=256, help="positions per chunk")
    loss.add_argument("--repeats", type=int_at_least(1, 1000), default=3)
    loss.add_argument("--direct-repeats", type=int_at_least(0, 1000), default=1,
                      help="the direct form needs ~10 GiB; run it fewer times")
    loss.add_argument("--skip-direct", action="store_true")
    loss.add_argument("--threads", type=int_at_least(1, 1024), default=2)
    loss.add_argument("--seed", type=int_at_least(0), default=0)
    loss.add_argument("--json", help="also write the summary here")
    loss.set_defaults(func=_run("training:loss"))

    train = bench_subparsers.add_parser(
        "train", help="training tokens/s / base forward-only tokens/s on SmolLM2: first epoch (goal >= 0.8) and "
        "epochs from the hidden cache (goal >= 3)",
        description="Real AutoDecoTrainer steps vs the base forward alone on the same rows of natural text, in one "
        "process: the first epoch (its steps run the base and write the hidden-state cache, as `autodeco train` "
        "does; for reference, the cache built before the first step + an epoch read from it) and a cached epoch; "
        "where a cached step's time goes (logits recompute, heads, loss, backward, optimizer); the forward is timed "
        "before the loss first runs and again after the training steps; medians.",
    )
    train.add_argument("--model", default="smollm2")
    train.add_argument("--batch", type=int_at_least(1, 4096), default=1)
    train.add_argument("--length", type=int_at_least(2, MAX_TOKENS), default=256)
    train.add_argument("--steps", type=int_at_least(1, 100_000), default=8, help="steps per epoch (default 8)")
    train.add_argument("--epochs", type=int_at_least(2, 1000), default=3, help="epochs (default 3)")
    train.add_argument("--build-repeats", type=int_at_least(1, 100), default=2, help="cache builds timed (default 2)")
    train.add_argument("--uncached-steps", type=int_at_least(0, 100_000), default=3,
                       help="steps without the cache, for reference (default 3; 0 skips)")
    train.add_argument("--cache-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="storage dtype of the hidden states (auto: the base's)")
    train.add_argument("--forward-repeats", type=int_at_least(1, 1000), default=5,
                       help="forwards timed before and after (default 5)")
    train.add_argument("--threads", type=int_at_least(1, 1024), default=2)
    train.add_argument("--out", help="write bench_train.json into this folder")
    train.set_defaults(func=_run("training:train"))


def _efficiency(bench_subparsers) -> None:
    bench = bench_subparsers.add_parser(
        "efficiency", help="FLOPs, latency per 1k tokens and peak memory with vs without the heads",
        description="Runs the same HF backend with the base model and with AutoDeco on the same weights "
                    "for each prompt length; writes efficiency.json for `autodeco report efficiency`. "
                    "Defaults are sized for a CPU; --paper-sizes uses the paper's 1k-24k prompts and "
                    "1000 generated tokens (GPU).")
    bench.add_argument("--model", default="smollm2", help="base model (name, folder or hub id)")
    bench.add_argument("--heads", help="a trained heads-only folder (default: freshly constructed heads)")
    bench.add_argument("--prompt-lengths", type=_lengths, default="256,1k",
                       help="comma-separated, k = 1024 (default 256,1k)")
    bench.add_argument("--paper-sizes", action="store_true", help="prompt lengths 1k,2k,4k,8k,16k,24k, 1000 tokens")
    bench.add_argument("--gen-tokens", type=int_at_least(1, MAX_TOKENS),
                       help="generated tokens per run (default 32; 1000 with --paper-sizes)")
    bench.add_argument("--repeats", type=int_at_least(1, 1000), default=3,
                       help="timed runs per method and length (median)")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:i]")
    bench.add_argument("--dtype", choices=DTYPES, default="float32", help="float32, bfloat16, float16")
    bench.add_argument("--threads", type=int_at_least(1, 1024), help="torch CPU threads")
    bench.add_argument("--out", default="outputs/efficiency/efficiency.json", help="where efficiency.json goes")
    bench.set_defaults(func=_run("efficiency:run"))


def _grading(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("grading", help="grade 128 x 270 math answers, print the time (target <= 60 s)")
    p.add_argument("--data-dir", help="benchmark files (default $AUTODECO_DATA_DIR; without: arith problems only)")
    p.add_argument("--samples", type=int_at_least(1, 100_000), default=128)
    p.add_argument("--workers", type=int_at_least(1, 1024), default=2)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.set_defaults(func=_run("grading:main"))
