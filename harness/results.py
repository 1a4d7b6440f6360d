"""The results files: verdicts and metrics written in one layout, for the runner and `autodeco grade`.

Output layout (DESIGN.md "Output files"), written by harness/runner.py and `grade_file`:
- ``samples_<task>_<timestamp>.jsonl``: one row per response — ``doc_id``, ``sample_index``,
  ``extracted``, ``correct`` (+ ``seed``/``response`` when known), and for IFEval the four
  lm-eval fields ``prompt_level_strict_acc``, ``inst_level_strict_acc`` (per-instruction list),
  ``prompt_level_loose_acc``, ``inst_level_loose_acc``; other graders add ``details``.
- ``results_<timestamp>.json``: ``{"results": {task: metrics}, "configs", "versions",
  "n-samples", "config", "date", "total_evaluation_time_seconds"}`` where metrics are
  ``harness.metrics.summarize`` (pass@1, pass@1_std, pass@k, n_docs, ...) plus
  ``Task.aggregate`` (lm-eval metric names).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.core.files import atomic_write_json, atomic_write_jsonl, iter_jsonl, timestamp
from harness.metrics import PASS_KS, majority_at_k, summarize
from harness.stats import pass1_estimate, seed_std, verdicts_by_doc
from tasks.verdict import Verdict

IFEVAL_FIELDS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


class ResponsesError(UserError, ValueError):
    """A malformed responses file (names file, line and field)."""


def verdict_fields(verdict: Verdict) -> dict[str, Any]:
    """The per-sample verdict columns: extracted, correct, and IFEval's lists or ``details``."""
    fields: dict[str, Any] = {"extracted": verdict.extracted, "correct": bool(verdict.correct)}
    if all(name in verdict.details for name in IFEVAL_FIELDS):
        fields.update({name: verdict.details[name] for name in IFEVAL_FIELDS})
    elif verdict.details:
        fields["details"] = verdict.details
    return fields


def task_metrics(task, rows: list[dict], verdicts: list[Verdict]) -> dict[str, Any]:
    """Pass@1 (± std over seeds, and its 95% interval over problems), Pass@k, maj@k and the task's
    own metrics for graded rows.

    Interval fields (harness.stats): ``pass@1_se``, ``pass@1_ci_low``, ``pass@1_ci_high`` (t interval
    over problems, each problem's accuracy pooled over seeds), ``n_problems``; ``pass@1_seed_std`` is
    the paper's ± (population std over seeds, as the official script).
"""
    correct: dict[int, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    by_doc: dict[str, list[Verdict]] = defaultdict(list)
    for row, verdict in zip(rows, verdicts, strict=True):
        correct[int(row.get("seed") or 0)][row["doc_id"]].append(bool(verdict.correct))
        by_doc[row["doc_id"]].append(verdict)
    try:
        metrics = summarize({seed: dict(docs) for seed, docs in correct.items()})
    except ValueError:  # uneven samples per doc: plain per-doc mean, no Pass@k
        docs = {d: v for seed_docs in correct.values() for d, v in seed_docs.items()}
        metrics = {"pass@1": sum(sum(v) / len(v) for v in docs.values()) / len(docs), "n_docs": len(docs)}
    estimate = pass1_estimate(verdicts_by_doc([{**row, "correct": v.correct} for row, v in zip(rows, verdicts, strict=True)]))
    metrics.update({"pass@1_se": estimate.se, "pass@1_ci_low": estimate.ci_low, "pass@1_ci_high": estimate.ci_high,
                    "n_problems": estimate.n})
    if metrics.get("pass@1_per_seed"):
        metrics["pass@1_seed_std"] = seed_std(metrics["pass@1_per_seed"])
    metrics.update(majority_metrics(rows, verdicts))
    metrics.update(task.aggregate(dict(by_doc)) or {})
    return metrics


def majority_metrics(rows: list[dict], verdicts: list[Verdict]) -> dict[str, float]:
    """maj@k for every k of PASS_KS that the per-problem sample count allows (k > 1)."""
    by_doc: dict[str, list[tuple[str | None, bool]]] = defaultdict(list)
    for row, verdict in zip(rows, verdicts, strict=True):
        by_doc[row["doc_id"]].append((verdict.extracted, bool(verdict.correct)))
    n = min(len(v) for v in by_doc.values())
    out = {}
    for k in PASS_KS:
        if 1 < k <= n:
            out[f"maj@{k}"] = sum(majority_at_k(samples, k) for samples in by_doc.values()) / len(by_doc)
    return out


def write_samples(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line (atomic)."""
    return atomic_write_jsonl(path, rows)


def write_results(path: Path, task, metrics: dict, config: dict, seconds: float, n_docs_total: int) -> Path:
    doc = {
        "results": {task.name: metrics},
        "configs": {task.name: json.loads(json.dumps(task.config, default=str))},
        "versions": {task.name: task.version},
        "n-samples": {task.name: {"original": n_docs_total, "effective": metrics.get("n_docs")}},
        "config": config,
        "date": time.time(),
        "total_evaluation_time_seconds": seconds,
    }
    return atomic_write_json(path, doc)


# ---------------------------------------------------------------- reading responses

def _doc_lookup(task) -> tuple[dict[str, dict], dict[str, dict]]:
    by_id, by_prompt = {}, {}
    for doc in task.docs():
        by_id[task.doc_id(doc)] = doc
        by_prompt[task.messages(doc)[-1]["content"]] = doc
        for key in ("problem", "prompt", "question", "question_content"):
            if isinstance(doc.get(key), str):
                by_prompt.setdefault(doc[key], doc)
    return by_id, by_prompt


def _whole_number(record: dict, field: str, where: str) -> int | None:
    """An optional integer field >= 0 (``seed``, ``sample_index``)."""
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ResponsesError(f"{where}: field {field!r} = {value!r}, expected an integer >= 0")
    return value


def read_responses(path: Path, task) -> list[tuple[dict, dict]]:
    """(doc, row) per response; row has doc_id, sample_index, response, and seed when given.

    Each line: ``doc_id`` (index in the test split, or IFEval's ``key``) or ``prompt``, and
    ``response`` (a string) or ``responses`` (a list of strings).
    """
    by_id, by_prompt = _doc_lookup(task)
    counters: dict[tuple, int] = defaultdict(int)
    out = []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ResponsesError(f"{where}: expected a JSON object")
        if "doc_id" in record:
            doc = by_id.get(str(record["doc_id"]))
            if doc is None:
                raise ResponsesError(f"{where}: field 'doc_id' = {record['doc_id']!r} is not a doc of {task.name}")
        elif "prompt" in record:
            doc = by_prompt.get(record["prompt"]) if isinstance(record["prompt"], str) else None
            if doc is None:
                raise ResponsesError(f"{where}: field 'prompt' matches no doc of {task.name}")
        else:
            raise ResponsesError(f"{where}: missing field 'doc_id' or 'prompt'")
        if "response" in record:
            responses = [record["response"]]
        elif "responses" in record and isinstance(record["responses"], list):
            responses = record["responses"]
        elif "responses" in record:
            raise ResponsesError(f"{where}: field 'responses' is {type(record['responses']).__name__}, "
                                 f"expected a list of strings")
        else:
            raise ResponsesError(f"{where}: missing field 'response' (string) or 'responses' (list)")
        for offset, response in enumerate(responses):
            if not isinstance(response, str):
                field = "response" if "response" in record else f"responses[{offset}]"
                raise ResponsesError(f"{where}: field {field!r} is {type(response).__name__}, expected a string")
            doc_id = task.doc_id(doc)
            seed = _whole_number(record, "seed", where)
            key = (doc_id, seed)
            given = _whole_number(record, "sample_index", where)
            index = (given if given is not None else counters[key]) if len(responses) == 1 else offset
            counters[key] += 1
            row = {"doc_id": doc_id, "sample_index": index, "response": response}
            if seed is not None:
                row["seed"] = seed
            out.append((doc, row))
    if not out:
        raise ResponsesError(f"{path}: no responses")
    return out


def grade_file(task, responses: Path, out: Path, workers: int | None = None) -> tuple[Path, Path, dict]:
    """Grade a responses file; write samples and results under `out`; return (samples, results, metrics)."""
    start = time.perf_counter()
    pairs = read_responses(responses, task)
    verdicts = task.grade_many([(doc, row["response"]) for doc, row in pairs], workers=workers)
    rows = [{**row, **verdict_fields(v)} for (_, row), v in zip(pairs, verdicts, strict=True)]
    metrics = task_metrics(task, rows, verdicts)
    out.mkdir(parents=True, exist_ok=True)
    stamp = timestamp()
    samples_path = write_samples(out / f"samples_{task.name}_{stamp}.jsonl", rows)
    config = {"command": "grade", "responses": str(responses), "task": task.name,
              "data": str(task.data_dir) if task.data_dir else "hub"}
    results_path = write_results(out / f"results_{stamp}.json", task, metrics, config,
                                 time.perf_counter() - start, len(task.docs()))
    return samples_path, results_path, metrics
