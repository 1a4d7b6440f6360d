"""Construct, split and merge AutoDeco checkpoints (layouts: DESIGN.md, heads section).

Every writer fills a temporary sibling folder and renames it into place at the end, so a
failure leaves nothing half-written. Tensors are copied byte-for-byte (split∘merge is exact).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from harness.core.files import atomic_folder, check_new_folder
from heads.model import (
    HEAD_PREFIXES,
    HEADS_FILE,
    INDEX_FILE,
    LEGACY_BASE_PREFIX,
    AutoDecoConfig,
    AutoDecoModelForCausalLM,
    CheckpointError,
    _load_config,
    _read_tensor,
    _tensor_names,
    weight_files,
    write_config,
)

HEADS_SHARD = "model-autodeco-heads.safetensors"  # the extra shard when merging into a sharded base
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_FROM_BASE = ("config.json", INDEX_FILE, "pytorch_model.bin.index.json", "autodeco_prepared.json")


def base_folder(base: str) -> Path:
    """A local folder as is; a hub id downloaded (weights + tokenizer)."""
    path = Path(base)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a model folder (no config.json)")
        return path.resolve()
    if path.exists() or str(base).startswith((".", "/", "~")) or str(base).count("/") != 1:
        raise CheckpointError(f"unknown model {base!r}: not a local model folder, not a hub id, not `smollm2`")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base)))
    except Exception as err:  # offline, missing repo, ...
        raise CheckpointError(f"unknown model {base!r}: cannot fetch it from the hub ({err})") from err


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config: every small non-weight file of the base."""
    for file in src.iterdir():
        if file.is_file() and file.name not in _SKIP_FROM_BASE and not file.name.endswith(_WEIGHT_SUFFIXES):
            if not file.name.endswith(".py"):
                shutil.copyfile(file, dst / file.name)


def construct(base: str, out: str | os.PathLike, overwrite: bool = False, seed: int = 0, **options) -> Path:
    """Fresh AutoDeco heads on ``base`` (folder or hub id), saved heads-only (+ tokenizer files) to ``out``."""
    from transformers import AutoModelForCausalLM

    check_new_folder(out, overwrite)
    folder = base_folder(base)
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(folder))
    except Exception as err:
        raise CheckpointError(f"cannot load base model from {folder}: {err}") from err
    torch.manual_seed(seed)
    model = AutoDecoModelForCausalLM.from_base(llm, base_model_name_or_path=str(folder), **options)
    with atomic_folder(out, overwrite) as tmp:
        _copy_side_files(folder, tmp)
        model.save_pretrained(tmp)
    return Path(out)


def head_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``temp_head.*`` / ``top_p_head.*`` tensors of an AutoDeco folder (heads-only or merged)."""
    folder = Path(folder)
    files = weight_files(folder)
    tensors = {
        name: _read_tensor(file, name)
        for file in files
        for name in _tensor_names(file)
        if name.startswith(HEAD_PREFIXES)
    }
    if not tensors:
        raise CheckpointError(f"{folder}: no temp_head.*/top_p_head.* tensors")
    return tensors


def split(full: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Merged folder -> heads-only folder (same config, head tensors copied exactly)."""
    from safetensors.torch import save_file

    check_new_folder(out, overwrite)
    folder = Path(full)
    config = _load_config(folder)
    heads = head_tensors(folder)
    with atomic_folder(out, overwrite) as tmp:
        _copy_side_files(folder, tmp)
        save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "pt"})
        write_config(config, tmp)
    return Path(out)


def _check_fit(heads: dict[str, torch.Tensor], config: AutoDecoConfig, hidden: int, source: Path) -> None:
    """Head input widths must equal the base hidden size (top-p adds T and, if enhanced, 4 features),
    and so must the hidden sizes the heads' config records (merge would silently rewrite them)."""
    for name in ("temperature_hidden_size", "top_p_hidden_size"):
        recorded = getattr(config, name, None)
        if recorded is not None and recorded != hidden:
            raise CheckpointError(f"{source}/config.json: {name} is {recorded}, but the base model's hidden_size "
                                  f"is {hidden}: these heads belong to a different base")
    extra = 1 + (4 if config.use_enhanced_features else 0)
    expected = {"temp_head.mlp.0.weight": hidden, "top_p_head.mlp.0.weight": hidden + extra}
    for name, width in expected.items():
        if name not in heads:
            raise CheckpointError(f"{source}: missing head tensor {name}")
        if heads[name].shape[-1] != width:
            raise CheckpointError(
                f"{source}: {name} takes inputs of width {heads[name].shape[-1]}, but the base model (hidden_size "
                f"{hidden}) needs width {width}: these heads belong to a different base"
            )


def merge(heads: str | os.PathLike, base: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Heads-only folder + base -> one folder that loads as one model (for vLLM, sharing)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    check_new_folder(out, overwrite)
    heads_folder = Path(heads)
    head_config = _load_config(heads_folder)
    new_heads = head_tensors(heads_folder)
    base_dir = base_folder(base)
    base_config = AutoConfig.from_pretrained(str(base_dir))
    _check_fit(new_heads, head_config, base_config.get_text_config().hidden_size, heads_folder)
    options = {k: getattr(head_config, k) for k in ("enable_temperature_head", "enable_top_p_head",
                                                     "use_enhanced_features", "head_width")}
    config = AutoDecoConfig.from_base_config(base_config, str(base_dir), **options)

    base_files = weight_files(base_dir)
    with atomic_folder(out, overwrite) as tmp:
        _copy_side_files(base_dir, tmp)
        if (base_dir / INDEX_FILE).is_file():  # sharded: copy shards untouched, add a heads shard
            index = json.loads((base_dir / INDEX_FILE).read_text())
            for file in base_files:
                _tensor_names(file)  # refuse corrupt shards now, not at load time
                shutil.copyfile(file, tmp / file.name)
            save_file(new_heads, str(tmp / HEADS_SHARD), metadata={"format": "pt"})
            index["weight_map"].update({name: HEADS_SHARD for name in new_heads})
            size = sum(t.numel() * t.element_size() for t in new_heads.values())
            index.setdefault("metadata", {})["total_size"] = index.get("metadata", {}).get("total_size", 0) + size
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        else:
            _tensor_names(base_files[0])
            tensors = load_file(str(base_files[0]))
            if any(k.startswith(LEGACY_BASE_PREFIX) for k in tensors):
                raise CheckpointError(f"{base_files[0]}: looks like a merged AutoDeco checkpoint, not a base")
            clash = [k for k in tensors if k.startswith(HEAD_PREFIXES)]
            if clash:
                raise CheckpointError(f"{base_files[0]}: base already holds head tensors {clash[:2]}")
            save_file({**tensors, **new_heads}, str(tmp / HEADS_FILE), metadata={"format": "pt"})
        write_config(config, tmp)
    return Path(out)


def folder_size(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))
