"""The one configuration mechanism: a dataclass per command, read from YAML, every field a flag.

    @dataclass
    class EvalConfig:
        tasks: str = field(default="", metadata={"help": "comma-separated tasks"})
        seeds: int = 1
        def check(self):                      # optional: raise FieldError(field, message)
            if self.seeds < 1: raise FieldError("seeds", "must be >= 1")

    add_arguments(parser, EvalConfig)         # --tasks, --seeds ... (default: not given)
    config = from_args(EvalConfig, args)      # defaults < --config YAML < flags given

Precedence is by what was *given*, not by value: a flag equal to its default still beats the
YAML. Errors are `ConfigError`s that name where the value came from (``file.yaml``, or
``command line``) and the field. Types: bool, int, float, str, ``X | None``, ``list[str]``,
``list[int]``, ``list[float]``; a YAML list given to a ``str`` field is joined with commas
(``tasks: [aime24, aime25]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import ConfigError

COMMAND_LINE = "command line"


class FieldError(ValueError):
    """Raised by a config's ``check()``: which field is wrong and why (the source is added)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(kind) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    """``value`` (from YAML or a flag's text) as the field's type, or a `ConfigError`."""
    kind, optional = _unwrap_optional(kind)
    if value is None and optional:
        return None
    where = f"{source}: field {name!r}" if source != COMMAND_LINE else f"{source}: {_flag(name)}"
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (str,)
        items = value if isinstance(value, list) else [value]
        return [coerce(name, item, v, source) for v in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    elif kind is int and not isinstance(value, bool):
        try:
            number = float(value)
            if math.isfinite(number) and number == int(number):
                return int(number)
        except (TypeError, ValueError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            number = float(value)
            if math.isfinite(number):
                return number
        except (TypeError, ValueError):
            pass
    elif kind is str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    name_of = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{where} expects {'a finite ' if kind in (int, float) else ''}{name_of}, got {value!r}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping, or a `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path}: {'is a folder' if path.is_dir() else 'no such file'}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {path}: expected a mapping of field: value, got {type(values).__name__}")
    return values


def build(cls, *layers: tuple[str, dict[str, Any]]):
    """An instance of ``cls`` from (source, values) layers, later layers winning; then ``check()``."""
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs, origin = {}, {}
    for source, values in layers:
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                if len(known) <= 40:
                    hint = f"known: {', '.join(sorted(known))}"
                else:  # TRL's SFTConfig has hundreds of fields: name the close ones
                    close = difflib.get_close_matches(name, known, n=4)
                    hint = f"did you mean {', '.join(close)}?" if close else "see --help for the fields"
                flag = f"{_flag(name)} (or --{name})" if source == COMMAND_LINE else repr(key)
                raise ConfigError(f"{source}: unknown field {flag}; {hint}")
            kwargs[name] = coerce(name, hints[name], value, source)
            origin[name] = source
    try:
        config = cls(**kwargs)
        check = getattr(config, "check", None)
        if check is not None:
            check()
    except FieldError as err:
        where = origin.get(err.field)
        if where is None:  # not given anywhere (a required field, or a default another field rules out)
            raise ConfigError(f"{_flag(err.field)} {err.message}") from None
        where = f"{where}: {_flag(err.field)}" if where == COMMAND_LINE else f"{where}: field {err.field!r}"
        raise ConfigError(f"{where} {err.message}") from None
    except (TypeError, ValueError) as err:  # a combination the class itself refuses (e.g. TRL's checks)
        sources = ", ".join(dict.fromkeys(origin.values())) or "defaults"
        raise ConfigError(f"{sources}: {err}") from None
    return config


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                  underscore_aliases: bool = False, title: str | None = None) -> None:
    """One flag per field of ``cls`` (help from ``metadata["help"]``); a flag not given is absent.

    Bool flags take an optional value: ``--bf16`` = ``--bf16 true``; ``--bf16 false``.
    List fields repeat (``--backend-arg a=1 --backend-arg b=2``), or with ``metadata["nargs"] = "+"``
    take several values at once (``--runs A B``).
    """
    group = parser.add_argument_group(title) if title else parser
    hints = _hints(cls)
    for spec in dataclasses.fields(cls):
        if not spec.init or spec.name in skip:
            continue
        kind, _ = _unwrap_optional(hints[spec.name])
        names = [_flag(spec.name)]
        if underscore_aliases and "_" in spec.name:
            names.append("--" + spec.name)
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        text = spec.metadata.get("help", "")
        shown = "" if default in (None, "", []) else f" (default: {default})"
        options: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": text + shown}
        if kind is bool:
            options.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(kind) is list:
            options.update(metavar=spec.metadata.get("metavar", "VALUE"))
            if spec.metadata.get("nargs") == "+":  # --runs A B C (given once)
                options.update(nargs="+")
            else:  # --backend-arg a=1 --backend-arg b=2
                options.update(action="append")
        else:
            options.update(metavar=spec.metadata.get("metavar", getattr(kind, "__name__", "VALUE").upper()))
        if "choices" in spec.metadata:
            options["choices"] = spec.metadata["choices"]
        group.add_argument(*names, **options)


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def from_args(cls, args: argparse.Namespace, config_path: str | os.PathLike | None = None):
    """defaults < ``--config`` YAML (``config_path`` or ``args.config``) < flags given."""
    path = config_path if config_path is not None else getattr(args, "config", None)
    layers = [(str(path), load_yaml(path))] if path else []
    return build(cls, *layers, (COMMAND_LINE, given(cls, args)))


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
