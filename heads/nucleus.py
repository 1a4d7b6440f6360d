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
The lse of logit_stats is part of the contract: every mass is float32 exp(z - lse) with that lse
(the tests' reference takes it from there).

Rows whose k candidates do not reach P (flat rows, P near 1: a third to two thirds of the rows
of a real model at P 0.9-0.99), or whose boundary ties the last candidate, go together through
one vectorised pass (no loop over rows): a histogram of their mass over rungs of z (value
ranges, 1/32 of 1 + depth wide, so any set of top rungs is a prefix of the sorted order) gives,
per row, the band of rungs where the cumulative mass crosses P ± a margin (1e-4, or a tenth of
1 − P where that is less: near P = 1 a fixed margin would put the whole tail in the band). Tokens
above the band are kept and only their exact mass sum is needed; only the band's tokens are
sorted (a few hundred to a few thousand instead of the vocabulary), with the reference's own
arithmetic on them. A row whose band misses the crossing (the margin did not cover rounding) is
sorted whole, so the result is always exact.

AutoDeco's decoding step (heads.model.native_decode) runs all of the above for its rows inside one
native call, deciding with the native file's own exp; a row where that exp could decide otherwise
than torch's (a cumulative mass within CLOSE of P) is decided with torch's masses: inside the call
where torch's own exp function is reachable natively (torch_exp: MKL's vmsExp, checked against
torch.exp), else back here through nucleus_exact.

Native passes (CPU): heads/nucleus_native.cpp, compiled on first use by the system C++ compiler
into ~/.cache/autodeco/kernels (per source, compiler and CPU) and loaded with ctypes, does the
vocabulary-wide work in as few reads of each row as possible: the row statistics (block maxima,
top candidates and the three exp sums in one call), the slow path's histogram and candidate
collection, and the final masking. The exact part stays as above: masses by torch.exp, float64
sums, a whole-row sort where a check fails. Where no compiler is found (or in a remote-code copy,
which lacks the .cpp), the same steps run in torch and numpy; the tests run both.

Self-contained (torch; numpy's faster sort where it is installed): copied next to saved
checkpoints for trust_remote_code loading.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

try:  # numpy sorts float32 rows several times faster than torch on CPU
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

BLOCK = 64
DEFAULT_K = 64
# Slow path rungs: float32 bits of 1 + depth (depth = row max - z) >> KEY_SHIFT, i.e. its exponent
# and 5 mantissa bits: rungs 1/32 of (1 + depth) wide (0.03 nats at the top, 0.3 nats 10 nats down).
KEY_SHIFT = 18
MAX_DEPTH = 64.0  # tokens deeper than this below the row max share the last rung
KEY_FIRST = struct.unpack("<i", struct.pack("<f", 1.0))[0] >> KEY_SHIFT
N_KEYS = (struct.unpack("<i", struct.pack("<f", 1.0 + MAX_DEPTH))[0] >> KEY_SHIFT) - KEY_FIRST + 1
MARGIN = 1e-4  # the chosen rungs' mass (float32 sums) must exceed P by this much ...
TAIL_SHARE, MIN_MARGIN = 0.1, 1e-6  # ... or by a tenth of 1 - P (not below 1e-6) where that is less
CLOSE = 5e-7  # native decoding (heads.model.native_decode) decides with its own exp, ~3 ulp from torch's: a
# cumulative mass within this (relative) of P could fall the other way, and the row goes to the exact path


NATIVE_SOURCE = Path(__file__).with_name("nucleus_native.cpp")  # absent in remote-code copies: numpy then
NATIVE_FLAGS = ("-fopenmp",)  # row blocks on the OpenMP runtime torch has loaded (see on_row_blocks)


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags (a shared cache may span machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build_native(source: Path, stem: str = "nucleus", flags: tuple[str, ...] = ()) -> Path | None:
    """Compile ``source`` (with extra compiler ``flags``) once per (source, flags, compiler, CPU) into
    the user's cache as ``<stem>-<key>.so``; None on failure."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + compiler.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autodeco" / "kernels"
    target = cache / f"{stem}-{key}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build beside the target, then rename: atomic
        built = Path(tmp) / target.name
        for arch in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []):
            command = [compiler, "-O3", *arch, "-fopenmp-simd", "-fno-trapping-math", *flags, "-std=c++17",
                       "-shared", "-fPIC", "-pthread", str(source), "-o", str(built)]
            if subprocess.run(command, capture_output=True).returncode == 0:
                os.replace(built, target)
                return target
    return None


def _load_native():
    """The compiled passes (ctypes.CDLL with typed signatures) or None: no compiler, no source."""
    if not NATIVE_SOURCE.is_file():
        return None
    try:
        path = _build_native(NATIVE_SOURCE, flags=NATIVE_FLAGS) or _build_native(NATIVE_SOURCE)  # no OpenMP: threads
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
    lib.nucleus_candidates.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i32, i32, f64, f64, f64,
                                       ptr, ptr, ptr, ptr, i32]
    lib.nucleus_candidates.restype = i64
    lib.nucleus_exact.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr]
    lib.nucleus_exact.restype = None
    lib.mask_below.argtypes = [ptr, i64, i64, i64, ptr, i32]
    lib.mask_below.restype = None
    lib.nucleus_thresholds.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr]
    lib.nucleus_thresholds.restype = i64
    lib.row_stats.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.row_stats.restype = None
    lib.autodeco_rows.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64,
                                  i32, i64, i32, i32, f64, f64, f64, f64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                  ptr, ptr, ptr, i64, i32]
    lib.autodeco_rows.restype = i64
    lib.native_team_cpus.argtypes = [i32]
    lib.native_team_cpus.restype = i32
    lib.native_openmp.argtypes = []
    lib.native_openmp.restype = i32
    return lib


_native_lock = threading.Lock()
_native_state: list = []  # [lib or None] once loaded


def _native_ok(z: torch.Tensor) -> bool:
    """The native passes take contiguous float32 CPU rows."""
    return z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 2 and z.stride(1) == 1


def _threads() -> int:
    """Threads for a call into the loaded native passes: torch's intra-op count, but no more than the CPUs that team may
    run on (``native_team_cpus``). vLLM's CPU worker pins its main thread to one core and each
    OpenMP worker to another: the team, torch's OpenMP workers, spans them all. A team whose
    threads would inherit the caller's single core (no OpenMP build, or unbound workers) gets no
    more threads than the caller's cores. Counted once per (thread count, caller's cores): workers
    re-pinned after the first count are not seen."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return 1
    cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return _team_threads(threads, cores)


@functools.lru_cache(maxsize=64)
def _team_threads(threads: int, cores: frozenset | None) -> int:
    return max(1, min(threads, native().native_team_cpus(threads)))  # `cores`: the cache key only


def native():
    """The native passes, compiled and loaded on first use (None where that is impossible)."""
    if not _native_state:
        with _native_lock:
            if not _native_state:
                _native_state.append(_load_native())
    return _native_state[0]


# torch computes float32 exp on the CPU with MKL's vmsExp in this mode where it is built with MKL
# (ATen/cpu/vml.h: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), and libtorch_cpu exports it.
VML_EXP_MODE = 0x2 | 0x140000 | 0x100


def _torch_exp_check() -> torch.Tensor:
    """Where torch_exp's function must equal torch.exp (at aligned and unaligned addresses): float32
    values from 0 down to -104 (below it exp is 0), every 4099th bit pattern (every exponent, ~270k
    values), plus -inf, -0, 0 and the exp(x) = 1e-38 region's neighbours where results go denormal."""
    bits = torch.arange(0x80000000, 0xC2D00001, 4099, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([float("-inf"), -0.0, 0.0, -87.33655, -87.33654, -103.97, -1e-45], dtype=torch.float32)
    return torch.cat([bits.view(torch.float32), special])


@functools.cache
def torch_exp():
    """(address, mode) of a native function that computes torch.exp of float32 values bit for bit
    (MKL's vmsExp inside libtorch_cpu, called as fn(n, in, out, mode)), or None: not Linux, torch
    without MKL, or a function that differs from torch.exp on _torch_exp_check's values. With it,
    native decoding settles close rows itself (autodeco_rows) instead of handing them back. Probed
    once (two threads racing would only both probe)."""
    if platform.system() != "Linux":
        return None
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(path)).vmsExp
    except (OSError, AttributeError):  # not there, or torch built without MKL
        return None
    fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    check = _torch_exp_check()
    out = torch.empty(check.numel() + 8, dtype=torch.float32)
    for start, at in ((0, 0), (1, 3), (5, 1)):  # aligned, and unaligned as the native call passes its buffers
        x = check[start:]
        y = out[at : at + x.numel()]
        fn(x.numel(), x.data_ptr(), y.data_ptr(), VML_EXP_MODE)
        if not torch.equal(y.view(torch.int32), torch.exp(x.clone()).view(torch.int32)):
            return None
    return ctypes.cast(fn, ctypes.c_void_p).value, VML_EXP_MODE


@dataclass
class LogitStats:
    """Row statistics of z [N, V] (float32): everything the features and the nucleus need."""

    top_values: torch.Tensor  # [N, k] sorted descending
    top_indices: torch.Tensor  # [N, k]
    lse: torch.Tensor  # [N] logsumexp(z)
    entropy: torch.Tensor | None  # [N] -sum p log p
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


def _workspace(like: torch.Tensor | tuple[int, torch.dtype], slot: str = "exp") -> torch.Tensor:
    """A per-thread scratch tensor shaped like ``like`` (or a flat CPU one of (numel, dtype)),
    reused across calls (one per ``slot``).

    Allocating (and freeing) a fresh vocabulary-sized temporary every decode step costs page
    faults that, on CPU, rival the arithmetic itself. A buffer made under ``torch.inference_mode``
    is an inference tensor that may not be written outside it, so each mode keeps its own.
    """
    if isinstance(like, tuple):
        shape, dtype, device = (like[0],), like[1], torch.device("cpu")
    else:
        shape, dtype, device = like.shape, like.dtype, like.device
    numel = shape[0] if isinstance(like, tuple) else like.numel()
    key = (slot, device, dtype, torch.is_inference_mode_enabled())
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def logit_stats(z: torch.Tensor, k: int = DEFAULT_K, moments: bool = True, fast: bool = True) -> LogitStats:
    """Top-k candidates, logsumexp and (optionally) the entropy and sum p^2 of each row of z [N, V].

    One exp pass over the vocabulary: with ``fast`` on CPU natively (block maxima, then one read of
    each row for all three sums; the entropy as log(sum e) + E_p[max - z], which cannot cancel),
    else in a reused scratch buffer with torch (``moments`` then adds reductions over it; the
    entropy as lse - E_p[z], off by up to ~1e-5 absolute on peaked rows). Training keeps torch's
    (``fast=False``): the arithmetic its loss kernels were checked against. Either way the nucleus
    uses this lse for every mass (its contract).
    """
    k = min(max(k, 5), z.shape[-1])
    lib = native() if fast and _native_ok(z) and not z.requires_grad else None
    if lib is not None:
        n = z.shape[0]
        values, lse = torch.empty(n, k, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        indices = torch.empty(n, k, dtype=torch.int64)
        sums = torch.empty(3, n, dtype=torch.float64)
        lib.row_stats(z.data_ptr(), n, z.stride(0), z.shape[1], k, values.data_ptr(), indices.data_ptr(),
                      sums[0].data_ptr(), sums[1].data_ptr(), sums[2].data_ptr(), lse.data_ptr(), _threads())
        total, sum_ed, sum_e2 = sums
        if not moments:
            return LogitStats(values, indices, lse, None, None, z.shape[-1])
        entropy = (torch.log(total) + sum_ed / total).float()
        return LogitStats(values, indices, lse, entropy, (sum_e2 / total.square()).float(), z.shape[-1])
    values, indices = top_candidates(z, k)
    row_max = values[:, :1]
    e = torch.sub(z, row_max, out=_workspace(z)).exp_()  # unnormalised probabilities, max term = 1
    total = e.sum(-1)
    lse = row_max.squeeze(-1) + torch.log(total)
    entropy = sum_p2 = None
    if moments:  # the training features' arithmetic (lse - E_p[z]: loses digits on peaked rows)
        sum_p2 = torch.linalg.vector_norm(e, dim=-1).square() / total.square()
        entropy = lse - e.mul_(z).nansum(-1) / total  # nansum: 0 * -inf (a masked token) adds 0
    return LogitStats(values, indices, lse, entropy, sum_p2, z.shape[-1])


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


def _packed_descending(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Values [m] of rows [m] (ascending row ids), each row's sorted descending, packed into [n, most]
    padded with -inf: one int64 sort whose high half is the row and whose low half orders the
    float32 bits (negatives' magnitude bits flipped, then reversed for descending order)."""
    counts = np.bincount(rows, minlength=n)
    most = max(int(counts.max()), 1)
    bits = values.view(np.int32)
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    keys = (rows.astype(np.int64) << 32) | ((~order).view(np.uint32) ^ np.uint32(0x80000000)).astype(np.int64)
    keys.sort()
    order = ~((keys & 0xFFFFFFFF).astype(np.uint32) ^ np.uint32(0x80000000)).view(np.int32)
    packed = np.full((n, most), -np.inf, dtype=np.float32)
    starts = np.cumsum(counts) - counts
    sorted_rows = keys >> 32
    packed.ravel()[sorted_rows * most + np.arange(rows.size) - starts[sorted_rows]] = (
        order ^ ((order >> 31) & 0x7FFFFFFF)).view(np.float32)
    return packed


def _sorted_thresholds(values: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor, base=None):
    """(threshold, first, masses) for rows of values sorted descending ([n, k], -inf padded), with
    the reference's arithmetic: masses exp(v - lse), cumulative sums (``base`` [n] float64 added:
    the exact mass ranked before these values), first index whose cumulative reaches P."""
    masses = torch.exp(values - lse.unsqueeze(-1))
    if base is None:
        cumulative = masses.cumsum(-1)
    else:  # exact: every partial sum is a multiple of 2^-52 below 2 (see _slow_thresholds_cpu)
        cumulative = (masses.double().cumsum(-1) + base.unsqueeze(-1)).float()
    first = (cumulative < top_p.unsqueeze(-1)).sum(-1)
    at = first.clamp(max=values.shape[1] - 1).unsqueeze(-1)
    return values.gather(1, at).squeeze(-1), first, masses.gather(1, at).squeeze(-1)


def _full_sort_thresholds(z: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Thresholds of whole rows by a full sort (cheap on accelerators; the CPU path's fallback).
    -inf = keep everything (the whole row does not reach P)."""
    if np is not None and z.device.type == "cpu":
        n, vocab = z.shape
        values = torch.from_numpy(_packed_descending(np.repeat(np.arange(n), vocab), z.numpy().ravel(), n))
    else:
        values = torch.sort(z, dim=-1, descending=True).values
    threshold, first, _ = _sorted_thresholds(values, lse, top_p)
    return torch.where(first < z.shape[1], threshold, float("-inf"))


def _slow_thresholds_cpu(z: torch.Tensor, row_max: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor):
    """Exact thresholds for rows z [n, V] the top candidates could not settle, all rows at once (numpy).

    1. Rungs: a token's rung is the float32 bit pattern of 1 + depth (depth = max - z) shifted
       right by KEY_SHIFT — monotone in the depth, so rungs are value ranges (the top rungs of a
       row are a prefix of its descending order and never split ties). A histogram of
       exp(-depth) over the rungs gives each row's rungs where the cumulative mass crosses
       P - MARGIN and P + MARGIN: the band where the nucleus ends.
    2. Tokens above the band are all kept: only the exact sum of their masses matters. Masses are
       the reference's float32 exp(z - lse); when every one of them is >= 2^-29 each is a multiple
       of 2^-52 and every partial sum (< 2) is exact in float64, so their sum is the same in any
       order — the reference's sequential cumulative sum, bit for bit, without sorting them.
    3. Only the band's tokens are sorted; the cumulative continues from that exact sum.
    Rows where a check fails (the crossing outside the band, a mass below 2^-29) are sorted whole.
    """
    n, vocab = z.shape
    zn = z.numpy()
    shifted = np.subtract((row_max.numpy() + 1.0)[:, None], zn)  # 1 + depth, monotone in z
    np.clip(shifted, 1.0, 1.0 + MAX_DEPTH, out=shifted)  # (the rounding of max + 1 may dip below 1)
    keys = (shifted.view(np.int32) >> KEY_SHIFT) - KEY_FIRST
    np.clip(keys, 0, N_KEYS - 1, out=keys)  # (a NaN would fall outside the rungs)
    keys += (np.arange(n, dtype=np.int32) * N_KEYS)[:, None]  # row r's rungs: r * N_KEYS + rung
    guide = np.exp(np.subtract(1.0, shifted, out=shifted), out=shifted)  # exp(-depth)
    hist = torch.bincount(torch.from_numpy(keys).view(-1), weights=torch.from_numpy(guide).view(-1),
                          minlength=n * N_KEYS).numpy().reshape(n, N_KEYS)
    cumulative = hist.cumsum(-1, dtype=np.float64)
    p = top_p.double().numpy()[:, None]
    margin = np.clip(TAIL_SHARE * (1.0 - p), MIN_MARGIN, MARGIN)  # near P = 1 the tail itself is the band
    offsets = np.arange(n) * N_KEYS
    low = (cumulative < (p - margin) * cumulative[:, -1:]).sum(-1) + offsets  # first key of the band
    high = np.minimum((cumulative < (p + margin) * cumulative[:, -1:]).sum(-1), N_KEYS - 1) + offsets

    flat = np.flatnonzero(keys <= high.astype(np.int32)[:, None])  # candidates, row-major
    values = zn.ravel()[flat]
    rows = flat // vocab
    in_band = keys.ravel()[flat] >= low[rows]
    masses = torch.exp(torch.from_numpy(values) - lse[torch.from_numpy(rows)]).numpy()
    above = ~in_band
    base = np.bincount(rows[above], weights=masses[above].astype(np.float64), minlength=n)
    small_above = np.bincount(rows[above], weights=masses[above] < 2.0**-29, minlength=n) > 0

    band = torch.from_numpy(_packed_descending(rows[in_band], values[in_band], n))
    base_t = torch.from_numpy(base)
    threshold, first, crossing_mass = _sorted_thresholds(band, lse, top_p, base_t)
    band_counts = torch.from_numpy(np.bincount(rows[in_band], minlength=n))
    ok = ((first < band_counts) & (base_t.float() < top_p) & (crossing_mass >= 2.0**-29)
          & ~torch.from_numpy(small_above))
    if not bool(ok.all()):
        redo = (~ok).nonzero().squeeze(-1)
        threshold[redo] = _full_sort_thresholds(z[redo], lse[redo], top_p[redo])
    return threshold


def _slow_thresholds_native(lib, z: torch.Tensor, rows: torch.Tensor, row_max: torch.Tensor, lse: torch.Tensor,
                            top_p: torch.Tensor) -> torch.Tensor:
    """The steps of _slow_thresholds_cpu for rows ``rows`` of z [N, V] (no copy of them), natively:
    one pass for the rung histogram (an approximate exp suffices: it only guides the band), one to
    collect the candidates (rungs up to the band's last), then torch.exp for their exact masses and
    the band's sort and cumulative. Rows whose checks fail are sorted whole, as there."""
    m, vocab = rows.numel(), z.shape[1]
    size = m * vocab
    in_band = _workspace((size, torch.uint8), "band")
    values, diffs = _workspace((size, torch.float32), "values"), _workspace((size, torch.float32), "diffs")
    counts = torch.empty(m, dtype=torch.int64)
    row_max, lse = row_max.contiguous(), lse.contiguous()
    p64 = top_p.double()
    total = lib.nucleus_candidates(
        z.data_ptr(), z.stride(0), vocab, rows.data_ptr(), m, row_max.data_ptr(), lse.data_ptr(), p64.data_ptr(),
        KEY_FIRST, N_KEYS, MARGIN, TAIL_SHARE, MIN_MARGIN, values.data_ptr(), diffs.data_ptr(),
        in_band.data_ptr(), counts.data_ptr(), _threads())
    masses = torch.exp(diffs[:total])  # the reference's float32 masses, by torch's own exp
    threshold, ok = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.uint8)
    p32 = top_p.contiguous()  # alive through the call
    lib.nucleus_exact(values.data_ptr(), masses.data_ptr(), in_band.data_ptr(), counts.data_ptr(), m,
                      p32.data_ptr(), threshold.data_ptr(), ok.data_ptr())
    if not bool(ok.all()):
        redo = (ok == 0).nonzero().squeeze(-1)
        threshold[redo] = _full_sort_thresholds(z[rows[redo]], lse[redo], top_p[redo])
    return threshold


def _slow_thresholds(z: torch.Tensor, rows: torch.Tensor, row_max: torch.Tensor, lse: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """Exact thresholds for rows ``rows`` of z [N, V] (float32) that the top candidates could not settle."""
    if z.device.type == "cpu":
        lib = native()
        if lib is not None and _native_ok(z):
            return _slow_thresholds_native(lib, z, rows, row_max, lse, top_p)
        if np is not None:
            return _slow_thresholds_cpu(z[rows], row_max, lse, top_p)
    return _full_sort_thresholds(z[rows], lse, top_p)


def _mask_below(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """z = where(z >= threshold, z, -inf) per row, in place (threshold -inf: the row is kept whole)."""
    lib = native() if _native_ok(z) else None
    if lib is not None:
        threshold = threshold.contiguous()
        lib.mask_below(z.data_ptr(), z.shape[0], z.stride(0), z.shape[1], threshold.data_ptr(), _threads())
        return z
    return z.masked_fill_(z < threshold.unsqueeze(-1), float("-inf"))


def nucleus_from_stats(
    z: torch.Tensor, stats: LogitStats, top_p: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """z [N, V] float32 -> tensor with -inf outside each row's nucleus (top_p [N]).

    Every row gets a threshold (from its top candidates, from the slow path, or -inf to keep it
    whole); one masking pass then applies them. ``inplace=True`` writes the result into z (saves
    a vocabulary-sized allocation per step).
    """
    top_p = top_p.to(z.dtype).clamp(min=0.0)
    lib = native() if _native_ok(z) else None
    if lib is not None:  # _cutoff's steps natively but for the masses (torch's exp: the contract)
        values = stats.top_values.contiguous()
        masses = torch.sub(values, stats.lse.unsqueeze(-1)).exp_()
        top_p = top_p.contiguous()
        threshold, flags = torch.empty(z.shape[0], dtype=torch.float32), torch.empty(z.shape[0], dtype=torch.uint8)
        count = lib.nucleus_thresholds(values.data_ptr(), masses.data_ptr(), values.shape[0], values.shape[1],
                                       top_p.data_ptr(), threshold.data_ptr(), flags.data_ptr())
        slow = flags.nonzero().squeeze(-1) if count else flags[:0].long()
    else:
        keep_all = top_p >= 1.0
        threshold, resolved = _cutoff(stats.top_values, stats.lse, top_p)
        threshold = threshold.masked_fill(keep_all, float("-inf"))
        slow = (~resolved & ~keep_all).nonzero().squeeze(-1)  # flat rows, P near 1, a boundary tied with the last candidate
    if slow.numel():
        threshold[slow] = _slow_thresholds(z, slow, stats.top_values[slow, 0], stats.lse[slow], top_p[slow])
    return _mask_below(z if inplace else z.clone(), threshold)


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
