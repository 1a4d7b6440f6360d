"""`autodeco train` and `autodeco data reject-sample`.

Handlers import torch, transformers and TRL lazily so `autodeco --help` stays instant.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from harness.cli.common import MAX_PROBLEMS, MAX_SAMPLES, MAX_TOKENS, int_at_least
from harness.core import config as configs
from harness.core.errors import UserError
from heads.training.config import AutoDecoArguments

TRAIN_EPILOG = """\
examples:
  autodeco train --config configs/train/smollm2_cpu.yaml
  autodeco train --config configs/train/smollm2_cpu.yaml --max_steps 20 --output_dir runs/try
  autodeco train --config configs/train/smollm2_cpu.yaml --resume_from_checkpoint latest
  accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m harness.cli \\
      train --config configs/train/paper.yaml --model path/to/base --train_file train.jsonl

Outputs in output_dir: checkpoint-<step>/ and final/ (config + head tensors only; load with
AutoDecoModelForCausalLM.from_pretrained), log_history.jsonl (one JSON line per logged step),
train_config.yaml, wandb/ (offline unless you are logged in).
"""

REJECT_EPILOG = """\
examples:
  autodeco data reject-sample --model smollm2 --task arith --samples 8 --limit 200 --out data/arith_train.jsonl
  autodeco data reject-sample --model path/to/base --task deepmath --samples 16 --out deepmath_rs.jsonl
  autodeco data reject-sample --model smollm2 --task deepmath --data-file DeepMath-103K.parquet --limit 50 ...
  autodeco data reject-sample --model BASE --task deepmath --samples 16 --shard 3/8 --out rs/deepmath_rs.jsonl
      # problems 3, 11, 19, ... → rs/deepmath_rs.shard-3-of-8.jsonl; then:
  autodeco gather --runs rs --out data     # → data/deepmath_rs.jsonl, as one unsharded run writes it

sources: arith (synthetic train split), deepmath (zwhe99/DeepMath-103K from the hub, or --data-file),
or any task name (its test split). Rows: prompt (chat template applied), completion, source,
doc_id, sample_index, answer. Only correct and finished completions are kept.
"""


# ---------------------------------------------------------------------------------------------
# autodeco train


def _train(args: argparse.Namespace) -> int:
    from heads.training.trainer import AutoDecoTrainingConfig, train

    overrides = {**configs.given(AutoDecoArguments, args), **_trainer_flags(args._extra)}
    layers = [(args.config, configs.load_yaml(args.config))] if args.config else []
    config = configs.build(AutoDecoTrainingConfig, *layers, (configs.COMMAND_LINE, overrides))
    final = train(config)
    print(f"heads: {final}")
    return 0


def _trainer_flags(extra: list[str]) -> dict:
    """``--name VALUE`` / ``--name=VALUE`` / ``--name`` (= true) pairs for the SFTConfig fields."""
    values, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or item == "--":
            raise UserError(f"unexpected argument {item!r}; trainer fields are given as --name VALUE")
        name, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = "true"
        values[name.replace("-", "_")] = value
        i += 1
    return values


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the AutoDeco heads on a frozen base (TRL; accelerate/DeepSpeed ready)",
        description="Train the temperature and top-p heads with the AutoDeco loss on prompt/completion JSONL. "
        "The config is TRL's SFTConfig plus the AutoDeco fields below; a --config YAML may set any of them, "
        "and flags given here win. Any SFTConfig / TrainingArguments field is a flag too "
        "(--learning_rate 1e-3, --max_steps 20, --bf16, --deepspeed ds.json, --save_steps 50, "
        "--resume_from_checkpoint latest, ...).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML of training fields (configs/train/*.yaml)")
    configs.add_arguments(parser, AutoDecoArguments, underscore_aliases=True,
                          title="AutoDeco fields (any SFTConfig field is accepted as --name VALUE too)")
    parser.set_defaults(func=_train, _takes_extra=True)


# ---------------------------------------------------------------------------------------------
# autodeco data reject-sample


# The reject-sample options that decide its rows (a shard manifest's settings; harness.gather).
REJECT_SETTINGS = ("model", "task", "samples", "limit", "seed", "decoding", "max_tokens", "backend", "data_file",
                   "data_dir", "difficulty", "keep_truncated")


def _reject_sample(args: argparse.Namespace) -> int:
    """Everything the user gave is checked (output, preset, backend, model, problems, shard) before
    the model is loaded; the rows are written at the end, in one go."""
    from harness.backends import check_backend, get_backend, parse_options
    from harness.core.files import check_output_file
    from harness.decoding import parse_spec
    from harness.gather import record_shard, shard_output
    from harness.models import resolve_model
    from harness.shards import parse_shard
    from heads.training.reject_sample import load_source, reject_sample

    shard = parse_shard(args.shard)
    out = shard_output(args.out, shard) if shard else Path(args.out)
    check_output_file(str(out), "--out")
    parse_spec(args.decoding)
    options = parse_options(args.backend_arg)
    check_backend(args.backend, options)
    model = resolve_model(args.model)
    try:
        source = load_source(args.task, limit=args.limit, seed=args.seed, data_dir=args.data_dir,
                             data_file=args.data_file, difficulty=args.difficulty)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot load problems for {args.task!r}: {err}") from None
    backend = get_backend(args.backend, model, **options)
    try:
        stats = reject_sample(backend, source, args.samples, out, preset_spec=args.decoding,
                              seed=args.seed, max_tokens=args.max_tokens, keep_truncated=args.keep_truncated,
                              progress=not args.no_progress, shard=shard)
    finally:
        backend.close()
    if shard:
        config = {name: getattr(args, name) for name in REJECT_SETTINGS} | {"out_name": Path(args.out).name}
        record_shard(out.parent, "reject-sample", config, shard, progress="done", extra={
            "output": out.name, "doc_ids": [doc["doc_id"] for doc in shard.take(source.docs)], "stats": asdict(stats)})
    print(stats.summary())
    print(f"wrote {out}")
    return 0


def _register_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="training data: reject sampling")
    data_sub = data.add_subparsers(dest="data_command", metavar="<action>")
    rs = data_sub.add_parser(
        "reject-sample", help="sample k completions per problem, keep the correct ones as prompt/completion rows",
        description="The paper's data recipe: sample with a backend, grade with the task's grader, keep correct.",
        epilog=REJECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rs.add_argument("--model", default="smollm2", help="base model: smollm2, a configs/models preset, a folder or a hub id (default smollm2)")
    rs.add_argument("--task", default="arith", help="arith, deepmath (= zwhe99/DeepMath-103K) or a task name")
    rs.add_argument("--samples", type=int_at_least(1, MAX_SAMPLES), default=4,
                    help="completions per problem (k; default 4)")
    rs.add_argument("--out", required=True, help="output JSONL")
    rs.add_argument("--limit", type=int_at_least(1, MAX_PROBLEMS),
                    help="number of problems (arith: generated; deepmath: seeded subset)")
    rs.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (and arith problem seed)")
    rs.add_argument("--decoding", default="default", help="sampling preset (default: plain T=1 sampling)")
    rs.add_argument("--max-tokens", type=int_at_least(1, MAX_TOKENS), help="generation budget (default: the source's)")
    rs.add_argument("--backend", default="hf", help="hf or vllm (default hf)")
    rs.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE", help="backend option")
    rs.add_argument("--data-file", help="local DeepMath-103K copy (.jsonl/.json/.parquet) instead of the hub")
    rs.add_argument("--data-dir", help="benchmark files for task sources (else $AUTODECO_DATA_DIR / hub)")
    rs.add_argument("--difficulty", type=int_at_least(1, 5), help="arith difficulty 1..5 (default 2)")
    rs.add_argument("--keep-truncated", action="store_true", help="also keep correct completions cut at max tokens")
    rs.add_argument("--shard", metavar="I/N", help="only problems I, I+N, ... (I = 0..N-1) into OUT.shard-I-of-N.jsonl; "
                                                   "merge with `autodeco gather --runs DIR --out DIR`")
    rs.add_argument("--no-progress", action="store_true")
    rs.set_defaults(func=_reject_sample)
    data.set_defaults(func=lambda args: data.print_help() or 2)


def register(subparsers) -> None:
    """Add `train` and `data` to the `autodeco` parser."""
    _register_train(subparsers)
    _register_data(subparsers)
