"""Files that are whole or absent: atomic writes, atomic folders, JSONL, timestamps.

A crash leaves the previous file (or folder) or the new one, never half of one; the temporary
is removed on failure. JSONL readers name the file and line of a malformed row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.core.errors import FileFormatError, UserError


def timestamp() -> str:
    """lm-eval's file timestamp, with microseconds so that two files never collide."""
    return datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) through a temp file beside it + rename (the temp name
    carries the pid, so processes writing the same file at once never share a temp file).

    A lone surrogate (``"\\ud800"`` read from a JSON file) cannot be UTF-8: it is written as the
    six characters ``\\ud800``, which is the same JSON escape it came from, so a JSON text stays
    valid JSON that reads back to the same string, and every file written here is valid UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object per line (atomic)."""
    return atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (then nothing can be made below it)."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, or lies under one, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder")
    blocker = _file_above(out)
    if blocker is not None:
        raise UserError(f"{flag} {out}: {blocker} is a file, not a folder")


def check_output_file(out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output file that is a folder, or lies under a file, before any work is done."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder, not a file")
    blocker = _file_above(out)
    if blocker is not None:
        raise UserError(f"{flag} {out}: {blocker} is a file, not a folder")


def check_new_folder(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output folder (or a file in its place) before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it becomes ``out``, on error it vanishes."""
    out = Path(out)
    check_new_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike, error: type[Exception] = FileFormatError) -> Any:
    """The JSON value in a file; a missing, unreadable or malformed file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {'is a folder, not a file' if path.is_dir() else 'not found'}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def iter_jsonl(path: str | os.PathLike, *, strict: bool = True, on_skip=None,
               error: type[Exception] = FileFormatError) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file.

    ``strict``: a line that is not JSON raises ``error`` naming ``file:line``; otherwise it is
    skipped and ``on_skip(message)`` called (e.g. a warning), as for an append-only store whose
    last line a crash may have cut.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise error(f"{path}: {what}")
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    message = f"{path}:{number}: invalid JSON ({err.msg})"
                    if strict:
                        raise error(message) from None
                    if on_skip is not None:
                        on_skip(message)
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8)") from None


def read_jsonl(path: str | os.PathLike, *, strict: bool = True, on_skip=None,
               error: type[Exception] = FileFormatError) -> list[Any]:
    """Every value of a JSONL file (see `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, strict=strict, on_skip=on_skip, error=error)]
