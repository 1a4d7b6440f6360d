"""Where things live: the repository's configs, the cache home and local benchmark files."""

from __future__ import annotations

import os
from pathlib import Path

from harness.core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"


def autodeco_home() -> Path:
    """Cache root for prepared models and offline data: ``$AUTODECO_HOME`` or ``~/.cache/autodeco``."""
    return Path(os.environ.get("AUTODECO_HOME") or Path.home() / ".cache" / "autodeco").expanduser()


def data_dir(cli_value: str | os.PathLike | None = None) -> Path | None:
    """Local benchmark files: ``--data-dir`` wins over ``$AUTODECO_DATA_DIR``; None means the hub."""
    value = cli_value or os.environ.get("AUTODECO_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise UserError(f"data dir {path} {what} (from --data-dir or AUTODECO_DATA_DIR)")
    return path
