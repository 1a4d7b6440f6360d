"""Stable seeds: a pure function of their parts, the same in every process and on every machine."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object, bits: int = 63) -> int:
    """A non-negative integer < 2**bits from the ``|``-joined string form of ``parts`` (SHA-256)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)
