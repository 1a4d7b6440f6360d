"""Math grading: extraction, equivalence (fast paths agree with math-verify), bounded adversarial checks."""

from __future__ import annotations

import time

import pytest

from tasks.math_grader import (
    ExtractionTimeout,
    check_equivalent,
    check_many,
    extract_answer,
    grade_many,
    quick_check,
)


@pytest.mark.parametrize("response, expected", [
    ("so the answer is \\boxed{204}.", "204"),
    ("\\boxed{3} then \\boxed{\\frac{1}{2}} finally \\boxed{2^{99}}", "2^{99}"),        # last box wins
    ("\\fbox{a{b{c}}d}", "a{b{c}}d"),                                                      # nested braces
    ("<think>maybe \\boxed{7}</think>The answer is \\boxed{8}", "8"),                      # reasoning ignored
    ("<think>\\boxed{7} and I keep thinking", None),                                       # never finished
    ("<think>\\boxed{7}</think>no box after reasoning", None),
    ("no box at all: 42", None),
    ("\\boxed{unbalanced", None),
    ("$\\boxed 5$", "5"),
    ("\\boxed{4} and later \\boxed{unclosed", "4"),                                       # unclosed last box skipped
    ("\\boxed{a \\boxed{b} c \\boxed{d", "b"),                                              # ... also inside an unclosed one
    ("\\boxed{x{y} \\boxed{z}", "z"),
])
def test_extraction(response, expected):
    assert extract_answer(response) == expected


def test_answer_is_fallback_for_arith():
    assert extract_answer("The answer is 12.", fallback="answer_is") == "12"
    assert extract_answer("we get 3 then 17", fallback="answer_is") == "17"
    assert extract_answer("\\boxed{5} and 6", fallback="answer_is") == "5"
    assert extract_answer("So the answer is 3.5.", fallback="answer_is") == "3.5"  # a decimal point ends no sentence
    assert extract_answer("the answer is $12$ apples", fallback="answer_is") == "12"
    assert extract_answer("answer: 7\nbut the answer is 9.", fallback="answer_is") == "9"   # the last one
    assert extract_answer("The answer is.\nAnswer: 4", fallback="answer_is") == "4"


ADVERSARIAL_RESPONSES = {  # ~1 MB each; the quadratic (or worse) shapes of the old extraction
    "unclosed boxes": "\\boxed{" * 150_000,
    "nested unclosed": "\\boxed{" + "{" * 1_000_000,
    "boxes with spaces": "\\boxed " * 150_000,
    "answer is, never ended": "the answer is 5 " * 65_000 + "$x",
    "answer and spaces": ("answer" + " " * 300 + "x") * 3_000,
    "think tags": "<think>" * 70_000 + "</think>" + "\\boxed{" * 70_000,
}


@pytest.mark.parametrize("name", ADVERSARIAL_RESPONSES)
def test_extraction_is_linear(name):
    """1 MB of an adversarial shape is extracted and graded (wrong) in well under 2 s."""
    response = ADVERSARIAL_RESPONSES[name]
    start = time.monotonic()
    verdict = grade_many([({"answer": 70}, response)], workers=1, fallback="answer_is")[0]
    assert time.monotonic() - start < 2.0, name
    assert not verdict.correct


def test_extraction_runs_under_the_check_bound():
    with pytest.raises(ExtractionTimeout):
        extract_answer("\\boxed{" * 10, timeout=-1.0)  # past its bound before it starts
    assert extract_answer("\\boxed{" * 10 + "\\boxed{3}", timeout=3.0) == "3"


@pytest.mark.parametrize("gold, answer, correct", [
    ("204", "204", True), ("204", "204.0", True), ("204", "\\frac{408}{2}", True), ("204", "205", False),
    ("1000", "1,000", True), ("70", "0070", True),
    ("2^{99}", "2^{99}", True), ("2^{99}", "2^{100}", False),
    ("\\frac{9 \\sqrt{23}}{23}", "\\frac{9}{\\sqrt{23}}", True),
    ("1-\\frac{2}{\\pi}", "\\frac{\\pi-2}{\\pi}", True),
    ("\\frac{1}{2}", "0.5", True), ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("10", "\\sqrt{100}", True), ("204", "x^{3}+4", False), ("204", "204 \\text{ cm}", True),
    ("x+1", "1+x", True), ("(1,2)", "(1, 2)", True), ("3", "\\pi", False),
])
def test_equivalence(gold, answer, correct):
    assert check_many([(gold, answer)], workers=1)[0][0] is correct


def test_fast_paths_agree_with_math_verify():
    """Every pair the fast path decides, math-verify (run directly) decides the same way."""
    pairs = [("204", "\\frac{408}{2}"), ("204", "205"), ("\\frac{9 \\sqrt{23}}{23}", "\\frac{9}{\\sqrt{23}}"),
             ("2^{99}", "2^{98}"), ("\\frac{1}{2}", "\\frac{2}{4}"), ("12", "3\\pi"), ("5", "\\sqrt{25}"),
             ("1-\\frac{2}{\\pi}", "\\frac{\\pi-2}{\\pi}"), ("17", "\\frac{34}{3}"), ("6", "2\\sqrt{9}")]
    for gold, answer in pairs:
        fast = quick_check(gold, answer)
        assert fast is not None
        assert fast == check_equivalent(gold, answer), (gold, answer)


@pytest.mark.slow
def test_adversarial_answers_are_wrong_within_the_bound():
    adversarial = ["10^{10^{10}}", "{" * 1000 + "1" + "}" * 1000, "\\\\frac\\\\frac{{}}}{", "9^{9^{9^{9}}}",
                   "\\frac{" * 300 + "1" + "}{2}" * 300, "x^{" * 500 + "2" + "}" * 500]
    start = time.monotonic()
    results = check_many([("70", a) for a in adversarial] + [("x", "x^{10^{10^{10}}}")], workers=2, timeout=2.0)
    elapsed = time.monotonic() - start
    assert all(not correct for correct, _ in results)
    assert elapsed < 2.0 * 4 + 5  # at most a few bounded checks, two workers
    # the pool survives killed workers and keeps answering
    assert check_many([("\\frac{3}{7}", "\\frac{6}{14}")], workers=2, timeout=2.0)[0][0] is True


def test_grade_many_verdicts_and_cache():
    docs = [{"answer": 70}, {"answer": "2^{99}"}]
    pairs = [(docs[0], "\\boxed{70}"), (docs[0], "I think 70"), (docs[1], "\\boxed{2^{99}}"), (docs[0], "\\boxed{70}")]
    verdicts = grade_many(pairs, workers=1)
    assert [v.correct for v in verdicts] == [True, False, True, True]
    assert verdicts[1].extracted is None and verdicts[1].details["reason"] == "no final answer"
    assert verdicts[3].details["check"] == "cached"
