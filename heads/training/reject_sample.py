"""Training data by reject sampling (the paper's recipe).

For every problem: sample k completions from the base model with a harness backend, grade them
with the problem source's grader, keep the correct (and finished) ones as prompt/completion
rows. The prompt is the model's chat template applied to the source's messages, so the rows
train the heads on exactly the context they see at inference.

Sources (registry ``SOURCES``):
- ``arith``: the seeded synthetic in-domain task's train split (never overlaps its test split);
- ``deepmath``: DeepMath-103K (hub id ``zwhe99/DeepMath-103K``; columns question, final_answer,
  ...), from the hub or a local JSONL / JSON / Parquet copy (``data_file``);
- any other registered task name (its test split), e.g. for quick experiments.

Rows come in source order, each problem's by sample index. With ``shard`` (``--shard I/N``) only
problems I, I+N, ... are sampled; `autodeco gather` interleaves the shards' files back into the
file one unsharded run writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.core.files import atomic_write_jsonl, read_jsonl

DEEPMATH_HUB_ID = "zwhe99/DeepMath-103K"


@dataclass
class ProblemSource:
    """Problems with a way to prompt for them and to grade answers."""

    name: str
    docs: list[dict]
    messages: Callable[[dict], list[dict]]
    grade_many: Callable[[Sequence[tuple[dict, str]]], list]
    max_tokens: int


def _task_source(name: str, limit: int | None, data_dir: str | None, **options) -> ProblemSource:
    from tasks import get_task

    task = get_task(name, data_dir=data_dir, **options)
    docs = task.docs(limit)
    return ProblemSource(name, docs, task.messages, task.grade_many,
                         int(task.generation_kwargs.get("max_gen_toks", 1024)))


def arith_source(limit: int | None, seed: int, data_dir: str | None = None, data_file: str | None = None,
                 difficulty: int = 2) -> ProblemSource:
    """The synthetic task's train split: ``limit`` problems (default 200) generated from ``seed``."""
    return _task_source("arith", None, None, split="train", n=limit or 200, seed=seed, difficulty=difficulty)


def read_deepmath_rows(data_file: str | None) -> list[dict]:
    """DeepMath-103K rows from a local file, or from the hub when ``data_file`` is None."""
    if data_file is None:
        import datasets

        return list(datasets.load_dataset(DEEPMATH_HUB_ID, split="train"))
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"DeepMath data file {path} not found")
    if path.suffix == ".parquet":
        import pandas

        return pandas.read_parquet(path).to_dict("records")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        return rows if isinstance(rows, list) else rows.get("train", [])
    return read_jsonl(path)


def deepmath_source(limit: int | None, seed: int, data_dir: str | None = None, data_file: str | None = None,
                    difficulty: int | None = None) -> ProblemSource:
    """DeepMath-103K: ``question`` → problem, ``final_answer`` → answer; math prompt and grader."""
    import random

    from tasks.graders import get_grader
    from tasks.math.utils import doc_to_text

    rows = read_deepmath_rows(data_file)
    docs = []
    for index, row in enumerate(rows):
        if not row.get("question") or row.get("final_answer") in (None, ""):
            raise ValueError(f"DeepMath row {index}: needs non-empty 'question' and 'final_answer'")
        docs.append({"doc_id": str(index), "problem": row["question"], "answer": str(row["final_answer"]),
                     "difficulty": row.get("difficulty")})
    if limit and limit < len(docs):  # a seeded subset, not the first rows (they are topic-sorted)
        docs = sorted(random.Random(seed).sample(docs, limit), key=lambda d: int(d["doc_id"]))
    grader = get_grader("math", {"answer_fallback": "none"})

    def messages(doc: dict) -> list[dict]:
        return [{"role": "user", "content": doc_to_text(doc)}]

    return ProblemSource("deepmath", docs, messages, grader.grade_many, 16384)


SOURCES: dict[str, Callable[..., ProblemSource]] = {
    "arith": arith_source,
    "deepmath": deepmath_source,
    DEEPMATH_HUB_ID: deepmath_source,
}


def load_source(name: str, limit: int | None = None, seed: int = 0, data_dir: str | None = None,
                data_file: str | None = None, difficulty: int | None = None) -> ProblemSource:
    """A registered source, or any task name (its test split)."""
    if name in SOURCES:
        options = {"difficulty": difficulty} if difficulty is not None else {}
        return SOURCES[name](limit, seed, data_dir=data_dir, data_file=data_file, **options)
    return _task_source(name, limit, data_dir)


@dataclass
class RejectSampleStats:
    problems: int
    samples: int
    correct: int
    rows: int
    solved_problems: int

    def summary(self) -> str:
        rate = self.correct / max(self.samples, 1)
        return (f"{self.problems} problems x samples -> {self.samples} completions, {self.correct} correct "
                f"({rate:.1%}), {self.solved_problems} problems solved at least once, {self.rows} rows written")


def reject_sample(
    backend,
    source: ProblemSource,
    samples: int,
    out: str | os.PathLike,
    *,
    preset_spec: str = "default",
    seed: int = 0,
    max_tokens: int | None = None,
    keep_truncated: bool = False,
    dedupe: bool = True,
    progress: bool = True,
    shard=None,
) -> RejectSampleStats:
    """Sample, grade, keep the correct completions; writes JSONL rows to ``out`` atomically.

    ``shard`` (a `harness.shards.Shard`): only this shard's problems (every N-th, from I)."""
    from tqdm import tqdm

    from harness.backends import Request
    from harness.decoding import parse_spec

    if samples < 1:
        raise ValueError("samples must be >= 1")
    preset = parse_spec(preset_spec)
    tokenizer = backend.tokenizer
    docs = source.docs if shard is None else shard.take(source.docs)
    prompts = {
        doc["doc_id"]: tokenizer.apply_chat_template(source.messages(doc), tokenize=False, add_generation_prompt=True)
        for doc in docs
    }
    requests = [
        Request(key=f"{source.name}/{doc['doc_id']}", prompt=prompts[doc["doc_id"]], preset=preset, seed=seed,
                n=samples, max_tokens=max_tokens or source.max_tokens)
        for doc in docs
    ]
    by_key = {f"{source.name}/{doc['doc_id']}": doc for doc in docs}
    position = {key: i for i, key in enumerate(by_key)}
    completions = []
    bar = tqdm(total=len(requests) * samples, desc="reject-sample: generate", disable=not progress)
    for completion in backend.generate(requests):
        completions.append(completion)
        bar.update(1)
    bar.close()
    completions.sort(key=lambda c: (position[c.key], c.sample_index))  # backends may answer in any order
    verdicts = source.grade_many([(by_key[c.key], c.text) for c in completions])

    rows, seen = [], set()
    for completion, verdict in zip(completions, verdicts, strict=True):
        doc = by_key[completion.key]
        if not verdict.correct or (completion.finish_reason != "stop" and not keep_truncated):
            continue
        if dedupe and (doc["doc_id"], completion.text) in seen:
            continue
        seen.add((doc["doc_id"], completion.text))
        rows.append({"prompt": prompts[doc["doc_id"]], "completion": completion.text, "source": source.name,
                     "doc_id": doc["doc_id"], "sample_index": completion.sample_index,
                     "answer": str(doc.get("answer"))})
    atomic_write_jsonl(out, rows)
    return RejectSampleStats(
        problems=len(docs), samples=len(completions), correct=sum(v.correct for v in verdicts),
        rows=len(rows), solved_problems=len({row["doc_id"] for row in rows}),
    )
