"""`autodeco bench efficiency`: the paper's Table 3 measured — FLOPs, latency per 1k tokens, peak memory.

`measure_efficiency(...)` runs the same HF backend with and
without the heads (the base model vs `AutoDecoModelForCausalLM.from_base(base)` sharing its
weights) for each prompt length, and writes `efficiency.json`:

```
{"model": str, "backend": "hf", "device": str, "gen_tokens": int, "repeats": int, "threads": int,
 "heads_parameters": int, "heads_parameter_mb": float, "date": float, "torch": str,
 "rows": [{"prompt_length": int, "method": "default"|"autodeco", "flops": float,
           "latency_s": float, "latency_s_per_1k": float, "latencies_s": [float],
           "peak_memory_mb": float, "memory_kind": "cuda_allocated"|"cpu_rss"}],
 "flops_check": [{"prompt_length": int, "method": str, "analytic": float, "measured": float,
                  "ratio": float}]}
```
FLOPs are analytic (every Linear layer: 2·in·out per token it sees; attention: 4·heads·d_head per
query-key pair computed; prefill with logits at the last position only, then one step per token, as
`generate` does); `flops_check` compares that formula with `torch.utils.flop_counter` on a full
forward pass. Latency is the median of `repeats` runs of `generate` with exactly `gen_tokens` new
tokens, base and AutoDeco interleaved so machine noise hits both alike. Peak memory is
`torch.cuda.max_memory_allocated` on GPUs, and the process's peak RSS (sampled every 2 ms) on CPU.
`reports.efficiency` turns one or more such files into the table and a plot, with the paper's
Table 3 alongside.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from harness.core.errors import UserError
from harness.core.files import atomic_write_json, check_output_file
from harness.models import resolve_model
from harness.stats import mean_estimate

METHODS = ("default", "autodeco")
PAPER_LENGTHS = "1k,2k,4k,8k,16k,24k"


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,512' -> [1024, 2048, 512]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError as err:
            raise ValueError(f"bad prompt length '{part}' (use e.g. 512,1k,2k)") from err
    if not out or min(out) < 1:
        raise ValueError(f"prompt lengths must be positive: '{text}'")
    return out


# ---------------------------------------------------------------- FLOPs


def linear_params(module) -> int:
    """Sum of in·out over the nn.Linear layers of a module (tied weights counted per layer)."""
    import torch

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_shape(base) -> dict:
    cfg = base.config
    n_heads = cfg.num_attention_heads
    return {"layers": cfg.num_hidden_layers, "heads": n_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}


def analytic_forward_flops(shape: dict, block_linear: int, head_linear: int, queries: int,
                           keys_per_query: list[int] | int, logit_positions: int) -> float:
    """FLOPs of one forward: decoder Linear layers on every query, lm_head + heads on the
    positions whose logits are kept, attention scores and weighted sum for every (query, key)."""
    pairs = keys_per_query * queries if isinstance(keys_per_query, int) else sum(keys_per_query)
    attention = 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * pairs
    lm_head = 2 * logit_positions * shape["hidden"] * shape["vocab"]
    return 2.0 * queries * block_linear + attention + lm_head + 2.0 * logit_positions * head_linear


def generation_flops(shape: dict, block_linear: int, head_linear: int, prompt: int, new: int) -> float:
    """Prefill (full prompt × prompt score matrix, as the kernels compute it; logits at the last
    position) + one step per further new token attending to everything before it."""
    prefill = analytic_forward_flops(shape, block_linear, head_linear, prompt, prompt, 1)
    steps = sum(analytic_forward_flops(shape, block_linear, head_linear, 1, prompt + i + 1, 1)
                for i in range(new - 1))
    return prefill + steps


def measured_forward_flops(model, input_ids) -> float:
    """torch.utils.flop_counter's count for one full forward (matmuls incl. attention).

    The counter does not see fused CPU SDPA kernels, so the count runs with eager attention
    (same math, explicit matmuls); the original implementation is restored afterwards.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    modules = [m for m in model.modules() if hasattr(m, "set_attn_implementation") and hasattr(m, "config")]
    before = [(m, getattr(m.config, "_attn_implementation", None)) for m in modules]
    for m, _ in before:
        try:
            m.set_attn_implementation("eager")
        except (ValueError, AttributeError):
            pass
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=input_ids)
    finally:
        for m, impl in before:
            if impl:
                try:
                    m.set_attn_implementation(impl)
                except (ValueError, AttributeError):
                    pass
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- latency and memory


class PeakRSS:
    """Peak resident memory of this process while the block runs (a 2 ms sampling thread)."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self._proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def timed_generate(model, input_ids, new_tokens: int, device: str) -> tuple[float, float, str]:
    """(seconds, peak MB, memory kind) of one `generate` with exactly `new_tokens` sampled tokens."""
    import torch

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                  temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    with PeakRSS() as rss, torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        seconds = time.perf_counter() - start
    return seconds, rss.peak / 2**20, "cpu_rss"


def load_pair(model: str, heads: str | None, device: str, dtype: str):
    """(base model, AutoDeco model on the same weights) — the AutoDeco heads are random unless
    `heads` names a trained heads-only folder (the cost does not depend on their values)."""
    import torch
    from transformers import AutoModelForCausalLM

    from heads.model import AutoDecoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if heads:
        autodeco = AutoDecoModelForCausalLM.from_pretrained(heads, dtype=torch_dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch_dtype)
        autodeco = AutoDecoModelForCausalLM.from_base(base)
    base = autodeco.llm  # the frozen base inside the wrapper (DESIGN.md): the same weights
    autodeco.set_decoding(temperature=True, top_p=True)
    return base.to(device).eval(), autodeco.to(device).eval()


def measure_efficiency(model: str = "smollm2", prompt_lengths: list[int] = (256, 1024), gen_tokens: int = 32,
                       repeats: int = 3, device: str = "cpu", dtype: str = "float32", heads: str | None = None,
                       threads: int | None = None, out: Path | None = None, check_length: int = 128,
                       progress: bool = True) -> dict:
    """Measure both methods at every prompt length; write and return efficiency.json's content."""
    import torch
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    base, autodeco = load_pair(model, heads, device, dtype)
    models = {"default": base, "autodeco": autodeco}
    shape = model_shape(base)
    block_linear = linear_params(base) - shape["hidden"] * shape["vocab"]  # minus lm_head
    head_linear = linear_params(autodeco) - linear_params(base)
    head_params = sum(p.numel() for p in autodeco.parameters()) - sum(p.numel() for p in base.parameters())
    max_len = getattr(base.config, "max_position_embeddings", None)
    for length in prompt_lengths:
        if max_len and length + gen_tokens > max_len:
            raise ValueError(f"prompt {length} + {gen_tokens} new tokens exceeds the model's "
                             f"max_position_embeddings={max_len}")
    vocab = shape["vocab"]
    gen = torch.Generator().manual_seed(0)

    check = []
    ids = torch.randint(10, vocab - 1, (1, check_length), generator=gen).to(device)
    for method, m in models.items():
        measured = measured_forward_flops(m, ids)
        analytic = analytic_forward_flops(shape, block_linear, head_linear if method == "autodeco" else 0,
                                          check_length, check_length, check_length)
        check.append({"prompt_length": check_length, "method": method, "analytic": analytic,
                      "measured": measured, "ratio": measured / analytic})

    rows = []
    bar = tqdm(total=len(prompt_lengths) * repeats * 2, desc="bench efficiency", disable=not progress)
    for length in prompt_lengths:
        ids = torch.randint(10, vocab - 1, (1, length), generator=gen).to(device)
        for m in models.values():  # warm-up (allocator, kernels) outside the timing
            timed_generate(m, ids[:, : min(length, 16)], 2, device)
        timings = {m: [] for m in METHODS}
        peaks = {m: [] for m in METHODS}
        for r in range(repeats):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            for method in order:
                seconds, peak, kind = timed_generate(models[method], ids, gen_tokens, device)
                timings[method].append(seconds)
                peaks[method].append(peak)
                bar.set_postfix(length=length, method=method, s=f"{seconds:.2f}")
                bar.update()
        for method in METHODS:
            latency = statistics.median(timings[method])
            rows.append({
                "prompt_length": length, "method": method,
                "flops": generation_flops(shape, block_linear, head_linear if method == "autodeco" else 0,
                                          length, gen_tokens),
                "latency_s": latency, "latency_s_per_1k": latency * 1000.0 / gen_tokens,
                "latencies_s": timings[method], "peak_memory_mb": max(peaks[method]), "memory_kind": kind})
    bar.close()
    result = {"model": model, "backend": "hf", "device": device, "dtype": dtype, "gen_tokens": gen_tokens,
              "repeats": repeats, "threads": torch.get_num_threads(), "heads_parameters": head_params,
              "heads_parameter_mb": head_params * next(autodeco.parameters()).element_size() / 2**20,
              "date": time.time(), "torch": torch.__version__, "rows": rows, "flops_check": check}
    if out:
        atomic_write_json(out, result, indent=1)
    return result


def _overhead(base: dict, new: dict) -> str:
    """The paired latency overhead (repeat i of both methods ran back to back) with its 95% interval;
    an interval holding 0 is said to be noise."""
    pairs = list(zip(base["latencies_s"], new["latencies_s"], strict=True))
    if len(pairs) < 2:
        return f"{100 * (new['latency_s'] / base['latency_s'] - 1):+.1f}% (1 repeat: no interval; use --repeats >= 5)"
    est = mean_estimate([100 * (n / b - 1) for b, n in pairs])
    verdict = "not distinguishable from 0" if est.ci_low <= 0 <= est.ci_high else "more than noise"
    return f"{est.mean:+.1f}% [95% CI {est.ci_low:+.1f}, {est.ci_high:+.1f}] over {est.n} paired repeats ({verdict})"


def run(args) -> int:
    """The command: measure, print the table and the ratios, write efficiency.json."""
    try:
        lengths = parse_lengths(PAPER_LENGTHS if args.paper_sizes else args.prompt_lengths)
    except ValueError as err:
        raise UserError(str(err)) from err
    gen_tokens = 1000 if args.paper_sizes and args.gen_tokens is None else (args.gen_tokens or 32)
    if gen_tokens < 1 or args.repeats < 1:
        raise UserError("--gen-tokens and --repeats must be >= 1")
    check_output_file(args.out, "--out")
    try:
        result = measure_efficiency(args.model, lengths, gen_tokens, args.repeats, args.device, args.dtype,
                                    args.heads, args.threads, Path(args.out))
    except ValueError as err:
        raise UserError(str(err)) from err
    by = {(r["prompt_length"], r["method"]): r for r in result["rows"]}
    print(f"{'prompt':>7} {'method':>9} {'FLOPs':>10} {'s/1k tok':>9} {'peak MB':>8}")
    for (length, method), r in sorted(by.items()):
        print(f"{length:>7} {method:>9} {r['flops']:>10.3e} {r['latency_s_per_1k']:>9.2f} {r['peak_memory_mb']:>8.0f}")
    for length in lengths:
        base, new = by[(length, "default")], by[(length, "autodeco")]
        print(f"prompt {length}: latency overhead {_overhead(base, new)}, FLOPs ratio = "
              f"{new['flops'] / base['flops']:.6f}, peak memory +{new['peak_memory_mb'] - base['peak_memory_mb']:.1f} MB")
    for check in result["flops_check"]:
        print(f"FLOPs check ({check['method']}, full forward of {check['prompt_length']} tokens): "
              f"measured/analytic = {check['ratio']:.4f}")
    print(f"wrote {args.out}")
    return 0
