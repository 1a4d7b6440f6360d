"""`autodeco bench loss` and `autodeco bench train`: what training the heads costs.

- loss: forward + backward of the soft top-p loss, chunked (the default kernel: numba on CPU) vs
  the direct autograd form, each run in a fresh process (peak RSS over the inputs), repeats
  interleaved, medians.
- train: real `AutoDecoTrainer` steps vs the base forward alone on the same rows of natural text,
  in tokens per second: the first epoch (its steps run the base and write the hidden-state cache,
  as training does by default; for reference, the cache built before the first step + an epoch
  read from it) and a cached epoch, where a cached step's time goes, and the forward timed before
  the loss ever ran and after (same process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness.core.errors import UserError


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def loss_bench_child(variant: str, length: int, vocab: int, chunk: int, seed: int) -> dict:
    """One measurement in this (fresh) process: forward + backward of the loss, time and peak RSS.

    Extra peak memory = peak RSS during the call - RSS with the inputs in place (the peak counter
    is reset through /proc/self/clear_refs first).
    """
    import torch

    from heads.training.loss import autodeco_loss

    torch.manual_seed(seed)
    logits = torch.randn(1, length, vocab) * 2.0  # an LM-like row: a broad floor and a few peaks
    peaks = torch.randint(0, vocab, (1, length, 3))
    logits.scatter_add_(-1, peaks, torch.rand(1, length, 3) * 12.0)
    labels = torch.where(torch.rand(1, length) < 0.5, logits.argmax(-1), torch.randint(0, vocab, (1, length)))
    temperature = (torch.rand(1, length) * 1.2 + 0.4).requires_grad_()
    top_p = (torch.rand(1, length) * 0.6 + 0.35).requires_grad_()
    kwargs = dict(train_temperature=False, train_top_p=True, easy_token_drop=0.0, seed=seed)
    if variant == "warmup":  # compile the numba kernel (cached on disk) outside the timed runs
        autodeco_loss(logits[:, :8], temperature[:, :8], top_p[:, :8], labels[:, :8], **kwargs, chunk_size=4)
        return {}
    chunk_size = None if variant == "direct" else chunk
    kernel = "auto" if variant in ("direct", "chunked") else variant.split("-", 1)[1]
    baseline = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    cpu_start, start = time.process_time(), time.perf_counter()
    out = autodeco_loss(logits, temperature, top_p, labels, chunk_size=chunk_size, kernel=kernel, **kwargs)
    out.loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _rss_kib("VmHWM")
    return {"variant": variant, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "extra_peak_gib": (peak - baseline) / 2**20,
            "loss": out.loss.item(), "grad_t": temperature.grad.double().norm().item(),
            "grad_p": top_p.grad.double().norm().item()}


def _run_child(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "harness.bench.training", "--loss-bench-child", variant, str(args.length),
           str(args.vocab), str(args.chunk), str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise UserError(f"bench loss {variant} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss(args) -> int:
    variants = ["chunked"] + ([] if args.skip_direct else ["direct"])
    _run_child("warmup", args)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):  # interleaved repeats: the machine's load hits both alike
        for variant in variants:
            if variant == "direct" and repeat >= args.direct_repeats:
                continue
            row = _run_child(variant, args)
            results[variant].append(row)
            print(f"  {variant:8s} {row['seconds']:7.2f} s wall {row.get('cpu_seconds', 0):7.2f} s CPU  extra peak {row['extra_peak_gib']:6.3f} GiB  "
                  f"loss {row['loss']:.6f}", flush=True)
    summary = {"length": args.length, "vocab": args.vocab, "chunk": args.chunk, "threads": args.threads}
    for variant, rows in results.items():
        summary[variant] = {"seconds_median": statistics.median(r["seconds"] for r in rows),
                            "cpu_seconds_median": statistics.median(r.get("cpu_seconds", 0.0) for r in rows),
                            "extra_peak_gib_median": statistics.median(r["extra_peak_gib"] for r in rows),
                            "loss": rows[0]["loss"], "grad_t_norm": rows[0]["grad_t"],
                            "grad_p_norm": rows[0]["grad_p"], "repeats": len(rows)}
    chunked = summary["chunked"]
    print(f"chunked: {chunked['seconds_median']:.2f} s ({chunked['cpu_seconds_median']:.2f} s CPU), extra peak {chunked['extra_peak_gib_median']:.3f} GiB "
          f"(target <= 1 GiB)")
    if "direct" in summary:
        direct = summary["direct"]
        summary["time_ratio_direct_over_chunked"] = direct["seconds_median"] / chunked["seconds_median"]
        summary["loss_abs_diff"] = abs(direct["loss"] - chunked["loss"])
        print(f"direct:          {direct['seconds_median']:.2f} s ({direct['cpu_seconds_median']:.2f} s CPU), extra peak {direct['extra_peak_gib_median']:.3f} GiB")
        print(f"speed-up {summary['time_ratio_direct_over_chunked']:.1f}x; |loss difference| "
              f"{summary['loss_abs_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# autodeco bench train: training tokens/s / base forward-only tokens/s, first epoch and cached epochs

FIRST_EPOCH_GOAL = 0.8  # training tokens/s of epoch 1 (writing the hidden cache included) / forward-only
CACHED_EPOCH_GOAL = 3.0  # training tokens/s of an epoch read from the cache / forward-only
PARTS = ("read", "logits", "heads", "features", "kernel", "loss other", "backward", "optimizer")


def cached_step_parts(model, cache, row_batches, cfg) -> dict[str, list[float]]:
    """Seconds per part of a training step read from the cache, per batch of rows: reading the rows
    (``read``), recomputing the logits (``logits``), the two head MLPs (``heads``), the top-p head's
    features with the loss kernel's first pass (``features``), the rest of the loss kernel
    (``kernel``), masks and reduction (``loss other``), ``backward``, AdamW on the heads
    (``optimizer``). The calls of `AutoDecoTrainer.compute_loss`, timed by the loss's ``timings``."""
    import torch

    from heads.training.loss import autodeco_loss_from_hidden

    output_layer = model.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    before = [p.detach().clone() for p in params]
    times: dict[str, list[float]] = {name: [] for name in PARTS}
    for number, rows in enumerate(row_batches):
        parts = dict.fromkeys(PARTS, 0.0)
        start = time.perf_counter()
        batch = cache.batch(rows)
        parts["read"] = time.perf_counter() - start
        start = time.perf_counter()
        out, _, _ = autodeco_loss_from_hidden(
            batch["hidden"].to(output_layer.weight.dtype), output_layer, model.temp_head, model.top_p_head,
            batch["targets"], batch["easy"], batch["base_prob"], alpha=cfg.alpha, easy_token_drop=cfg.easy_token_drop,
            generator=torch.Generator().manual_seed(number), chunk_size=cfg.loss_chunk_size, timings=parts)
        inside = sum(parts[k] for k in ("logits", "heads", "features", "kernel"))
        parts["loss other"] = time.perf_counter() - start - inside
        start = time.perf_counter()
        out.loss.backward()
        parts["backward"] = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        parts["optimizer"] = time.perf_counter() - start
        for name, seconds in parts.items():
            times[name].append(seconds)
    with torch.no_grad():  # leave the heads as they were
        for param, value in zip(params, before, strict=True):
            param.copy_(value)
    return times


def train(args) -> int:
    """Training tokens/s against base forward-only tokens/s on SmolLM2, in one process.

    - first epoch, as `autodeco train` runs it (``hidden_cache_fill: first_epoch``): each step runs
      the base on its rows, stores their hidden states and trains on the base's own logits (median
      step); for reference, the cache built before the first step (``before``: median of
      ``--build-repeats`` builds) + one epoch read from it;
    - cached epoch: an epoch of steps read from the cache (median step);
    - without the cache (``--uncached-steps``): the base forward in every step, for reference;
    - where a cached step's time goes (median per part over the rows);
    - the base forward is timed before any loss ran and again after the training steps: a kernel
      that disturbs torch's threads (numba's OpenMP layer did: ~3x slower forwards from then on)
      shows as after/before < 1, and the ratios are reported against both.
    """
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from harness.bench import natural_rows, write_result
    from heads.training import hidden_cache
    from heads.training.loss import autodeco_loss_from_hidden
    from heads.training.trainer import AutoDecoTrainer, AutoDecoTrainingConfig, build_model

    torch.set_num_threads(args.threads)
    batch, length, steps, epochs = args.batch, args.length, args.steps, args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        def config(**changes) -> AutoDecoTrainingConfig:
            values = dict(model=args.model, train_file="-", output_dir=tmp, per_device_train_batch_size=batch,
                          gradient_accumulation_steps=1, max_length=length, save_steps=10**9, report_to="none",
                          logging_steps=10**9, learning_rate=5e-6, disable_tqdm=True,
                          hidden_cache_dtype=args.cache_dtype)
            values.update(changes)
            return AutoDecoTrainingConfig(**values)

        cfg = config(num_train_epochs=epochs, hidden_cache=str(Path(tmp) / "cache"), hidden_cache_fill="first_epoch")
        model, base_path = build_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        prompt_len = length // 4  # natural text: the base's real next-token distributions
        rows = [{"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (length - prompt_len)}
                for ids in natural_rows(tokenizer, batch * steps, length, stride=13)]
        ids = torch.tensor([r["input_ids"] for r in rows[:batch]])

        def forward_seconds() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                model.base_forward(input_ids=ids, attention_mask=torch.ones_like(ids))
                return time.perf_counter() - start

        forward_seconds()  # warm-up
        before = [forward_seconds() for _ in range(args.forward_repeats)]

        step_times: list[tuple[float, float]] = []  # (epoch, seconds)

        class Timer(TrainerCallback):
            def on_step_begin(self, _args, state, *a, **k):
                self.start = time.perf_counter()

            def on_step_end(self, _args, state, *a, **k):
                step_times.append((state.epoch, time.perf_counter() - self.start))

        # The key once (hashing the base's tensors: a fixed cost per run), then builds before any
        # training, under other names: the trainer's own cache is written by its first epoch.
        trainer = AutoDecoTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[Timer()])
        data = trainer.train_dataset
        cache_rows = list(zip(data["input_ids"], data["labels"], strict=True))
        dtype = model.llm.dtype if args.cache_dtype == "auto" else hidden_cache.DTYPES[args.cache_dtype]
        start = time.perf_counter()
        hidden_cache.cache_key(model.llm, cache_rows, length, dtype)
        key_seconds = time.perf_counter() - start
        build_seconds = []
        for repeat in range(args.build_repeats):
            folder = Path(tmp) / "builds" / f"repeat-{repeat}"
            start = time.perf_counter()
            built = hidden_cache.build(model, cache_rows, folder, folder.name, dtype, batch_size=batch,
                                       chunk=cfg.loss_chunk_size, pad_token_id=tokenizer.pad_token_id, progress=False)
            build_seconds.append(time.perf_counter() - start)
        warm = built.batch([0])  # compile the loss kernel (cached on disk) outside the timed steps
        autodeco_loss_from_hidden(warm["hidden"][:8].to(model.llm.dtype), model.get_output_embeddings(),
                                  model.temp_head, model.top_p_head, warm["targets"][:8], warm["easy"][:8],
                                  warm["base_prob"][:8])
        trainer.train()
        cache = trainer.use_hidden_cache()
        if not isinstance(cache, hidden_cache.HiddenCache):
            raise RuntimeError(f"bench train: the trainer did not complete its hidden cache ({cache!r})")
        fill_seconds = [seconds for _, seconds in step_times[:steps]]
        step_times = step_times[steps:]
        parts = cached_step_parts(model, cache, [list(range(i, i + batch)) for i in range(0, len(rows), batch)], cfg)
        uncached: list[float] = []
        if args.uncached_steps:
            plain = AutoDecoTrainer(model=model, args=config(max_steps=args.uncached_steps + 1, hidden_cache="off"),
                                    train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                    callbacks=[Timer()])
            count = len(step_times)
            plain.train()
            uncached = [seconds for _, seconds in step_times[count + 1 :]]  # its first step warms up
            step_times = step_times[:count]
        after = [forward_seconds() for _ in range(args.forward_repeats)]

    tokens_per_step = batch * length
    forward_before = tokens_per_step / statistics.median(before)
    forward_after = tokens_per_step / statistics.median(after)
    cached_steps = [seconds for _, seconds in step_times]
    step_median = statistics.median(cached_steps)
    cached_tps = tokens_per_step / step_median
    first_tps = tokens_per_step / statistics.median(fill_seconds)
    before_seconds = statistics.median(build_seconds) + steps * step_median
    before_tps = tokens_per_step * steps / before_seconds
    first_with_key = tokens_per_step * steps / (steps * statistics.median(fill_seconds) + key_seconds)
    result = {
        "bench": "train", "model": args.model, "batch": batch, "length": length, "steps_per_epoch": steps,
        "epochs": epochs, "threads": args.threads, "cache_dtype": str(dtype).removeprefix("torch."),
        "forward_seconds_before": before, "forward_seconds_after": after,
        "forward_tokens_per_second_before": forward_before, "forward_tokens_per_second_after": forward_after,
        "cache_key_seconds": key_seconds, "cache_build_seconds": build_seconds,
        "first_epoch_step_seconds": fill_seconds, "train_step_seconds": step_times,
        "first_epoch_tokens_per_second": first_tps, "cached_epoch_tokens_per_second": cached_tps,
        "first_epoch_ratio": first_tps / forward_before, "first_epoch_ratio_after": first_tps / forward_after,
        "first_epoch_ratio_with_key": first_with_key / forward_before,
        "first_epoch_ratio_cache_built_before": before_tps / forward_before,
        "cached_epoch_ratio": cached_tps / forward_before, "cached_epoch_ratio_after": cached_tps / forward_after,
        "goals": {"first_epoch": FIRST_EPOCH_GOAL, "cached_epoch": CACHED_EPOCH_GOAL},
        "cached_step_parts_seconds": {name: statistics.median(values) for name, values in parts.items()},
    }
    if uncached:
        result["uncached_step_seconds"] = uncached
        result["uncached_ratio"] = tokens_per_step / statistics.median(uncached) / forward_before
    print(f"batch {batch} x length {length}, {steps} steps per epoch, {epochs} epochs, {args.threads} threads, "
          f"cache dtype {result['cache_dtype']}; medians of {len(fill_seconds)} first-epoch steps, "
          f"{len(cached_steps)} cached steps, {len(build_seconds)} cache builds, {args.forward_repeats} forwards each:")
    print(f"  base forward-only {forward_before:.1f} tokens/s before the loss ran, {forward_after:.1f} after it "
          f"(after / before = {forward_after / forward_before:.3f}; 1 = no interference)")
    print(f"  cache build {statistics.median(build_seconds):.2f} s for {tokens_per_step * steps} tokens "
          f"(+ {key_seconds:.2f} s once per run to hash the base's tensors for the key)")
    print(f"first-epoch ratio  = {result['first_epoch_ratio']:.3f} (its steps write the cache; forward after the "
          f"loss: {result['first_epoch_ratio_after']:.3f}; with the key's hash: "
          f"{result['first_epoch_ratio_with_key']:.3f}; cache built before the first step instead: "
          f"{result['first_epoch_ratio_cache_built_before']:.3f}); goal >= {FIRST_EPOCH_GOAL}")
    print(f"cached-epoch ratio = {result['cached_epoch_ratio']:.3f} (forward after the loss: "
          f"{result['cached_epoch_ratio_after']:.3f}); goal >= {CACHED_EPOCH_GOAL}")
    if uncached:
        print(f"without the cache  = {result['uncached_ratio']:.3f} (median of {len(uncached)} steps)")
    part_seconds = result["cached_step_parts_seconds"]
    total = sum(part_seconds.values())
    print(f"a cached step ({step_median * 1e3:.0f} ms in the trainer; {total * 1e3:.0f} ms in its parts, the rest "
          f"is the trainer's own work):")
    for name, seconds in part_seconds.items():
        print(f"  {name:10s} {seconds * 1e3:8.1f} ms  {seconds / total:6.1%}")
    write_result(args.out, "bench_train.json", result)
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--loss-bench-child":
    _variant, _length, _vocab, _chunk, _seed = sys.argv[2], *map(int, sys.argv[3:])
    print(json.dumps(loss_bench_child(_variant, _length, _vocab, _chunk, _seed)))
