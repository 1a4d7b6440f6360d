"""`autodeco bench decode`: what AutoDeco's in-forward decoding costs during HF sampling.

Both sides generate from the same random prompts with the same number of new tokens (EOS cannot
stop them: no EOS token is set). Default sampling = the base model with T=1, P=1,
top_k=0; AutoDeco sampling = the wrapped model (heads + exact nucleus inside forward) with the
same arguments. The prompts are prefilled once (all but their last token) and every timed run
starts from a copy of that KV cache, so the runs time the decode steps themselves (the part the
heads can slow down) instead of a prefill that dominates on CPU. Repeats interleave the two
sides (alternating order); the median of the per-repeat ratios is reported. Then the per-step
cost of the nucleus on real logits: the fast exact nucleus vs the naive full-vocabulary sort.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from harness.bench import natural_rows


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _timed_both(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is robust to a machine shared with others."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    return 1e3 * statistics.median(_timed(fn) for _ in range(repeats))


def _prompts(path: str, batch: int, context: int):
    """Natural-text prompts (random tokens give unnaturally flat next-token distributions)."""
    import torch
    from transformers import AutoTokenizer

    return torch.tensor(natural_rows(AutoTokenizer.from_pretrained(path), batch, context))


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.models import resolve_model
    from heads.model import AutoDecoModelForCausalLM, decode
    from heads.nucleus import logit_stats, nucleus_filter_sorted, nucleus_from_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoDecoModelForCausalLM.from_base(resolve_model(args.model)).eval()
    base = model.llm
    prompts = _prompts(resolve_model(args.model), args.batch_size, args.context)
    mask = torch.ones_like(prompts)
    pad = base.generation_config.pad_token_id or 0

    with torch.no_grad():  # the shared prefill: all but the last prompt token
        cache = base(prompts[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values

    def generate(m, n: int, past=None) -> None:
        # No EOS (so exactly n tokens) and no min_new_tokens: its EOS ban after a nucleus that kept
        # only EOS would leave nothing to sample.
        with torch.no_grad():
            out = m.generate(prompts, attention_mask=mask, past_key_values=past or copy.deepcopy(cache),
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=pad)
        assert out.shape[1] == prompts.shape[1] + n, out.shape

    sides = {"default": base, "autodeco": model}
    print(f"bench decode: {args.model}, batch {args.batch_size}, context {args.context}, "
          f"{args.new_tokens} new tokens, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    generate(model, 2)  # warm up both paths
    generate(base, 2)
    ratios, cpu_ratios, per_step = [], [], []
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        wall, cpu = {}, {}
        for name in order:
            past = copy.deepcopy(cache)  # copied outside the timed region
            torch.manual_seed(args.seed + r)
            wall[name], cpu[name] = _timed_both(generate, sides[name], args.new_tokens, past)
        ratios.append(wall["autodeco"] / wall["default"])
        cpu_ratios.append(cpu["autodeco"] / cpu["default"])
        per_step.append(cpu["default"] / args.new_tokens / max(torch.get_num_threads(), 1))
        print(f"  repeat {r + 1}: wall default {wall['default']:.2f}s autodeco {wall['autodeco']:.2f}s "
              f"ratio {ratios[-1]:.4f} | cpu default {cpu['default']:.2f}s autodeco {cpu['autodeco']:.2f}s "
              f"ratio {cpu_ratios[-1]:.4f}", flush=True)
    step_ms = 1e3 * statistics.median(per_step)
    print(f"median ratio AutoDeco / default sampling: wall {statistics.median(ratios):.4f} "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f}), process CPU time {statistics.median(cpu_ratios):.4f} "
          f"(min {min(cpu_ratios):.4f}, max {max(cpu_ratios):.4f}); goal <= 1.01")

    # Per-step costs on this model's real next-token logits (one decode step from the cache).
    with torch.no_grad():
        out = model(prompts[:, -1:], attention_mask=mask, past_key_values=copy.deepcopy(cache), logits_to_keep=1)
        z = out.base_logits[:, -1].float() / out.temperature[:, -1:].float()
        top_p = out.top_p[:, -1].float()
        fast = _median_ms(lambda: nucleus_from_stats(z, logit_stats(z, moments=False), top_p))
        naive = _median_ms(lambda: nucleus_filter_sorted(z, top_p), repeats=5)

        def everything():  # heads, features, ÷T and nucleus: all AutoDeco adds to a step
            decode(model.temp_head, model.top_p_head, out.hidden, out.base_logits, use_temperature=True,
                   use_top_p=True)

        total = _median_ms(everything)
    print(f"per decode step (base step ≈ {step_ms:.1f} ms): exact nucleus {fast:.2f} ms "
          f"({100 * fast / step_ms:.2f}%), naive full sort {naive:.2f} ms ({100 * naive / step_ms:.1f}%), "
          f"all of AutoDeco (heads + features + ÷T + nucleus) {total:.2f} ms ({100 * total / step_ms:.2f}%)")
    return 0
