"""Math answers: extract the last \\boxed{} and check it against the gold answer.

Extraction (in the calling process, cheap):
- reasoning before the last ``</think>`` is ignored; an unclosed ``<think>`` (the model never
  finished thinking) has no final answer;
- the *last* ``\\boxed{...}`` / ``\\fbox{...}`` wins (nested braces are balanced); several
  boxes are common when a model restates intermediate results, and the last is the final one;
- no box: no answer (wrong), unless the task allows the ``answer_is`` fallback ("the answer
  is 12", then the last number) — used by the synthetic ``arith`` task for small models.

Equivalence: normalised string equality and integer equality decide most answers without
parsing; the rest go to math-verify (gold first, as its API asks) and then a restricted sympy
fallback, inside worker processes where each check has its own wall-clock bound (the parent
kills a stuck worker), so adversarial answers (``10^{10^{10}}``, 1000-level nesting, garbage
``\\frac``) come back wrong within the bound. Results are cached per (gold, answer) string.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Sequence

from tasks.verdict import Verdict

CHECK_TIMEOUT_S = 3.0
_MAX_ANSWER_CHARS = 2000

# ---------------------------------------------------------------- extraction
# Linear in the response length whatever its shape (10^5 unclosed boxes, a 1 MB line of "answer
# is"): no regex here can backtrack over a run of text more than once, and the one Python-level
# loop (brace matching) scans each character at most once and gives up at the check bound.

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"[{}]")
_TOKEN = re.compile(r"[^\s$]+")


class ExtractionTimeout(Exception):
    """Extraction ran past its time bound (only an adversarial response gets here)."""


def _closing(text: str, start: int, stop: int, deadline: float | None) -> int | None:
    """The position of the '}' closing the '{' at text[start], searched before `stop` (or None)."""
    depth = 0
    for count, brace in enumerate(_BRACE.finditer(text, start, stop)):
        if brace.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return brace.start()
        if deadline is not None and not count % 8192 and time.monotonic() > deadline:
            raise ExtractionTimeout
    return None


def last_boxed(text: str, deadline: float | None = None) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} whose braces balance (also ``\\boxed 5``), or None.

    Boxes are tried from the last; a box whose '{' never closes is skipped. An earlier '{' can
    only close before a later one that does not (past it the depth never returns), so each
    search stops where the previous failed one began: every character is scanned once.
    """
    stop = len(text)
    for index, match in enumerate(reversed(list(_BOX.finditer(text)))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            close = _closing(text, end, stop, deadline)
            if close is not None:
                return text[end + 1:close].strip()
            stop = end
        elif match.group().endswith(" ") and end < len(text):
            token = _TOKEN.match(text, end)
            if token:
                return token.group().strip()
        if deadline is not None and not index % 4096 and time.monotonic() > deadline:
            raise ExtractionTimeout
    return None


def final_part(response: str) -> str | None:
    """The text after the reasoning: after the last </think>; None if <think> never closed."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


# "answer is X" / "answer: X": X runs from after an optional '$' to the end of its sentence — a
# '.' followed by a space or the end, a newline, a '$' — or of the text.
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_ANSWER_START = re.compile(r"\s*\$?\s*")
_ANSWER_END = re.compile(r"\.(?=\s|\Z)|[\n$]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def answer_is(text: str) -> str | None:
    """X of the last "answer is X" (or "answer: X") that has one."""
    for head in reversed(list(_ANSWER_IS.finditer(text))):
        start = _ANSWER_START.match(text, head.end()).end()
        end = _ANSWER_END.search(text, start)
        found = text[start:end.start() if end else len(text)].strip()
        if found:
            return found
    return None


def extract_answer(response: str, fallback: str = "none", timeout: float | None = None) -> str | None:
    """The final answer string of a response (see module docstring); None when there is none.

    ``timeout`` bounds the work (seconds; `ExtractionTimeout` past it) — extraction is linear, so
    only a pathological response of many megabytes gets near a check's bound.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    text = final_part(response)
    if text is None:
        return None
    boxed = last_boxed(text, deadline)
    if boxed is not None:
        return boxed[:_MAX_ANSWER_CHARS]
    if fallback == "answer_is":
        found = answer_is(text)
        if found:
            return found[:_MAX_ANSWER_CHARS]
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


# ---------------------------------------------------------------- cheap equivalence

_STRIP = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\displaystyle", "$", " ", "\n"]


def normalize(answer: str) -> str:
    """A light canonical form: spacing commands, \\dfrac/\\tfrac, \\text{}, degrees, trailing '.'."""
    text = answer
    for token in _STRIP:
        text = text.replace(token, "")
    text = text.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    return text.rstrip(".")


def _as_int(text: str) -> int | None:
    cleaned = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+", text) else text
    if re.fullmatch(r"-?\d{1,60}", cleaned):
        return int(cleaned)
    return None


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth -= 1
    return deepest


class _Unsupported(ValueError):
    pass


class _NumberParser:
    """Value of a closed-form LaTeX number: digits, + - * / \\cdot \\times, ^, \\frac, \\sqrt[n]{}, \\pi,
    braces and parentheses, implicit products (``2\\sqrt{3}``). Anything else is unsupported."""

    def __init__(self, text: str):
        self.s, self.i = text.replace("\\cdot", "*").replace("\\times", "*"), 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self, token: str) -> bool:
        if self.s.startswith(token, self.i):
            self.i += len(token)
            return True
        return False

    def parse(self) -> float:
        value = self.expr()
        if self.i != len(self.s):
            raise _Unsupported(self.s[self.i:])
        return value

    def expr(self) -> float:
        value = self.term()
        while True:
            if self.take("+"):
                value += self.term()
            elif self.take("-"):
                value -= self.term()
            else:
                return value

    def term(self) -> float:
        value = self.factor()
        while True:
            if self.take("*"):
                value *= self.factor()
            elif self.take("/"):
                value /= self.factor()
            elif self.peek() in ("\\", "(", "{") or (self.peek().isdigit() and self.s[self.i - 1] in ")}"):
                value *= self.factor()
            else:
                return value

    def factor(self) -> float:
        if self.take("-"):
            return -self.factor()
        base = self.atom()
        if self.take("^"):
            exponent = self.group() if self.peek() == "{" else self.digit()
            if abs(exponent) > 4096:
                raise OverflowError("exponent")
            return float(base**exponent)
        return base

    def digit(self) -> float:
        char = self.peek()
        if not char.isdigit():
            raise _Unsupported(char)
        self.i += 1
        return float(char)

    def group(self) -> float:
        if not self.take("{"):
            raise _Unsupported(self.peek())
        value = self.expr()
        if not self.take("}"):
            raise _Unsupported("unclosed brace")
        return value

    def atom(self) -> float:
        match = re.match(r"\d+(?:\.\d+)?|\.\d+", self.s[self.i:])
        if match:
            self.i += match.end()
            return float(match.group())
        if self.take("\\frac"):
            numerator = self.group() if self.peek() == "{" else self.digit()
            denominator = self.group() if self.peek() == "{" else self.digit()
            return numerator / denominator
        if self.take("\\sqrt"):
            degree = 2.0
            if self.take("["):
                degree = self.expr()
                if not self.take("]"):
                    raise _Unsupported("sqrt degree")
            radicand = self.group() if self.peek() == "{" else self.digit()
            if radicand < 0:
                raise _Unsupported("negative radicand")
            return radicand ** (1.0 / degree)
        if self.take("\\pi"):
            return math.pi
        if self.peek() == "{":
            return self.group()
        if self.take("("):
            value = self.expr()
            if not self.take(")"):
                raise _Unsupported("unclosed parenthesis")
            return value
        raise _Unsupported(self.s[self.i:self.i + 10])


def numeric_value(latex: str) -> float | None:
    """The value of a closed-form LaTeX number (see `_NumberParser`), ``inf`` when it overflows
    a float (``10^{10^{10}}``), or None when it is not such a number."""
    try:
        value = _NumberParser(normalize(latex)).parse()
    except OverflowError:
        return math.inf
    except (_Unsupported, ZeroDivisionError, RecursionError, ValueError, TypeError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


_COMMANDS = re.compile(r"\\[a-zA-Z]+")


def _has_free_variable(answer: str) -> bool:
    """Letters outside LaTeX commands, and no '=' / set or relation syntax that math-verify reads."""
    if re.search(r"=|\\in|\\le|\\ge|<|>|\\cup|\\infty", answer):
        return False
    without_text = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}", "", answer)
    return re.search(r"[a-zA-Z]", _COMMANDS.sub("", without_text)) is not None


def quick_check(gold: str, answer: str) -> bool | None:
    """Decide without parsing when possible: True/False, or None for 'needs math-verify'.

    Exact text, integers, and closed-form numbers (equal within 1e-9 relative: True; apart by
    more than 1e-4 relative: False; in between math-verify decides, as it rounds floats).
    """
    g, a = normalize(gold), normalize(answer)
    if g == a:
        return True
    if _depth(a) > _MAX_DEPTH:
        return False  # no real answer nests this deep; parsing it only burns the time bound
    gi, ai = _as_int(g), _as_int(a)
    if gi is not None and ai is not None:
        return gi == ai
    gv, av = numeric_value(gold), numeric_value(answer)
    if gv is not None and math.isfinite(gv):
        if av == math.inf:
            return False  # astronomically large: no finite gold equals it, and sympy would hang on it
        if av is None and _has_free_variable(answer):
            return False  # an expression in a variable is not a number (assignments "x=5" excepted)
    if gv is not None and av is not None and math.isfinite(gv) and math.isfinite(av):
        if math.isclose(gv, av, rel_tol=1e-9, abs_tol=1e-12):
            return True
        if not math.isclose(gv, av, rel_tol=1e-4, abs_tol=1e-9):
            return False
    if gi is not None and re.fullmatch(r"-?[\d,]+(\.\d+)?", a) is None and not re.search(r"\\frac|\d", a):
        return False  # an integer gold vs an answer with no digits at all (e.g. "x", "\pi")
    return None


# ---------------------------------------------------------------- the bounded check (worker side)

_SAFE_SYMPY = re.compile(r"^(?:[0-9.+\-*/^()\s]|sqrt|pi|e|i)*$")
_MAX_DEPTH = 64


def _sympy_fallback(gold: str, answer: str) -> bool:
    """Plain-text arithmetic ('2**99', 'sqrt(2)/2'): only digits, operators and a few names."""
    import sympy
    from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

    gold_text, answer_text = (normalize(t).replace("{", "(").replace("}", ")") for t in (gold, answer))
    if not (_SAFE_SYMPY.match(gold_text) and _SAFE_SYMPY.match(answer_text)):
        return False
    transforms = (*standard_transformations, convert_xor)
    try:
        g = parse_expr(gold_text, transformations=transforms, evaluate=False)
        a = parse_expr(answer_text, transformations=transforms, evaluate=False)
        return bool(sympy.simplify(g - a) == 0)
    except Exception:  # noqa: BLE001 - unparsable text is simply not equal
        return False


@functools.lru_cache(maxsize=4096)
def _parse(latex: str) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{latex}}}", parsing_timeout=None)


def check_equivalent(gold: str, answer: str) -> bool:
    """math-verify equivalence (gold first), then the sympy fallback. Runs inside a worker."""
    from math_verify import verify

    gold_parsed = _parse(gold)
    answer_parsed = _parse(answer)
    if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=None):
        return True
    return _sympy_fallback(gold, answer)


# ---------------------------------------------------------------- grading many answers

_CACHE: dict[tuple[str, str], bool] = {}


def check_many(pairs: Sequence[tuple[str, str]], workers: int | None = None,
               timeout: float = CHECK_TIMEOUT_S) -> list[tuple[bool, str]]:
    """(correct, how) for each (gold, answer); how is 'exact', 'math-verify', 'cached', 'timeout'."""
    from tasks.pool import shared_pool

    out: list[tuple[bool, str] | None] = [None] * len(pairs)
    todo: dict[tuple[str, str], list[int]] = {}
    for index, key in enumerate(pairs):
        if key in _CACHE:
            out[index] = (_CACHE[key], "cached")
            continue
        quick = quick_check(*key)
        if quick is not None:
            _CACHE[key] = quick
            out[index] = (quick, "exact")
        else:
            todo.setdefault(key, []).append(index)
    if todo:
        keys = list(todo)
        pool = shared_pool("tasks.math_worker:check", workers=workers, timeout=timeout)
        results = pool.map(keys, on_failure=lambda reason: None, desc="math-verify")
        for key, result in zip(keys, results, strict=True):
            correct = bool(result)
            _CACHE[key] = correct
            how = "math-verify" if result is not None else "timeout-or-error"
            for index in todo[key]:
                out[index] = (correct, how)
    return out  # type: ignore[return-value]


def gold_string(answer: object) -> str:
    """Gold answers are strings or integers (aime25); compare as strings."""
    return str(answer).strip()


def grade_many(pairs: Sequence[tuple[dict, str]], workers: int | None = None,
               fallback: str = "none", timeout: float = CHECK_TIMEOUT_S) -> list[Verdict]:
    """Verdicts for (doc, response) pairs of a math task (docs have an ``answer``)."""
    extracted: list[str | None] = []
    reasons: dict[int, str] = {}
    for index, (_, response) in enumerate(pairs):  # under the same bound as each check
        try:
            extracted.append(extract_answer(response, fallback, timeout=timeout))
        except ExtractionTimeout:
            extracted.append(None)
            reasons[index] = f"extraction timed out after {timeout:g}s"
    checks = [(gold_string(doc["answer"]), ans) for (doc, _), ans in zip(pairs, extracted, strict=True) if ans is not None]
    results = iter(check_many(checks, workers=workers, timeout=timeout))
    verdicts = []
    for index, ans in enumerate(extracted):
        if ans is None:
            verdicts.append(Verdict(False, None, {"reason": reasons.get(index, "no final answer")}))
            continue
        correct, how = next(results)
        verdicts.append(Verdict(correct, ans, {"check": how}))
    return verdicts
