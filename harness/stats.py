"""Uncertainty for comparisons: Pass@1 with a 95% interval over problems, and paired differences.

Why problems, not seeds: the samples of one problem are not independent draws of "the method's
accuracy" — a hard problem is hard for every seed. The unit a reader generalises over is the
problem, so each problem contributes one number (its accuracy over all of its samples, pooled
over seeds) and the interval is a t interval over those numbers (Miller 2024, "Adding Error Bars
to Evals", arXiv 2411.00640). Two methods run on the same problems are compared *paired*: the
per-problem differences carry far less noise than two independent intervals.

- ``pass1_estimate(per_doc)``: ``per_doc`` maps doc id -> that problem's verdicts (bools; counts
  may differ per problem). mean = mean of per-problem accuracies; se = std(ddof=1)/sqrt(n);
  95% CI = mean ± t(0.975, n−1)·se; n = problems.
- ``paired_difference(a, b)``: over the problems present in both, d_i = acc_a(i) − acc_b(i);
  mean, se, t interval as above; ``p_value`` = two-sided paired t-test (1.0 when every d_i is 0;
  0.0 when se is 0 and the mean is not).
- ``bootstrap_ci(per_doc)``: a cluster (by problem) percentile bootstrap, offered beside the t
  interval, never instead of it.
- ``proportion_estimate(k, n)``: a share of n independent units (steering's consistency: the
  prompts that moved as commanded) with its Wilson 95% interval and the two-sided exact binomial
  (sign) test against 1/2, i.e. against chance.
- ``geometric_estimate(values)``: for timings' ratios (benchmarks): the geometric mean and the t
  interval of the logs, exponentiated.
- ``seed_std(per_seed)``: the paper's ± column — the population std (ddof=0) of per-seed Pass@1,
  as the official evaluation script computes it.

Everything is plain Python + ``scipy.stats`` for the t distribution.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from scipy import stats as _scipy

ANECDOTAL_BELOW = 10  # cells from fewer problems are flagged, never bolded as a win
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and 95% interval; ``n`` = problems; ``p_value`` only for differences."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    n: int
    p_value: float | None = None

    @property
    def anecdotal(self) -> bool:
        return self.n < ANECDOTAL_BELOW

    @property
    def significant(self) -> bool:
        """p < 0.05 (differences only)."""
        return self.p_value is not None and self.p_value < ALPHA

    def to_dict(self) -> dict:
        return asdict(self)


def problem_accuracies(per_doc: Mapping[str, Sequence[bool] | float]) -> dict[str, float]:
    """doc id -> fraction of its samples that are correct (problems without samples are dropped).

    A value may also be an accuracy already (a float), e.g. a cross-validated baseline's."""
    out = {}
    for doc, verdicts in per_doc.items():
        if isinstance(verdicts, (int, float)) and not isinstance(verdicts, bool):
            out[doc] = float(verdicts)
        elif verdicts:
            out[doc] = sum(bool(v) for v in verdicts) / len(verdicts)
    return out


def _t_estimate(values: Sequence[float], with_p: bool) -> Estimate:
    n = len(values)
    if n == 0:
        raise ValueError("no problems to estimate over")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, math.nan, math.nan, 1, 1.0 if with_p and mean == 0 else None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(_scipy.t.ppf(1 - ALPHA / 2, n - 1)) * se
    p_value = None
    if with_p:
        if se == 0:
            p_value = 1.0 if mean == 0 else 0.0
        else:
            p_value = float(2 * _scipy.t.sf(abs(mean / se), n - 1))
    return Estimate(mean, se, mean - half, mean + half, n, p_value)


def mean_estimate(values: Sequence[float]) -> Estimate:
    """The mean of independent measurements with its 95% t interval and the t-test of mean = 0
    (e.g. paired timing differences: overhead estimates that say when they are noise)."""
    return _t_estimate(list(values), with_p=True)


def geometric_estimate(values: Sequence[float]) -> tuple[float, list[float] | None]:
    """The geometric mean of positive measurements whose noise is multiplicative (ratios, shares of
    a bound) and its 95% t interval, taken on their logs; None for the interval with one value."""
    estimate = _t_estimate([math.log(v) for v in values], with_p=False)
    interval = [math.exp(estimate.ci_low), math.exp(estimate.ci_high)] if estimate.n > 1 else None
    return math.exp(estimate.mean), interval


def pass1_estimate(per_doc: Mapping[str, Sequence[bool] | float]) -> Estimate:
    """Pass@1 over problems with its 95% t interval (see the module docstring)."""
    return _t_estimate(list(problem_accuracies(per_doc).values()), with_p=False)


def paired_difference(a: Mapping[str, Sequence[bool] | float], b: Mapping[str, Sequence[bool] | float]) -> Estimate:
    """Pass@1(a) − Pass@1(b) on the problems both have, with a paired t interval and p-value."""
    acc_a, acc_b = problem_accuracies(a), problem_accuracies(b)
    shared = sorted(set(acc_a) & set(acc_b))
    if not shared:
        raise ValueError("the two runs share no problem")
    return _t_estimate([acc_a[d] - acc_b[d] for d in shared], with_p=True)


def bootstrap_ci(per_doc: Mapping[str, Sequence[bool]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of Pass@1 from resampling problems with replacement (cluster bootstrap)."""
    values = list(problem_accuracies(per_doc).values())
    if not values:
        raise ValueError("no problems to resample")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(math.fsum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    return means[int(ALPHA / 2 * resamples)], means[min(resamples - 1, int((1 - ALPHA / 2) * resamples))]


def proportion_estimate(successes: int, n: int) -> Estimate:
    """k of n as a share with its Wilson 95% interval; ``p_value``: exact two-sided binomial test
    against 1/2 (NaN interval and p = 1 for n = 0)."""
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), float("nan"), 0, 1.0)
    share, z = successes / n, _scipy.norm.ppf(0.975)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    p = float(_scipy.binomtest(successes, n, 0.5).pvalue)
    return Estimate(share, math.sqrt(share * (1 - share) / n), float(centre - half), float(centre + half), n, p)


def seed_std(per_seed: Sequence[float]) -> float:
    """The paper's ± (population std over seeds, ddof=0, as the official script)."""
    if not per_seed:
        raise ValueError("no seeds")
    mean = math.fsum(per_seed) / len(per_seed)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in per_seed) / len(per_seed))


def verdicts_by_doc(rows: Sequence[Mapping]) -> dict[str, list[bool]]:
    """doc id -> verdicts of every sample row (``doc_id``, ``correct``), pooled over seeds."""
    out: dict[str, list[bool]] = {}
    for row in rows:
        out.setdefault(str(row["doc_id"]), []).append(bool(row["correct"]))
    return out
