"""Multiple choice: read the chosen letter from a free-form response.

Patterns, strongest first; within a pattern the *last* occurrence wins (models restate the
options before concluding): ``\\boxed{C}``, "answer is (C)" / "Answer: **C**", a bare "(C)" or
"**C**", a response that is only a letter, and finally the text of exactly one option echoed in
the conclusion. A letter outside the question's options, or nothing found, is wrong — never an
exception.
"""

from __future__ import annotations

import hashlib
import random
import re
import string

from tasks.math_grader import final_part, last_boxed
from tasks.verdict import Verdict

LETTERS = string.ascii_uppercase


def _patterns(valid: str) -> list[re.Pattern]:
    """Linear-time patterns: no two quantified parts can match the same characters, so a long run
    of spaces or blank lines is scanned once (the earlier ``\\s*(?:is|:)?\\s*[:\\s]*`` took 30 s on
    "answer" + 400 spaces)."""
    letter = f"([{valid}])"
    filler = r"[\s:*(\[]*"
    return [
        re.compile(rf"(?i:answer){filler}(?:is(?![A-Za-z]){filler})?(?:(?i:option){filler})?{letter}(?![A-Za-z])"),
        re.compile(rf"\(\s*{letter}\s*\)"),
        re.compile(rf"\*\*\s*{letter}\s*(?:[\.\):]\s*)?\*\*"),
        re.compile(rf"^[ \t]*{letter}[ \t]*(?:[\.\):][ \t]*)?$", re.MULTILINE),
    ]


def _clean(text: str) -> str:
    return re.sub(r"[\s\*\$\.\(\)\\]|\\text", "", text).lower()


def extract_letter(response: str, n_options: int) -> str | None:
    """The chosen option letter (A..), or None when the response names none of the options."""
    text = final_part(response)
    if text is None:
        return None
    valid = LETTERS[:n_options]
    boxed = last_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^{}]*)\}|[\(\)\s\*]", r"\1", boxed)
        if len(inner) >= 1 and inner[0].upper() in valid and (len(inner) == 1 or not inner[1].isalpha()):
            return inner[0].upper()
    for pattern in _patterns(valid):
        found = pattern.findall(text)
        if found:
            letter = found[-1].upper()
            return letter if letter in valid else None
    return None


def extract_choice(response: str, options: list[str]) -> str | None:
    """`extract_letter`, then the option text echoed in the last lines (exactly one match)."""
    letter = extract_letter(response, len(options))
    if letter is not None:
        return letter
    text = final_part(response) or ""
    tail = _clean("\n".join(text.strip().splitlines()[-3:]))
    hits = [i for i, option in enumerate(options) if _clean(option) and _clean(option) in tail]
    # prefer the longest echoed option when one option's text contains another's
    hits = [i for i in hits if not any(j != i and _clean(options[i]) in _clean(options[j]) for j in hits)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def grade(doc: dict, response: str) -> Verdict:
    """Correct when the extracted letter equals the doc's ``answer`` letter."""
    letter = extract_choice(response, doc["options"])
    return Verdict(letter is not None and letter == doc["answer"], letter, {})


def format_options(options: list[str]) -> str:
    """'A. text' lines, as the prompt shows them."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def shuffle_gpqa(row: dict) -> dict:
    """GPQA's four answers in a per-question deterministic order (seeded by the Record ID)."""
    choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    choices = [c.strip() for c in choices]
    seed = int(hashlib.sha256(row["Record ID"].encode()).hexdigest()[:16], 16)
    order = list(range(4))
    random.Random(seed).shuffle(order)
    options = [choices[i] for i in order]
    return {
        "record_id": row["Record ID"],
        "question": row["Question"].strip(),
        "options": options,
        "answer": LETTERS[order.index(0)],
        "domain": row.get("High-level domain", ""),
    }
