"""Every `autodeco bench <name>` measurement, one module each; each prints ratios, not raw timings.

decode (AutoDeco vs default sampling per step), engine (overhead: harness / raw generate;
backends: tokens/s per backend), efficiency (the paper's Table 3: FLOPs, latency, memory vs
prompt length), loss and train (the training loss and a training step vs a base forward), grading
(grader throughput). The command-line options live in `harness.cli.bench`.
"""

from __future__ import annotations

from pathlib import Path

from harness.core.files import atomic_write_json

# Natural text for prompts and training rows: random tokens give unnaturally flat next-token
# distributions (a slow nucleus, a slow loss sort), so every benchmark reads real text.
TEXT = (
    "The history of mathematics spans thousands of years. Early civilizations such as the Babylonians "
    "and the Egyptians developed arithmetic and geometry for trade, astronomy and construction. Greek "
    "mathematicians introduced deductive proof; Euclid's Elements organised geometry from a few axioms. "
    "In India the decimal place-value system and the number zero took shape, and scholars in Baghdad "
    "wrote the first treatises on algebra. During the Renaissance, European mathematicians solved cubic "
    "equations, and in the seventeenth century Newton and Leibniz invented calculus. Question: a train "
    "travels 120 kilometres in 1.5 hours. What is its average speed? Answer: the average speed is "
    "distance divided by time, so 120 / 1.5 = 80 kilometres per hour. Question: what is 17 times 23? "
)


def natural_rows(tokenizer, rows: int, length: int, stride: int = 7) -> list[list[int]]:
    """``rows`` token-id lists of ``length`` tokens of TEXT (repeated), each starting ``stride`` later."""
    ids = tokenizer(TEXT).input_ids
    ids = ids * (1 + (length + rows * stride) // len(ids))
    return [ids[stride * row : stride * row + length] for row in range(rows)]


def write_result(out: str | None, name: str, result: dict) -> Path | None:
    """``<out>/<name>`` as JSON (atomic), when an output folder was given."""
    if not out:
        return None
    path = atomic_write_json(Path(out) / name, result)
    print(f"wrote {path}")
    return path
