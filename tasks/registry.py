"""Tasks from the YAML files under tasks/<family>/ (lm-eval's schema): find, load, prompt, grade.

A YAML is a real lm-eval task config (``lm_eval --include_path tasks --tasks aime24`` runs it);
this module reads the same file for the harness. Fields used here:
``task`` / ``group``+``task`` (a group lists its tasks), ``doc_to_text`` (a ``!function``),
``generation_kwargs``, ``dataset_kwargs`` (the source in tasks/data.py and its options, e.g.
LiveCodeBench's ``release``, ``start_date``, ``end_date``, arith's ``split``, ``n``,
``difficulty``, ``seed``), and ``metadata`` (``version``, ``grader``, ``system_prompt``,
grader options such as ``answer_fallback``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import UserError
from harness.core.paths import data_dir as resolve_data_dir
from tasks.data import check_options
from tasks.graders import GRADINGS, OFFICIAL_APPLIES_TO, Grader, get_grader
from tasks.verdict import Verdict

TASKS_DIR = Path(__file__).resolve().parent


class _FunctionRef(str):
    """A ``!function utils.name`` reference, kept as text in `config` and resolved on use."""


def _yaml_loader():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
    return Loader


def read_yaml(path: Path) -> dict:
    """A task YAML, with lm-eval's ``include: base.yaml`` merged underneath it."""
    with path.open(encoding="utf-8") as handle:
        config = yaml.load(handle, Loader=_yaml_loader()) or {}  # noqa: S506 - SafeLoader subclass
    if "include" in config:
        base = read_yaml(path.parent / config.pop("include"))
        config = {**base, **config}
    return config


def _resolve(ref: str, yaml_path: Path):
    module_name, _, func = ref.rpartition(".")
    package = yaml_path.parent.relative_to(TASKS_DIR.parent).as_posix().replace("/", ".")
    return getattr(importlib.import_module(f"{package}.{module_name}"), func)


@functools.cache
def _index() -> tuple[dict[str, Path], dict[str, list[str]]]:
    tasks, groups = {}, {}
    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        config = read_yaml(path)
        if "group" in config:
            groups[config["group"]] = [t if isinstance(t, str) else t["task"] for t in config["task"]]
        elif "task" in config:
            tasks[config["task"]] = path
    return tasks, groups


def list_tasks() -> list[str]:
    """Names of all tasks and groups."""
    tasks, groups = _index()
    return sorted([*tasks, *groups])


class UnknownTaskError(UserError, KeyError):
    """A task or group name that is not registered (the message suggests close names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskOptionError(UserError, ValueError):
    """An option (``--task-option KEY=VALUE``) the task does not take."""


def _unknown(name: str) -> UnknownTaskError:
    close = difflib.get_close_matches(name, list_tasks(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_tasks())}"
    return UnknownTaskError(f"unknown task {name!r}{hint}")


def expand(names: str | Iterable[str]) -> list[str]:
    """Task names with groups replaced by their tasks (order kept, duplicates dropped).

    Accepts a list or a comma-separated string (``"aime,gpqa_diamond"``).
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    tasks, groups = _index()
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name in groups:
            members = expand(groups[name])
        elif name in tasks:
            members = [name]
        else:
            raise _unknown(name)
        out += [m for m in members if m not in out]
    return out


class Task:
    """One benchmark: its docs, prompts, generation settings and grader."""

    def __init__(self, name: str, path: Path, data_dir: Path | None, options: dict[str, Any]):
        self.name = name
        self.path = path
        self.config = read_yaml(path)
        self.data_dir = data_dir
        self.metadata: dict = dict(self.config.get("metadata") or {})
        defaults = dict(self.config.get("dataset_kwargs") or {})
        self.source = defaults.pop("source")
        options = dict(options)
        self.grading = options.pop("grading", "default")
        unknown = sorted(set(options) - set(defaults))
        if unknown:  # a task takes the options its YAML's dataset_kwargs declare (and `grading`), nothing else
            known = ", ".join(sorted(defaults)) or "none"
            raise TaskOptionError(f"unknown task option {unknown[0]!r} for {name}; known: {known}, grading")
        self.dataset_options = check_options(self.source, {**defaults, **options})
        self.grader: Grader = get_grader(self._grader_name(), self.metadata)
        self._doc_to_text = _resolve(self.config["doc_to_text"], path)
        self._docs: list[dict] | None = None

    def _grader_name(self) -> str:
        """The YAML's grader, or the paper's check under ``grading=official`` (math and choice tasks)."""
        if self.grading not in GRADINGS:
            raise UnknownTaskError(f"grading {self.grading!r} is not one of {', '.join(GRADINGS)}")
        if self.grading == "default":
            return self.metadata["grader"]
        if self.metadata["grader"] not in OFFICIAL_APPLIES_TO:
            raise UnknownTaskError(f"{self.name}: grading=official applies to math and multiple-choice tasks, "
                                   f"not to a {self.metadata['grader']} task")
        self.config = {**self.config, "grading": "official"}  # recorded in the results files' configs
        return "official"

    def __repr__(self) -> str:
        where = self.data_dir or "hub"
        return f"Task({self.name!r}, source={self.source!r}, data={where}, options={self.dataset_options})"

    @property
    def version(self) -> Any:
        return self.metadata.get("version")

    @property
    def generation_kwargs(self) -> dict:
        kwargs = dict(self.config.get("generation_kwargs") or {})
        kwargs.setdefault("until", [])
        return kwargs

    def docs(self, limit: int | None = None) -> list[dict]:
        """The test split (cached); each doc has a string ``doc_id``."""
        if self._docs is None:
            from tasks.data import load_docs

            self._docs = load_docs(self.source, self.data_dir, self.dataset_options)
        return self._docs if limit is None else self._docs[:limit]

    def doc_id(self, doc: dict) -> str:
        return str(doc["doc_id"])

    def doc_by_id(self, doc_id: str) -> dict:
        lookup = {d["doc_id"]: d for d in self.docs()}
        if str(doc_id) not in lookup:
            raise KeyError(f"{self.name}: no doc with doc_id {doc_id!r}")
        return lookup[str(doc_id)]

    def messages(self, doc: dict) -> list[dict[str, str]]:
        """Chat messages: an optional system prompt (metadata.system_prompt) and the user turn."""
        out = []
        if self.metadata.get("system_prompt"):
            out.append({"role": "system", "content": self.metadata["system_prompt"]})
        out.append({"role": "user", "content": self._doc_to_text(doc)})
        return out

    def prompt(self, doc: dict, tokenizer) -> str:
        """The model's chat template applied to `messages(doc)`, generation prompt added."""
        return tokenizer.apply_chat_template(self.messages(doc), tokenize=False, add_generation_prompt=True)

    def grade(self, doc: dict, response: str) -> Verdict:
        return self.grader.grade(doc, response)

    def grade_many(self, pairs: Sequence[tuple[dict, str]], workers: int | None = None) -> list[Verdict]:
        """Verdicts for (doc, response) pairs: parallel, cached and time-bounded where it matters."""
        return self.grader.grade_many(list(pairs), workers=workers)

    def aggregate(self, verdicts_by_doc: dict[str, list[Verdict]]) -> dict[str, float]:
        """Task metrics beyond Pass@k (IFEval's prompt/instruction-level strict/loose accuracies)."""
        return self.grader.aggregate([v for verdicts in verdicts_by_doc.values() for v in verdicts])


def get_task(name: str, data_dir: str | Path | None = None, **options: Any) -> Task:
    """Load task `name`. `data_dir` (or $AUTODECO_DATA_DIR) reads local files; otherwise the hub.

    `options` override the YAML's ``dataset_kwargs`` (e.g. ``split="train"`` for arith,
    ``start_date="2025-01-01"`` for livecodebench).
    """
    tasks, groups = _index()
    if name in groups:
        raise UnknownTaskError(f"{name!r} is a group of tasks ({', '.join(groups[name])}); name one of them "
                               f"(in Python: expand() it)")
    if name not in tasks:
        raise _unknown(name)
    return Task(name, tasks[name], resolve_data_dir(data_dir), options)


def load_tasks(names: str | Iterable[str], data_dir: str | Path | None = None, **options: Any) -> list[Task]:
    """Every task named (groups expanded; a comma-separated string works), loaded with ``data_dir``
    and ``options`` (e.g. ``grading="official"``)."""
    folder = resolve_data_dir(data_dir)
    return [get_task(name, data_dir=folder, **options) for name in expand(names)]
