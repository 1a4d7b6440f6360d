"""Exact hard nucleus (top-p) filtering without sorting the vocabulary.

Definition (the contract, shared with the tests' full-sort reference): with p = softmax(z) and
the tokens in descending order of z, keep the shortest prefix whose cumulative probability
reaches P; tokens tied with the last kept one are kept too; everything else gets -inf.
P <= 0 keeps the top token (and its ties); P >= 1 keeps everything.

Why it is fast: the order of probabilities is the order of logits, and the mass of any token
is exp(z_i - lse) once the full-vocabulary logsumexp is known. So the nucleus only needs
(1) one exp pass over the vocabulary for lse (shared with the top-p head's features) and
(2) the largest logits up to the crossing point. Those come from a block-max pre-selection: the
k largest values of a row lie in the k blocks with the largest maxima, so a cheap max over blocks
of 64 plus two tiny top-k's replaces a vocabulary-wide top-k (slow on CPU) or sort (very slow).

Rows whose k candidates do not reach P (flat rows, P near 1: a third to two thirds of the rows
of a real model at P 0.9-0.99), or whose boundary ties the last candidate, go together through
one vectorised pass (no loop over rows): a histogram of their mass over rungs of z (0.5 nats
each, value ranges, so any set of top rungs is a prefix of the sorted order) picks, per row, the
fewest top rungs whose mass reaches P with a margin; only those tokens are sorted (a few hundred
to a few thousand instead of the vocabulary), with the reference's own arithmetic on them. A
row whose sorted candidates still miss P (the margin did not cover rounding) is sorted whole, so
the result is always exact.

Self-contained (torch; numpy's faster sort where it is installed): copied next to saved
checkpoints for trust_remote_code loading.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import torch

try:  # numpy sorts float32 rows several times faster than torch on CPU
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

BLOCK = 64
DEFAULT_K = 64
KEY_SHIFT = 18  # slow path: a token's rung = float32 bits of (row max - z) >> 18 (exponent + 5 mantissa bits)
MAX_DEPTH = 64.0  # tokens deeper than this below the row max share the last rung
N_KEYS = (struct.unpack("<i", struct.pack("<f", MAX_DEPTH))[0] >> KEY_SHIFT) + 1
MARGIN = 1e-4  # the chosen rungs' mass (float32 sums) must exceed P by this much


@dataclass
class LogitStats:
    """Row statistics of z [N, V] (float32): everything the features and the nucleus need."""

    top_values: torch.Tensor  # [N, k] sorted descending
    top_indices: torch.Tensor  # [N, k]
    lse: torch.Tensor  # [N] logsumexp(z)
    mean_z: torch.Tensor | None  # [N] E_p[z]
    sum_p2: torch.Tensor | None  # [N] sum of p^2
    vocab_size: int


def top_candidates(z: torch.Tensor, k: int, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of z [N, V] and their indices, sorted descending (exact)."""
    n, vocab = z.shape
    k = min(k, vocab)
    n_blocks = vocab // block
    if vocab % block or k * block * 4 > vocab:  # small vocab / large k: plain top-k is as good
        return torch.topk(z, k, dim=-1)
    block_max = z.view(n, n_blocks, block).amax(-1)
    best_blocks = torch.topk(block_max, k, dim=-1, sorted=False).indices
    offsets = torch.arange(block, device=z.device)
    cand_idx = (best_blocks.unsqueeze(-1) * block + offsets).reshape(n, k * block)
    values, pos = torch.topk(z.gather(1, cand_idx), k, dim=-1)
    return values, cand_idx.gather(1, pos)


_local = threading.local()


def _workspace(like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch tensor shaped like ``like``, reused across calls.

    Allocating (and freeing) a fresh vocabulary-sized temporary every decode step costs page
    faults that, on CPU, rival the arithmetic itself.
    """
    key = (like.device, like.dtype)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = cache[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()].view(like.shape)


def logit_stats(z: torch.Tensor, k: int = DEFAULT_K, moments: bool = True) -> LogitStats:
    """Top-k candidates, logsumexp and (optionally) E_p[z] and sum p^2 of each row of z [N, V].

    One exp pass over the vocabulary, in a reused scratch buffer; ``moments`` adds reductions
    over it (for the top-p head's features).
    """
    values, indices = top_candidates(z, max(k, 5))
    row_max = values[:, :1]
    e = torch.sub(z, row_max, out=_workspace(z)).exp_()  # unnormalised probabilities, max term = 1
    total = e.sum(-1)
    lse = row_max.squeeze(-1) + torch.log(total)
    mean_z = sum_p2 = None
    if moments:
        sum_p2 = torch.linalg.vector_norm(e, dim=-1).square() / total.square()
        mean_z = e.mul_(z).sum(-1) / total
    return LogitStats(values, indices, lse, mean_z, sum_p2, z.shape[-1])


def _cutoff(values: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted candidates: (threshold value, resolved?) per row.

    Resolved = the candidates reach P and the boundary value is not tied with the last candidate
    (tokens outside the candidates could share it), or the candidates are the whole row.
    """
    k = values.shape[-1]
    cumulative = torch.exp(values - lse.unsqueeze(-1)).cumsum(-1)
    first = (cumulative < top_p.unsqueeze(-1)).sum(-1)  # index of the first cumulative >= P
    reached = first < k
    threshold = values.gather(1, first.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
    untied = threshold > values[:, -1]
    return threshold, reached & untied


def _descending_packed(z: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row's candidate values sorted descending, packed into [n, most counts], padded with -inf.

    On CPU (numpy): the candidates are gathered row-major and sorted once by (row, descending
    value) through an int64 key whose low half orders float32 bits (negatives' magnitude bits
    flipped); elsewhere a padded torch.sort.
    """
    n, most = z.shape[0], max(int(counts.max()), 1)
    if np is None or z.device.type != "cpu":
        packed = z.masked_fill(~candidates, float("-inf"))
        return torch.sort(packed, dim=-1, descending=True).values[:, :most]
    bits = z.numpy().view(np.int32)[candidates.numpy()]  # row-major: row 0's candidates first
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    counts_np = counts.numpy()
    rows = np.repeat(np.arange(n, dtype=np.int64), counts_np)
    low = ((~order).view(np.uint32) ^ np.uint32(0x80000000)).astype(np.int64)  # unsigned, descending value
    keys = (rows << 32) | low  # by row, then by descending value
    keys.sort()
    order = ~((keys & 0xFFFFFFFF).astype(np.uint32) ^ np.uint32(0x80000000)).view(np.int32)
    values = (order ^ ((order >> 31) & 0x7FFFFFFF)).view(np.float32)
    starts = np.cumsum(counts_np) - counts_np
    packed = np.full((n, most), -np.inf, dtype=np.float32)
    packed.ravel()[rows * most + np.arange(rows.size) - starts[rows]] = values
    return torch.from_numpy(packed)


def _sorted_thresholds(z: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor, candidates: torch.Tensor):
    """(threshold, ok) per row from its candidate tokens (a prefix of its sorted order).

    The sorted candidates go through the reference's arithmetic (exp(v - lse), cumsum, first
    cumulative >= P). ok = the crossing lies inside the candidates (padding adds no mass, so a
    short set shows as first >= count).
    """
    counts = candidates.sum(-1)
    values = _descending_packed(z, candidates, counts)
    cumulative = torch.exp(values - lse.unsqueeze(-1)).cumsum(-1)
    first = (cumulative < top_p.unsqueeze(-1)).sum(-1)
    threshold = values.gather(1, first.clamp(max=values.shape[1] - 1).unsqueeze(-1)).squeeze(-1)
    return threshold, first < counts


def _slow_thresholds(z: torch.Tensor, row_max: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Exact thresholds for rows z [n, V] that the top candidates could not settle (all at once).

    A token's rung is the float32 bit pattern of its depth max - z, shifted right by KEY_SHIFT:
    monotone in the depth (so in -z), hence the top rungs of a row are a prefix of its descending
    order and never split ties, and each rung spans ~3% of its depth. A histogram of exp(-depth)
    over the rungs picks the fewest top rungs whose mass reaches P + MARGIN; only their tokens are
    sorted. Rows where that still falls short are sorted whole. -inf = keep everything (the
    whole row does not reach P).
    """
    n = z.shape[0]
    depth = torch.sub(row_max.unsqueeze(-1), z).clamp_(max=MAX_DEPTH)
    rung = depth.view(torch.int32) >> KEY_SHIFT
    keys = rung + (torch.arange(n, dtype=torch.int32, device=z.device) * N_KEYS).unsqueeze(-1)
    mass = torch.bincount(keys.view(-1), weights=depth.neg_().exp_().view(-1), minlength=n * N_KEYS)
    cumulative = mass.view(n, N_KEYS).cumsum(-1)
    reached = cumulative >= (top_p + MARGIN).unsqueeze(-1) * cumulative[:, -1:]
    deepest = torch.where(reached.any(-1), reached.to(torch.int8).argmax(-1), N_KEYS - 1).to(torch.int32)
    threshold, ok = _sorted_thresholds(z, lse, top_p, rung <= deepest.unsqueeze(-1))
    if not bool(ok.all()):
        redo = (~ok).nonzero().squeeze(-1)
        whole = torch.ones_like(z[redo], dtype=torch.bool)
        full, full_ok = _sorted_thresholds(z[redo], lse[redo], top_p[redo], whole)
        threshold[redo] = torch.where(full_ok, full, float("-inf"))  # never reaching P: keep all
    return threshold


def nucleus_from_stats(
    z: torch.Tensor, stats: LogitStats, top_p: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """z [N, V] float32 -> tensor with -inf outside each row's nucleus (top_p [N]).

    ``inplace=True`` writes the result into z (saves a vocabulary-sized allocation per step).
    """
    top_p = top_p.to(z.dtype).clamp(min=0.0)
    keep_all = top_p >= 1.0
    threshold, resolved = _cutoff(stats.top_values, stats.lse, top_p)
    slow = (~resolved & ~keep_all).nonzero().squeeze(-1)  # flat rows, P near 1, a boundary tied with the last candidate
    whole = keep_all.nonzero().squeeze(-1)
    saved = torch.index_select(z, 0, slow) if slow.numel() else None  # rows still needed whole
    kept_whole = torch.index_select(z, 0, whole) if whole.numel() else None

    out = z.fill_(float("-inf")) if inplace else torch.full_like(z, float("-inf"))
    kept = torch.where(stats.top_values >= threshold.unsqueeze(-1), stats.top_values, float("-inf"))
    out.scatter_(1, stats.top_indices, kept)
    if saved is not None:
        cut = _slow_thresholds(saved, stats.top_values[slow, 0], stats.lse[slow], top_p[slow])
        out.index_copy_(0, slow, saved.masked_fill_(saved < cut.unsqueeze(-1), float("-inf")))
    if kept_whole is not None:
        out.index_copy_(0, whole, kept_whole)
    return out


def nucleus_filter(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Exact hard top-p on logits [..., V] (already temperature-scaled); top_p [...] or a float.

    Returns logits of the same shape and dtype with -inf outside the nucleus.
    """
    shape, vocab = logits.shape, logits.shape[-1]
    z = logits.reshape(-1, vocab).float()
    p = torch.as_tensor(top_p, dtype=torch.float32, device=z.device).expand(shape[:-1]).reshape(-1)
    out = nucleus_from_stats(z, logit_stats(z, moments=False), p)
    return out.reshape(shape).to(logits.dtype)


def nucleus_filter_sorted(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """The naive way (full sort + cumsum + scatter), same semantics; the benchmark's baseline."""
    shape, vocab = logits.shape, logits.shape[-1]
    z = logits.reshape(-1, vocab).float()
    p = torch.as_tensor(top_p, dtype=torch.float32, device=z.device).expand(shape[:-1]).reshape(-1)
    values, order = torch.sort(z, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= p.unsqueeze(-1)  # the mass before this token already reaches P
    drop[:, 0] = False
    drop &= (p < 1.0).unsqueeze(-1)
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return z.masked_fill(mask, float("-inf")).reshape(shape).to(logits.dtype)
