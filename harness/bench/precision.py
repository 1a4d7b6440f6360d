"""`autodeco bench precision`: bf16 against fp32 per engine — decode speed and the accuracy check.

For each backend, one engine per dtype: (1) a fixed-shape decode (batch 16, no EOS, prefill
excluded; `harness.bench.engine.decode_vs_bound`), (2) greedy on the demo's held-out problems
(arith, 16 problems, 128 tokens). Prints the speed ratio bf16 / fp32 (goal >= 1.4 on vLLM) and
the accuracy check:

    bf16 passes when its graded accuracy is within ACCURACY_GAP of fp32's (2 of the demo's 16
    problems) and the per-problem verdicts (right / wrong) agree on at least AGREEMENT of them.

Word-for-word equality is reported but not required: bf16 keeps ~3 significant digits of each
logit, so a greedy path parts from fp32's at the first near-tie — SmolLM2's arith answers are
long and wordy, and measured here (hf) 7 of 16 completions were identical, 9 of 16 extracted
answers equal, 15 of 16 verdicts equal, accuracy 3/16 (fp32) vs 2/16 (bf16). AutoDeco's heads
and the nucleus stay fp32 in both engines.
"""

from __future__ import annotations

import sys

from harness.backends import Request, get_backend, parse_options
from harness.bench import write_result
from harness.bench.engine import decode_vs_bound, read_bandwidth
from harness.decoding import get_preset
from harness.models import resolve_model
from tasks import get_task

ACCURACY_GAP = 0.125  # accuracies at most this far apart
AGREEMENT = 0.8  # and at least this share of problems with the same verdict
SPEED_GOAL = 1.4  # vLLM bf16 decode / fp32 decode, on CPUs with native bf16
DTYPES = ("float32", "bfloat16")


def greedy_texts(backend, task, docs, max_tokens: int) -> dict[str, str]:
    """Greedy completion per doc id."""
    requests = [Request(key=f"{task.name}/{task.doc_id(d)}", prompt=task.prompt(d, backend.tokenizer),
                        preset=get_preset("greedy"), seed=0, n=1, max_tokens=max_tokens) for d in docs]
    return {c.key.split("/", 1)[1]: c.text for c in backend.generate(requests)}


def accuracy_check(task, docs, reference: dict[str, str], other: dict[str, str]) -> dict:
    """Two greedy runs on ``docs`` compared: accuracies, verdict agreement (``passed`` per the
    tolerance above), identical completions and equal extracted answers (reported)."""
    n = len(docs)
    verdicts = [[task.grade(d, texts[task.doc_id(d)]) for d in docs] for texts in (reference, other)]
    accuracy = [sum(v.correct for v in run) / n for run in verdicts]
    same_verdict = sum(a.correct == b.correct for a, b in zip(*verdicts, strict=True)) / n
    passed = abs(accuracy[0] - accuracy[1]) <= ACCURACY_GAP and same_verdict >= AGREEMENT
    return {"accuracy_reference": accuracy[0], "accuracy_other": accuracy[1], "same_verdict": same_verdict,
            "identical": sum(reference[task.doc_id(d)] == other[task.doc_id(d)] for d in docs) / n,
            "same_answer": sum(a.extracted == b.extracted for a, b in zip(*verdicts, strict=True)) / n,
            "passed": passed, "problems": n}


def run(args) -> int:
    task = get_task(args.task)
    docs = task.docs(limit=args.limit)
    model = resolve_model(args.model)
    options = parse_options(args.backend_arg)
    bandwidth = read_bandwidth()
    result = {"bench": "precision", "model": args.model, "task": args.task, "problems": len(docs),
              "read_bandwidth_bytes_per_second": bandwidth, "backends": {}}
    for name in args.backends.split(","):
        texts, decode = {}, {}
        for dtype in DTYPES:
            backend = get_backend(name, model, **{**options, "dtype": dtype})
            try:
                texts[dtype] = greedy_texts(backend, task, docs, args.max_tokens)
                prompt = backend.tokenizer(task.prompt(docs[0], backend.tokenizer), add_special_tokens=False).input_ids
                decode[dtype] = decode_vs_bound(backend, prompt, args.batch, args.new_tokens, bandwidth)
            finally:
                backend.close()
            print(f"{name} {dtype}: decode {decode[dtype]['tokens_per_second']:.1f} tok/s at batch {args.batch}",
                  file=sys.stderr, flush=True)
        check = accuracy_check(task, docs, texts["float32"], texts["bfloat16"])
        speed = decode["bfloat16"]["tokens_per_second"] / decode["float32"]["tokens_per_second"]
        result["backends"][name] = {"decode": decode, "speed_ratio": speed, "accuracy_check": check}
    print(f"bench precision: {args.model}, decode at batch {args.batch} ({args.new_tokens} tokens); greedy on "
          f"{len(docs)} {args.task} problems")
    for name, row in result["backends"].items():
        check = row["accuracy_check"]
        goal = f" (goal >= {SPEED_GOAL})" if name == "vllm" else ""
        print(f"  {name:>5}: bf16 / fp32 decode speed = {row['speed_ratio']:.2f}{goal}; accuracy fp32 "
              f"{check['accuracy_reference']:.1%} vs bf16 {check['accuracy_other']:.1%} (gap <= {ACCURACY_GAP:.1%}), "
              f"same verdict {check['same_verdict']:.0%} (>= {AGREEMENT:.0%}): accuracy check "
              f"{'passed' if check['passed'] else 'FAILED'} (identical completions {check['identical']:.0%}, "
              f"same answers {check['same_answer']:.0%})")
    write_result(args.out, "bench_precision.json", result)
    return 0
