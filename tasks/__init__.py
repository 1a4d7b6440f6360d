"""Benchmarks as lm-eval-style YAML tasks plus graders.

``get_task(name, data_dir=None, **options)``, ``load_tasks(names, data_dir)``, ``list_tasks()``,
``expand(names)``; a `Task` gives
docs, prompts, generation settings and grading; a `Verdict` is one graded response.
"""

from tasks.registry import Task, UnknownTaskError, expand, get_task, list_tasks, load_tasks
from tasks.verdict import Verdict

__all__ = ["Task", "UnknownTaskError", "Verdict", "expand", "get_task", "list_tasks", "load_tasks"]
