"""`arith`: a seeded synthetic in-domain task (arithmetic and short word problems) for CPU runs.

Difficulty 1..5 sets the operand size and the number of operations; level >= 3 mixes in short
word problems. Splits never overlap: a problem belongs to ``train``, ``dev`` or ``test`` by a hash
of its text (about 70/10/20), whatever the seed or difficulty, so a problem generated for training
can never appear in a held-out split. ``dev`` is for choosing among checkpoints and recipes
(`arith_dev`), ``test`` for the numbers one reports (`arith`). Docs are ``{"problem", "answer" (int), "difficulty"}``
and are graded by the math grader (boxed answer, or "the answer is N" / last number).

The trainer's reject sampling uses ``get_task("arith", split="train", n=..., seed=...)``.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
from collections.abc import Callable

SPLITS = ("train", "dev", "test")
TEST_FRACTION = 0.2
DEV_FRACTION = 0.1

_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def split_of(problem: str) -> str:
    """'train', 'dev' or 'test', decided by the problem text alone (so splits can never overlap)."""
    digest = hashlib.sha256(problem.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < TEST_FRACTION else "dev" if u < TEST_FRACTION + DEV_FRACTION else "train"


def evaluate(text: str) -> int:
    """Value of an expression of integers, + - * and parentheses (operator precedence as usual)."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression: {text!r}")

    return walk(ast.parse(text, mode="eval"))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _expression(rng: random.Random, difficulty: int) -> tuple[str, int]:
    high = 10 ** min(difficulty, 4)
    n_ops = 1 + (difficulty - 1) // 2 + rng.randint(0, 1 if difficulty > 1 else 0)
    ops = "+-" if difficulty == 1 else "+-*"
    text = str(rng.randint(1, high))
    for _ in range(n_ops):
        op = rng.choice(ops)
        operand = rng.randint(2, 12) if op == "*" else rng.randint(1, high)
        if op == "*" and difficulty >= 3 and rng.random() < 0.5:
            text = f"({text}) * {operand}" if " " in text else f"{text} * {operand}"
        else:
            text = f"{text} {op} {operand}"
    return text, evaluate(text)


def _word_problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = rng.randint(5, 10 * difficulty * difficulty)
    gained = rng.randint(2, 5 * difficulty)
    groups = rng.randint(2, 2 + difficulty)
    lost = rng.randint(1, start)
    answer = (start - lost + gained) * groups
    text = (f"{name} has {start} {item}, gives away {lost}, then finds {gained} more. "
            f"{name} then makes {groups} identical copies of the whole collection. "
            f"How many {item} does {name} have in total?")
    return text, answer


def _generate_one(rng: random.Random, difficulty: int) -> dict:
    kinds: list[Callable] = [_expression] + ([_word_problem] if difficulty >= 3 else [])
    kind = rng.choice(kinds)
    text, answer = kind(rng, difficulty)
    problem = f"Compute {text}." if kind is _expression else text
    return {"problem": problem, "answer": int(answer), "difficulty": difficulty}


def generate(split: str = "test", n: int = 200, difficulty: int = 2, seed: int = 1234) -> list[dict]:
    """`n` distinct problems of `split` (deterministic in seed, difficulty and split)."""
    if split not in SPLITS:
        raise ValueError(f"arith split must be one of {SPLITS}, got {split!r}")
    if not 1 <= int(difficulty) <= 5:
        raise ValueError(f"arith difficulty must be 1..5, got {difficulty!r}")
    rng = random.Random(f"arith:{seed}:{difficulty}")
    docs, seen = [], set()
    attempts = 0
    while len(docs) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"cannot make {n} distinct {split} problems at difficulty {difficulty}")
        doc = _generate_one(rng, int(difficulty))
        if doc["problem"] in seen or split_of(doc["problem"]) != split:
            continue
        seen.add(doc["problem"])
        docs.append(doc)
    return docs
