"""Shards back into one run: shard manifests, their checks, and merging (`autodeco gather`).

A sharded command (``--shard I/N``) records itself in
``<out>/shards/<command>-<digest>.shard-I-of-N.json``::

    {"command": "eval" | "sweep" | "reject-sample", "digest": str, "config": {the command's options},
     "shard": {"index": I, "count": N}, "progress": "started" | "temperature-grid" | "done",
     "models": [model folder names], "extra": {...}, "host": str, "date": float}

The digest covers the options that decide what is generated (model, backend, tasks, decoding,
seeds, samples, limit, max_tokens, the sweep grids and group, ...), not where files go or how the
engine is spread (``WHERE_FILES_GO``). ``progress`` only moves forward; a sweep's shards stop at
"temperature-grid" until they are run again with ``--best-from``.

``find_jobs(runs)`` groups the manifests of the ``--runs`` folders into jobs — each a command
whose shards 0..N-1 are all present once, with the same settings, finished — or raises one
`GatherError` line naming the folders. ``merge_stores(job, out)`` copies the shards' samples
into ``<out>/<model>/sample_store.jsonl`` after checking that they agree (run settings, prompt
hash, token budget); the CLI then replays the command on it with
`harness.backends.stored.StoredBackend`, so the results and samples files come from the same code
as an unsharded run's. ``merge_reject_samples`` puts reject-sampling shards' rows back in source order.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import UserError
from harness.core.files import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from harness.runner import SETTINGS_FILE, STORE_FILE, store_file
from harness.shards import Shard
from harness.store import SampleStore, writer_lock

MANIFEST_DIR = "shards"
PROGRESS = ("started", "temperature-grid", "done")
# Options that say where files go or how an engine is spread, not what is generated.
WHERE_FILES_GO = frozenset({"out", "shard", "no_progress", "wandb", "backend_arg", "data_dir", "data_file",
                            "best_from"})


class GatherError(UserError, ValueError):
    """Shards that do not make one run (missing, repeated, mixed settings, unfinished)."""


def digest(command: str, config: dict) -> str:
    identity = {k: v for k, v in config.items() if k not in WHERE_FILES_GO}
    text = json.dumps([command, identity], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Manifests


@dataclass
class Manifest:
    path: Path
    command: str
    digest: str
    config: dict
    shard: Shard
    progress: str
    models: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The shard's ``--out`` folder."""
        return self.path.parent.parent


def manifest_path(root: str | os.PathLike, command: str, config: dict, shard: Shard) -> Path:
    return Path(root) / MANIFEST_DIR / f"{command}-{digest(command, config)}.{shard.tag}.json"


def record_shard(root: str | os.PathLike, command: str, config: dict, shard: Shard, *, progress: str,
                 models: Iterable[str] = (), extra: dict | None = None) -> Path:
    """Write or advance this shard's manifest (``progress`` never moves back)."""
    path = manifest_path(root, command, config, shard)
    if path.is_file():
        before = read_manifest(path).progress
        progress = max(progress, before, key=PROGRESS.index)
    atomic_write_json(path, {
        "command": command, "digest": digest(command, config), "config": config,
        "shard": {"index": shard.index, "count": shard.count}, "progress": progress,
        "models": list(models), "extra": extra or {}, "host": socket.gethostname(), "date": time.time(),
    })
    return path


def read_manifest(path: Path) -> Manifest:
    data = read_json(path, error=GatherError)
    try:
        manifest = Manifest(path=path, command=data["command"], digest=data["digest"], config=data["config"],
                            shard=Shard(int(data["shard"]["index"]), int(data["shard"]["count"])),
                            progress=data["progress"], models=list(data.get("models") or []),
                            extra=dict(data.get("extra") or {}))
    except (KeyError, TypeError, ValueError) as err:
        raise GatherError(f"{path}: not a shard manifest ({type(err).__name__}: {err})") from None
    if manifest.progress not in PROGRESS:
        raise GatherError(f"{path}: field 'progress' is {manifest.progress!r}; expected one of {', '.join(PROGRESS)}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Jobs: the shards of one command


@dataclass
class Job:
    command: str
    digest: str
    config: dict
    shards: list[Manifest]  # by shard index, 0..N-1

    @property
    def count(self) -> int:
        return len(self.shards)

    @property
    def roots(self) -> list[Path]:
        return list(dict.fromkeys(m.root for m in self.shards))

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(name for m in self.shards for name in m.models))

    def __str__(self) -> str:
        return f"{self.command} {self.digest} ({self.count} shards)"


def _manifests(runs: Iterable[str | os.PathLike]) -> list[Manifest]:
    found, seen = [], set()
    for run in runs:
        folder = Path(run)
        if not folder.is_dir():
            raise GatherError(f"--runs {run}: no such folder")
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        paths = sorted((folder / MANIFEST_DIR).glob("*.json"))
        if not paths:
            raise GatherError(f"--runs {run}: no shard manifests ({folder / MANIFEST_DIR}/*.json); "
                              f"give the --out folder of each `--shard I/N` run")
        found.extend(read_manifest(p) for p in paths)
    return found


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in {*a, *b} - WHERE_FILES_GO if a.get(k) != b.get(k))
    return ", ".join(f"{k} = {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def find_jobs(runs: Iterable[str | os.PathLike], *, need: str = "done", digest_only: str | None = None) -> list[Job]:
    """The complete jobs in ``runs`` (every shard once, same settings, at least ``need``), or a
    `GatherError` naming what is wrong. ``digest_only`` keeps the one job with that digest."""
    runs = list(runs)
    manifests = _manifests(runs)
    groups: dict[tuple[str, str], list[Manifest]] = {}
    for m in manifests:
        groups.setdefault((m.command, m.digest), []).append(m)
    if digest_only is not None:
        groups = {key: group for key, group in groups.items() if key[1] == digest_only}
        if not groups:
            raise GatherError(f"no shard of this command with these settings in {', '.join(map(str, runs))}")
    jobs = []
    for (command, key), group in sorted(groups.items()):
        counts = sorted({m.shard.count for m in group})
        if len(counts) > 1:
            where = "; ".join(f"{m.shard} in {m.root}" for m in group)
            raise GatherError(f"{command} {key}: shards of different splits ({where}); gather one --shard N at a time")
        count = counts[0]
        by_index: dict[int, Manifest] = {}
        for m in group:
            if m.shard.index in by_index:
                raise GatherError(f"shard {m.shard} of {command} is in both {by_index[m.shard.index].root} and "
                                  f"{m.root}; give each shard once")
            by_index[m.shard.index] = m
        missing = [i for i in range(count) if i not in by_index]
        if missing:
            message = (f"{command} {key}: shard {', '.join(f'{i}/{count}' for i in missing)} missing from --runs "
                       f"(found {', '.join(str(m.shard) for m in sorted(group, key=lambda m: m.shard.index))})")
            other = next((g for (c, k), g in groups.items() if c == command and k != key), None)
            if other:
                message += f"; the runs also hold {command} shards with other settings: {_differences(group[0].config, other[0].config)}"
            raise GatherError(message)
        for m in by_index.values():
            if PROGRESS.index(m.progress) < PROGRESS.index(need):
                if m.progress == "temperature-grid" and need == "done":
                    roots = " ".join(str(r) for r in dict.fromkeys(x.root for x in group))
                    raise GatherError(f"the sweep's shards hold its temperature grid only: run every shard again "
                                      f"with --best-from {roots} (the top-p grid at the best temperature), then gather")
                raise GatherError(f"shard {m.shard} of {command} in {m.root} has not finished ({m.progress}); "
                                  f"run it again (it resumes from its store), then gather")
        jobs.append(Job(command, key, group[0].config, [by_index[i] for i in range(count)]))
    return jobs


# ---------------------------------------------------------------------------------------------
# Merging sample stores


def _read_settings(folder: Path) -> dict | None:
    path = folder / SETTINGS_FILE
    return read_json(path, error=GatherError) if path.is_file() else None


def merge_stores(job: Job, out: str | os.PathLike, warn: Callable[[str], None] | None = None) -> dict[str, int]:
    """Copy every shard's samples into ``<out>/<model>/sample_store.jsonl`` (those it lacks);
    return the number of samples added per model. Shards must agree on the run settings, and on the
    prompt and token budget of every doc."""
    added = {}
    for model in job.models:
        settings, records, seen = None, {}, {}
        for m in job.shards:
            folder = m.root / model
            mine = _read_settings(folder)
            if settings is not None and mine != settings[0]:
                raise GatherError(f"{folder}/{SETTINGS_FILE} differs from {settings[1]}: {mine} vs {settings[0]}")
            settings = settings or (mine, folder / SETTINGS_FILE)
            path = folder / store_file(m.shard)
            if not path.is_file():
                raise GatherError(f"{path}: not found (shard {m.shard} of {job.command} wrote no samples for {model})")
            for key, record in SampleStore(path, warn=warn).records.items():
                for what, ident in (("prompt_hash", (key.task, key.doc_id)),
                                    ("max_tokens", (key.task, key.doc_id, key.decoding))):
                    first = seen.setdefault((what, ident), (record.get(what), path))
                    if first[0] != record.get(what):
                        raise GatherError(f"shards disagree on {'/'.join(ident)} of {model}: {what} "
                                          f"{first[0]!r} in {first[1]}, {record.get(what)!r} in {path}")
                if key in records and records[key] != record:
                    raise GatherError(f"{path}: sample {key.task}/{key.doc_id} seed {key.seed} #{key.sample_index} "
                                      f"differs from the same sample in another shard")
                records[key] = record
        target = Path(out) / model
        with writer_lock(target / STORE_FILE):
            existing = _read_settings(target)
            if settings[0] is not None and existing not in (None, settings[0]):
                raise GatherError(f"{target} holds a run with other settings ({existing}, the shards: {settings[0]}); "
                                  f"gather into another --out")
            if existing is None and settings[0] is not None:
                atomic_write_json(target / SETTINGS_FILE, settings[0])
            store = SampleStore(target / STORE_FILE, warn=warn)
            new = [record for key, record in records.items() if key not in store]
            store.append_many(new)
        added[model] = len(new)
    return added


# ---------------------------------------------------------------------------------------------
# Reject sampling


def shard_output(out: str | os.PathLike, shard: Shard) -> Path:
    """A reject-sampling shard's rows: ``rs.jsonl`` → ``rs.shard-I-of-N.jsonl`` beside it."""
    path = Path(out)
    return path.with_name(f"{path.stem}.{shard.tag}{path.suffix or '.jsonl'}")


def merge_reject_samples(job: Job, out: str | os.PathLike) -> tuple[Path, dict]:
    """Interleave the shards' rows back into source order (shard I's k-th problem is problem
    I + k*N), each problem's rows by sample index; return the merged file and summed counts."""
    positions, rows, totals = {}, [], {}
    for m in job.shards:
        for k, doc_id in enumerate(m.extra.get("doc_ids", [])):
            positions[str(doc_id)] = m.shard.index + k * job.count
        rows.extend(read_jsonl(m.root / m.extra.get("output", ""), error=GatherError))
        for key, value in (m.extra.get("stats") or {}).items():
            totals[key] = totals.get(key, 0) + value
    for row in rows:
        if str(row.get("doc_id")) not in positions:
            raise GatherError(f"reject-sample row for doc {row.get('doc_id')!r} belongs to no shard's problems")
    rows.sort(key=lambda row: (positions[str(row["doc_id"])], row["sample_index"]))
    target = Path(out) / job.config["out_name"]
    atomic_write_jsonl(target, rows)
    return target, totals
