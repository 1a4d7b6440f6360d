"""Faster CPU decoding for the transformers backend: six measured costs and what replaces each.

Measured on this project's CPU (SmolLM2-135M bf16, batch 16, context 256, 2 threads; torch
profiler and ``autodeco bench backends``), a decode step of transformers' defaults spent its time:

1. **repeat_kv.** The eager attention copies each layer's keys and values once per query head
   of a group (3 copies for SmolLM2's 9 query / 3 key-value heads) every step: ~a third of a step.
   ``grouped_attention`` lays the query heads of a group side by side against their shared key /
   value head (one matmul, the same dot products, no copy). Registered with transformers'
   ``AttentionInterface`` as ``grouped-eager`` (with the eager mask), used for the model types in
   ``GROUPED_MODEL_TYPES`` whose eager attention is exactly softmax(q k^T * scale + mask) v.
2. **Growing the KV cache.** ``DynamicCache`` concatenates each layer's keys and values into a
   freshly allocated tensor every step; on CPU a fresh multi-megabyte block costs page faults
   that take several times the copy itself. ``ReusedBuffersCache`` concatenates into one of two
   buffers it keeps per layer, alternating (the source is always the other one), so the memory
   is touched once. Eager attention still reads one contiguous tensor per layer (a slice of a
   pre-allocated buffer would be strided, and torch's bmm copies strided batches). torch's SDPA
   reads strided keys and values as they are (same time, same output, measured), so with sdpa
   ``AppendedInPlaceCache`` writes each step's tokens in place after the cached ones and hands
   attention a prefix view: no copy of the cache per step (fp32 on an AVX2-only CPU: a decode step
   166-197 ms against 188-255 ms with ``reused``).
3. **Linear layers.** aten's bf16 matmul at batch 16 streams weights at ~8 GB/s; oneDNN with the
   weights reordered once into its blocked layout (what torch.compile's freezing does) at
   ~11-13 GB/s; fusing an attention's q, k and v projections into one matmul (k_proj and v_proj
   hand back q_proj's result for the same input) and a gated MLP's gate and up projections into
   another saves ~2 ms more per step. In fp32 on an AVX2-only CPU (AMD Zen 3, 2 threads, weights
   cold in cache) aten's matmul (MKL) streamed 2.9-5.6 GB/s and oneDNN's packed one 6.0-6.5 GB/s
   (the 49k-row lm_head 2.9 → 6.4); a SmolLM2 decode step went from ~200 to ~154 ms.
   ``pack_linears`` keeps a packed copy beside each bf16 / fp32 weight (the dense one stays for
   anything that reads it: + the linear weights' size in memory; ``linear=plain`` saves it).
4. **Sampling.** ``torch.multinomial`` draws one exponential variate per vocabulary entry (~1 ms
   per row of 49k on CPU, ~16 ms of a batch-16 step). ``sample_rows`` inverts the CDF: one
   uniform per row from that row's generator, then the block of 64 tokens and the token within it
   by two short cumulative sums (0.18 ms for 16 rows of 49k).
5. **Elementwise operations (fp32).** At batch 16 an RMSNorm is ~9k numbers and costs five torch
   operations (~55-60 µs on the AVX2 EPYC), the rotary embedding of a layer's queries and keys
   ten (~90-120 µs), SiLU(gate) · up two (~55 µs), mostly per-operation overhead; a step has 61
   norms and 30 of each of the others. ``use_native_elementwise`` swaps in one compiled pass for each
   (``hf_native.cpp``; the rotary runs in place on the fused q / k / v matmul's output, all query
   and key heads in one call), for each module type whose own forward it reproduces on random
   inputs (a probe at swap time, so other math, such as Gemma's 1 + weight norm or a GELU MLP,
   keeps its forward). A decode step of fp32 SmolLM2 (batch 16, context ~200, 2 threads, paired
   with torch's, one process): 0.91-0.94 of the time. In the same attention forward, a decode
   step with no mask (the rows of one prompt) runs ``decode_attention``: one work item per (row,
   key-value head), its keys and values read once for the query heads that share them, on
   torch's OpenMP threads (30 layers, batch 16, context 216: 20-22 ms against SDPA's 28-29 ms at
   2 threads, 40 against 55 at one); the whole step then 0.83 of torch's.
6. **Decode linears and the layer around them (fp32).** With the rest native, a step was ~65%
   linear layers, and oneDNN's packed kernel reads a cold weight at 5-6 GB/s at 16 rows (its loads
   wait on memory; the cores stream 19 GB/s). ``linear_rows`` (``hf_native.cpp``) multiplies up to
   ``NATIVE_LINEAR_ROWS`` rows by the module's own row-major weight, each OpenMP thread streaming
   its share of the rows with a software prefetch ahead of the multiply-adds: 0.61-0.67 of
   oneDNN's time over a step's linears at 1-7 rows, 0.89 at 16 (oneDNN wins from ~24 rows, so
   prefill stays packed). No extra memory: q / k / v and gate / up are one call per part into one
   output. A Llama decoder layer whose parts all run natively then runs a decode step as one native
   call, ``decode_layer`` (the same passes in the same order, the residual sums added by the
   linear itself, the new keys and values appended to an ``AppendedInPlaceCache``'s buffer),
   without the module calls and ~10 µs torch operations between them (~0.5 ms a layer). ``bench
   backends`` hf fp32, alternating with the commit before each: 133/145 vs 114/124 tok/s (the
   linear), 141/165 vs 119/133 (the layer as a Python sequence of calls), 144/122 vs 126/113 (as
   one call); with 8 repeats 143-151 tok/s against torch's path's 92, 0.26-0.27 of the bandwidth
   bound.

The first three give the plain path's logits (tests/test_hf_kernels.py: eager vs grouped
attention to 1e-6, a small Llama and Qwen2 packed vs plain exactly in bf16 and to float32 rounding
in fp32, with the same greedy tokens; real SmolLM2's completions identical); the native passes
the same (rotary bit for bit, the others to float32 rounding; real fp32 SmolLM2's greedy
completions identical, sampled ones but where a rounding moves a draw); the sampler draws by the
probabilities (its frequencies tested) from another random
stream than multinomial's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

GROUPED = "grouped-eager"
# Model types whose eager attention is plain softmax(q k^T * scaling + mask) v (no soft-capping,
# no attention sinks): grouped_attention computes the same thing for them.
GROUPED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3",
                                 "phi3", "cohere", "starcoder2", "helium"})
GROW_TOKENS = 256  # a cache buffer grows by room for this many more tokens at a time


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention without repeating keys and values: query [B, H, q, d], key / value
    [B, H_kv, k, d] with H = groups * H_kv (query head h reads key-value head h // groups, as in
    repeat_kv). Returns (output [B, q, H, d], weights [B, H, q, k])."""
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{GROUPED} attention does not implement {unsupported}")
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * q_len, query.shape[-1])
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling  # [B, H_kv, groups * q, k]
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.reshape(batch, kv_heads, groups, q_len, k_len)
        scores = (scores.view(batch, kv_heads, groups, q_len, k_len) + mask).view(batch, kv_heads, groups * q_len, k_len)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).view(batch, heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), weights.view(batch, heads, q_len, k_len)


def register_grouped_attention() -> str:
    """Register ``grouped_attention`` (and the eager mask) with transformers under ``GROUPED``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)
    return GROUPED


class ReusedBuffersLayer(DynamicLayer):
    """A ``DynamicLayer`` whose concatenation writes into one of two buffers it keeps, alternating.

    ``keys`` / ``values`` are always a contiguous prefix of the buffer written last; the next
    update reads them and writes the other buffer, so a source is never overwritten while read.
    Anything that replaces ``keys`` (crop, batch selection) is just read as the next source.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: list[list[torch.Tensor | None]] = [[None, None], [None, None]]  # [turn][keys, values]
        self._turn = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._turn ^= 1
        buffers = self._buffers[self._turn]
        merged = []
        for slot, (past, new) in enumerate(((self.keys, key_states), (self.values, value_states))):
            length = (past.shape[-2] if past.numel() else 0) + new.shape[-2]
            shape = (*new.shape[:-2], length, new.shape[-1])
            per_token = new[..., :1, :].numel()
            numel = per_token * length
            buffer = buffers[slot]
            if buffer is None or buffer.numel() < numel:
                buffer = buffers[slot] = new.new_empty(per_token * (length + GROW_TOKENS))
            out = buffer[:numel].view(shape)
            if past.numel():
                torch.cat([past, new], dim=-2, out=out)
            else:
                out.copy_(new)
            merged.append(out)
        self.keys, self.values = merged
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buffers = [[None, None], [None, None]]


class ReusedBuffersCache(DynamicCache):
    """``DynamicCache`` with its full-attention layers as ``ReusedBuffersLayer`` (sliding-window and
    other layer kinds stay transformers' own)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.layers = [ReusedBuffersLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]


class AppendedInPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new tokens in place after the cached ones, in a buffer with
    room for ``GROW_TOKENS`` more (a bigger one, copied into, when it fills).

    ``keys`` / ``values`` are prefix views of the buffer ([B, H, length, D] with the buffer's
    strides): no per-step copy of the whole cache. Only for attention that reads strided keys and
    values as they are (torch's SDPA); eager attention's bmm copies strided batches (``reused``
    there). Anything that replaces ``keys`` with another tensor (batch selection) is copied into a
    new buffer at the next update; a crop is a shorter prefix view, written over from its end.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: list[torch.Tensor | None] = [None, None]  # [keys, values]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        merged = []
        for slot, (past, new) in enumerate(((self.keys, key_states), (self.values, value_states))):
            cached = past.shape[-2] if past.numel() else 0
            length = cached + new.shape[-2]
            buffer = self._buffers[slot]
            fits = (buffer is not None and buffer.shape[:-2] == new.shape[:-2] and buffer.shape[-1] == new.shape[-1]
                    and buffer.shape[-2] >= length)
            if cached and fits:  # the cached tokens must be this buffer's prefix (not a selection's copy)
                fits = past.data_ptr() == buffer.data_ptr() and past.stride() == buffer.stride()
            if not fits:
                buffer = self._buffers[slot] = new.new_empty((*new.shape[:-2], length + GROW_TOKENS, new.shape[-1]))
                if cached:
                    buffer[..., :cached, :].copy_(past)
            buffer[..., cached:length, :].copy_(new)
            merged.append(buffer[..., :length, :])
        self.keys, self.values = merged
        return self.keys, self.values

    def room_for_step(self, rows: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(key buffer, value buffer, cached length) where a decode step's one new token per row can be
        written in place at the cached length (float32 buffers of this shape whose prefix is the
        cached tokens, with room left); None where ``update`` is needed (no cache yet, a full
        buffer, one that is not the cached tokens')."""
        if not self.is_initialized or self.keys.numel() == 0:
            return None
        cached = self.keys.shape[-2]
        for past, buffer in zip((self.keys, self.values), self._buffers, strict=True):
            if (buffer is None or buffer.dtype is not torch.float32 or buffer.shape[-2] <= cached
                    or buffer.shape[:2] != (rows, kv_heads) or buffer.shape[-1] != head_dim
                    or past.data_ptr() != buffer.data_ptr() or past.stride() != buffer.stride()):
                return None
        return self._buffers[0], self._buffers[1], cached

    def appended_one(self) -> None:
        """After a decode step wrote one token per row at the cached length: the prefix views grow by one."""
        length = self.keys.shape[-2] + 1
        self.keys, self.values = self._buffers[0][:, :, :length], self._buffers[1][:, :, :length]

    def reset(self) -> None:
        super().reset()
        self._buffers = [None, None]


class AppendedInPlaceCache(DynamicCache):
    """``DynamicCache`` with its full-attention layers as ``AppendedInPlaceLayer``."""

    def __init__(self, config):
        super().__init__(config=config)
        self.layers = [AppendedInPlaceLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]


PACKED_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def packed_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this CPU runs oneDNN's packed linear in ``dtype`` (bf16 or fp32). bf16 needs
    avx512bw/vl/dq or avx_ne_convert (AVX2-only CPUs such as AMD Zen 3 lack both and raise); fp32
    runs wherever torch has oneDNN. Probed once per dtype on a 16 x 16 weight."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(16, 16, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=dtype), _packed(weight), None,
                                           "none", [None], "")
    except RuntimeError:
        return False
    return True


def pack_linears(model: nn.Module) -> int:
    """Serve every bf16 / fp32 ``nn.Linear`` of ``model`` on CPU from oneDNN-packed weights (those of a
    dtype whose packed path this CPU runs, ``packed_supported``): an attention's
    q / k / v projections (``q_proj``, ``k_proj``, ``v_proj``) as one matmul, a gated MLP's gate and
    up projections (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``: Llama's shape) as
    another, every other linear on its own packed weight. Returns how many linears are served so
    (0 where torch lacks oneDNN or this CPU lacks the packed path of the weights' dtype)."""
    served: set[int] = set()
    for module in model.modules():
        if _fusable_qkv(module):
            q, k, v = module.q_proj, module.k_proj, module.v_proj
            q.packed_qkv = _packed(torch.cat([q.weight, k.weight, v.weight]))
            q.qkv_bias = torch.cat([q.bias, k.bias, v.bias]).detach() if q.bias is not None else None
            q.qkv_sizes, q.qkv_receivers = (q.out_features, k.out_features, v.out_features), (k, v)
            q.forward = _qkv_forward.__get__(q)
            k.forward, v.forward = _received_forward.__get__(k), _received_forward.__get__(v)
            served.update(map(id, (q, k, v)))
        if _is_gated_mlp(module):
            module.packed_gate_up = _packed(torch.cat([module.gate_proj.weight, module.up_proj.weight]))
            module.forward = _gated_mlp_forward.__get__(module)
            served.update(map(id, (module.gate_proj, module.up_proj)))
        if _packable(module) and id(module) not in served:
            module.packed_weight = _packed(module.weight)
            module.forward = _packed_forward.__get__(module)
            served.add(id(module))
    return len(served)


@torch.no_grad()
def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _packable(linear) -> bool:
    return (isinstance(linear, nn.Linear) and linear.weight.device.type == "cpu"
            and packed_supported(linear.weight.dtype))


def _fusable_qkv(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    return (all(_packable(p) for p in parts) and len({p.in_features for p in parts}) == 1
            and len({p.bias is None for p in parts}) == 1 and len({p.weight.dtype for p in parts}) == 1)


def _qkv_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """q_proj's forward: q, k and v in one matmul; k and v wait on k_proj / v_proj for the same input."""
    q, k, v = torch.ops.mkldnn._linear_pointwise(x, self.packed_qkv, self.qkv_bias, "none", [None], "").split(
        self.qkv_sizes, dim=-1)
    for receiver, out in zip(self.qkv_receivers, (k, v), strict=True):
        receiver.received = (x, out)
    return q


def _received_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """k_proj / v_proj: the output q_proj computed for this very input, else the plain matmul."""
    received = self.__dict__.pop("received", None)
    if received is not None and received[0] is x:
        return received[1]
    return nn.functional.linear(x, self.weight, self.bias)


def _is_gated_mlp(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(_packable(p) and p.bias is None for p in parts) and callable(getattr(module, "act_fn", None))
            and parts[0].weight.shape == parts[1].weight.shape and len({p.weight.dtype for p in parts}) == 1)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate_up, None, "none", [None], "").chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


# ----------------------------------------------------------------------------- native elementwise
# RMSNorm, the rotary embedding and SiLU(gate) * up, each one native call (hf_native.cpp) instead
# of 5-10 torch operations on a few thousand elements: float32 on CPU, for modules whose own
# forward computes the same thing (checked on random inputs when they are swapped in).

NATIVE_SOURCE = Path(__file__).with_name("hf_native.cpp")
NATIVE_FLAGS = ("-ffp-contract=off", "-fopenmp")  # the rotary's products and sums as torch rounds them;
# the attention's and the linears' threads from the OpenMP runtime torch has loaded (libgomp), none started
# per call
NATIVE_ATTENTIONS = (LlamaAttention,)  # the classes (exactly) whose forward _native_attention_forward replicates
NATIVE_LAYERS = (LlamaDecoderLayer,)  # the classes (exactly) whose forward _native_layer_forward replicates
NATIVE_LINEAR_ROWS = 16  # at most this many rows (a decode step's batch) go to the native linear, more to oneDNN:
# against oneDNN's packed fp32 kernel over a SmolLM2 step's linears (2 threads, AVX2) 0.61-0.67 of its time at
# 1-7 rows, 0.89 at 16, 1.03 at 24, 1.34 at 64 (oneDNN reuses each weight tile across more rows)


@functools.cache
def native_elementwise():
    """The compiled passes (ctypes.CDLL with typed signatures), or None where no compiler builds them."""
    from heads.nucleus import _build_native

    try:  # an unwritable cache or an unloadable library: no native passes
        path = _build_native(NATIVE_SOURCE, stem="hf", flags=NATIVE_FLAGS)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.rms_norm.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr, i64]
    lib.rotary.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64]
    lib.silu_mul.argtypes = [ptr, i64, i64, i64, ptr, i64]
    for name in ("rms_norm", "rotary", "silu_mul"):
        getattr(lib, name).restype = None
    lib.decode_attention.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64,
                                     i64, f32, ctypes.c_int32]
    lib.decode_attention.restype = ctypes.c_int32
    lib.decode_layer.argtypes = [ptr, i64, i64, ptr, f32, ptr, f32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr,
                                 ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr,
                                 i64, ptr, ptr, ctypes.c_int32]
    lib.decode_layer.restype = ctypes.c_int32
    lib.linear_rows.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int32, ctypes.c_int32]
    lib.linear_rows.restype = ctypes.c_int32
    return lib


@functools.cache
def native_linear_available() -> bool:
    """Whether the compiled library has its decode linear (built with AVX2 and FMA): one 1 x 8 probe."""
    lib = native_elementwise()
    if lib is None:
        return False
    x, out = torch.ones(1, 8), torch.zeros(1, 1)
    code = lib.linear_rows(x.data_ptr(), 1, 8, x.data_ptr(), 1, None, out.data_ptr(), 1, 0, 1)
    return code == 0 and out.item() == 8.0


def use_native_elementwise(model: nn.Module) -> int:
    """Swap in the native passes for ``model``'s float32 CPU modules of four kinds: RMSNorms
    (``weight`` and ``variance_epsilon``), gated MLPs served by ``pack_linears``, attentions of
    the classes in ``NATIVE_ATTENTIONS`` whose q / k / v ``pack_linears`` fused, and the linears it
    packed on their own (o_proj, down_proj, lm_head), whose decode steps (at most
    ``NATIVE_LINEAR_ROWS`` rows) then run the native linear on the module's own row-major weight
    (the fused q / k / v and gate / up matmuls too, one call per part); then decoder layers of the
    classes in ``NATIVE_LAYERS`` whose norms, attention, MLP, o_proj and down_proj were all swapped,
    whose decode steps with the in-place cache run as one native call (``_native_layer_forward``). Each module is
    swapped only if, on random inputs, the native forward gives its own forward's outputs (to
    float32 rounding); a module that later sees gradients, another dtype or strided input runs its
    own forward. Modules swapped before are left as they are. Returns how many modules were
    swapped now (0 where nothing compiles)."""
    lib = native_elementwise()
    if lib is None:
        return 0
    swapped = 0
    for module in model.modules():
        kind = _native_kind(module)
        if kind is None or "torch_forward" in vars(module):
            continue
        native = _NATIVE_FORWARDS[kind].__get__(module)
        if _agrees(module, kind, native):
            module.torch_forward = module.forward
            module.forward = native
            swapped += 1
    for module in model.modules():  # then whole decoder layers, once all their parts run natively
        if _fusable_layer(module) and "torch_forward" not in vars(module):
            native = _native_layer_forward.__get__(module)
            if _layer_agrees(module, native):
                module.torch_forward, module.forward = module.forward, native
                swapped += 1
    return swapped


def _native_kind(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and isinstance(getattr(module, "variance_epsilon", None), float)):
        return "norm"
    packed = getattr(module, "packed_gate_up", None)
    if packed is not None and packed.dtype == torch.float32 and module.gate_proj.weight.device.type == "cpu":
        return "mlp"
    if (isinstance(module, nn.Linear) and getattr(module, "packed_weight", None) is not None
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and module.in_features % 8 == 0 and native_linear_available()):
        return "linear"
    q_proj = getattr(module, "q_proj", None)
    if (type(module) in NATIVE_ATTENTIONS and getattr(q_proj, "packed_qkv", None) is not None
            and q_proj.packed_qkv.dtype == torch.float32 and q_proj.qkv_sizes[1] % module.head_dim == 0):
        return "attention"
    return None


@torch.no_grad()
def _agrees(module: nn.Module, kind: str, native) -> bool:
    """Whether ``native`` gives ``module``'s own forward's output on random float32 inputs."""
    generator = torch.Generator().manual_seed(0)
    if kind == "norm":
        args = (torch.randn(2, 3, module.weight.shape[0], generator=generator),)
    elif kind == "mlp":
        args = (torch.randn(2, 3, module.gate_proj.in_features, generator=generator),)
    elif kind == "linear":
        args = (torch.randn(2, 3, module.in_features, generator=generator),)
    else:
        head_dim = module.head_dim
        angles = torch.rand(2, 3, head_dim // 2, generator=generator) * 6.0
        angles = torch.cat([angles, angles], dim=-1)
        args = (torch.randn(2, 3, module.q_proj.in_features, generator=generator), (angles.cos(), angles.sin()))
    try:
        mine, theirs = native(*args), module.forward(*args)
    except Exception:  # noqa: BLE001 - a forward that cannot even run on the probe is not swapped
        return False
    if kind == "attention":
        mine, theirs = mine[0], theirs[0]
    scale = theirs.abs().max().clamp_min(1.0)
    return mine.shape == theirs.shape and bool(((mine - theirs).abs().max() <= 1e-5 * scale).item())


def _native_ok(x: torch.Tensor, *more: torch.Tensor) -> bool:
    """Native only without autograd (the passes record no graph) and on contiguous fp32 CPU input
    (checked once per call, ~100 calls a step: kept to plain attribute reads)."""
    if torch.is_grad_enabled() or x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous():
        return False
    return all(t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() for t in more)


def _native_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, one pass per row."""
    if not _native_ok(x, self.weight):
        return self.torch_forward(x)
    out, dim = torch.empty_like(x), x.shape[-1]
    native_elementwise().rms_norm(x.data_ptr(), x.numel() // dim, dim, dim, self.weight.data_ptr(),
                                  self.variance_epsilon, out.data_ptr(), dim)
    return out


def _native_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused gate / up matmul, SiLU(gate) * up in one pass, then down_proj."""
    if not _native_ok(x):
        return self.torch_forward(x)
    gate_up = _native_linear(x, (self.gate_proj, self.up_proj))
    if gate_up is None:
        gate_up = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate_up, None, "none", [None], "")
    width = gate_up.shape[-1]
    hidden = gate_up.new_empty((*gate_up.shape[:-1], width // 2))
    native_elementwise().silu_mul(gate_up.data_ptr(), gate_up.numel() // width, width, width // 2,
                                  hidden.data_ptr(), width // 2)
    return self.down_proj(hidden)


def _native_attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor],
                              attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
    """transformers' LlamaAttention.forward, with q, k and v from the fused matmul, the rotary
    embedding of all query and key heads in one native pass, in place on that matmul's output, and
    a decode step's attention (one position per row, no mask: rows of one prompt) natively too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if not _native_ok(hidden_states) or hidden_states.dim() != 3:
        return self.torch_forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    q_proj = self.q_proj
    qkv = _native_linear(hidden_states, (q_proj, self.k_proj, self.v_proj))
    if qkv is None:
        qkv = torch.ops.mkldnn._linear_pointwise(hidden_states, q_proj.packed_qkv, q_proj.qkv_bias, "none", [None],
                                                 "").contiguous()  # a fresh output: contiguous already
    (batch, seq), width = hidden_states.shape[:-1], qkv.shape[-1]
    cos, sin = position_embeddings  # [batch or 1, seq, head_dim], the same for every layer
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1:] != (seq, self.head_dim) \
            or cos.shape[0] not in (1, batch) or not _native_ok(cos, sin):
        cos, sin = (t.float().expand(batch, seq, self.head_dim).contiguous() for t in (cos, sin))
    rotated = (q_proj.qkv_sizes[0] + q_proj.qkv_sizes[1]) // self.head_dim
    native_elementwise().rotary(qkv.data_ptr(), batch, seq, width, rotated, self.head_dim, cos.data_ptr(),
                                sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
    lead = (batch, seq)
    shape = (*lead, -1, self.head_dim)
    query, key, value = (part.view(shape).transpose(1, 2) for part in qkv.split(q_proj.qkv_sizes, dim=-1))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    if seq == 1 and attention_mask is None and key.dtype is torch.float32 and key.stride(-1) == value.stride(-1) == 1:
        out = _native_decode_attention(query, key, value, self.scaling)
        if out is not None:  # [batch, heads, head_dim]: one query position per row
            return self.o_proj(out.view(batch, 1, -1)), None
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **kwargs)
    return self.o_proj(out.reshape(*lead, -1).contiguous()), weights


def _native_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear packed on its own: the native linear at a decode step's few rows, else its packed forward."""
    out = _native_linear(x, (self,)) if _native_ok(x) else None
    return self.torch_forward(x) if out is None else out


def _native_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
    """x [..., K] (contiguous float32) through ``linears`` side by side (their outputs concatenated on
    the last dimension: q / k / v, gate / up), each from its own row-major weight; None where x has
    more than ``NATIVE_LINEAR_ROWS`` rows, K is not a multiple of 8 or a weight is not a contiguous
    float32 CPU tensor (the caller then runs oneDNN's packed matmul)."""
    width = x.shape[-1]
    rows = x.numel() // width
    if rows > NATIVE_LINEAR_ROWS or width % 8 or not native_linear_available():
        return None
    parts = [(linear.weight, linear.bias) for linear in linears]
    if not all(w.shape[1] == width and _native_ok(w, *([] if b is None else [b])) for w, b in parts):
        return None
    total = sum(w.shape[0] for w, _ in parts)
    out, offset = x.new_empty((*x.shape[:-1], total)), 0
    lib, threads = native_elementwise(), torch.get_num_threads()
    for weight, bias in parts:  # each part's columns of the one output (rows `total` apart)
        lib.linear_rows(x.data_ptr(), rows, width, weight.data_ptr(), weight.shape[0], _pointer(bias),
                        out.data_ptr() + 4 * offset, total, 0, threads)
        offset += weight.shape[0]
    return out


def _fusable_layer(module: nn.Module) -> bool:
    if type(module) not in NATIVE_LAYERS:
        return False
    attention, mlp = module.self_attn, module.mlp
    parts = (module.input_layernorm, module.post_attention_layernorm, attention, mlp, attention.o_proj, mlp.down_proj)
    return (all("torch_forward" in vars(part) for part in parts) and attention.q_proj.in_features % 8 == 0
            and all(p.is_contiguous() for p in module.parameters()))


def _native_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """transformers' LlamaDecoderLayer.forward at a decode step (one position per row, no mask, at
    most ``NATIVE_LINEAR_ROWS`` rows, an ``AppendedInPlaceCache`` with room for the token) as one
    native call, ``decode_layer``: the norms, q / k / v, rotary, the cache's append, the attention,
    o_proj and down_proj added to the residual, SiLU·up, the same passes the swapped modules run,
    so the output is theirs; the module calls and small torch operations between them (~0.5 ms a
    layer at batch 16 on the AVX2 machine) are what it saves. Anything else runs the layer's own
    forward (the modules' native passes one by one)."""
    room = _decode_step_room(self, hidden_states, attention_mask, past_key_values, position_embeddings)
    if room is not None:
        cache_layer, (keys, values, cached) = room
        attention, mlp = self.self_attn, self.mlp
        heads, kv_heads, head_dim, inter = self.native_shape
        rows, _, width = hidden_states.shape
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        cos, sin = position_embeddings
        out = torch.empty_like(hidden_states)
        scratch = hidden_states.new_empty(rows * (width + 2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * inter))
        code = native_elementwise().decode_layer(
            hidden_states.data_ptr(), rows, width, norm1.weight.data_ptr(), norm1.variance_epsilon,
            norm2.weight.data_ptr(), norm2.variance_epsilon, q.weight.data_ptr(), _pointer(q.bias),
            k.weight.data_ptr(), _pointer(k.bias), v.weight.data_ptr(), _pointer(v.bias), heads, kv_heads, head_dim,
            cos.data_ptr(), sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, keys.data_ptr(),
            *keys.stride()[:3], values.data_ptr(), *values.stride()[:3], cached, attention.scaling,
            o.weight.data_ptr(), _pointer(o.bias), mlp.gate_proj.weight.data_ptr(), mlp.up_proj.weight.data_ptr(),
            mlp.down_proj.weight.data_ptr(), inter, scratch.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if code == 0:
            cache_layer.appended_one()
            return out
    return self.torch_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _decode_step_room(layer: nn.Module, hidden_states: torch.Tensor, attention_mask, past_key_values,
                      position_embeddings):
    """(cache layer, its ``room_for_step``) where ``_native_layer_forward`` computes this call: a
    decode step's float32 rows (no grad), no mask, the rotary's cos / sin for one position, every
    parameter still float32 on the CPU (contiguous: checked when the layer was swapped), and an
    in-place cache layer with room for the step; else None."""
    if (attention_mask is not None or position_embeddings is None or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or hidden_states.shape[0] > NATIVE_LINEAR_ROWS
            or not _native_ok(hidden_states)):
        return None
    cache_layers = getattr(past_key_values, "layers", None)
    index = layer.self_attn.layer_idx
    cache_layer = cache_layers[index] if cache_layers is not None and index < len(cache_layers) else None
    if type(cache_layer) is not AppendedInPlaceLayer:
        return None
    cos, sin = position_embeddings
    if (cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1:] != (1, layer.self_attn.head_dim)
            or cos.shape[0] not in (1, hidden_states.shape[0]) or not _native_ok(cos, sin)
            or not all(p.dtype is torch.float32 and p.is_cpu for p in layer.native_parameters)):
        return None
    heads, kv_heads, head_dim, _ = layer.native_shape
    room = cache_layer.room_for_step(hidden_states.shape[0], kv_heads, head_dim)
    return None if room is None else (cache_layer, room)


@torch.no_grad()
def _layer_agrees(layer: nn.Module, native) -> bool:
    """Whether ``native`` gives ``layer``'s own forward's output at a decode step (random float32
    inputs, after a 3-token prefill into a fresh in-place cache for each). Sets the layer's
    ``native_parameters`` and ``native_shape`` (heads, key-value heads, head dim, MLP width)."""
    generator = torch.Generator().manual_seed(0)
    hidden, head_dim = layer.self_attn.q_proj.in_features, layer.self_attn.head_dim
    prefill, step = torch.randn(2, 3, hidden, generator=generator), torch.randn(2, 1, hidden, generator=generator)
    angles = torch.rand(2, 4, head_dim // 2, generator=generator) * 6.0
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    attention = layer.self_attn
    layer.native_parameters = tuple(layer.parameters())
    layer.native_shape = (attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim,
                          head_dim, layer.mlp.gate_proj.out_features)
    outs = []
    try:
        for forward in (native, layer.forward):
            cache = AppendedInPlaceCache(attention.config)
            layer.forward(prefill, past_key_values=cache, position_embeddings=(cos[:, :3], sin[:, :3]))
            outs.append(forward(step, past_key_values=cache,
                                position_embeddings=(cos[:, 3:].contiguous(), sin[:, 3:].contiguous())))
    except Exception:  # noqa: BLE001 - a forward that cannot even run on the probe is not swapped
        return False
    mine, theirs = outs
    scale = theirs.abs().max().clamp_min(1.0)
    return mine.shape == theirs.shape and bool(((mine - theirs).abs().max() <= 1e-5 * scale).item())


def _native_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float) -> torch.Tensor | None:
    """softmax(q k^T * scaling) v for one query position per row with no mask (query [B, H, 1, d],
    key / value [B, H_kv, L, d] read in place), or None where the kernel does not take the shapes."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    out = query.new_empty((batch, heads, dim))
    code = native_elementwise().decode_attention(
        query.data_ptr(), query.stride(0), query.stride(1), key.data_ptr(), key.stride(0), key.stride(1),
        key.stride(2), value.data_ptr(), value.stride(0), value.stride(1), value.stride(2), out.data_ptr(), batch,
        heads, kv_heads, length, dim, scaling, torch.get_num_threads())
    return out if code == 0 else None


_NATIVE_FORWARDS = {"norm": _native_norm_forward, "mlp": _native_mlp_forward, "attention": _native_attention_forward,
                    "linear": _native_linear_forward}


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator], block: int = 64) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] (non-negative, any positive total), row b drawn with
    ``generators[b]``: the first index whose cumulative mass exceeds u * total, u ~ U[0, 1).

    Two levels instead of a vocabulary-long cumulative sum: the block of ``block`` tokens where the
    cumulative of block sums crosses u * total, then the token inside that block. A zero-mass
    token or block is never drawn (its cumulative equals its predecessor's); where rounding puts
    u * total at or past the last cumulative, the last block / token with mass is drawn.
    """
    rows, vocab = probs.shape
    probs = probs.float()
    if vocab % block:
        probs = nn.functional.pad(probs, (0, block - vocab % block))
    blocks = probs.view(rows, -1, block)
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators]).unsqueeze(-1)
    outer = blocks.sum(-1).cumsum(-1)
    chosen = _first_above(outer, u * outer[:, -1:])
    inner = blocks[torch.arange(rows, device=probs.device), chosen].cumsum(-1)
    start = torch.where(chosen > 0, outer.gather(1, (chosen - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    within = _first_above(inner, (u.squeeze(-1) * outer[:, -1] - start).unsqueeze(-1).clamp(min=0.0))
    return chosen * block + within


def _first_above(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: the first index whose cumulative exceeds target [rows, 1], or the last index with
    mass (the first reaching the row's total) where rounding left none above it."""
    index = torch.searchsorted(cumulative, target, right=True)
    last = torch.searchsorted(cumulative, cumulative[:, -1:].contiguous())
    return torch.minimum(index, last).squeeze(-1)
