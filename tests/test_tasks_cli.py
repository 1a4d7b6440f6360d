"""`autodeco tasks list|show|prepare`, `autodeco grade`, `autodeco bench grading` (small)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_show_prepare(capsys, data_dir, tmp_path):
    code, out, _ = _run(capsys, "tasks", "list")
    assert code == 0 and "aime24" in out and "group: aime24, aime25" in out
    code, out, _ = _run(capsys, "tasks", "show", "aime25", "--data-dir", str(data_dir))
    assert code == 0 and "docs: 30" in out and "\\boxed{}" in out
    code, out, _ = _run(capsys, "tasks", "show", "arith", "--task-option", "difficulty=4", "-n", "2")
    assert code == 0 and "'difficulty': 4" in out
    for _ in range(2):  # idempotent
        code, out, _ = _run(capsys, "tasks", "prepare", "--nltk-dir", str(tmp_path))
        assert code == 0 and "punkt_tab" in out and "code sandbox:" in out
    code, _, err = _run(capsys, "tasks", "show", "aime42")
    assert code == 2 and "unknown task 'aime42'" in err


def test_grade_math(capsys, data_dir, tmp_path):
    responses = tmp_path / "r.jsonl"
    with responses.open("w") as f:
        f.write(json.dumps({"doc_id": 0, "responses": ["\\boxed{70}", "\\boxed{71}"]}) + "\n")
        f.write(json.dumps({"doc_id": "1", "response": "\\boxed{588}"}) + "\n")
        f.write(json.dumps({"doc_id": "1", "response": "no idea"}) + "\n")
        problem = "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$"
        f.write(json.dumps({"prompt": problem, "response": "\\boxed{70}"}) + "\n")
    code, out, err = _run(capsys, "grade", "--task", "aime25", "--responses", str(responses),
                          "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), "--workers", "1")
    assert code == 0, err
    samples = list((tmp_path / "out").glob("samples_aime25_*.jsonl"))
    results = list((tmp_path / "out").glob("results_*.json"))
    assert len(samples) == 1 and len(results) == 1
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert [(r["doc_id"], r["sample_index"], r["extracted"], r["correct"]) for r in rows] == [
        ("0", 0, "70", True), ("0", 1, "71", False), ("1", 0, "588", True), ("1", 1, None, False), ("0", 2, "70", True)]
    metrics = json.loads(results[0].read_text())
    task = metrics["results"]["aime25"]
    assert task["pass@1"] == pytest.approx((2 / 3 + 1 / 2) / 2) and task["n_docs"] == 2
    assert metrics["versions"]["aime25"] == 1.0 and metrics["configs"]["aime25"]["task"] == "aime25"


def test_grade_ifeval_writes_instruction_lists(capsys, data_dir, tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"doc_id": 1001, "responses": ["no commas here", "a, b"]}) + "\n")
    code, _, err = _run(capsys, "grade", "--task", "ifeval", "--responses", str(responses),
                        "--out", str(tmp_path), "--data-dir", str(data_dir))
    assert code == 0, err
    rows = [json.loads(x) for x in next(tmp_path.glob("samples_ifeval_*.jsonl")).read_text().splitlines()]
    assert rows[0]["inst_level_strict_acc"] == [True] and rows[1]["inst_level_loose_acc"] == [False]
    results = json.loads(next(tmp_path.glob("results_*.json")).read_text())["results"]["ifeval"]
    assert results["prompt_level_strict_acc"] == 0.5 and results["inst_level_loose_acc"] == 0.5


@pytest.mark.parametrize("line, message", [
    ('{"doc_id": 99, "response": "x"}', ":1: field 'doc_id' = 99 is not a doc of aime24"),
    ('{"response": "x"}', ":1: missing field 'doc_id' or 'prompt'"),
    ('{"doc_id": 0, "response": 5}', ":1: field 'response' is int, expected a string"),
    ('{"doc_id": 0}', ":1: missing field 'response'"),
    ('{"doc_id": 0, "response": "x"', ":1: invalid JSON"),
])
def test_grade_bad_responses(capsys, data_dir, tmp_path, line, message):
    responses = tmp_path / "r.jsonl"
    responses.write_text(line + "\n")
    code, _, err = _run(capsys, "grade", "--task", "aime24", "--responses", str(responses),
                        "--out", str(tmp_path), "--data-dir", str(data_dir))
    assert code == 2 and str(responses) + message in err


def test_bench_grading_small(capsys, data_dir):
    code, out, err = _run(capsys, "bench", "grading", "--samples", "2", "--workers", "2", "--data-dir", str(data_dir))
    assert code == 0, err
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["answers"] == 540 and report["adversarial_wrong"] is True
    assert "math answers in" in out


def test_grade_lone_surrogate_and_a_megabyte_of_unclosed_boxes(capsys, tmp_path):
    """A lone surrogate is graded and written (valid UTF-8, the same JSON escape); 1 MB of unclosed
    \\boxed{ is graded wrong quickly; no temporary file is left behind."""
    import time

    from tasks import get_task

    answer = get_task("arith").docs()[0]["answer"]
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"doc_id": 0, "response": "\\ud800 so \\\\boxed{' + str(answer) + '}"}\n'
                         + json.dumps({"doc_id": 0, "response": "\\boxed{" * 150_000}) + "\n")
    start = time.monotonic()
    code, _, err = _run(capsys, "grade", "--task", "arith", "--responses", str(responses), "--out",
                        str(tmp_path / "out"), "--workers", "1")
    assert code == 0, err
    assert time.monotonic() - start < 30
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 2 and not [name for name in files if name.startswith(".")], files
    sample_file = next((tmp_path / "out").glob("samples_arith_*.jsonl"))
    rows = [json.loads(line) for line in sample_file.read_text(encoding="utf-8").splitlines()]  # strict UTF-8
    assert rows[0]["response"] == f"\ud800 so \\boxed{{{answer}}}" and rows[0]["correct"] is True
    assert rows[1]["extracted"] is None and rows[1]["correct"] is False
