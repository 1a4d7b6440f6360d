"""Graders by name (a task's YAML says ``metadata.grader``): grade many responses, aggregate.

Each grader turns (doc, response) pairs into Verdicts and, optionally, computes task metrics
beyond Pass@k from all verdicts (IFEval's four accuracies).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tasks.verdict import Verdict


class Grader:
    """Base: `grade_many` maps `grade`; `aggregate` adds nothing."""

    lm_eval_metric = "exact_match"

    def __init__(self, options: dict | None = None):
        self.options = options or {}

    def grade(self, doc: dict, response: str) -> Verdict:
        return self.grade_many([(doc, response)])[0]

    def grade_many(self, pairs: Sequence[tuple[dict, str]], workers: int | None = None) -> list[Verdict]:
        return [self.grade(doc, response) for doc, response in pairs]

    def aggregate(self, verdicts: list[Verdict]) -> dict[str, float]:
        return {}


class MathGrader(Grader):
    def grade_many(self, pairs, workers=None):
        from tasks import math_grader

        return math_grader.grade_many(pairs, workers=workers, fallback=self.options.get("answer_fallback", "none"),
                                      timeout=float(self.options.get("check_timeout", math_grader.CHECK_TIMEOUT_S)))


class OfficialGrader(Grader):
    """The paper's own answer check (tasks.official_grader): for numbers comparable with its tables."""

    def grade(self, doc, response):
        from tasks import official_grader

        return official_grader.grade(doc, response)


class ChoiceGrader(Grader):
    def grade(self, doc, response):
        from tasks import choice_grader

        return choice_grader.grade(doc, response)


class IFEvalGrader(Grader):
    lm_eval_metric = "prompt_level_strict_acc"

    def grade(self, doc, response):
        from tasks import ifeval_grader

        return ifeval_grader.grade(doc, response)

    def grade_many(self, pairs, workers=None):
        """In-process for a few responses; in bounded worker processes for many."""
        from tasks import ifeval_grader
        from tasks.pool import shared_pool

        if len(pairs) < 64 or workers == 1:
            return [ifeval_grader.grade(doc, response) for doc, response in pairs]
        timeout = float(self.options.get("check_timeout", 60.0))
        pool = shared_pool("tasks.ifeval_worker:check", workers=workers, timeout=timeout)
        results = pool.map([(doc, response) for doc, response in pairs], on_failure=lambda reason: reason, desc="ifeval")
        verdicts = []
        for (doc, _), result in zip(pairs, results, strict=True):
            if isinstance(result, str):  # the check failed or ran out of time: nothing followed
                n = len(doc["instruction_id_list"])
                result = {"prompt_level_strict_acc": False, "inst_level_strict_acc": [False] * n,
                          "prompt_level_loose_acc": False, "inst_level_loose_acc": [False] * n, "error": result}
            verdicts.append(Verdict(result["prompt_level_strict_acc"], None, result))
        return verdicts

    def aggregate(self, verdicts):
        from tasks import ifeval_grader

        return ifeval_grader.aggregate(verdicts)


class CodeGrader(Grader):
    lm_eval_metric = "pass@1"

    def grade(self, doc, response):
        from tasks import code_grader

        return code_grader.grade(doc, response, timeout=float(self.options.get("test_timeout", 6.0)))

    def grade_many(self, pairs, workers=None):
        # every test already runs in its own sandboxed process; threads just keep them overlapping
        with ThreadPoolExecutor(max_workers=max(1, workers or 2)) as pool:
            return list(pool.map(lambda pair: self.grade(*pair), pairs))


GRADERS: dict[str, type[Grader]] = {
    "math": MathGrader,
    "choice": ChoiceGrader,
    "ifeval": IFEvalGrader,
    "code": CodeGrader,
    "official": OfficialGrader,
}
GRADINGS = ("default", "official")  # `--grading`: the task's own grader, or the paper's check (math, choice)
OFFICIAL_APPLIES_TO = ("math", "choice")


def get_grader(name: str, options: dict | None = None) -> Grader:
    if name not in GRADERS:
        raise KeyError(f"unknown grader {name!r}; known: {', '.join(GRADERS)}")
    return GRADERS[name](options)


def lm_eval_process_results(grader: str, doc: dict, response: str, options: dict | None = None) -> dict:
    """lm-eval's ``process_results`` for our graders: {metric: value} for one response."""
    impl = get_grader(grader, options)
    verdict = impl.grade(dict(doc), response)
    if grader == "ifeval":
        return dict(verdict.details)
    return {impl.lm_eval_metric: float(verdict.correct)}
