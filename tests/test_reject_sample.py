"""Reject sampling with the real SmolLM2 + HF backend + the tasks' graders."""

from __future__ import annotations

import json

import pytest

from heads.training.reject_sample import deepmath_source, load_source, read_deepmath_rows


def _deepmath_file(tmp_path):
    """A local copy in DeepMath-103K's real schema (question, final_answer, difficulty, topic, r1_solution_*)."""
    rows = [
        {"question": "What is 2 + 3?", "final_answer": "5", "difficulty": 1.0, "topic": "Arithmetic",
         "r1_solution_1": "...", "r1_solution_2": "...", "r1_solution_3": "..."},
        {"question": "Compute 10 - 4.", "final_answer": "6", "difficulty": 1.0, "topic": "Arithmetic",
         "r1_solution_1": "...", "r1_solution_2": "...", "r1_solution_3": "..."},
        {"question": "Evaluate $\\int_0^1 2x\\,dx$.", "final_answer": "1", "difficulty": 3.0,
         "topic": "Calculus", "r1_solution_1": "...", "r1_solution_2": "...", "r1_solution_3": "..."},
    ]
    path = tmp_path / "deepmath.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_deepmath_source_schema_and_grading(tmp_path):
    source = load_source("zwhe99/DeepMath-103K", data_file=str(_deepmath_file(tmp_path)))
    assert source.name == "deepmath" and len(source.docs) == 3
    doc = source.docs[2]
    assert doc["answer"] == "1" and "\\boxed{}" in source.messages(doc)[0]["content"]
    verdicts = source.grade_many([(source.docs[0], "So the sum is \\boxed{5}."),
                                  (source.docs[1], "The answer is \\boxed{7}.")])
    assert [v.correct for v in verdicts] == [True, False]
    subset = deepmath_source(2, seed=1, data_file=str(_deepmath_file(tmp_path)))
    assert len(subset.docs) == 2 and subset.docs == sorted(subset.docs, key=lambda d: int(d["doc_id"]))


def test_deepmath_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "x", "final_answer": ""}\n')
    with pytest.raises(ValueError, match="final_answer"):
        deepmath_source(None, 0, data_file=str(path))
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_deepmath_rows(str(path))


@pytest.mark.slow
def test_reject_sample_arith_keeps_only_correct(tmp_path, smollm2_path):
    """Greedy (deterministic) on easy arith problems: every kept row re-grades correct, no duplicates."""
    from harness.cli import main
    from tasks import get_task

    out = tmp_path / "rs.jsonl"
    code = main(["data", "reject-sample", "--model", str(smollm2_path), "--task", "arith", "--difficulty", "1",
                 "--limit", "8", "--samples", "2", "--decoding", "greedy", "--max-tokens", "48", "--seed", "5",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    task = get_task("arith", split="train", n=8, seed=5, difficulty=1)
    docs = {d["doc_id"]: d for d in task.docs()}
    assert rows, "SmolLM2 solves some difficulty-1 sums greedily"
    assert len({r["doc_id"] for r in rows}) == len(rows)  # greedy samples are identical: deduplicated
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    for row in rows:
        doc = docs[row["doc_id"]]
        assert row["prompt"] == task.prompt(doc, tokenizer)
        assert row["prompt"].startswith("<|im_start|>") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert task.grade(doc, row["completion"]).correct
        assert row["answer"] == str(doc["answer"])


def test_reject_sample_cli_errors(tmp_path, capsys):
    from harness.cli import main

    assert main(["data", "reject-sample", "--task", "no_such_task", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no_such_task" in capsys.readouterr().err
    assert main(["data", "reject-sample", "--task", "deepmath", "--data-file", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
