"""`autodeco bench nucleus`: AutoDeco sampling / default sampling at the top-p where trained heads live.

A fresh head predicts P ~ 0.5, where the exact nucleus settles nearly every row from its 64 top
candidates; trained heads sit at 0.8-0.999 (the paper's mean P ~ 0.8; our demo's ~ 0.999), where
a third to two thirds of a real model's rows need the slow path. So this benchmark forces the
top-p head's output: for each P in ``--top-ps`` it writes heads whose last layers are zero with
biases set so that T = 1 and P = that value for every token (a real checkpoint, loaded by both
engines unchanged), and, with ``--heads``, also uses a trained checkpoint's own T and P.

Per engine (hf, vllm) and thread count, one child process generates the same natural-text
prompts with AutoDeco's heads on and off, repeats interleaved, and reports the ratio of wall
times (goal <= 1.01 at every P): the median of the per-repeat ratios (AutoDeco run / the default
run beside it), and the geometric mean with its 95% t interval over those ratios' logs
(`ratio_interval`). A cell *meets* the goal when its whole interval lies at or below 1.01,
*misses* when it lies above, and is *undecided* otherwise: run-to-run noise on a shared CPU is
several percent, so a single median under or over 1.01 settles nothing.
- hf: the backend's own generate path (its CPU kernels, KV cache and row sampler; ``HFBackend.
  generate_ids``) with the ``default`` preset (heads off: the base's logits, T = 1, P = 1) against
  the ``autodeco`` preset, both from a copy of one prefilled KV cache, so the decode steps are what
  is timed;
- vllm: one engine on the merged checkpoint, heads switched off (the base's logits, untouched) and
  on through the worker RPC; the prompts are prefix-cached after a warm-up, so the runs are
  decode steps too. vLLM caches whole KV blocks (128 tokens on CPU) and recomputes a wholly cached
  prompt's last block, so its prompts are a whole number of blocks plus one token
  (`cached_prompt_length`: 257 for --context 256; at 256, every run recomputed 128 tokens of each
  prompt, ~5 s of prefill beside ~6 s of decode, diluting AutoDeco's share of the wall time ~2×).
Both children also report AutoDeco's own cost per decode step against a default step, which the
wall-time ratio cannot resolve at ~1% on this noise: per repeat, the median time of its decoding
step in the AutoDeco run (hf: ``heads.model.decode``, vllm: the plugin's ``apply_heads`` in the
worker; heads, features, ÷T, nucleus, on real rows as generation goes) over the paired default
run's step (the median spacing of its steps' starts: hf, the model's forward; vllm, the worker's
``compute_logits``; so a run's fixed costs are not counted as step time: a one-token vLLM
``generate`` of cached prompts takes ~0.3 s). Its geometric mean and 95% interval over the
repeats (`share_interval`) get a verdict against 1%: AutoDeco's other work per step is the
default's (the same sampler, the same forward), so a step share above 1% puts the per-step ratio
above 1.01 (the wall ratio adds each run's fixed cost to both sides, which dilutes it toward 1). The hf child also times, on one step's logits, that step natively and by its torch steps,
with how many rows the top candidates could not settle.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.bench import natural_rows, write_result
from harness.core.errors import UserError
from harness.stats import geometric_estimate

GOAL = 1.01
SHARE_GOAL = GOAL - 1.0  # AutoDeco's step as a share of a default step
VERDICTS = ("meets", "misses", "undecided")


def _verdict(interval: list[float] | None, goal: float) -> str:
    return ("undecided" if interval is None else "meets" if interval[1] <= goal
            else "misses" if interval[0] > goal else "undecided")


def ratio_interval(ratios: list[float]) -> dict:
    """The geometric mean of per-repeat ratios and its 95% t interval (on their logs: a ratio's
    noise is multiplicative), and the verdict against `GOAL`; one repeat gives no interval (None)
    and no verdict but undecided."""
    mean, interval = geometric_estimate(ratios)
    return {"ratio_mean": mean, "ratio_ci": interval, "verdict": _verdict(interval, GOAL)}


def step_seconds(starts: list[float]) -> float:
    """A run's decode step: the median spacing of its steps' start times (at least two). The first
    spacing (the first step, often slower) weighs in fully only below three spacings."""
    return statistics.median(later - earlier for earlier, later in zip(starts, starts[1:], strict=False))


def share_interval(head_seconds: list[list[float]], default_starts: list[list[float]]) -> dict:
    """AutoDeco's decoding step as a share of a default decode step, per repeat r: the median of the
    head-work times recorded in AutoDeco's run r over default run r's step (`step_seconds` of its
    steps' start times); their geometric mean, 95% t interval and verdict against `SHARE_GOAL` (as
    `ratio_interval`); with each default run's step and the median head-work time over all runs (ms)."""
    steps = [step_seconds(starts) for starts in default_starts]
    shares = [statistics.median(heads) / step for heads, step in zip(head_seconds, steps, strict=True)]
    mean, interval = geometric_estimate(shares)
    return {"shares": shares, "share_mean": mean, "share_ci": interval,
            "share_verdict": _verdict(interval, SHARE_GOAL), "default_step_ms": [1e3 * step for step in steps],
            "generation_ms": 1e3 * statistics.median([t for heads in head_seconds for t in heads])}


def cached_prompt_length(context: int, block: int) -> int:
    """The prompt length whose prefix-cache hit leaves one token to compute: ``context`` rounded
    down to whole blocks of ``block`` tokens, plus one (``context`` itself when under a block)."""
    return context if context < block else context // block * block + 1


def force_heads(model, top_p: float, temperature: float = 1.0) -> None:
    """Make ``model``'s heads predict ``temperature`` and ``top_p`` for every token (zero last
    layers; biases at the inverse of their squashing: 2·sigmoid for T, sigmoid for P)."""
    with torch.no_grad():
        for head, value in ((model.temp_head, temperature / 2.0), (model.top_p_head, top_p)):
            last = head.mlp[2]
            last.weight.zero_()
            last.bias.fill_(math.log(value / (1.0 - value)))


def _settings(args, base_path: str, folder: Path) -> list[tuple[str, str]]:
    """(name, heads-only folder) per setting: the forced P values, then the trained heads."""
    from heads.model import AutoDecoModelForCausalLM

    model = AutoDecoModelForCausalLM.from_base(base_path)
    settings = []
    for top_p in args.top_ps:
        force_heads(model, top_p)
        path = folder / f"p{top_p}"
        model.save_pretrained(path)
        settings.append((f"P={top_p:g}", str(path)))
    if args.heads:
        settings.append(("trained", str(args.heads)))
    return settings


def _child(spec: dict, env: dict) -> dict:
    cmd = [sys.executable, "-m", "harness.bench.nucleus", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        raise UserError(f"bench nucleus: the {spec['backend']} child ({spec['threads']} threads) failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> int:
    from harness.backends.dtype import resolve_dtype
    from harness.models import is_autodeco, read_config, resolve_model

    base_path = resolve_model(args.model)
    if args.heads and not is_autodeco(read_config(args.heads)):
        raise UserError(f"--heads {args.heads}: not an AutoDeco checkpoint")
    dtype = resolve_dtype(args.dtype)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="autodeco-nucleus-") as tmp:
        settings = _settings(args, base_path, Path(tmp))
        for backend in args.backends:
            for threads in args.threads:
                spec = {"backend": backend, "threads": threads, "base": base_path, "settings": settings,
                        "dtype": dtype, "batch": args.batch_size, "context": args.context,
                        "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed, "tmp": tmp}
                env = {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
                print(f"{backend}, {threads} thread(s): {len(settings)} settings x {args.repeats} repeats ...",
                      file=sys.stderr, flush=True)
                results[f"{backend}@{threads}"] = _child(spec, env)
    cells = [row for column in results.values() for row in column["settings"].values()]
    summary = {"worst_ratio": max(r["ratio"] for r in cells), "goal": GOAL,
               "verdicts": {v: sum(r["verdict"] == v for r in cells) for v in VERDICTS},
               "worst_share": max(r["share_mean"] for r in cells), "share_goal": SHARE_GOAL,
               "share_verdicts": {v: sum(r["share_verdict"] == v for r in cells) for v in VERDICTS}}
    _print_table(results, [name for name, _ in settings], dtype, args, summary)
    write_result(args.out, "bench_nucleus.json", {
        "bench": "nucleus", "model": args.model, "dtype": dtype, "batch": args.batch_size, "context": args.context,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "results": results, **summary})
    return 0


def _print_table(results: dict, names: list[str], dtype: str, args, summary: dict) -> None:
    columns = list(results)
    vllm_prompts = sorted({data["prompt_tokens"] for data in results.values() if "prompt_tokens" in data})
    print(f"bench nucleus: {args.model} {dtype}, batch {args.batch_size}, context {args.context}"
          + (f" (vllm: {', '.join(map(str, vllm_prompts))}, whole KV blocks + 1)" if vllm_prompts else "")
          + f", {args.new_tokens} new tokens, {args.repeats} interleaved repeats")
    print(f"AutoDeco / default sampling, wall time: median of the repeats' ratios [95% interval of their geometric "
          f"mean]; + meets the goal <= {GOAL} (whole interval at or below), - misses (whole interval above), "
          "? undecided")
    mark = {"meets": "+", "misses": "-", "undecided": "?"}
    width = 26
    print(f"  {'heads':<10}" + "".join(f"{c:>{width}}" for c in columns))
    for name in names:
        cells = []
        for c in columns:
            r = results[c]["settings"][name]
            interval = "[{:.3f}, {:.3f}]".format(*r["ratio_ci"]) if r["ratio_ci"] else "[no interval]"
            cells.append(f"{r['ratio']:.4f} {interval} {mark[r['verdict']]}")
        print(f"  {name:<10}" + "".join(f"{cell:>{width}}" for cell in cells))
    for column, data in results.items():
        print(f"AutoDeco's decoding step (heads, features, ÷T, nucleus) as a share of a default-sampling decode "
              f"step ({column}, {data['step_ms']:.1f} ms): per repeat, the median step in the AutoDeco run over the "
              f"paired default run's median step; geometric mean [95% interval], verdict against "
              f"{100 * SHARE_GOAL:g}%" + ("; on one step's logits natively and by its torch steps"
                                         if column.startswith("hf@") else ""))
        for name in names:
            s = data["settings"][name]
            low, high = (100 * x for x in s["share_ci"]) if s["share_ci"] else (math.nan, math.nan)
            line = (f"  {name:<10} in generation {s['generation_ms']:.3f} ms = {100 * s['share_mean']:.2f}% "
                    f"[{low:.2f}, {high:.2f}] {mark[s['share_verdict']]}")
            if column.startswith("hf@"):
                line += (f"; one step {s['autodeco_ms']:.3f} ms (torch steps {s['torch_steps_ms']:.3f} ms), "
                         f"{s['slow_rows']}/{args.batch_size} rows past the top candidates, "
                         f"mean P {s['top_p_mean']:.4f}")
            print(line)
    verdicts = summary["verdicts"]
    counts = ", ".join(f"{verdicts[v]} {v}" for v in VERDICTS)
    print(f"wall time: worst median ratio {summary['worst_ratio']:.4f}; of {sum(verdicts.values())} cells: {counts} "
          f"(goal <= {GOAL})")
    shares = summary["share_verdicts"]
    counts = ", ".join(f"{shares[v]} {v}" for v in VERDICTS)
    print(f"step share: worst {100 * summary['worst_share']:.2f}%; of {sum(shares.values())} cells: {counts} "
          f"(goal <= {100 * SHARE_GOAL:g}%)")
    faster = [f"{column} {name}" for column, data in results.items() for name, r in data["settings"].items()
              if r["ratio_ci"] and r["ratio_ci"][1] < 1.0]
    if faster:
        print(f"wall-time intervals wholly below 1 (AutoDeco only adds work to a step, so these are host noise, "
              f"not findings): {', '.join(faster)}")


# ---------------------------------------------------------------------------------------------
# The children: one engine, one thread count, every setting


def _interleaved(repeats: int, default, autodeco) -> dict:
    walls = {"default": [], "autodeco": []}
    for r in range(repeats):
        order = ("default", "autodeco") if r % 2 == 0 else ("autodeco", "default")
        for side in order:
            walls[side].append((default if side == "default" else autodeco)(r))
    ratios = [a / d for a, d in zip(walls["autodeco"], walls["default"], strict=True)]
    return {"ratio": statistics.median(ratios), "ratios": ratios, **ratio_interval(ratios),
            **{f"{k}_seconds": v for k, v in walls.items()}}


@contextlib.contextmanager
def _timed_decoding(seconds: list[float]):
    """Append the wall time of every AutoDeco decoding step (``heads.model.decode``, which the
    model's forward calls) to ``seconds`` while inside."""
    import heads.model as heads_model

    original = heads_model.decode

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    heads_model.decode = timed
    try:
        yield
    finally:
        heads_model.decode = original


def _hf_child(spec: dict) -> dict:
    import heads.model as heads_model
    from harness.backends.hf import HFBackend
    from harness.decoding import get_preset
    from heads.checkpoint import head_tensors
    from heads.model import decode
    from heads.nucleus import _cutoff, logit_stats

    torch.set_num_threads(spec["threads"])
    settings = spec["settings"]
    backend = HFBackend(settings[0][1], dtype=spec["dtype"], base=spec["base"])  # as `eval` loads it
    model, llm = backend.model, backend.llm
    presets = {"default": get_preset("default"), "autodeco": get_preset("autodeco")}
    prompts = torch.tensor(natural_rows(backend.tokenizer, spec["batch"], spec["context"]))
    mask = torch.ones_like(prompts)
    with torch.inference_mode():  # the shared prefill: all but the last prompt token
        cache = llm(prompts[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
                    past_key_values=backend.new_cache()).past_key_values  # None: the model's own

    def generate(preset: str, seed: int) -> float:
        """The backend's generate (its kernels, cache and row sampler) from a copy of the prefilled cache."""
        past = copy.deepcopy(cache)  # outside the timed region
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        start = time.perf_counter()
        out = backend.generate_ids(prompts, presets[preset], generators, spec["new_tokens"], eos=False,
                                   past_key_values=past)
        seconds = time.perf_counter() - start
        assert out.shape[1] == prompts.shape[1] + spec["new_tokens"], out.shape
        return seconds

    def timed(preset: str, seed: int, starts: list[list[float]], heads: list[list[float]]) -> float:
        """generate(preset); the start time of each step's forward appended to ``starts`` and the
        time of each AutoDeco decoding step to ``heads``, one list per run each."""
        starts.append([])
        heads.append([])
        hook = model.register_forward_pre_hook(lambda *_: starts[-1].append(time.perf_counter()))
        try:
            with _timed_decoding(heads[-1]):
                return generate(preset, seed)
        finally:
            hook.remove()

    def torch_steps(h, b):
        saved = heads_model.native_decode
        heads_model.native_decode = lambda *args: None
        try:
            return decode(model.temp_head, model.top_p_head, h, b, use_temperature=True, use_top_p=True)
        finally:
            heads_model.native_decode = saved

    def step_ms(fn, repeats: int = 20) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    generate("default", 0)
    out = {"settings": {}}
    for name, folder in settings:
        model.load_heads(head_tensors(folder))
        generate("autodeco", 0)  # warm-up
        starts: dict[str, list[list[float]]] = {"default": [], "autodeco": []}
        heads: dict[str, list[list[float]]] = {"default": [], "autodeco": []}
        row = _interleaved(spec["repeats"],
                           lambda r, s=starts, h=heads: timed("default", spec["seed"] + r, s["default"], h["default"]),
                           lambda r, s=starts, h=heads: timed("autodeco", spec["seed"] + r, s["autodeco"],
                                                              h["autodeco"]))
        assert not any(heads["default"]), "the default preset ran AutoDeco's decoding step"
        row.update(share_interval(heads["autodeco"], starts["default"]))
        with torch.inference_mode():  # AutoDeco's step on this setting's real logits of one step
            hidden, base_logits, _ = model.base_forward(prompts[:, -1:], attention_mask=mask,
                                                        past_key_values=copy.deepcopy(cache), logits_to_keep=1)
            _, temperature, top_p = decode(model.temp_head, model.top_p_head, hidden, base_logits,
                                           use_temperature=True, use_top_p=True)
            z = base_logits[:, -1].float() / temperature[:, -1:].float()
            p = top_p[:, -1].float()
            stats = logit_stats(z, moments=False)
            _, resolved = _cutoff(stats.top_values, stats.lse, p)
            row.update(autodeco_ms=step_ms(lambda h=hidden, b=base_logits: decode(
                           model.temp_head, model.top_p_head, h, b, use_temperature=True, use_top_p=True)),
                       torch_steps_ms=step_ms(lambda h=hidden, b=base_logits: torch_steps(h, b)),
                       slow_rows=int((~resolved).sum()), top_p_mean=float(p.mean()))
        out["settings"][name] = row
        print(f"  hf {name}: ratio {row['ratio']:.4f}", file=sys.stderr, flush=True)
    return {**out, "step_ms": _default_step_ms(out)}


def _default_step_ms(out: dict) -> float:
    """A default decode step: the median of the default runs' steps."""
    return statistics.median(ms for row in out["settings"].values() for ms in row["default_step_ms"])


def _vllm_child(spec: dict) -> dict:
    from vllm import SamplingParams

    from harness.backends.vllm import VLLMBackend
    from heads.checkpoint import merge

    settings = spec["settings"]
    merged = merge(settings[0][1], spec["base"], Path(spec["tmp"]) / f"merged-{os.getpid()}")
    length = spec["context"] + spec["new_tokens"] + 8
    backend = VLLMBackend(str(merged), trace=False, dtype=spec["dtype"], max_model_len=length)
    tokenizer = backend.tokenizer
    context = cached_prompt_length(spec["context"], backend.llm.llm_engine.vllm_config.cache_config.block_size)
    prompts = [{"prompt_token_ids": ids} for ids in natural_rows(tokenizer, spec["batch"], context)]

    def generate(heads_on: bool, seed: int, runs: list[list[list[float]]] | None = None) -> float:
        """One timed generation, heads on or off; with ``runs``, the worker's (start, head-work
        seconds) of each compute_logits call appended to it as one list."""
        backend.llm.collective_rpc("autodeco_set_decoding", args=(heads_on, heads_on))
        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=seed * 1000 + i,
                                 max_tokens=spec["new_tokens"], ignore_eos=True) for i in range(len(prompts))]
        if runs is not None:
            backend.llm.collective_rpc("autodeco_time_heads", args=(True,))
        start = time.perf_counter()
        outputs = backend.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if runs is not None:
            runs.append(backend.llm.collective_rpc("autodeco_time_heads", args=(False,))[0])
        assert all(len(o.outputs[0].token_ids) == spec["new_tokens"] for o in outputs)
        return seconds

    generate(False, 0)  # warm-up: the prompts enter the prefix cache
    out = {"settings": {}, "prompt_tokens": context}
    try:
        for name, folder in settings:
            backend.llm.collective_rpc("autodeco_load_heads", args=(str(Path(folder).resolve()),))
            generate(True, 0)
            runs: dict[bool, list] = {False: [], True: []}
            row = _interleaved(spec["repeats"], lambda r, runs=runs: generate(False, spec["seed"] + r, runs[False]),
                               lambda r, runs=runs: generate(True, spec["seed"] + r, runs[True]))
            default_starts = [[start for start, _ in run] for run in runs[False]]
            heads = [[seconds for _, seconds in run] for run in runs[True]]
            row.update(share_interval(heads, default_starts))
            out["settings"][name] = row
            print(f"  vllm {name}: ratio {row['ratio']:.4f}", file=sys.stderr, flush=True)
    finally:
        backend.close()
    return {**out, "step_ms": _default_step_ms(out)}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _spec = json.loads(sys.argv[2])
    _result = (_hf_child if _spec["backend"] == "hf" else _vllm_child)(_spec)
    print(json.dumps(_result))
