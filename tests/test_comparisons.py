"""Fair comparisons: maj@k, the official answer check, the cross-validated static baseline, interval
fields in results files, and the paired report on a real (small) SmolLM2 run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness.metrics import majority_at_k
from harness.sweep import cross_validate, fold_of
from tasks import official_grader


def test_majority_at_k_exact_and_ties():
    samples = [("4", True), ("4", True), ("5", False)]
    assert majority_at_k(samples, 3) == 1.0
    # pairs: (4,4) -> right; (4,5) twice -> a tie, half right
    assert majority_at_k(samples, 2) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert majority_at_k([(None, False), ("7", False)], 2) == 0.0
    assert majority_at_k([(None, False), (None, False)], 2) == 0.0
    many = [("a", True)] * 30 + [("b", False)] * 70  # C(100, 10) subsets: sampled, seeded
    value = majority_at_k(many, 10)
    assert value == majority_at_k(many, 10) and 0.0 < value < 0.3
    with pytest.raises(ValueError):
        majority_at_k(samples, 4)


@pytest.mark.parametrize("response, gold, correct", [
    ("so \\boxed{\\dfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{10\\%}", "10", True),
    ("first \\boxed{1} then \\boxed{2}", "2", True),
    ("\\boxed 42$ trailing", "42", True),
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", True),
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{2.0}", "2", False),  # the official check is string equality after normalising
    ("\\fbox{7}", "7", False),  # its unwrapping rejects \\fbox
    ("\\boxed{7", "7", False),  # unclosed
    ("no box, the answer is 7", "7", False),
])
def test_official_check(response, gold, correct):
    assert official_grader.grade({"answer": gold}, response).correct is correct


def test_official_grading_is_a_task_option():
    from harness.core.errors import UserError
    from tasks import get_task

    task = get_task("arith", grading="official", n=3)
    assert task.config["grading"] == "official" and task.grader.__class__.__name__ == "OfficialGrader"
    doc = task.docs()[0]
    assert task.grade(doc, f"\\boxed{{{doc['answer']}}}").correct
    with pytest.raises(UserError, match="applies to math and multiple-choice tasks"):
        get_task("ifeval", grading="official")
    with pytest.raises(UserError, match="grading 'fuzzy' is not one of default, official"):
        get_task("arith", grading="fuzzy")


def test_cross_validation_scores_each_fold_with_the_others_best():
    docs = [f"d{i}" for i in range(40)]
    folds = fold_of(docs, 5)
    assert sorted(list(folds.values()).count(f) for f in range(5)) == [8] * 5  # balanced
    # point A is better on folds 0-3, B on fold 4: fold 4 is scored with A (best on the others)
    a = {"temperature": 0.5, "top_p": 1.0, "per_doc": {d: (0.75 if folds[d] < 4 else 0.25) for d in docs}}
    b = {"temperature": 1.0, "top_p": 1.0, "per_doc": {d: (0.25 if folds[d] < 4 else 0.5) for d in docs}}
    cv = cross_validate([a, b], folds=5)
    assert cv["folds"] == 5 and cv["n_problems"] == 40
    assert all(c["temperature"] == 0.5 for c in cv["choices"])  # A wins every training split
    assert cv["per_doc"] == a["per_doc"]
    want = np.array(list(a["per_doc"].values()))
    assert cv["pass@1"] == pytest.approx(want.mean())
    low, _ = scipy_stats.t.interval(0.95, 39, loc=want.mean(), scale=scipy_stats.sem(want))
    assert cv["ci_low"] == pytest.approx(low)  # fractional accuracies are kept as they are
    two = cross_validate([{"temperature": 0.5, "top_p": 1.0, "per_doc": {"x": 1.0, "y": 0.0}}])
    assert two["folds"] == 2 and two["n_problems"] == 2  # two problems: one per fold, never an empty fold
    one = cross_validate([{"temperature": 0.5, "top_p": 1.0, "per_doc": {"only": 0.5}}])
    assert one["pass@1"] is None and one["note"] == "needs at least 2 problems"


@pytest.mark.slow
def test_interval_fields_sweep_and_paired_report_on_smollm2(tmp_path, smollm2_path, capsys):
    """Real SmolLM2 on arith: results carry the interval, the sweep holds greedy and a CV baseline, and
    `report paired` equals a paired t-test recomputed from the samples files with scipy."""
    from harness.cli import main

    out = tmp_path / "runs"
    common = ["--model", "smollm2", "--tasks", "arith", "--limit", "12", "--max-tokens", "24", "--seeds", "1",
              "--samples", "2", "--wandb", "off", "--no-progress", "--out", str(out)]
    assert main(["eval", *common, "--decoding", "greedy,default"]) == 0
    assert main(["sweep", *common, "--temperatures", "0.5", "--top-ps", "0.9"]) == 0
    files = {json.loads(p.read_text())["config"]["decoding"]["name"]: p
             for p in (out / "smollm2").glob("results_*.json") if not json.loads(p.read_text())["config"]["sweep"]}
    metrics = json.loads(files["default"].read_text())["results"]["arith"]
    assert metrics["n_problems"] == 12 and metrics["pass@1_ci_low"] <= metrics["pass@1"] <= metrics["pass@1_ci_high"]
    assert "maj@2" not in metrics  # k must be > 1 and one of 16/32/64

    summary = json.loads((out / "smollm2" / "sweep_summary_arith.json").read_text())
    assert summary["temperature_grid"][0]["temperature"] == 0.0  # greedy is a grid point
    assert summary["best_pass@1"] >= summary["temperature_grid"][0]["pass@1"]  # never below greedy
    assert set(summary["cross_validated"]["per_doc"]) == set(summary["temperature_grid"][0]["per_doc"])

    reports = tmp_path / "rep"
    assert main(["report", "paired", "--runs", str(out), "--out", str(reports)]) == 0
    assert main(["report", "oracle", "--runs", str(out), "--out", str(reports)]) == 0
    rows = list(__import__("csv").DictReader((reports / "paired.csv").open()))
    row = next(r for r in rows if r["Method"] == "greedy" and r["Baseline"] == "default")

    def accuracy(name):
        samples = next((out / "smollm2").glob(f"samples_arith_{files[name].stem.removeprefix('results_')}.jsonl"))
        by_doc = {}
        for line in samples.read_text().splitlines():
            r = json.loads(line)
            by_doc.setdefault(r["doc_id"], []).append(r["correct"])
        return {d: np.mean(v) for d, v in by_doc.items()}

    a, b = accuracy("greedy"), accuracy("default")
    diff = np.array([a[d] - b[d] for d in sorted(a)])
    assert float(row["Δ [95% CI]"]) == pytest.approx(100 * diff.mean())
    if diff.std() > 0:
        assert float(row["p"]) == pytest.approx(scipy_stats.ttest_rel([a[d] for d in sorted(a)],
                                                                      [b[d] for d in sorted(a)]).pvalue, abs=1e-3)
    oracle = (reports / "oracle.md").read_text()
    assert "Static (CV)" in oracle and "Oracle (test-tuned)" in oracle
