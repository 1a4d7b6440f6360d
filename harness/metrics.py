"""Pass@k and the paper's per-seed Pass@1.

- ``pass_at_k(n, c, k)``: the unbiased estimator 1 − C(n−c, k) / C(n, k) of Chen et al. (2021),
  computed as a product of ratios so it never forms huge binomials.
- ``majority_at_k(samples, k)``: the expected accuracy of a majority vote over k of a problem's
  samples (extracted answer, correct) drawn at random, over every k-subset (exact for small n,
  else 200 seeded random subsets); a tie picks uniformly among the tied answers; no answer = wrong.
- ``summarize(correct)``: for one task, ``correct[seed][doc]`` = list of booleans (the samples of
  that seed). Pass@1 is the mean over seeds of each seed's mean accuracy, with the std over seeds;
  Pass@k (k in 1, 16, 32, 64 up to the samples per doc) pools all seeds' samples of a doc.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from itertools import combinations

PASS_KS = (1, 16, 32, 64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


MAJORITY_SUBSETS = 200  # random k-subsets when enumerating all of them would cost more


def majority_at_k(samples: Sequence[tuple[str | None, bool]], k: int, seed: int = 0) -> float:
    """Expected correctness of the majority answer among k of these samples (see the module docstring).

    Answers are compared as extracted strings; an answer is correct when any sample giving it was
    graded correct. Samples without an extracted answer vote for nothing.
    """
    n = len(samples)
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} needs 1 <= k <= {n} samples")
    correct_answers = {answer for answer, ok in samples if ok and answer is not None}

    def vote(subset) -> float:
        counts = Counter(samples[i][0] for i in subset if samples[i][0] is not None)
        if not counts:
            return 0.0
        top = max(counts.values())
        tied = [answer for answer, count in counts.items() if count == top]
        return sum(answer in correct_answers for answer in tied) / len(tied)

    if math.comb(n, k) <= MAJORITY_SUBSETS:
        subsets = list(combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MAJORITY_SUBSETS)]
    return math.fsum(vote(s) for s in subsets) / len(subsets)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std of an empty list")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(correct: dict[int, dict[str, list[bool]]], ks: Sequence[int] = PASS_KS) -> dict:
    """Pass@1 (mean ± std over seeds) and pooled Pass@k from ``correct[seed][doc_id] = [bool, ...]``."""
    seeds = sorted(correct)
    if not seeds:
        raise ValueError("no samples to summarize")
    doc_ids = sorted(correct[seeds[0]])
    per_seed = []
    for seed in seeds:
        by_doc = correct[seed]
        if sorted(by_doc) != doc_ids:
            raise ValueError(f"seed {seed} covers other documents than seed {seeds[0]}")
        per_seed.append(math.fsum(sum(v) / len(v) for v in by_doc.values()) / len(by_doc))
    mean, std = mean_std(per_seed)
    pooled = {doc: [x for seed in seeds for x in correct[seed][doc]] for doc in doc_ids}
    n_per_doc = {len(v) for v in pooled.values()}
    if len(n_per_doc) != 1:
        raise ValueError(f"documents have different sample counts: {sorted(n_per_doc)}")
    n = n_per_doc.pop()
    out = {"pass@1": mean, "pass@1_std": std, "pass@1_per_seed": per_seed}
    for k in ks:
        if 1 < k <= n:  # pooled pass@1 equals the per-seed mean above
            out[f"pass@{k}"] = math.fsum(pass_at_k(n, sum(v), k) for v in pooled.values()) / len(pooled)
    out.update(n_docs=len(doc_ids), n_samples_per_doc=n, n_seeds=len(seeds))
    return out
