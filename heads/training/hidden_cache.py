"""A cache of the frozen base's last hidden states over a training set: the heads train from it.

The heads and the loss read, at every loss position t (a position whose next token is a target),
only the base's last hidden state h_t and the base logits l_t = lm_head(h_t). The base is frozen,
so h_t never changes: one base forward over the training set (`build`) stores h_t for every loss
position, and every epoch after that recomputes l_t from h_t with the output embedding alone
(`heads.training.loss.autodeco_loss_from_hidden`, chunk by chunk) instead of running the base.
Two per-token values that depend on the base alone are stored too, computed from the base's own
logits: ``easy`` (argmax l_t == target: the easy-token mask) and ``base_prob`` (softmax(l_t) at the
target: the DFT weight) — so they are exact whatever the storage dtype of h_t.

A cache is a folder ``<root>/<key>/`` (numpy files, memory-mapped when read):

- ``hidden.npy``    [N, H] h_t at the N loss positions of all rows, row after row, in the storage
  dtype (bfloat16 is stored as its uint16 bit patterns: numpy has no bfloat16);
- ``targets.npy``   [N] int32, ``easy.npy`` [N] bool, ``base_prob.npy`` [N] float32;
- ``offsets.npy``   [R + 1] int64: row r's loss positions are ``offsets[r]:offsets[r + 1]``;
- ``tokens.npy``    [R] int32: row r's length in tokens (the trainer's token count);
- ``meta.json``     format, key, the storage dtype, sizes and a CRC-32 of every file.

The folder is built under a temporary name and renamed once ``meta.json`` is written, so a
folder named by its key is complete or was damaged later; opening one checks every file's size
and CRC-32 and a damaged cache is rebuilt with a warning, never read.

Key (`cache_key`): SHA-256 over the base's tensors (names, dtypes, shapes, bytes — whatever
folder or hub id they came from), its config, every row's token ids and labels in order (after
the trainer's tokenization and truncation), ``max_length`` and the storage dtype: any change
to one of them names another folder.

Storage dtype: the base's own by default (exact: the stored h_t are the values the base's
lm_head reads in a run without the cache). A float32 base stored in 16 bits halves the disk;
tests/test_hidden_cache.py measures what it costs on SmolLM2 (one batch's loss / head gradients:
float16 <= 8e-5 / 6e-3, bfloat16 <= 3e-4 / 7e-2 relative; hidden states beyond float16's range
are refused, not stored as inf).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harness.core.errors import UserError
from harness.core.files import atomic_write_json, read_json

FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16: raw bits
ARRAYS = ("hidden", "targets", "easy", "base_prob", "offsets", "tokens")
META = "meta.json"
CRC_BLOCK = 1 << 24
# The base's logits must be its output embedding applied to the last hidden state: within this
# relative error of the largest logit (two bf16 roundings of the same product differ by ~2^-8).
LOGITS_CHECK_RTOL = 1e-2
CHECK_ROWS = 16  # loss positions of the first batch on which that is checked
BLOCK_ROWS = 4  # logits rows per block when computing easy / base_prob on CPU (4 x V float32 stay in cache)

__all__ = ["DTYPES", "CacheDamaged", "CacheWriter", "HiddenCache", "build", "cache_key", "loss_positions", "prepare"]


class CacheDamaged(Exception):
    """A cache folder that cannot be trusted (missing, truncated or altered file); says which and why."""


class CacheUnusable(UserError):
    """A base whose logits are not its output embedding of its last hidden state (soft-capping, a
    logit scale, ...): cached hidden states could not reproduce them."""


# --------------------------------------------------------------------------------------------
# Rows and keys


def loss_positions(labels: Sequence[int]) -> np.ndarray:
    """The positions t whose next token is a target (labels[t + 1] != -100), ascending."""
    shifted = np.asarray(labels, dtype=np.int64)[1:]
    return np.flatnonzero(shifted != -100)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's tensors: names, dtypes, shapes and bytes (tied tensors hashed once)."""
    digest = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        alias = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if alias in seen:  # a tied weight (lm_head = embed_tokens): same storage, same bytes
            digest.update(f"={seen[alias]}\n".encode())
            continue
        seen[alias] = name
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def rows_digest(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """SHA-256 of (token ids, labels) of every row, in order."""
    digest = hashlib.sha256()
    for ids, labels in rows:
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        digest.update(np.array([ids.size, labels.size], dtype=np.int64).tobytes())
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()


def _config_text(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return ""
    values = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return json.dumps(values, sort_keys=True, default=str)


def cache_key(base: torch.nn.Module, rows, max_length: int | None, dtype: torch.dtype) -> str:
    """The folder name of a cache: a digest of everything the stored values depend on."""
    parts = {"format": FORMAT, "weights": weights_digest(base), "config": _config_text(base),
             "rows": rows_digest(rows), "max_length": max_length, "dtype": str(dtype).removeprefix("torch.")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Reading a cache


@dataclass
class HiddenCache:
    """An opened, checked cache: ``hidden`` memory-mapped, the small arrays in memory."""

    folder: Path
    dtype: torch.dtype
    hidden: np.ndarray  # [N, H], memory-mapped
    targets: np.ndarray
    easy: np.ndarray
    base_prob: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.tokens)

    @property
    def positions(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        return sum(_file_bytes(self.folder / f"{name}.npy") for name in ARRAYS)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """What the loss needs for these rows, in order: ``hidden`` [n, H] (storage dtype),
        ``targets`` [n] int64, ``easy`` [n] bool, ``base_prob`` [n] float32, ``n_tokens`` (the rows' tokens)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)]) if len(rows) else \
            np.zeros(0, dtype=np.int64)
        hidden = torch.from_numpy(np.ascontiguousarray(self.hidden[index]))
        if self.dtype == torch.bfloat16:
            hidden = hidden.view(torch.bfloat16)
        return {"hidden": hidden, "targets": torch.from_numpy(self.targets[index].astype(np.int64)),
                "easy": torch.from_numpy(self.easy[index].copy()),
                "base_prob": torch.from_numpy(self.base_prob[index].copy()),
                "n_tokens": torch.tensor(int(self.tokens[rows].sum()))}


def _file_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def open_cache(folder: Path, key: str) -> HiddenCache:
    """Open a cache folder after checking every file against meta.json; `CacheDamaged` if one is off."""
    folder = Path(folder)
    try:
        meta = read_json(folder / META, error=CacheDamaged)
    except CacheDamaged as err:
        raise CacheDamaged(str(err)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
        raise CacheDamaged(f"{folder / META}: not a format-{FORMAT} cache with key {key}")
    files = meta.get("files") or {}
    for name in ARRAYS:
        path, expected = folder / f"{name}.npy", files.get(name) or {}
        if not path.is_file():
            raise CacheDamaged(f"{path}: missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CacheDamaged(f"{path}: {size} bytes, {expected.get('bytes')} written (truncated or altered)")
        if _crc32(path) != expected.get("crc32"):
            raise CacheDamaged(f"{path}: CRC-32 differs from the one written (altered)")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise CacheDamaged(f"{folder / META}: unknown dtype {meta.get('dtype')!r}")
    try:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if name == "hidden" else None)
                  for name in ARRAYS}
    except ValueError as err:
        raise CacheDamaged(f"{folder}: unreadable array ({err})") from None
    n, rows = len(arrays["targets"]), len(arrays["tokens"])
    if (arrays["hidden"].shape[0] != n or len(arrays["offsets"]) != rows + 1 or int(arrays["offsets"][-1]) != n
            or len(arrays["easy"]) != n or len(arrays["base_prob"]) != n or arrays["hidden"].dtype != _NUMPY[dtype]):
        raise CacheDamaged(f"{folder}: arrays of inconsistent shapes or dtype")
    return HiddenCache(folder=folder, dtype=dtype, **arrays)


# --------------------------------------------------------------------------------------------
# Building a cache


def _run_base(net, ids: torch.Tensor, mask: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and base logits [B, K, ·] at positions first .. L - 2 (the last position has no
    next token), from one no-grad base forward whose lm_head runs on those positions only."""
    keep = torch.arange(first, ids.shape[1] - 1, device=ids.device)
    hidden, logits, _ = net.base_forward(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
    return hidden, logits


def _base_values(logits: torch.Tensor, targets: torch.Tensor, buffers: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(easy, base_prob) per row of base logits [n, V]: the arithmetic of the loss in float32
    (`heads.training.loss`: argmax of the logits; exp(l_y - max) / sum exp(l - max)), a block of
    ``buffers.shape[1]`` rows at a time in the two reused buffers [2, block, V] (a block that fits in
    the core's cache: its passes then do not wait on memory)."""
    block = buffers.shape[1]
    easy = torch.empty(logits.shape[0], dtype=torch.bool, device=logits.device)
    prob = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], block):
        sl = slice(start, start + block)
        rows = buffers[0, : logits[sl].shape[0]].copy_(logits[sl])
        labels = targets[sl].unsqueeze(-1)
        l_max = rows.amax(-1, keepdim=True)
        easy[sl] = rows.argmax(-1) == targets[sl]
        total = torch.sub(rows, l_max, out=buffers[1, : rows.shape[0]]).exp_().sum(-1)
        prob[sl] = torch.exp(rows.gather(-1, labels) - l_max).squeeze(-1) / total
    return easy.cpu().numpy(), prob.cpu().numpy()


def _check_logits(net, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse a base whose logits are not its output embedding of the hidden state."""
    if hidden.shape[0] == 0:
        return
    again = net.get_output_embeddings()(hidden).float()
    logits = logits.float()
    error = (again - logits).abs().max().item()
    scale = logits.abs().max().item()
    if not error <= LOGITS_CHECK_RTOL * scale + 1e-4:
        raise CacheUnusable(f"hidden_cache: the base's logits are not its output embedding of its last hidden state "
                            f"(max difference {error:.3g} at logits up to {scale:.3g}); use hidden_cache off")


class CacheWriter:
    """A cache being written under a temporary folder beside ``folder``: rows arrive in any order
    and any grouping (`compute`: a training step's batch, so the first epoch fills the cache as it
    trains), `finish` runs the base over the rows still missing, writes ``meta.json`` and renames
    the folder into place; `discard` removes it. Nothing is visible under ``folder`` before `finish`.

    Rows go through the base right-padded; the lm_head runs only on the loss positions' span, and
    easy/base_prob come from those logits (float32 arithmetic of the loss)."""

    def __init__(self, net, rows: Sequence[tuple[Sequence[int], Sequence[int]]], folder: Path, key: str,
                 dtype: torch.dtype, *, chunk: int = 256, pad_token_id: int = 0):
        self.net, self.rows, self.folder, self.key, self.dtype = net, rows, Path(folder), key, dtype
        self.pad_token_id = pad_token_id
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.positions = [loss_positions(labels) for _, labels in rows]
        self.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(p) for p in self.positions])
        total = int(self.offsets[-1])
        vocab, self.hidden_size = net.get_output_embeddings().weight.shape
        self.device = net.get_output_embeddings().weight.device
        self.tokens = np.array([len(ids) for ids, _ in rows], dtype=np.int32)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=self.folder.parent))
        try:
            self.stored = np.lib.format.open_memmap(self.tmp / "hidden.npy", mode="w+", dtype=_NUMPY[dtype],
                                                    shape=(total, self.hidden_size))
        except BaseException:
            self.discard()
            raise
        self.targets = np.zeros(total, dtype=np.int32)
        self.easy = np.zeros(total, dtype=bool)
        self.base_prob = np.zeros(total, dtype=np.float32)
        self.written = np.array([len(p) == 0 for p in self.positions], dtype=bool)  # rows without a loss position
        block = BLOCK_ROWS if self.device.type == "cpu" else chunk
        self.buffers = torch.empty(2, min(block, max(total, 1)), vocab, device=self.device)  # reused: no page faults
        self.checked = False

    @property
    def missing(self) -> list[int]:
        return np.flatnonzero(~self.written).tolist()

    def has(self, rows: Sequence[int]) -> bool:
        return bool(self.written[np.asarray(rows, dtype=np.int64)].all())

    @torch.no_grad()
    def compute(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        """Run the base over rows ``batch`` (indices into ``rows``) and store them; returns what the
        loss needs, as `HiddenCache.batch` does, plus ``logits`` [n, V] (the base's own, at the
        loss positions, row after row): the step that wrote them need not recompute them."""
        rows, positions, offsets = self.rows, self.positions, self.offsets
        n_tokens = torch.tensor(sum(len(rows[int(r)][0]) for r in batch))
        batch = [int(r) for r in batch if len(positions[r])]
        if not batch:
            empty = torch.zeros(0, self.hidden_size, dtype=self.dtype)
            return {"hidden": empty, "logits": torch.zeros(0, self.buffers.shape[-1]),
                    "targets": torch.zeros(0, dtype=torch.long), "easy": torch.zeros(0, dtype=torch.bool),
                    "base_prob": torch.zeros(0), "n_tokens": n_tokens}
        net, was_training = self.net, self.net.training
        net.eval()
        try:
            width = max(len(rows[r][0]) for r in batch)
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, : len(rows[r][0])] = torch.as_tensor(np.asarray(rows[r][0], dtype=np.int64))
                mask[i, : len(rows[r][0])] = 1
            first = min(int(positions[r][0]) for r in batch)
            hidden, logits = _run_base(net, ids.to(self.device), mask.to(self.device), first)
        finally:
            net.train(was_training)
        pick_b = torch.cat([torch.full((len(positions[r]),), i) for i, r in enumerate(batch)])
        pick_t = torch.from_numpy(np.concatenate([positions[r] for r in batch]) - first)
        h, lg = hidden[pick_b, pick_t], logits[pick_b, pick_t]
        labels = torch.from_numpy(np.concatenate([np.asarray(rows[r][1], dtype=np.int64)[positions[r] + 1]
                                                  for r in batch])).to(self.device)
        if not self.checked:
            _check_logits(net, h[:CHECK_ROWS], lg[:CHECK_ROWS])
            self.checked = True
        row_easy, row_prob = _base_values(lg, labels, self.buffers)
        values = h.to(self.dtype).cpu()
        if not bool(torch.isfinite(values).all()):
            raise CacheUnusable(f"hidden_cache: the base's hidden states exceed {self.dtype}'s range; use "
                                f"hidden_cache_dtype bfloat16 or float32")
        bits = (values.view(torch.uint16) if self.dtype == torch.bfloat16 else values).numpy()
        start = 0
        for r in batch:
            lo, hi = offsets[r], offsets[r + 1]
            count = hi - lo
            self.stored[lo:hi] = bits[start : start + count]
            self.targets[lo:hi] = labels[start : start + count].cpu().numpy()
            self.easy[lo:hi] = row_easy[start : start + count]
            self.base_prob[lo:hi] = row_prob[start : start + count]
            start += count
        self.written[batch] = True
        return {"hidden": values, "logits": lg, "targets": labels.cpu(), "easy": torch.from_numpy(row_easy.copy()),
                "base_prob": torch.from_numpy(row_prob.copy()), "n_tokens": n_tokens}

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows already written (`has`), read back as `HiddenCache.batch` reads them."""
        written = HiddenCache(folder=self.tmp, dtype=self.dtype, hidden=self.stored, targets=self.targets,
                              easy=self.easy, base_prob=self.base_prob, offsets=self.offsets, tokens=self.tokens)
        return written.batch(rows)

    def finish(self, *, batch_size: int = 1, progress: bool = True) -> HiddenCache:
        """Compute the missing rows (longest first, ``batch_size`` at a time), write the cache and
        rename it into ``folder``; if another process finished the same folder meanwhile, its copy
        is used. Returns the opened cache. The writer is spent afterwards."""
        try:
            order = sorted(self.missing, key=lambda r: -len(self.rows[r][0]))
            with tqdm(total=len(order), desc="hidden cache", unit="row", disable=not progress or not order) as bar:
                for start in range(0, len(order), batch_size):
                    self.compute(order[start : start + batch_size])
                    bar.update(len(order[start : start + batch_size]))
            self.stored.flush()
            del self.stored
            tmp = self.tmp
            for name, array in (("targets", self.targets), ("easy", self.easy), ("base_prob", self.base_prob),
                                ("offsets", self.offsets), ("tokens", self.tokens)):
                np.save(tmp / f"{name}.npy", array)
            files = {name: {"bytes": (tmp / f"{name}.npy").stat().st_size, "crc32": _crc32(tmp / f"{name}.npy")}
                     for name in ARRAYS}
            atomic_write_json(tmp / META, {"format": FORMAT, "key": self.key,
                                           "dtype": str(self.dtype).removeprefix("torch."), "rows": len(self.rows),
                                           "positions": int(self.offsets[-1]), "hidden_size": self.hidden_size,
                                           "files": files})
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if not (self.folder / META).is_file():  # not a finished copy from another process: a real failure
                    raise
        finally:
            self.discard()
        return open_cache(self.folder, self.key)

    def discard(self) -> None:
        """Remove the temporary folder (nothing of it was visible under ``folder``)."""
        self.__dict__.pop("stored", None)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def build(net, rows: Sequence[tuple[Sequence[int], Sequence[int]]], folder: Path, key: str, dtype: torch.dtype, *,
          batch_size: int = 1, chunk: int = 256, pad_token_id: int = 0, progress: bool = True) -> HiddenCache:
    """Run the base once over ``rows`` ((token ids, labels) each) and write the cache to ``folder``
    (`CacheWriter` with no row computed yet, finished): batches of ``batch_size`` rows of similar
    length, longest first. Returns the opened cache."""
    writer = CacheWriter(net, rows, folder, key, dtype, chunk=chunk, pad_token_id=pad_token_id)
    return writer.finish(batch_size=batch_size, progress=progress)  # (finish removes the writer's folder either way)


def estimated_bytes(rows, hidden_size: int, dtype: torch.dtype) -> int:
    """Disk a cache of ``rows`` takes (hidden states + 9 bytes per position + per-row arrays)."""
    positions = sum(len(loss_positions(labels)) for _, labels in rows)
    return positions * (hidden_size * torch.finfo(dtype).bits // 8 + 9) + 12 * len(rows) + 4096


def prepare(net, rows, root: str | os.PathLike, *, max_length: int | None, dtype: torch.dtype, batch_size: int = 1,
            chunk: int = 256, pad_token_id: int = 0, progress: bool = True,
            warn: Callable[[str], None] | None = None, fill_later: bool = False) -> HiddenCache | CacheWriter:
    """The cache of ``rows`` ((token ids, labels) each) for the AutoDeco model ``net``'s base, under
    ``root``: opened when a sound one exists, else built (a damaged one is removed with a warning
    first) — or, with ``fill_later``, a `CacheWriter` for the caller to fill and finish."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    folder = Path(root) / cache_key(net.llm, rows, max_length, dtype)
    if folder.exists():
        try:
            return open_cache(folder, folder.name)
        except CacheDamaged as err:
            warn(f"hidden cache {folder} is damaged ({err}); computing it again")
            shutil.rmtree(folder)
    if fill_later:
        return CacheWriter(net, rows, folder, folder.name, dtype, chunk=chunk, pad_token_id=pad_token_id)
    return build(net, rows, folder, folder.name, dtype, batch_size=batch_size, chunk=chunk,
                 pad_token_id=pad_token_id, progress=progress)
