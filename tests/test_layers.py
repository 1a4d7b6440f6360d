"""The import layers of DESIGN.md, enforced: no module imports against them, and no import cycle
between files or between folders. Imports inside functions count (they run too).

Read every module of harness/, heads/, tasks/ and reports/ with `ast`; ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "heads", "tasks", "reports")

# folder -> the folders it may import (besides itself). The order of DESIGN.md "Layers".
BELOW_BENCH = {"harness/core", "harness/decoding", "harness/models", "harness/backends", "harness", "heads",
               "heads/training", "tasks", "tasks/math", "tasks/choice", "tasks/ifeval", "tasks/livecodebench",
               "reports"}
ALLOWED: dict[str, set[str]] = {
    "harness/core": set(),
    "harness/decoding": {"harness/core"},
    "heads": {"harness/core"},
    "tasks": {"harness/core"},
    "tasks/math": {"harness/core", "tasks"},
    "tasks/choice": {"harness/core", "tasks"},
    "tasks/ifeval": {"harness/core", "tasks"},
    "tasks/livecodebench": {"harness/core", "tasks"},
    "harness/models": {"harness/core", "heads"},
    "harness/backends": {"harness/core", "harness/decoding", "harness/models", "heads"},
    "harness": {"harness/core", "harness/decoding", "harness/models", "harness/backends", "heads", "tasks"},
    "heads/training": {"harness/core", "harness/decoding", "harness/models", "harness/backends", "harness", "heads",
                       "tasks", "tasks/math"},
    "reports": {"harness/core", "harness"},
    "harness/bench": BELOW_BENCH,
    "harness/cli": BELOW_BENCH | {"harness/bench"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()

    def add(target: str) -> None:
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                if candidate != name:
                    out.add(candidate)
                return

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def folder(path: Path) -> str:
    return "/".join(path.relative_to(ROOT).parent.parts)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    known = modules()
    return known, {name: imports(name, path, known) for name, path in known.items()}


def test_every_folder_has_a_layer(graph):
    known, _ = graph
    assert {folder(p) for p in known.values()} <= set(ALLOWED), "add the new folder to ALLOWED and DESIGN.md"


def test_no_import_against_the_layers(graph):
    known, edges = graph
    wrong = [f"{a} ({folder(known[a])}) imports {b} ({folder(known[b])})"
             for a, targets in edges.items() for b in sorted(targets)
             if folder(known[b]) != folder(known[a]) and folder(known[b]) not in ALLOWED[folder(known[a])]]
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_files(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_no_cycle_between_folders(graph):
    known, edges = graph
    folders: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if folder(known[a]) != folder(known[b]):
                folders[folder(known[a])].add(folder(known[b]))
    assert cycles(folders) == []


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    """The analysis itself: a cycle through an import inside a function is found."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("import pkg.a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    edges = {name: imports(name, path, known) for name, path in known.items()}
    assert edges == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
