"""`autodeco bench grading`: grade 34 560 math answers (128 samples x 270 problems) and print the time.

The problems are the real math sets (AIME 24/25, HMMT 25, BRUMO 25, BeyondAIME = 220) plus 50
arith problems when a data dir is available, else 270 arith problems. The responses are a
seeded, realistic mix per problem: ~2 kB of reasoning, optional ``<think>`` blocks, a correct
share that varies by problem, correct answers in equivalent forms (``\\dfrac``, spacing,
``204.0``, rewritten fractions), a few recurring wrong answers (models repeat themselves),
unique wrong answers (integers and LaTeX expressions), truncated responses without a box,
several boxes, and a handful of adversarial answers (``10^{10^{10}}``, deep nesting,
``\\frac`` garbage) that must come back wrong within the per-check bound.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from harness.core.paths import data_dir

FILLER = [
    "Let us set up the problem carefully.", "We compute the first few cases by hand.",
    "By symmetry we may assume $a \\le b$.", "Substituting $x = 2y$ gives $4y^2 + 3y = 7$.",
    "This contradicts the assumption, so the case is impossible.", "Summing over all $k$ we get the total.",
    "Note that $\\binom{n}{2} = \\frac{n(n-1)}{2}$.", "Therefore the remainder modulo 1000 follows.",
    "Checking the boundary cases confirms the count.", "Hence the expression simplifies nicely.",
]
ADVERSARIAL = ["10^{10^{10}}", "{" * 1000 + "1" + "}" * 1000, "\\\\frac\\\\frac{{}}}{", "9^{9^{9^{9}}}",
               "\\frac{" * 300 + "1" + "}{2}" * 300, "(" * 900 + "2" + ")" * 900]


def _problems(data_dir: Path | None) -> list[dict]:
    from tasks.registry import get_task

    docs: list[dict] = []
    if data_dir is not None:
        for name in ("aime24", "aime25", "hmmt25", "brumo25", "beyondaime"):
            docs += get_task(name, data_dir=data_dir).docs()
    arith = get_task("arith", data_dir=None, n=270 - len(docs), difficulty=3, split="test").docs()
    return docs + arith


def _equivalent_forms(gold: str, rng: random.Random) -> list[str]:
    forms = [gold, gold.replace("\\frac", "\\dfrac"), f" {gold} "]
    if gold.lstrip("-").isdigit():
        value = int(gold)
        forms += [f"{value}.0", f"\\frac{{{2 * value}}}{{2}}", f"{value:,}" if abs(value) >= 1000 else str(value)]
    return forms


def _wrong(gold: str, rng: random.Random) -> str:
    if gold.lstrip("-").isdigit() and rng.random() < 0.7:
        return str(int(gold) + rng.choice([-1, 1]) * rng.randint(1, 500))
    return rng.choice([f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}", f"\\sqrt{{{rng.randint(2, 500)}}}",
                       f"{rng.randint(2, 9)}\\pi", f"x^{{{rng.randint(2, 5)}}} + {rng.randint(1, 9)}",
                       f"2^{{{rng.randint(2, 120)}}}", f"{rng.randint(1, 9)}\\sqrt{{{rng.randint(2, 30)}}}"])


def make_responses(problems: list[dict], samples: int, seed: int = 0) -> list[tuple[dict, str]]:
    """The seeded (doc, response) mix described in the module docstring."""
    rng = random.Random(seed)
    pairs = []
    adversarial_left = list(ADVERSARIAL) * 3
    for doc in problems:
        gold = str(doc["answer"]).strip()
        accuracy = rng.betavariate(0.6, 1.2)
        distractors = [_wrong(gold, rng) for _ in range(rng.randint(2, 6))]
        for _ in range(samples):
            reasoning = " ".join(rng.choice(FILLER) for _ in range(rng.randint(15, 40)))
            roll = rng.random()
            if adversarial_left and rng.random() < 0.0006:
                answer = adversarial_left.pop()
            elif roll < accuracy:
                answer = rng.choice(_equivalent_forms(gold, rng))
            elif roll < accuracy + (1 - accuracy) * 0.55:
                answer = rng.choice(distractors)
            elif roll < accuracy + (1 - accuracy) * 0.8:
                answer = _wrong(gold, rng)
            else:
                answer = None  # truncated: no final box
            if answer is None:
                text = reasoning
            elif rng.random() < 0.2:
                text = f"{reasoning} First guess \\boxed{{{_wrong(gold, rng)}}}. Rechecking, the answer is \\boxed{{{answer}}}."
            else:
                text = f"{reasoning}\n\nThe final answer is $\\boxed{{{answer}}}$."
            if rng.random() < 0.3:
                text = f"<think>{reasoning}</think>\n{text[-200:]}" if answer is not None else f"<think>{reasoning}"
            pairs.append((doc, text))
    return pairs


def run(data_dir: Path | None, samples: int = 128, workers: int = 2, seed: int = 0) -> dict:
    """Grade the mix once; return counts and seconds."""
    from tasks import math_grader

    problems = _problems(data_dir)
    pairs = make_responses(problems, samples, seed)
    math_grader._CACHE.clear()
    start = time.perf_counter()
    verdicts = math_grader.grade_many(pairs, workers=workers)
    seconds = time.perf_counter() - start
    checks = [v.details.get("check", "none") for v in verdicts]
    return {
        "answers": len(pairs), "problems": len(problems), "seconds": seconds, "workers": workers,
        "correct": sum(v.correct for v in verdicts),
        "unique_checks": len({(str(d["answer"]), v.extracted) for (d, _), v in zip(pairs, verdicts, strict=True)
                              if v.extracted is not None}),
        "by_check": {name: checks.count(name) for name in sorted(set(checks))},
        "adversarial_wrong": all(not v.correct for v in verdicts if v.extracted in ADVERSARIAL),
    }


def main(args) -> int:
    """The command: grade, print the report and the rate."""
    report = run(data_dir(args.data_dir), samples=args.samples, workers=args.workers, seed=args.seed)
    print(json.dumps(report, indent=2))
    print(f"graded {report['answers']} math answers in {report['seconds']:.1f} s with {args.workers} workers "
          f"({report['answers'] / report['seconds']:.0f} answers/s; target <= 60 s)")
    return 0
