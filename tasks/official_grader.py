"""The official AutoDeco evaluation's answer check, for numbers comparable with the paper's.

The paper's script (`utils/llm_eval.py` of the AutoDeco repository) scores a response with a
`compute_score(response, gt)` of the MATH-benchmark lineage (Hendrycks et al.'s normalisation, as
carried by lm-evaluation-harness and verl): take the content of the *last* ``\\boxed{...}``, apply a
fixed list of string normalisations to it and to the gold answer, and compare the strings. This
module re-implements those rules (written from their description, behaviour pinned by tests):

- extraction: after ``\\boxed `` (with a space) the rest up to the next ``$``; else the last
  ``\\boxed{`` (or ``\\fbox{`` when there is no ``\\boxed``) up to its matching brace. An unclosed
  box, or an ``\\fbox`` (which the official unwrapping rejects), scores wrong.
- normalisation, in order: drop newlines and ``\\!``; ``\\\\`` → ``\\``; tfrac/dfrac → frac; drop
  ``\\left``/``\\right``, degree marks, ``\\$``; cut units after a single ``\\text{ ``; drop ``\\%``;
  " ." → " 0.", "{." → "{0.", a leading "." gets a 0; "x = ..." with a left side of ≤ 2 characters
  keeps the right side; ``\\sqrt3`` → ``\\sqrt{3}``; drop spaces; ``\\frac12`` → ``\\frac{1}{2}``;
  "0.5" → ``\\frac{1}{2}``; an integer "a/b" → ``\\frac{a}{b}``. Where a rule fails on odd input the
  official falls back to comparing the raw strings, and so does this.

Our default math grader (tasks.math_grader: math-verify plus numeric and symbolic checks) accepts
more equivalent forms; this one exists only to put our numbers beside the paper's like for like
(``--grading official``).
"""

from __future__ import annotations

from tasks.verdict import Verdict


class _RuleFailed(ValueError):
    """A normalisation rule met input it cannot handle (the official code's assertion)."""


def last_boxed_content(text: str) -> str | None:
    """The official extraction (see the module docstring); None when nothing can be scored."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                boxed = text[start : i + 1]
                return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else None
    return None


def _units_dropped(text: str) -> str:
    if "\\text{ " not in text:
        return text
    parts = text.split("\\text{ ")
    if len(parts) != 2:
        raise _RuleFailed("more than one \\text{ ")
    return parts[0]


def _sqrt_braced(text: str) -> str:
    if "\\sqrt" not in text:
        return text
    head, *tails = text.split("\\sqrt")
    out = [head]
    for tail in tails:
        if not tail:
            raise _RuleFailed("\\sqrt at the end")
        out.append("\\sqrt" + (tail if tail[0] == "{" else "{" + tail[0] + "}" + tail[1:]))
    return "".join(out)


def _fracs_braced(text: str) -> str:
    head, *tails = text.split("\\frac")
    out = [head]
    for tail in tails:
        if tail.startswith("{"):
            out.append("\\frac" + tail)
            continue
        if len(tail) < 2:
            return text  # the official gives up on the whole string here
        a, b, rest = tail[0], tail[1], tail[2:]
        out.append("\\frac{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest))
    return "".join(out)


def _slash_as_frac(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


def normalize(text: str) -> str:
    """The official normalisation (raises `_RuleFailed` where the official code would fail)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        text = text.replace(old, new)
    text = _units_dropped(text)
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _fracs_braced(_sqrt_braced(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_as_frac(text)


def equivalent(answer: str | None, gold: str | None) -> bool:
    """The official equality: normalised strings, or raw strings where normalising fails."""
    if answer is None or gold is None:
        return answer is None and gold is None
    try:
        return normalize(answer) == normalize(gold)
    except _RuleFailed:
        return answer == gold


def grade(doc: dict, response: str) -> Verdict:
    """Correct when the last box's content equals the doc's ``answer`` under the official rules."""
    answer = last_boxed_content(response)
    if answer is None:
        return Verdict(False, None, {"reason": "no scorable \\boxed{} (official rules)"})
    return Verdict(equivalent(answer, str(doc["answer"])), answer, {"grading": "official"})
