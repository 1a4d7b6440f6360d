"""The transformers backend: ``model.generate`` with the samples of one prompt in one batch.

Sampling is done by our own last logits processor, ``RowSampler``: it runs the preset's pipeline
(``preset.warp``), draws one token per row from that row's own ``torch.Generator`` (seeded by
``sample_seed(seed, key, sample_index)``; inverse CDF, ``hf_kernels.sample_rows``) and hands
generate a one-hot score row, so generate's greedy step picks exactly the drawn token. A sample
therefore does not depend on which other samples share its batch — a resumed run reproduces an
uninterrupted one.

Options (``--backend-arg KEY=VALUE``): ``dtype`` (auto = bf16 on CPUs with native bf16, see
``harness.backends.dtype``), ``attention`` (auto = ``grouped-eager`` for bf16 on CPU where the
model type has plain eager attention, else eager for bf16 on CPU, else transformers' default,
sdpa), ``cache`` (auto on CPU = ``inplace`` with sdpa attention, ``reused`` with eager ones; ``dynamic``
elsewhere; ``static`` = transformers' pre-allocated KV cache where it supports the model),
``linear`` (auto = ``packed`` on CPU: oneDNN-packed weights, bf16 where the CPU runs oneDNN's
packed bf16 linear, fp32 wherever torch has oneDNN; else ``plain``), ``elementwise`` (auto = ``native``
for fp32 on CPU: compiled RMSNorm, rotary, SiLU·up, decode-attention and decode-linear passes where
they compute a module's forward, and a Llama layer's decode step as one run of them; else
``torch``), ``max_batch_size``, ``device``. What each CPU choice replaces and why is in
``harness.backends.hf_kernels``. Measured here (SmolLM2, batch 16, context 256, 2
threads, decode ms per step): bf16 + eager 71-107, bf16 + sdpa ~150 (torch's bf16 SDPA kernel is
slow here), fp32 + sdpa ~145; grouped-eager 60-66, + reused cache 57-59, + packed linears 51;
with fused q/k/v and gate/up and the inverse-CDF sampler ~42 (``bench backends``: 377-383
tok/s). With eager attention the static cache was slower than the dynamic one (it attends over
its whole length every step); with grouped-eager it measured level with ``reused`` (347 / 364 vs
361 / 389 tok/s), which also grows only as far as the longest row. On an AVX2-only AMD EPYC (fp32,
sdpa; median decode step of 24, four alternating runs each): ``inplace`` 166-197 ms against
``reused`` 188-255 ms.

AutoDeco models (``model_type == "autodeco"``: heads-only or merged folders) load through
``heads.model.AutoDecoModelForCausalLM``; the preset's ``heads`` switch the heads on, and a forward
hook records the predicted T and P of every generated token (presets without heads run the base
model alone and record none, as the vLLM backend). Only the base model's linear layers
are packed: the heads stay float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from harness.backends.base import Backend, BackendError, Completion, Request, same_base_and_heads, sample_seed
from harness.backends.dtype import torch_dtype as resolve_torch_dtype
from harness.backends.hf_kernels import (
    GROUPED,
    GROUPED_MODEL_TYPES,
    AppendedInPlaceCache,
    ReusedBuffersCache,
    pack_linears,
    packed_supported,
    register_grouped_attention,
    sample_rows,
    use_native_elementwise,
)
from harness.decoding import DecodingPreset
from harness.models import is_autodeco, read_config

CACHES = ("auto", "static", "dynamic", "reused", "inplace")  # --backend-arg cache=...
ATTENTIONS = ("auto", "eager", "sdpa", GROUPED)  # --backend-arg attention=...
LINEARS = ("auto", "packed", "plain")  # --backend-arg linear=...
ELEMENTWISE = ("auto", "native", "torch")  # --backend-arg elementwise=...


class RowSampler:
    """transformers LogitsProcessor: preset pipeline, then one seeded draw per row."""

    def __init__(self, preset: DecodingPreset, generators: list[torch.Generator]):
        self.preset = preset
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.preset.warp(scores.float())
        if not self.preset.do_sample:
            return scores
        tokens = sample_rows(scores.softmax(dim=-1), self.generators)
        picked = torch.full_like(scores, float("-inf"))
        picked[torch.arange(len(tokens)), tokens] = 0.0
        return picked


class TraceRecorder:
    """Forward hook collecting the AutoDeco heads' T and P at the last position of each step."""

    def __init__(self):
        self.temperatures: list[torch.Tensor] = []
        self.top_ps: list[torch.Tensor] = []

    def __call__(self, module, args, output) -> None:
        temperature = getattr(output, "temperature", None)
        top_p = getattr(output, "top_p", None)
        if temperature is not None:
            self.temperatures.append(temperature[:, -1].detach().float().cpu())
        if top_p is not None:
            self.top_ps.append(top_p[:, -1].detach().float().cpu())

    def rows(self, which: list[torch.Tensor], n_rows: int) -> torch.Tensor | None:
        return torch.stack(which, dim=1)[:n_rows] if which else None


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, max_batch_size: int = 64,
                 cache: str = "auto", attention: str = "auto", linear: str = "auto", elementwise: str = "auto",
                 base: str | None = None):
        """``base``: load a heads-only AutoDeco folder on this base instead of its config's
        ``base_model_name_or_path`` (e.g. a published checkpoint whose config names an internal path)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_size = max_batch_size
        if cache not in CACHES:
            raise BackendError(f"unknown cache {cache!r}; choose from {', '.join(CACHES)}")
        if attention not in ATTENTIONS:
            raise BackendError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTIONS)}")
        if linear not in LINEARS:
            raise BackendError(f"unknown linear {linear!r}; choose from {', '.join(LINEARS)}")
        if elementwise not in ELEMENTWISE:
            raise BackendError(f"unknown elementwise {elementwise!r}; choose from {', '.join(ELEMENTWISE)}")
        config = read_config(self.model_path)
        self.is_autodeco = is_autodeco(config)
        torch_dtype = resolve_torch_dtype(dtype, self.device.type)  # auto: bf16 where the CPU has it natively
        if attention == "auto":
            attention = default_attention(torch_dtype, self.device.type,
                                          config.get("base_model_type") if self.is_autodeco else config.get("model_type"))
        if attention == GROUPED:
            register_grouped_attention()
        load = {"dtype": torch_dtype, **({"attn_implementation": attention} if attention else {})}
        if self.is_autodeco:
            from heads.model import AutoDecoModelForCausalLM

            self.model = AutoDecoModelForCausalLM.from_pretrained(self.model_path, base_model_name_or_path=base,
                                                                  **load)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, **load)
        self.model.to(self.device).eval()
        self.tokenizer = _load_tokenizer(AutoTokenizer, self.model_path, config | ({"base_model_name_or_path": base}
                                                                                   if base else {}))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.llm = self.model.llm if self.is_autodeco else self.model
        if cache == "auto":  # on CPU: no fresh memory per step; in place where attention reads strided keys
            cache = ("dynamic" if self.device.type != "cpu" else
                     "inplace" if self.llm.config._attn_implementation == "sdpa" else "reused")
        self.cache = cache
        self.static_ok = bool(getattr(self.llm, "_can_compile_fullgraph", False))  # transformers' StaticCache fits it
        can_pack = self.device.type == "cpu" and packed_supported(torch_dtype)
        if linear == "auto":  # oneDNN-packed weights on CPU, bf16 or fp32 (each measured faster than aten's matmul)
            linear = "packed" if can_pack else "plain"
        elif linear == "packed" and not can_pack:
            raise BackendError(f"linear=packed: no oneDNN packed {str(torch_dtype).removeprefix('torch.')} linear "
                               f"on this {self.device.type} (bf16 needs a CPU with avx512bw/vl/dq or "
                               "avx_ne_convert; fp32 a torch build with oneDNN); use linear=plain")
        self.packed_linears = pack_linears(self.llm) if linear == "packed" else 0
        # Native RMSNorm / rotary / SiLU·up / decode-attention / decode-linear passes and fused Llama layers,
        # fp32 on CPU (measured faster there).
        self.native_modules = (use_native_elementwise(self.llm) if elementwise == "native" or (
            elementwise == "auto" and self.device.type == "cpu" and torch_dtype == torch.float32) else 0)
        if elementwise == "native" and not self.native_modules:
            raise BackendError("elementwise=native: no module was swapped (the passes are float32 on CPU and need "
                               "a C++ compiler; the MLP and attention passes also linear=packed); use "
                               "elementwise=torch")

    def cache_implementation(self) -> str | None:
        """``"static"`` (a KV cache allocated once, written in place) when asked for and transformers
        supports it for this model, else None (a growing cache: ``new_cache``'s)."""
        return "static" if self.cache == "static" and self.static_ok else None

    def new_cache(self):
        """The KV cache object to hand generate: a ``ReusedBuffersCache`` for ``cache=reused``, an
        ``AppendedInPlaceCache`` for ``cache=inplace``, else None (generate makes its own: dynamic,
        or static per ``cache_implementation``)."""
        kind = {"reused": ReusedBuffersCache, "inplace": AppendedInPlaceCache}.get(self.cache)
        return kind(self.llm.config) if kind else None

    def load_heads(self, model_path: str) -> bool:
        if not (self.is_autodeco and same_base_and_heads(self.model_path, model_path)):
            return False
        from heads.checkpoint import head_tensors

        self.model.load_heads(head_tensors(model_path), source=str(model_path))
        self.model_path = str(model_path)
        return True

    def generate(self, requests: list[Request]) -> Iterator[Completion]:
        for request in requests:
            self.check_preset(request.preset)
            indices = list(request.indices)
            for start in range(0, len(indices), self.max_batch_size):
                yield from self._generate_batch(request, indices[start : start + self.max_batch_size])

    @torch.inference_mode()
    def _generate_batch(self, request: Request, indices: list[int]) -> Iterator[Completion]:
        preset = request.preset
        rows = len(indices) if preset.do_sample else 1  # greedy: one row serves every sample
        ids = self.tokenizer(request.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = ids.to(self.device).expand(rows, -1)
        generators = []
        for index in indices[:rows]:
            g = torch.Generator(device=self.device)
            g.manual_seed(sample_seed(request.seed, request.key, index))
            generators.append(g)
        recorder = TraceRecorder() if self.is_autodeco else None
        out = self.generate_ids(ids, preset, generators, request.max_tokens, request.stop, recorder=recorder)
        generated = out[:, ids.shape[1] :].cpu()
        temps = recorder.rows(recorder.temperatures, rows) if recorder else None
        top_ps = recorder.rows(recorder.top_ps, rows) if recorder else None
        for row, index in enumerate(indices):
            r = row if preset.do_sample else 0
            tokens = generated[r].tolist()
            text, n_tokens, reason = self._finish(tokens, request.stop, request.max_tokens)
            yield Completion(
                key=request.key,
                sample_index=index,
                text=text,
                n_tokens=n_tokens,
                finish_reason=reason,
                temperatures=temps[r, :n_tokens].tolist() if temps is not None else None,
                top_ps=top_ps[r, :n_tokens].tolist() if top_ps is not None else None,
                seed=request.seed,
                token_ids=tokens[:n_tokens],
            )

    @torch.inference_mode()
    def generate_ids(self, ids: torch.Tensor, preset: DecodingPreset, generators: list[torch.Generator],
                     max_tokens: int, stop: tuple[str, ...] = (), recorder: TraceRecorder | None = None,
                     eos: bool = True, past_key_values=None) -> torch.Tensor:
        """generate on token ids [rows, n] with this backend's cache and sampler (row r drawn with
        ``generators[r]``); prompt + new tokens. ``eos=False``: exactly ``max_tokens`` new tokens;
        ``past_key_values``: a cache already holding a prefix of ``ids`` (benchmarks time decode
        steps from a copy of one prefill)."""
        from transformers import GenerationConfig, LogitsProcessorList

        if self.is_autodeco:
            heads = preset.heads or (False, False)
            self.model.set_decoding(temperature=heads[0], top_p=heads[1])
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_tokens,
            cache_implementation=self.cache_implementation(),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids if eos else None,
            stop_strings=list(stop) or None,
        )
        cache = self.new_cache() if past_key_values is None else past_key_values
        hook = self.model.register_forward_hook(recorder) if recorder else None
        try:
            return self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                logits_processor=LogitsProcessorList([RowSampler(preset, generators)]),
                **({"past_key_values": cache} if cache is not None else {}),
                **({"tokenizer": self.tokenizer} if stop else {}),
            )
        finally:
            if hook is not None:
                hook.remove()

    def _finish(self, tokens: list[int], stop: tuple[str, ...], max_tokens: int) -> tuple[str, int, str]:
        """Cut a generated row at EOS (kept in the count) and at the first stop string."""
        n_tokens, reason = len(tokens), "length"
        pad = self.tokenizer.pad_token_id if stop else None  # rows ended by a stop string are padded
        for i, token in enumerate(tokens):
            if token in self.eos_ids or token == pad:
                n_tokens, reason = i + (token in self.eos_ids), "stop"
                break
        text = self.tokenizer.decode(tokens[:n_tokens], skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        return text, n_tokens, reason


def default_attention(dtype: torch.dtype, device_type: str, model_type: str | None = None) -> str | None:
    """``attention=auto``: for bf16 on CPU (torch's bf16 SDPA kernel is ~2x slower there) eager, as
    ``grouped-eager`` (no repeated keys and values) for the model types it computes exactly; else
    None (transformers' default, sdpa)."""
    if device_type != "cpu" or dtype != torch.bfloat16:
        return None
    return GROUPED if model_type in GROUPED_MODEL_TYPES else "eager"


def _load_tokenizer(auto_tokenizer, path: str, config: dict):
    """The folder's tokenizer; heads-only AutoDeco folders (no tokenizer files) use their base's."""
    base = config.get("base_model_name_or_path")
    local = Path(path)
    if base and local.is_dir() and not (local / "tokenizer_config.json").is_file():
        return auto_tokenizer.from_pretrained(base)
    return auto_tokenizer.from_pretrained(path)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
