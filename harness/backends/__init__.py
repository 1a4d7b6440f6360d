"""Backends turn requests into completions: ``get_backend(name, model, **options)``.

The registry maps a name to a module path and class so that importing this package stays cheap
(no torch, no vllm) until a backend is asked for. A backend is an object with
``tokenizer``, ``is_autodeco`` and ``generate(requests) -> Iterator[Completion]``.
"""

from __future__ import annotations

import importlib
import json
import sys

from harness.backends.base import Backend, BackendError, Completion, Request, sample_seed, token_texts

__all__ = ["BACKENDS", "Backend", "BackendError", "Completion", "Request", "check_backend", "get_backend",
           "loaded_in_turn", "parse_options", "sample_seed", "token_texts"]

# name -> "module:Class"
BACKENDS: dict[str, str] = {
    "hf": "harness.backends.hf:HFBackend",
    "vllm": "harness.backends.vllm:VLLMBackend",
}


def check_backend(name: str, options: dict) -> type[Backend]:
    """The backend class for ``name``, refusing an unknown name or ``--backend-arg`` key before
    any model is loaded (a backend that takes ``**options``, vLLM's engine arguments, takes any)."""
    import inspect

    cls = _backend_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        known = [p for p in parameters if p not in ("self", "model")]
        for key in options:
            if key not in known:
                raise BackendError(f"--backend-arg {key!r}: not an option of the {name} backend; "
                                   f"known: {', '.join(known)}")
    return cls


def get_backend(name: str, model: str, **options) -> Backend:
    """Load ``model`` (a path or hub id) on the named backend."""
    cls = check_backend(name, options)
    try:
        return cls(model, **options)
    except OSError as err:
        raise BackendError(f"cannot load model {model!r}: {err}") from None


def _backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendError(f"backend {name!r} is not available here: {err}") from err
    cls = getattr(module, class_name, None)
    if cls is None:  # tolerate another class name: the one Backend subclass the module defines
        found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Backend) and v is not Backend]
        if len(found) != 1:
            raise BackendError(f"backend module {module_name} defines no {class_name}")
        cls = found[0]
    return cls


def parse_options(items: list[str]) -> dict:
    """``--backend-arg KEY=VALUE`` strings as a dict (values parsed as JSON where they are JSON)."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BackendError(f"--backend-arg {item!r}: expected KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    return options


def loaded_in_turn(paths: list[str], backend_name: str, options: dict):
    """Yield a backend serving each model path in turn: where the loaded engine can take the next
    checkpoint's heads in place (``Backend.load_heads``) it is reused, else it is closed and the
    next model loaded. The last backend is closed when the generator is closed (use
    ``contextlib.closing``), so a failure in the caller's loop frees the engine too."""
    backend = None
    try:
        for path in paths:
            if backend is not None and backend.load_heads(path):
                print(f"{path}: heads swapped into the loaded {backend_name} engine", file=sys.stderr)
            else:
                if backend is not None:
                    backend.close()
                    backend = None
                backend = get_backend(backend_name, path, **options)
            yield backend
    finally:
        if backend is not None:
            backend.close()
