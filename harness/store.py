"""The sample store: every finished sample on disk at once, so a killed run resumes where it died.

One JSONL file, append-only. Each line is one sample: the key fields
(model, task, doc_id, decoding, seed, sample_index) plus the completion. Appends are written with
one ``write`` per batch of finished samples, then flushed and fsync'ed before the call returns.
On open, a line that is not a complete JSON record (a torn last write, a hand edit) is skipped
with a warning naming the file and line; every other line is kept. A file that does not end in a
newline gets one before the next append, so a torn line never swallows the next record.

One writer per store: `writer_lock(path)` holds an exclusive ``fcntl.flock`` on
``<store>.lock`` (created next to the store, left in place) for as long as the ``with`` block
runs; a second process asking for it gets `StoreLockedError` at once, naming the holder. The
lock is re-entrant within a process (a sweep reopens the store per grid point) and is released
by the kernel when its process dies, even by SIGKILL. On NFS, Linux maps flock onto NFS byte-range
locks, so processes on several machines sharing one folder should be covered too (not tested here).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from harness.core.errors import UserError


class SampleKey(NamedTuple):
    model: str
    task: str
    doc_id: str
    decoding: str
    seed: int
    sample_index: int


KEY_FIELDS = SampleKey._fields


def key_of(record: dict) -> SampleKey:
    return SampleKey(*(record[name] for name in KEY_FIELDS))


class SampleStore:
    def __init__(self, path: str | os.PathLike, warn=None):
        self.path = Path(path)
        self._warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.records: dict[SampleKey, dict] = {}
        self.skipped_lines: list[int] = []
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            data = f.read()
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                key = key_of(record)
            except (ValueError, KeyError, TypeError) as err:
                self.skipped_lines.append(number)
                reason = f"missing field {err}" if isinstance(err, KeyError) else "not a complete JSON record"
                self._warn(f"sample store {self.path} line {number}: {reason}; skipped (that sample will be redone)")
                continue
            self.records[key] = record  # a later duplicate wins; they are identical in practice

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: SampleKey) -> bool:
        return key in self.records

    def get(self, key: SampleKey) -> dict | None:
        return self.records.get(key)

    def missing(self, keys: Iterable[SampleKey]) -> list[SampleKey]:
        """The keys (in the given order) that have no stored sample."""
        return [key for key in keys if key not in self.records]

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Persist finished samples: one write, flush and fsync before returning."""
        if not records:
            return
        lines = []
        for record in records:
            key_of(record)  # validates the key fields are present
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        payload = ("\n" if self._needs_newline else "") + "\n".join(lines) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        self._needs_newline = False
        for record in records:
            self.records[key_of(record)] = record


# ---------------------------------------------------------------------------------------------
# One writer per store


class StoreLockedError(UserError, RuntimeError):
    """Another process is writing this sample store."""


_HELD: dict[Path, int] = {}  # lock file -> open fd, for the locks this process holds


def lock_path(store_path: str | os.PathLike) -> Path:
    path = Path(store_path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def writer_lock(store_path: str | os.PathLike) -> Iterator[Path]:
    """Hold the store's writer lock for the ``with`` block (re-entrant in one process).

    The lock is an flock on ``<store>.lock``. A run that ends before its store exists (it failed
    before its first sample) leaves nothing behind: the lock file and the folders made for it are
    removed while the lock is still held. A process that opened the file just before it was removed
    sees, once it holds the flock, that the name no longer points at its file and opens it afresh.
    """
    path = lock_path(store_path).resolve()
    if path in _HELD:  # an outer block of this process holds it until it ends
        yield path
        return
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, store_path)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[path] = fd
    try:
        yield path
    finally:
        del _HELD[path]
        if not Path(store_path).exists():  # nothing was written: leave no trace
            path.unlink(missing_ok=True)
            for folder in made:  # innermost first
                with contextlib.suppress(OSError):  # not empty: something else lives there now
                    folder.rmdir()
        os.close(fd)  # releases the flock


def _acquire(path: Path, store_path: str | os.PathLike) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise StoreLockedError(
                f"{Path(store_path)} is being written by another autodeco process ({holder}); "
                f"wait for it to finish, or give this run another --out (or another --shard)") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we opened it: take the new one
