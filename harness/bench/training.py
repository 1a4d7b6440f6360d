"""`autodeco bench loss` and `autodeco bench train`: what training the heads costs.

- loss: forward + backward of the soft top-p loss, chunked (the default kernel: numba on CPU) vs
  the direct autograd form, each run in a fresh process (peak RSS over the inputs), repeats
  interleaved, medians.
- train: real `AutoDecoTrainer` steps (base no-grad forward, heads, loss, backward, AdamW) vs the
  base forward alone on the same batch of natural text: the ratio of tokens per second, against
  the forward timed before the loss ever ran and after (same process).
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
# autodeco bench train: training tokens/s / base forward-only tokens/s


def train(args) -> int:
    """Training tokens/s against base forward-only tokens/s, the forward measured twice in this
    process: before any loss ran and after the training steps. A kernel that disturbs torch's
    threads (numba's OpenMP layer did: ~3x slower forwards from then on) shows as after/before < 1,
    and the ratio is reported against both."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from harness.bench import natural_rows, write_result
    from heads.training.trainer import AutoDecoTrainer, AutoDecoTrainingConfig, build_model

    torch.set_num_threads(args.threads)
    batch, length = args.batch, args.length
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AutoDecoTrainingConfig(
            model=args.model, train_file="-", output_dir=tmp, per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, max_steps=args.steps + 1, max_length=length, save_steps=10**9,
            report_to="none", logging_steps=10**9, learning_rate=5e-6, disable_tqdm=True,
        )
        model, base_path = build_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        prompt_len = length // 4  # natural text: the base's real next-token distributions
        rows = [{"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (length - prompt_len)}
                for ids in natural_rows(tokenizer, batch * (args.steps + 1), length, stride=13)]

        step_times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                step_times.append(time.perf_counter() - self.start)

        ids = torch.tensor([r["input_ids"] for r in rows[:batch]])

        def forward_seconds() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                model.base_forward(input_ids=ids, attention_mask=torch.ones_like(ids))
                return time.perf_counter() - start

        forward_seconds()  # warm-up
        before = [forward_seconds() for _ in range(args.forward_repeats)]
        trainer = AutoDecoTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
        after = [forward_seconds() for _ in range(args.forward_repeats)]
    tokens = batch * length
    train_tps = tokens / statistics.median(step_times[1:])  # step 1 warms up (kernel compile, allocator)
    before_tps, after_tps = tokens / statistics.median(before), tokens / statistics.median(after)
    ratio, ratio_after = train_tps / before_tps, train_tps / after_tps
    print(f"batch {batch} x length {length} on {args.threads} threads, median of {len(step_times) - 1} steps "
          f"and {args.forward_repeats} forwards each:")
    print(f"  training {train_tps:.1f} tokens/s; base forward-only {before_tps:.1f} tokens/s before the loss ran, "
          f"{after_tps:.1f} after it (after / before = {after_tps / before_tps:.3f}; 1 = no interference)")
    print(f"ratio training / forward-only = {ratio:.3f} (forward after the loss: {ratio_after:.3f}); "
          f"goal >= 0.8 (first epoch)")
    write_result(args.out, "bench_train.json", {
        "bench": "train", "model": args.model, "batch": batch, "length": length, "threads": args.threads,
        "train_step_seconds": step_times, "forward_seconds_before": before, "forward_seconds_after": after,
        "train_tokens_per_second": train_tps, "forward_tokens_per_second_before": before_tps,
        "forward_tokens_per_second_after": after_tps, "ratio": ratio, "ratio_after": ratio_after, "target": 0.8})
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--loss-bench-child":
    _variant, _length, _vocab, _chunk, _seed = sys.argv[2], *map(int, sys.argv[3:])
    print(json.dumps(loss_bench_child(_variant, _length, _vocab, _chunk, _seed)))
