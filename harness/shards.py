"""One run split over N processes: ``--shard I/N`` (I = 0 .. N-1).

The work of a run is a list of units in a fixed order — (task, doc, seed) for eval and sweep,
ordered seed, then task, then doc as planned; one problem for reject sampling, in source order.
Shard I of N takes units I, I+N, I+2N, ...: deterministic, balanced to within one unit, and the
same split for every grid point of a sweep. Since a sample's randomness depends only on
(seed, problem, sample index), a unit makes the same samples whichever shard runs it.

Each shard writes its own files (``sample_store.shard-I-of-N.jsonl``, a manifest under
``<out>/shards/``), so no two processes append to one file, and shards may share one ``--out``
or use one each. `autodeco gather` (harness/gather.py) merges them into the files of one
unsharded run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from harness.core.errors import UserError

T = TypeVar("T")

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
FORMAT = "expected I/N with 0 <= I < N, e.g. 3/8"


class ShardError(UserError, ValueError):
    """A malformed ``--shard`` or a set of shards that does not make one run."""


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based: a Slurm array task passes $SLURM_ARRAY_TASK_ID
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"--shard {self.index}/{self.count}: {FORMAT}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` → Shard; anything else is a `ShardError` naming the flag."""
        match = _SPEC.match(str(text))
        if not match:
            raise ShardError(f"--shard {text}: {FORMAT}")
        return cls(int(match[1]), int(match[2]))

    def take(self, units: Sequence[T]) -> list[T]:
        """This shard's units: every N-th, starting at I."""
        return list(units[self.index :: self.count])

    @property
    def tag(self) -> str:
        """``shard-I-of-N``: the suffix of this shard's files."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``None``/empty → None (an unsharded run), else `Shard.parse`."""
    return Shard.parse(text) if text not in (None, "") else None
