"""`autodeco bench overhead` and `autodeco bench backends`: the harness's own cost, and engines side by side.

- overhead: median wall time of a full `evaluate` (plan, store, grading, files) over the
  backend's raw ``generate`` on the same requests (target <= 1.05), interleaved repeats.
- backends: generated tokens per second of each backend on the same requests; then each engine's
  decode at a fixed batch (no EOS, prefill excluded) against the memory-bandwidth bound: a decode
  step reads every weight and the KV cache once, so tokens/s <= batch x read bandwidth / bytes per
  step, with the bandwidth measured here (a large ``torch.sum``) just before each of
  ``--decode-repeats`` decodes, and the fraction's interval over them; beside it the compute bound,
  the step's FLOPs at torch's matmul rate at that batch (on a CPU without fast fp32 / bf16
  arithmetic it is the lower of the two).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.backends import get_backend, parse_options
from harness.bench import write_result
from harness.decoding import parse_spec
from harness.models import model_name_for, resolve_model
from harness.runner import RunSpec, build_requests, evaluate, plan
from harness.stats import geometric_estimate
from tasks import load_tasks


def _setup(args, samples: int):
    tasks = load_tasks(args.task, args.data_dir)
    model = resolve_model(args.model)
    spec = RunSpec(model=args.model, model_path=model, model_name=model_name_for(model), backend=args.backend,
                   preset=parse_spec(args.decoding), seeds=list(range(args.seeds)), samples=samples,
                   limit=args.limit, max_tokens=args.max_tokens)
    spec.check()
    return tasks, spec


class _TimedBackend:
    """Wraps a backend and counts the seconds spent inside its generate (to isolate the harness's own time)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests):
        iterator = iter(self.inner.generate(requests))
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


def overhead(args) -> int:
    """Median wall time of a full eval (store, grading, files) / the backend's raw generate, same requests."""
    tasks, spec = _setup(args, args.samples)
    backend = get_backend(args.backend, spec.model_path, **parse_options(args.backend_arg))
    items = plan(tasks, backend.tokenizer, spec)
    requests = build_requests(items, spec)
    raw, full, raw_cpu, full_cpu, harness_only = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="autodeco-bench-") as tmp:
        for repeat in range(args.repeats):
            order = ("raw", "eval") if repeat % 2 == 0 else ("eval", "raw")  # interleave against drift
            for which in order:
                start, cpu = time.perf_counter(), time.process_time()
                if which == "raw":
                    tokens = sum(c.n_tokens for c in backend.generate(requests))
                    raw.append(time.perf_counter() - start)
                    raw_cpu.append(time.process_time() - cpu)
                else:
                    timed = _TimedBackend(backend)
                    evaluate(timed, tasks, spec, Path(tmp) / f"r{repeat}", progress=False, log=lambda m: None)
                    full.append(time.perf_counter() - start)
                    full_cpu.append(time.process_time() - cpu)
                    harness_only.append(full[-1] - timed.seconds)
            print(f"repeat {repeat}: raw {raw[-1]:.2f}s (cpu {raw_cpu[-1]:.2f}s)  eval {full[-1]:.2f}s "
                  f"(cpu {full_cpu[-1]:.2f}s, outside generate {harness_only[-1]:.3f}s)  ({tokens} tokens)",
                  file=sys.stderr)
    backend.close()
    ratio = statistics.median(full) / statistics.median(raw)
    cpu_ratio = statistics.median(full_cpu) / statistics.median(raw_cpu)
    # the harness's own time (plan, store, grading, files) added to the raw generate time:
    isolated_ratio = (statistics.median(raw) + statistics.median(harness_only)) / statistics.median(raw)
    result = {"bench": "overhead", "model": spec.model_name, "backend": args.backend, "task": args.task,
              "decoding": spec.preset.key, "requests": len(requests), "samples": args.samples,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "raw_seconds": raw,
              "eval_seconds": full, "raw_cpu_seconds": raw_cpu, "eval_cpu_seconds": full_cpu,
              "harness_only_seconds": harness_only, "ratio": ratio, "cpu_ratio": cpu_ratio,
              "isolated_ratio": isolated_ratio, "target": 1.05}
    print(f"harness overhead (CPU time of this process): eval / raw generate = {cpu_ratio:.3f}")
    print(f"harness overhead (raw generate + time outside generate) / raw generate = {isolated_ratio:.3f}")
    print(f"harness overhead: eval / raw generate = {ratio:.3f} (median of {args.repeats}; target <= 1.05)")
    write_result(args.out, "bench_overhead.json", result)
    return 0


def backends(args) -> int:
    """Generated tokens per second of each backend on the same requests (16 samples per problem), then
    each engine's fixed-shape decode against the memory-bandwidth bound measured on this machine."""
    tasks, spec = _setup(args, args.samples)
    options = parse_options(args.backend_arg)
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth at the start: {bandwidth / 1e9:.1f} GB/s (best of 5 sums over 1 GiB, "
          f"{torch.get_num_threads()} threads; the decode bounds use the same reading taken before each repeat)",
          file=sys.stderr)
    rows = {}
    for name in args.backends.split(","):
        backend = get_backend(name, spec.model_path, **options)
        requests = build_requests(plan(tasks, backend.tokenizer, spec), spec)
        start = time.perf_counter()
        tokens = sum(c.n_tokens for c in backend.generate(requests))
        seconds = time.perf_counter() - start
        rows[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
        print(f"{name:>6}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tok/s", file=sys.stderr)
        prompt = backend.tokenizer(requests[0].prompt, add_special_tokens=False).input_ids
        rows[name]["decode"] = decode_vs_bound(backend, prompt, args.decode_batch, args.decode_tokens,
                                               repeats=args.decode_repeats, compute=matmul_throughput)
        backend.close()
    names = list(rows)
    result = {"bench": "backends", "model": spec.model_name, "task": args.task, "samples": args.samples,
              "limit": args.limit, "max_tokens": args.max_tokens, "decoding": spec.preset.key, "backends": rows,
              "read_bandwidth_bytes_per_second": bandwidth, "backend_options": options}
    print(f"throughput on {args.task} ({args.samples} samples per problem, EOS stops rows):")
    for name, row in rows.items():
        print(f"  {name:>6}: {row['tokens_per_second']:.1f} tok/s")
    if len(names) == 2:
        ratio = rows[names[0]]["tokens_per_second"] / rows[names[1]]["tokens_per_second"]
        result["ratio"] = ratio
        print(f"  {names[0]} / {names[1]} = {ratio:.2f}")
    print(f"decode at batch {args.decode_batch} ({args.decode_tokens} tokens, no EOS, prefill excluded) "
          f"against the bandwidth bound, {args.decode_repeats} repeats, the read bandwidth measured before each "
          "(the median repeat; the fraction's geometric mean and 95% interval over the repeats):")
    for name, row in rows.items():
        d = row["decode"]
        interval = (f" [{d['fraction_ci'][0]:.3f}, {d['fraction_ci'][1]:.3f}]" if d["fraction_ci"] else "")
        reads = ", ".join(f"{r['read_bandwidth_bytes_per_second'] / 1e9:.1f}" for r in d["repeats"])
        print(f"  {name:>6} {d['dtype']:>8}: {d['tokens_per_second']:.1f} tok/s; bound {d['bound_tokens_per_second']:.1f} "
              f"tok/s ({d['bytes_per_step'] / 1e6:.0f} MB read per step: weights {d['weight_bytes'] / 1e6:.0f} MB + "
              f"KV cache {d['kv_bytes_per_step'] / 1e6:.0f} MB; read {reads} GB/s); fraction "
              f"{d['fraction_of_bound']:.3f}, mean {d['fraction_mean']:.3f}{interval}")
        print(f"  {'':>6} {'':>8}  compute bound {d['compute_bound_tokens_per_second']:.1f} tok/s "
              f"({d['flops_per_step'] / 1e9:.2f} GFLOP per step at {d['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s, "
              f"torch's {d['dtype']} matmul at batch {d['batch']} with its weight in cache); fraction "
              f"{d['fraction_of_compute_bound']:.3f}")
    write_result(args.out, "bench_backends.json", result)
    return 0


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second that ``torch.sum`` reads from memory (best of ``repeats``, all torch threads):
    the ceiling of a decode step, which reads every weight and the KV cache once."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    data.sum()  # touch every page
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def decode_bytes(config, weight_bytes: int, kv_element: int, batch: int, context: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step reads at ``batch`` rows of ``context`` tokens."""
    layers, _, kv_heads, head_dim = _attention_shape(config)
    kv = 2 * layers * kv_heads * head_dim * context * batch * kv_element
    return float(weight_bytes), float(kv)


def _attention_shape(config) -> tuple[int, int, int, int]:
    """(layers, query heads, key-value heads, head dim) of a model config (its text part)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads, head_dim


def model_weight_bytes(model, element: int | None = None) -> int:
    """Bytes of the weights a decode step reads: every parameter once (tied ones once), except an
    untied input embedding (a step reads only its batch's rows of it). ``element``: bytes per value
    (default: each parameter's own)."""
    size = lambda p: p.numel() * (element or p.element_size())  # noqa: E731
    total = sum(size(p) for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and embed is not None and embed.weight is not head.weight:
        total -= size(embed.weight)
    return total


def decode_vs_bound(backend, prompt: list[int], batch: int, tokens: int, bandwidth: float | None = None,
                    repeats: int = 3, compute=None) -> dict:
    """A fixed-shape decode (``batch`` copies of ``prompt``, exactly ``tokens`` new tokens, default
    sampling) on the backend's own engine, ``repeats`` times: decode tok/s = batch x (tokens - 1) /
    the decode steps' time. hf times the steps themselves (from the first forward's end to the
    last's); vllm, whose steps run in its engine, as t(tokens) - t(1), which carries the prefill's
    run-to-run noise. Each repeat is set against the bound from the read bandwidth measured just
    before it (``bandwidth`` fixes it instead): on a shared host both drift, by tens of percent
    within minutes, so a fraction is only meaningful against a bandwidth of the same moment. The
    top-level fields are the median repeat's; ``fraction_mean`` / ``fraction_ci`` are the geometric
    mean of the per-repeat fractions and its 95% t interval (None with one repeat; repeats in a row
    on a drifting host are not independent, so the interval is a lower estimate of the noise). With
    an even number of repeats the median is the lower of the two middle ones. ``compute`` (a
    function of (dtype, batch) giving matmul FLOP/s, e.g. ``matmul_throughput``) adds the compute
    bound: a step's FLOPs (2 x batch x the weights read, + attention's 4 x batch x layers x heads x
    head_dim x context) at that rate; where it is lower than the bandwidth bound, the CPU cannot
    reach the bandwidth bound at this batch."""
    if tokens < 2:
        raise ValueError(f"a decode needs at least 2 new tokens (the first comes from the prefill), got {tokens}")
    if backend.name == "vllm":
        run, weight_bytes, dtype, config = _vllm_decode(backend, prompt, batch)
    else:
        run, weight_bytes, dtype, config = _hf_decode(backend, prompt, batch)
    run(2)  # warm-up
    one = min(run(1)[0] for _ in range(2))
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    weights, kv = decode_bytes(config, weight_bytes, element, batch, len(prompt) + tokens / 2)
    runs = []
    for _ in range(repeats):
        read = bandwidth if bandwidth is not None else read_bandwidth()
        full, steps = run(tokens)
        decode_seconds = steps if steps is not None else full - one
        tps = batch * (tokens - 1) / max(decode_seconds, 1e-9)
        bound = batch * read / (weights + kv)
        runs.append({"read_bandwidth_bytes_per_second": read, "seconds_all_tokens": full,
                     "seconds_decode_steps": decode_seconds, "tokens_per_second": tps,
                     "bound_tokens_per_second": bound, "fraction_of_bound": tps / bound})
    median = sorted(runs, key=lambda r: r["fraction_of_bound"])[(len(runs) - 1) // 2]
    mean, interval = geometric_estimate([r["fraction_of_bound"] for r in runs])
    out = {"batch": batch, "new_tokens": tokens, "prompt_tokens": len(prompt), "dtype": dtype,
           "seconds_one_token": one, **median, "weight_bytes": weights, "kv_bytes_per_step": kv,
           "bytes_per_step": weights + kv, "repeats": runs, "fraction_mean": mean, "fraction_ci": interval}
    if compute is not None:
        layers, heads, _, head_dim = _attention_shape(config)
        flops = 2 * batch * weights / element + 4 * batch * layers * heads * head_dim * (len(prompt) + tokens / 2)
        rate = compute(getattr(torch, dtype), batch)
        out.update(flops_per_step=flops, matmul_flops_per_second=rate,
                   compute_bound_tokens_per_second=batch * rate / flops,
                   fraction_of_compute_bound=median["tokens_per_second"] * flops / (batch * rate))
    return out


def matmul_throughput(dtype: torch.dtype, batch: int, size: int = 1024, calls: int = 100) -> float:
    """FLOP/s of torch's fastest CPU linear at ``batch`` rows (oneDNN-packed where this CPU runs it
    for ``dtype``, as the hf backend's ``linear=auto``; else aten's) on a ``size`` x ``size`` weight
    that stays in cache: what a decode step's linear layers can reach at that batch when memory is
    not what limits them (best of 5 timings of ``calls`` calls)."""
    from harness.backends.hf_kernels import pack_linears

    with torch.no_grad():
        linear = torch.nn.Linear(size, size, bias=False).to(dtype)
        pack_linears(linear)
        x = torch.randn(batch, size).to(dtype)
        for _ in range(10):
            linear(x)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                linear(x)
            best = min(best, time.perf_counter() - start)
    return 2 * batch * size * size * calls / best


def _hf_decode(backend, prompt: list[int], batch: int):
    """The backend's own generate path (its KV cache, attention, linear kernels and row sampler), base
    model only. ``run(n)`` -> (seconds, seconds of the n - 1 decode steps: between the ends of the
    first and the last forward)."""
    from harness.decoding import get_preset

    preset = get_preset("default")
    ids = torch.tensor([prompt] * batch, device=backend.device)
    ends: list[float] = []

    def run(n: int) -> tuple[float, float]:
        generators = [torch.Generator(device=backend.device).manual_seed(i) for i in range(batch)]
        ends.clear()
        hook = backend.model.register_forward_hook(lambda *_: ends.append(time.perf_counter()))
        try:
            start = time.perf_counter()
            out = backend.generate_ids(ids, preset, generators, n, eos=False)  # default: AutoDeco's heads off
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        assert out.shape[1] == ids.shape[1] + n and len(ends) == n, (out.shape, len(ends))
        return seconds, ends[-1] - ends[0]

    return run, model_weight_bytes(backend.llm), str(backend.llm.dtype).removeprefix("torch."), backend.llm.config


def _vllm_decode(backend, prompt: list[int], batch: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    from vllm import SamplingParams

    llm = backend.llm
    if backend.is_autodeco:
        llm.collective_rpc("autodeco_set_decoding", args=(False, False))
    requests = [{"prompt_token_ids": prompt}] * batch

    def run(n: int) -> tuple[float, None]:
        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=i, max_tokens=n, ignore_eos=True)
                  for i in range(batch)]
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - start, None

    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    config = AutoConfig.from_pretrained(backend.engine_path)
    with torch.device("meta"):  # the parameter count without loading the weights again
        shapes = AutoModelForCausalLM.from_config(config)
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    return run, model_weight_bytes(shapes, element), dtype, config
