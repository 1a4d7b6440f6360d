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
    "Answer: 17 times 20 is 340 and 17 times 3 is 51, so the product is 391. "
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp and a small "
    "notebook in which he recorded the wind, the colour of the sea and the ships that passed the cape. In "
    "winter the storms came from the north-west and the spray reached the gallery windows; in summer the "
    "fishing boats returned late, their decks crowded with gulls. Nobody in the village could remember a "
    "night when the light had failed. Bread dough needs flour, water, salt and yeast; knead it for ten "
    "minutes, let it rise in a warm place until it doubles, shape it gently and bake it in a hot oven until "
    "the crust sounds hollow when tapped. Rivers carry sediment from the mountains to the plains, and over "
    "thousands of years the deposits build fertile deltas where farmers grow rice, wheat and cotton. The "
    "committee met on Tuesday to discuss the new library budget, the repairs to the school roof and a "
    "proposal to plant trees along the main road; after a long debate the members agreed to postpone the "
    "vote until the spring. A rectangle is 12 centimetres long and 5 centimetres wide, so its area is 60 "
    "square centimetres and its diagonal, by Pythagoras, is 13 centimetres. Maria bought three notebooks at "
    "2.50 euros each and a pen for 1.20 euros; she paid with a ten-euro note and received 1.30 euros in change. "
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
