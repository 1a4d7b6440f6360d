"""AutoDeco on any Hugging Face causal LM: a frozen base plus a temperature head and a top-p head.

``forward`` runs the base, reads its last hidden state h_t, predicts T_t = TempHead(h_t) and
P_t = TopPHead(h_t, T_t, features of softmax(l_t / T_t)), and — when dynamic decoding is on,
the default — returns logits already divided by T_t and hard nucleus-filtered by P_t. Plain
``generate(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)`` is then AutoDeco sampling and
greedy stays greedy.

Checkpoints (the published AutoDeco format, loadable unchanged):
- heads-only folder: ``config.json`` (``model_type: autodeco``, ``base_model_name_or_path``,
  ``base_model_type``, ``enable_temperature_head``, ``enable_top_p_head``,
  ``use_enhanced_features``, ``temperature_hidden_size``, ``top_p_hidden_size`` + the base
  config's keys) and ``model.safetensors`` (older: ``autodeco_heads.safetensors``) holding only
  ``temp_head.mlp.{0,2}.*`` and ``top_p_head.mlp.{0,2}.*``; the base is loaded from
  ``base_model_name_or_path``.
- merged folder: the same config plus base tensors under the base's own names (``model.*``,
  ``lm_head.*``; the official ``llm.``-prefixed names are accepted too) and the head tensors,
  single-file or sharded with ``model.safetensors.index.json``.

This file only imports torch/transformers/safetensors and its sibling modules (relative
imports): ``save_pretrained`` copies it next to the config with ``auto_map`` so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .modules import TempHead, TopPHead, features_from_stats
from .nucleus import (
    CLOSE,
    DEFAULT_K,
    KEY_FIRST,
    MARGIN,
    MIN_MARGIN,
    N_KEYS,
    TAIL_SHARE,
    LogitStats,
    _mask_below,
    _threads,
    _workspace,
    logit_stats,
    native,
    nucleus_from_stats,
    torch_exp,
)

HEAD_PREFIXES = ("temp_head.", "top_p_head.")
FEATURE_BLOCK = 1 << 24  # logits per float32 block when computing the top-p head's features
HEADS_FILE = "model.safetensors"
LEGACY_HEADS_FILE = "autodeco_heads.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LEGACY_BASE_PREFIX = "llm."  # official merged checkpoints store the base under `llm.`
CODE_FILES = ("model.py", "modules.py", "nucleus.py")  # copied next to config.json on save
AUTODECO_KEYS = (
    "base_model_name_or_path",
    "base_model_type",
    "enable_temperature_head",
    "enable_top_p_head",
    "use_enhanced_features",
    "temperature_hidden_size",
    "top_p_hidden_size",
    "head_width",
)
# Keys of a config dict that belong to neither the base nor AutoDeco.
_META_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")
# from_pretrained kwargs that are about loading the base weights.
_BASE_LOAD_KWARGS = (
    "dtype", "torch_dtype", "device_map", "attn_implementation", "low_cpu_mem_usage", "cache_dir",
    "local_files_only", "token", "trust_remote_code", "max_memory", "offload_folder",
)


try:  # in this project every user-facing error shares one base; as remote code this file stands alone
    from harness.core.errors import UserError as _UserError
except ImportError:
    _UserError = Exception


class CheckpointError(ValueError, _UserError):
    """An AutoDeco folder that cannot be loaded (missing/corrupt file, shapes that do not fit)."""


# ----------------------------------------------------------------------------- config


class AutoDecoConfig(PreTrainedConfig):
    """The base config's keys, flat, plus the AutoDeco keys (see module docstring)."""

    model_type = "autodeco"

    def __init__(
        self,
        base_model_name_or_path: str | None = None,
        base_model_type: str | None = None,
        enable_temperature_head: bool = True,
        enable_top_p_head: bool = True,
        use_enhanced_features: bool = True,
        temperature_hidden_size: int | None = None,
        top_p_hidden_size: int | None = None,
        head_width: int = 256,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_type = base_model_type
        self.enable_temperature_head = enable_temperature_head
        self.enable_top_p_head = enable_top_p_head
        self.use_enhanced_features = use_enhanced_features
        hidden = kwargs.get("hidden_size")
        self.temperature_hidden_size = temperature_hidden_size or hidden
        self.top_p_hidden_size = top_p_hidden_size or hidden
        self.head_width = head_width

    @classmethod
    def from_base_config(cls, base_config: PreTrainedConfig, base_model_name_or_path: str | None, **options):
        """AutoDeco config around ``base_config`` (its keys copied flat, as the official format does)."""
        keys = {k: v for k, v in base_config.to_dict().items() if k not in _META_KEYS}
        hidden = base_config.get_text_config().hidden_size
        keys.setdefault("hidden_size", hidden)
        return cls(
            base_model_name_or_path=base_model_name_or_path,
            base_model_type=base_config.model_type,
            temperature_hidden_size=hidden,
            top_p_hidden_size=hidden,
            **options,
            **keys,
        )

    def base_config(self) -> PreTrainedConfig:
        """Rebuild the base model's config from the flat keys."""
        if not self.base_model_type:
            raise CheckpointError("AutoDeco config has no `base_model_type`; cannot rebuild the base config")
        keys = {k: v for k, v in self.to_dict().items() if k not in AUTODECO_KEYS and k not in _META_KEYS}
        return AutoConfig.for_model(self.base_model_type, **keys)


# ----------------------------------------------------------------------------- model


@dataclass
class AutoDecoOutput(ModelOutput):
    """``logits``: processed (÷T, nucleus) when dynamic decoding is on, else the base logits.

    ``temperature`` / ``top_p``: [batch, kept positions] (None with both heads off); ``base_logits``: raw base logits;
    ``hidden``: the base's last hidden state at the kept positions.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    base_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def _kept(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    return slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep


@torch.no_grad()
def block_features(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Features of softmax(logits / T) for rows [N, V], FEATURE_BLOCK logits per float32 pass.

    One pass over all rows holds several float32 copies of the logits (1.5 GiB extra measured
    for 4096 × 49152 bf16 logits; ~19 GiB at the paper's 16k × 152k); in blocks the extra stays
    ~0.3 GiB whatever the length.
    """
    rows = max(1, FEATURE_BLOCK // logits.shape[-1])
    out = []
    for start in range(0, logits.shape[0], rows):
        t = temperature[start : start + rows].float().clamp_min(1e-6).unsqueeze(-1)
        block = logits[start : start + rows].float()
        z = torch.div(block, t, out=_workspace(block, "scaled"))  # a reused buffer; the logits stay intact
        out.append(features_from_stats(logit_stats(z, moments=True, fast=False)))  # the loss kernels' arithmetic
    return torch.cat(out) if out else logits.new_zeros((0, 4), dtype=torch.float32)


# ----------------------------------------------------------------------------- the head math
# One plain function for the decoding step, called by this model's forward and by the vLLM plugin
# (heads.vllm_plugin) on its own rows: T and P from the heads, then ÷T and the exact nucleus.


def predict(temp_head: nn.Module, top_p_head: nn.Module, hidden: torch.Tensor, base_logits: torch.Tensor,
            need_stats: bool = False, unit_temperature: bool = False):
    """T, P [...] from hidden [..., H] and base logits [..., V]; gradients reach the heads only.

    The top-p head sees T detached and the features of softmax(logits / T) (as in the paper's
    code); with ``unit_temperature`` it sees T = 1 instead (the top-p-only ablation, where no
    temperature acts: the official setup). With ``need_stats`` (decoding with both heads) it also
    returns z = l/T [N, V] and its row statistics, which ÷T and the nucleus then reuse; otherwise
    those two are None.
    """
    lead, vocab = base_logits.shape[:-1], base_logits.shape[-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    temperature = temp_head(h)
    seen = torch.ones_like(temperature) if unit_temperature else temperature.detach()  # the T the top-p head sees
    z = stats = features = None
    enhanced = top_p_head.use_enhanced_features
    if need_stats:  # decoding: z and its statistics are reused by ÷T and the nucleus
        with torch.no_grad():
            z = torch.div(base_logits.reshape(-1, vocab), seen.float().clamp_min(1e-6).unsqueeze(-1))  # float32: one pass
            stats = logit_stats(z, moments=enhanced)
            features = features_from_stats(stats) if enhanced else None
    elif enhanced:  # training / tracing: only the features, a bounded block of rows at a time
        features = block_features(base_logits.reshape(-1, vocab), seen)
    top_p = top_p_head(h, seen, features)
    return temperature.reshape(lead), top_p.reshape(lead), z, stats


@torch.no_grad()
def dynamic_logits(base_logits, temperature, top_p, z=None, stats=None, *, use_temperature: bool,
                   use_top_p: bool) -> torch.Tensor:
    """The logits AutoDeco samples from: base / T (temperature head on), then the exact nucleus at P
    (top-p head on), in float32; both off: the base logits, untouched."""
    if not (use_temperature or use_top_p):
        return base_logits
    shape, vocab = base_logits.shape, base_logits.shape[-1]
    if use_temperature and z is None:
        z = torch.div(base_logits.reshape(-1, vocab), temperature.reshape(-1, 1).float().clamp_min(1e-6))
    if not use_temperature:
        z = base_logits.reshape(-1, vocab).float()
        stats = None
    if use_top_p:
        if stats is None:
            stats = logit_stats(z, moments=False)
        fresh = z.untyped_storage().data_ptr() != base_logits.untyped_storage().data_ptr()
        z = nucleus_from_stats(z, stats, top_p.reshape(-1).float(), inplace=fresh)
    return z.reshape(shape)


def _head_pointers(head: nn.Module) -> tuple | None:
    """(w1, b1, w2, b2 addresses, width, inputs) of a head's MLP as the native step reads it (float32,
    contiguous, on the CPU), or None if it is not. The checks run once per set of tensors: the result
    is kept on the head and reused while its four parameters are the same objects at the same
    addresses (an in-place update keeps both; .to(), ``.data =`` and load_state_dict(assign=True)
    change one; a weight re-strided or resized in place at the same address is not seen). At a
    decoding step, with caches cold from the forward, each tensor attribute read costs microseconds."""
    modules = head.mlp._modules
    first, last = modules.get("0"), modules.get("2")
    if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)):  # e.g. wrapped by an adapter
        return None
    tensors = (first.weight, first.bias, last.weight, last.bias)
    kept = head.__dict__.get("_native_pointers")
    if (kept is not None and all(a is b for a, b in zip(kept[0], tensors, strict=True))
            and all(t.data_ptr() == address for t, address in zip(tensors, kept[1][:4], strict=True))):
        return kept[1]
    for t in tensors:
        if t is None or t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return None
    width, inputs = tensors[0].shape
    if tensors[1].numel() != width or tensors[2].numel() != width or tensors[3].numel() != 1:
        return None
    pointers = (*(t.data_ptr() for t in tensors), width, inputs)
    head.__dict__["_native_pointers"] = (tensors, pointers)
    return pointers


_scratch = threading.local()
NATIVE_ROWS = 64  # rows per native call: its scratch (candidates of rows handed back) is rows x vocab x 9 bytes


def _native_scratch(n: int, k: int, vocab: int) -> tuple:
    """Per-thread buffers the native step writes but does not return (top values, their ids, lse,
    row status, and the candidates of rows it hands back: values, value - lse, in-band flags, counts)
    and their addresses, reused while the shape stays (and per inference mode: see
    nucleus._workspace)."""
    key = (n, k, vocab, torch.is_inference_mode_enabled())
    cached = getattr(_scratch, "buffers", None)
    if cached is None or cached[0] != key:
        f32, i64, u8 = torch.float32, torch.int64, torch.uint8  # (not the default dtype: the C side writes these)
        tensors = (torch.empty(n, k, dtype=f32), torch.empty(n, k, dtype=i64), torch.empty(n, dtype=f32),
                   torch.empty(n, dtype=u8), torch.empty(n * vocab, dtype=f32), torch.empty(n * vocab, dtype=f32),
                   torch.empty(n * vocab, dtype=u8), torch.empty(n, dtype=i64))
        cached = _scratch.buffers = (key, tensors, tuple(t.data_ptr() for t in tensors))
    return cached[1], cached[2]


def native_decode(temp_head: nn.Module, top_p_head: nn.Module, hidden: torch.Tensor, base_logits: torch.Tensor):
    """``decode`` with both heads in one native call (heads/nucleus_native.cpp, ``autodeco_rows``):
    both MLPs, z = l / T, the row statistics and features, and each row's exact nucleus and masking.
    The nucleus there decides with the file's own exp. A row where that could differ from torch's (a
    cumulative mass within ``CLOSE`` of P) is decided with torch's masses: inside the call where
    torch's exp is reachable natively (``nucleus.torch_exp``), else it comes back with its
    candidates, which get torch's exp here and the exact cumulative natively (``nucleus_exact``, as
    the slow path of ``nucleus_from_stats``). A row whose band missed the crossing comes back whole,
    for ``nucleus_from_stats``. None where the call does not apply (no compiler, not the CPU,
    gradients on, heads not float32); the caller then runs the torch steps. T and P agree with those
    to float32 rounding (other summation orders); the nucleus is exact for the z and P returned. The
    Python here is kept to a few torch operations: at a decoding step, with caches cold from the
    model's forward, each costs tens of microseconds.
    """
    lib = native()
    if lib is None or torch.is_grad_enabled() or not (hidden.is_cpu and base_logits.is_cpu):
        return None
    temp, top = _head_pointers(temp_head), _head_pointers(top_p_head)
    if temp is None or top is None:
        return None
    size, vocab = hidden.shape[-1], base_logits.shape[-1]
    enhanced = top_p_head.use_enhanced_features
    if temp[5] != size or top[5] != size + 1 + (4 if enhanced else 0) or vocab < 5:
        return None
    h, h_stride = _rows_of(hidden)
    logits, l_stride = _rows_of(base_logits)
    n, k = logits.numel() // vocab, min(DEFAULT_K, vocab)
    if n == 0 or h.numel() // size != n:
        return None
    lead, f32 = base_logits.shape[:-1], torch.float32
    z = torch.empty(base_logits.shape, dtype=f32)
    temperature, top_p = torch.empty(lead, dtype=f32), torch.empty(lead, dtype=f32)
    exp_fn, exp_mode = torch_exp() or (None, 0)
    h_at, l_at, z_at, t_at, p_at = h.data_ptr(), logits.data_ptr(), z.data_ptr(), temperature.data_ptr(), top_p.data_ptr()
    for start in range(0, n, NATIVE_ROWS):  # a decoding step is one call; a whole sequence's rows in blocks
        rows = min(NATIVE_ROWS, n - start)
        buffers, pointers = _native_scratch(rows, k, vocab)
        unsettled = lib.autodeco_rows(
            h_at + 4 * start * h_stride, h_stride, size, l_at + 4 * start * l_stride, l_stride, vocab, rows,
            *temp[:5], *top[:5], int(enhanced), k, KEY_FIRST, N_KEYS, MARGIN, TAIL_SHARE, MIN_MARGIN, CLOSE,
            z_at + 4 * start * vocab, *pointers[:3], t_at + 4 * start, p_at + 4 * start, *pointers[3:], exp_fn,
            exp_mode, _threads())
        if unsettled:
            _finish_rows(lib, z.view(n, vocab)[start : start + rows], top_p.view(n)[start : start + rows], buffers)
    return z, temperature, top_p


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [..., D] as float32 rows of D contiguous values with a uniform row stride: (tensor, stride in
    elements). x itself where it already is (a decoding step's; no torch operation), else a view or
    a float32 copy."""
    size = x.shape[-1]
    if x.dtype is torch.float32 and x.is_contiguous():
        return x, size
    rows = x.reshape(-1, size)
    if rows.dtype is not torch.float32 or rows.stride(-1) != 1:
        rows = rows.float().contiguous()
    return rows, rows.stride(0)


def _finish_rows(lib, z: torch.Tensor, top_p: torch.Tensor, buffers: tuple) -> None:
    """The rows autodeco_rows left unmasked in z [n, V] (their status 1: candidates; 2: whole), masked
    exactly: torch's exp for the candidates' masses, then nucleus_exact; a row whose exact check
    fails there, and every whole row, through nucleus_from_stats (the torch-exp contract)."""
    values, indices, lse, status, cand_values, cand_diffs, cand_in_band, cand_counts = buffers
    n, vocab = z.shape
    threshold = torch.full((n,), float("-inf"), dtype=torch.float32)  # -inf: mask_below leaves the row be
    exact = (status == 1).nonzero().squeeze(-1)
    whole = (status == 2).nonzero().squeeze(-1)
    if exact.numel():
        counts, p = cand_counts[exact].contiguous(), top_p[exact].contiguous()  # (alive through the call)
        masses = torch.exp(cand_diffs[: int(counts.sum())])
        found, ok = torch.empty(exact.numel(), dtype=torch.float32), torch.empty(exact.numel(), dtype=torch.uint8)
        lib.nucleus_exact(cand_values.data_ptr(), masses.data_ptr(), cand_in_band.data_ptr(), counts.data_ptr(),
                          exact.numel(), p.data_ptr(), found.data_ptr(), ok.data_ptr())
        ok = ok.bool()
        threshold[exact[ok]] = found[ok]
        whole = torch.cat([whole, exact[~ok]])
        _mask_below(z, threshold)
    if whole.numel():
        stats = LogitStats(values[whole], indices[whole], lse[whole], None, None, vocab)
        z[whole] = nucleus_from_stats(z[whole], stats, top_p[whole], inplace=True)


def decode(temp_head: nn.Module, top_p_head: nn.Module, hidden: torch.Tensor, base_logits: torch.Tensor, *,
           use_temperature: bool, use_top_p: bool):
    """One AutoDeco decoding step on rows: (logits, T, P). With the top-p head alone (the ablation),
    the top-p head sees T = 1, the temperature at which its nucleus then cuts. Both heads on a CPU:
    one native call (``native_decode``) where it applies."""
    if use_temperature and use_top_p:
        fast = native_decode(temp_head, top_p_head, hidden, base_logits)
        if fast is not None:
            return fast
    temperature, top_p, z, stats = predict(temp_head, top_p_head, hidden, base_logits,
                                           need_stats=use_temperature and use_top_p,
                                           unit_temperature=use_top_p and not use_temperature)
    logits = dynamic_logits(base_logits, temperature, top_p, z, stats, use_temperature=use_temperature,
                            use_top_p=use_top_p)
    return logits, temperature, top_p


class AutoDecoModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen causal LM (``self.llm``) plus ``temp_head`` and ``top_p_head``."""

    config_class = AutoDecoConfig
    base_model_prefix = "autodeco"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: AutoDecoConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:  # random base from the config (merged loading fills it; tests use it)
            base_model = AutoModelForCausalLM.from_config(config.base_config())
        self.temp_head = TempHead(config.temperature_hidden_size, config.head_width)
        self.top_p_head = TopPHead(config.top_p_hidden_size, config.head_width, config.use_enhanced_features)
        # Initialise our own weights before the base is attached so post_init never touches it.
        self.post_init()
        self.llm = base_model
        self.llm.requires_grad_(False)
        head_device = self.llm.get_output_embeddings().weight.device  # where hidden states meet lm_head
        self.temp_head.to(head_device)
        self.top_p_head.to(head_device)
        base_hidden = self.llm.config.get_text_config().hidden_size
        if base_hidden != config.temperature_hidden_size or base_hidden != config.top_p_hidden_size:
            raise CheckpointError(
                f"head hidden size (temperature {config.temperature_hidden_size}, top-p "
                f"{config.top_p_hidden_size}) does not match the base model's hidden_size {base_hidden}"
            )
        self.decode_temperature = bool(config.enable_temperature_head)
        self.decode_top_p = bool(config.enable_top_p_head)
        self.generation_config = copy.deepcopy(self.llm.generation_config)
        self._base_takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.llm.forward).parameters

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: PreTrainedModel | str, **head_options) -> AutoDecoModelForCausalLM:
        """Fresh (untrained) heads on ``base`` (a model or a name/path). Options: AutoDecoConfig keys."""
        if isinstance(base, (str, os.PathLike)):
            base = AutoModelForCausalLM.from_pretrained(str(base))
        name = head_options.pop("base_model_name_or_path", None) or base.config._name_or_path or None
        config = AutoDecoConfig.from_base_config(base.config, name, **head_options)
        return cls(config, base_model=base)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a heads-only folder (base from ``base_model_name_or_path``, or from the keyword of that
        name, which overrides the config's) or a merged folder."""
        base_override = kwargs.pop("base_model_name_or_path", None)
        folder = _resolve_folder(pretrained_model_name_or_path, kwargs)
        if not isinstance(config, AutoDecoConfig) and not (
            config is not None and getattr(config, "model_type", None) == "autodeco"
        ):
            config = _load_config(folder)
        base_kwargs = {k: kwargs[k] for k in _BASE_LOAD_KWARGS if k in kwargs}
        files = weight_files(folder)
        keys = {key: file for file in files for key in _tensor_names(file)}
        head_keys = [k for k in keys if k.startswith(HEAD_PREFIXES)]
        base_keys = [k for k in keys if not k.startswith(HEAD_PREFIXES)]
        if base_keys:  # merged: the base's weights are in this folder
            mapping = {f"^{LEGACY_BASE_PREFIX}": ""} if base_keys[0].startswith(LEGACY_BASE_PREFIX) else None
            with _quiet_unexpected():
                base = AutoModelForCausalLM.from_pretrained(
                    str(folder), config=config.base_config(), key_mapping=mapping, **base_kwargs
                )
        else:
            if base_override:
                config.base_model_name_or_path = str(base_override)
            if not config.base_model_name_or_path:
                raise CheckpointError(f"{folder}/config.json has no `base_model_name_or_path` and no base weights")
            base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **base_kwargs)
        model = cls(config, base_model=base)
        if not head_keys:
            raise CheckpointError(f"no temp_head.*/top_p_head.* tensors in {folder} ({[f.name for f in files]})")
        # The heads stay float32 whatever the base's dtype (tiny; the vLLM plugin does the same).
        model.load_heads({k: _read_tensor(keys[k], k) for k in head_keys}, source=str(folder))
        return model.eval()

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the head tensors, under their checkpoint names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIXES)}

    def load_heads(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy head tensors in; clear errors for missing tensors or shapes that do not fit."""
        own = self.heads_state_dict()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise CheckpointError(f"{source}: missing head tensors {missing}")
        for name, tensor in tensors.items():
            if name not in own:
                raise CheckpointError(f"{source}: unexpected head tensor {name}")
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)} "
                    f"(base hidden_size {self.config.temperature_hidden_size}, head width {self.config.head_width}); "
                    f"the heads were trained for a different base model"
                )
        self.load_state_dict(tensors, strict=False)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """Heads-only checkpoint: config.json (+auto_map), model.safetensors with head tensors, code files."""
        from safetensors.torch import save_file

        if kwargs.get("is_main_process", True) is False:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        source = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in source.items() if k.startswith(HEAD_PREFIXES)}
        if not tensors:  # e.g. a trainer's filtered state dict: take them from the model
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.heads_state_dict().items()}
        save_file(tensors, str(folder / HEADS_FILE), metadata={"format": "pt"})
        write_config(self.config, folder)
        self.generation_config.save_pretrained(folder)

    # --- forward ------------------------------------------------------------------------

    def set_decoding(self, temperature: bool, top_p: bool) -> AutoDecoModelForCausalLM:
        """Which heads act on the returned logits; both False returns the base logits and runs no
        heads at all (``temperature`` and ``top_p`` None), as the vLLM plugin does."""
        self.decode_temperature, self.decode_top_p = bool(temperature), bool(top_p)
        return self

    def base_forward(self, input_ids=None, attention_mask=None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """Run the base: (hidden at kept positions [B, L, H], base logits [B, L, V], base output)."""
        captured = {}

        def grab(_module, _inputs, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        decoder = self.llm.get_decoder()
        handle = decoder.register_forward_hook(grab)
        try:
            if self._base_takes_logits_to_keep:
                kwargs["logits_to_keep"] = logits_to_keep
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()
        logits = out.logits
        if not self._base_takes_logits_to_keep:
            logits = logits[:, _kept(logits_to_keep)]
        return captured["hidden"][:, _kept(logits_to_keep)], logits, out

    def heads_forward(self, hidden: torch.Tensor, base_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T, P [...] from hidden [..., H] and base logits [..., V]; gradients flow into the heads only.

        The top-p head sees T detached and features of softmax(logits / T) (as in the paper's code).
        """
        temperature, top_p, _, _ = predict(self.temp_head, self.top_p_head, hidden, base_logits)
        return temperature, top_p


    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> AutoDecoOutput:
        """Base forward, then (with a head on) the heads on the kept positions and ÷T and the nucleus
        on the logits."""
        hidden, base_logits, out = self.base_forward(
            input_ids,
            attention_mask,
            logits_to_keep=logits_to_keep,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if self.decode_temperature or self.decode_top_p:
            logits, temperature, top_p = decode(self.temp_head, self.top_p_head, hidden, base_logits,
                                                use_temperature=self.decode_temperature, use_top_p=self.decode_top_p)
        else:  # both heads off: the base model, nothing more (as the vLLM plugin)
            logits, temperature, top_p = base_logits, None, None
        return AutoDecoOutput(
            logits=logits,
            temperature=temperature,
            top_p=top_p,
            base_logits=base_logits,
            hidden=hidden,
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    @torch.no_grad()
    def trace(self, input_ids, attention_mask=None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (T, P) [B, L] of given sequences with one base forward (heads in chunks of positions)."""
        hidden, base_logits, _ = self.base_forward(input_ids, attention_mask, use_cache=False)
        ts, ps = [], []
        for start in range(0, hidden.shape[1], chunk):
            t, p = self.heads_forward(hidden[:, start : start + chunk], base_logits[:, start : start + chunk])
            ts.append(t)
            ps.append(p)
        return torch.cat(ts, dim=1), torch.cat(ps, dim=1)

    def generate(self, *args, **kwargs):
        """HF generate; sampling defaults to top_k=0 so that T=1, P=1 sampling is pure AutoDeco sampling."""
        if kwargs.get("do_sample") and "top_k" not in kwargs and "generation_config" not in kwargs:
            if self.generation_config.top_k in (None, 50):
                kwargs["top_k"] = 0
        return super().generate(*args, **kwargs)

    # --- delegation to the base -----------------------------------------------------------

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def get_decoder(self):
        return self.llm.get_decoder()

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()

    def tie_weights(self, *args, **kwargs):  # the base ties its own weights
        return None


# ----------------------------------------------------------------------------- files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, else model.safetensors / the legacy name."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / name for name in (HEADS_FILE, LEGACY_HEADS_FILE) if (folder / name).is_file()]
    if not files:
        raise CheckpointError(f"{folder}: no {HEADS_FILE}, {LEGACY_HEADS_FILE} or {INDEX_FILE}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
    return files


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({err})") from err


def _load_config(folder: Path) -> AutoDecoConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {'is a file, not a model folder' if folder.exists() else 'does not exist'}")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err
    if data.get("model_type") != "autodeco":
        raise CheckpointError(f"{path}: model_type is {data.get('model_type')!r}, not 'autodeco'")
    return AutoDecoConfig.from_pretrained(str(folder))


def _resolve_folder(name_or_path, kwargs) -> Path:
    """A local folder as is; a hub id is downloaded (config, safetensors, index)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(name_or_path),
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only", False)),
            allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model"],
        )
    )


def write_config(config: AutoDecoConfig, folder: Path) -> None:
    """config.json with architectures + auto_map, and the code files that auto_map points at."""
    config.architectures = ["AutoDecoModelForCausalLM"]
    config.auto_map = {
        "AutoConfig": "model.AutoDecoConfig",
        "AutoModelForCausalLM": "model.AutoDecoModelForCausalLM",
    }
    config.save_pretrained(str(folder))
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, Path(folder) / name)


@contextlib.contextmanager
def _quiet_unexpected():
    """Merged folders hold head tensors the base class does not know: silence that one warning."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


AutoConfig.register("autodeco", AutoDecoConfig, exist_ok=True)
AutoModelForCausalLM.register(AutoDecoConfig, AutoDecoModelForCausalLM, exist_ok=True)
