"""The transformers backend's CPU kernels (harness.backends.hf_kernels): each computes what the plain
path computes — grouped attention = eager attention with repeated keys/values, the reused-buffer KV
cache = DynamicCache, packed linears = F.linear (bf16 exactly, fp32 to rounding), the native fp32
RMSNorm / rotary / SiLU·up = torch's (rotary bit for bit), the inverse-CDF sampler draws by the
probabilities — and the backend with all of them on gives the plain backend's completions on real SmolLM2."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from harness.backends import BackendError, Request, get_backend
from harness.backends.hf_kernels import (
    GROUPED,
    AppendedInPlaceCache,
    ReusedBuffersCache,
    grouped_attention,
    native_elementwise,
    native_linear_available,
    pack_linears,
    packed_supported,
    sample_rows,
    use_native_elementwise,
)
from harness.bench.nucleus import (
    GOAL,
    SHARE_GOAL,
    cached_prompt_length,
    ratio_interval,
    share_interval,
    step_seconds,
)
from harness.decoding import get_preset

needs_packed_bf16 = pytest.mark.skipif(not packed_supported(torch.bfloat16),
                                       reason="this CPU has no oneDNN packed bf16 linear (AVX2 only)")
needs_packed_fp32 = pytest.mark.skipif(not packed_supported(torch.float32), reason="torch without oneDNN")
needs_native = pytest.mark.skipif(native_elementwise() is None, reason="no C++ compiler for hf_native.cpp")
# Packed fp32 sums in another order than aten's matmul: outputs agree to float32 rounding (SmolLM2's
# logits measured 7e-5 apart at magnitude ~20); bf16 rounds both to the same value.
PACKED_TOLERANCE = {torch.bfloat16: {"rtol": 0, "atol": 0}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
PACKED_DTYPES = [pytest.param(torch.bfloat16, marks=needs_packed_bf16, id="bf16"),
                 pytest.param(torch.float32, marks=needs_packed_fp32, id="fp32")]


@pytest.mark.parametrize("q_len,groups,mask_heads", [(1, 3, 1), (5, 3, 1), (4, 1, 1), (3, 2, 4)])
def test_grouped_attention_equals_eager(q_len, groups, mask_heads):
    torch.manual_seed(0)
    batch, kv_heads, k_len, dim = 2, 2, 7, 16
    heads = kv_heads * groups
    query = torch.randn(batch, q_len, heads, dim).transpose(1, 2)  # as the model hands it: a transposed view
    key, value = torch.randn(batch, kv_heads, k_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    mask = torch.zeros(batch, min(mask_heads, heads), q_len, k_len + 2)  # longer than k_len: sliced
    mask[0, ..., 1] = torch.finfo(torch.float32).min
    mask = mask.expand(batch, heads, q_len, k_len + 2).contiguous() if mask_heads > 1 else mask
    module = SimpleNamespace(num_key_value_groups=groups, training=False)
    want, want_weights = eager_attention_forward(module, query, key, value, mask[..., :k_len], 0.25)
    got, got_weights = grouped_attention(module, query, key, value, mask, 0.25)
    assert got.shape == want.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-6, atol=1e-6)
    assert float(got_weights[0, :, :, 1].abs().max()) == 0.0  # the masked key gets no weight


def test_grouped_attention_refuses_what_it_does_not_compute():
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(NotImplementedError, match="softcap"):
        grouped_attention(SimpleNamespace(training=False), q, q, q, None, 1.0, softcap=30.0)


@pytest.mark.parametrize("kind", [ReusedBuffersCache, AppendedInPlaceCache])
def test_cpu_caches_equal_dynamic_cache(kind):
    """Prefill, single steps past a buffer's growth, a crop and a batch selection: keys and values
    equal DynamicCache's after every update. Reused buffers: contiguous, never the tensor the update
    read. In place: a prefix view of the buffer the previous step returned (no copy) except where it
    grows or after a batch selection."""
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    torch.manual_seed(1)
    reused = kind(config)
    plain = DynamicCache(config=config)
    lengths = [5] + [1] * 300 + [300]  # the last update outgrows any buffer
    rows, moved = 3, 0
    for step, n in enumerate(lengths):
        for layer in range(2):
            k, v = torch.randn(rows, 2, n, 8), torch.randn(rows, 2, n, 6)  # values may have another head size
            before = reused.layers[layer].keys if step else None
            got_k, got_v = reused.update(k, v, layer)
            want_k, want_v = plain.update(k, v, layer)
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
            if kind is ReusedBuffersCache:
                assert got_k.is_contiguous() and got_v.is_contiguous()
                if before is not None:
                    assert got_k.data_ptr() != before.data_ptr()
            elif before is not None:
                moved += got_k.data_ptr() != before.data_ptr()
        if step == 100:
            reused.crop(-4), plain.crop(-4)
        if step == 200:
            index = torch.tensor([2, 0])
            reused.batch_select_indices(index), plain.batch_select_indices(index)
            rows = 2
    if kind is AppendedInPlaceCache:  # per layer: the batch selection's copy and the last update's growth
        assert moved == 2 * 2
    assert reused.get_seq_length() == plain.get_seq_length() == sum(lengths) - 4


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_linears_compute_f_linear(dtype):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16, bias=False)).to(dtype)
    x = torch.randn(5, 3, 32, dtype=dtype)
    want = model(x)
    assert pack_linears(model) == 2
    torch.testing.assert_close(model(x), want, **PACKED_TOLERANCE[dtype])
    assert pack_linears(torch.nn.Linear(4, 4).to(torch.float16)) == 0  # no packed fp16 path: stays plain


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_model_gives_the_plain_models_logits(family, dtype):
    """A small random Llama (no biases) / Qwen2 (q, k, v biases): fused q/k/v, fused gate/up and
    packed linears give the plain model's logits (bf16 exactly, fp32 to rounding) and its greedy
    tokens, over a prefill and cached steps."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(4)
    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = kind(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    plain = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    fast = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    fast.load_state_dict(plain.state_dict())
    assert pack_linears(fast) == 2 * 7 + 1
    assert (fast.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    ids = torch.randint(0, 300, (3, 9))
    with torch.inference_mode():
        want = plain.generate(ids, do_sample=False, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
        got = fast.generate(ids, do_sample=False, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, **PACKED_TOLERANCE[dtype])
    x = torch.randn(2, 64, dtype=dtype)  # k_proj on an input q_proj never saw: its own matmul
    attention, reference = fast.model.layers[1].self_attn, plain.model.layers[1].self_attn
    assert torch.equal(attention.k_proj(x), reference.k_proj(x))


@needs_native
def test_native_passes_compute_what_torch_computes():
    """rms_norm = LlamaRMSNorm (float32 rounding: its sum runs in another order), rotary on the query
    and key heads of one fused row = apply_rotary_pos_emb bit for bit (the same products and sums),
    silu_mul = F.silu(gate) * up to float32 rounding, extreme gates included."""
    lib = native_elementwise()
    torch.manual_seed(5)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96) + 0.5
    x = torch.randn(7, 96) * 3
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), 7, 96, 96, norm.weight.data_ptr(), 1e-5, out.data_ptr(), 96)
    torch.testing.assert_close(out, norm(x), rtol=2e-6, atol=1e-6)

    batch, seq, q_heads, kv_heads, head_dim = 2, 3, 4, 2, 16
    qkv = torch.randn(batch, seq, (q_heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(batch, seq, head_dim // 2) * 6.0
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    want_q, want_k = apply_rotary_pos_emb(q.reshape(batch, seq, q_heads, head_dim).transpose(1, 2),
                                          k.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2), cos, sin)
    value = qkv[..., (q_heads + kv_heads) * head_dim:].clone()
    lib.rotary(qkv.data_ptr(), batch, seq, qkv.shape[-1], q_heads + kv_heads, head_dim, cos.data_ptr(),
               sin.data_ptr(), seq * head_dim, head_dim)
    got_q, got_k, got_v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    assert torch.equal(got_q.reshape(batch, seq, q_heads, head_dim).transpose(1, 2), want_q)
    assert torch.equal(got_k.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2), want_k)
    assert torch.equal(got_v, value)  # the value heads are left alone
    shared = qkv.clone()  # one row of positions for the whole batch (batch stride 0)
    want_q, _ = apply_rotary_pos_emb(shared[..., :q_heads * head_dim].reshape(batch, seq, q_heads, head_dim)
                                     .transpose(1, 2), want_k, cos[:1], sin[:1])
    lib.rotary(shared.data_ptr(), batch, seq, qkv.shape[-1], q_heads, head_dim, cos.data_ptr(), sin.data_ptr(), 0,
               head_dim)
    assert torch.equal(shared[..., :q_heads * head_dim].reshape(batch, seq, q_heads, head_dim).transpose(1, 2), want_q)

    gate_up = torch.randn(5, 2 * 40) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    hidden = torch.empty(5, 40)
    lib.silu_mul(gate_up.data_ptr(), 5, 80, 40, hidden.data_ptr(), 40)
    torch.testing.assert_close(hidden, torch.nn.functional.silu(gate_up[:, :40]) * gate_up[:, 40:],
                               rtol=1e-6, atol=1e-7)


class CountingLibrary:
    """native_elementwise()'s library, counting the native calls made through it."""

    def __init__(self, lib):
        self.lib, self.calls = lib, 0

    def __getattr__(self, name):
        self.calls += 1
        return getattr(self.lib, name)


@pytest.mark.skipif(not native_linear_available(), reason="no C++ compiler, or a CPU without AVX2 and FMA")
@pytest.mark.parametrize("rows,n,k", [(1, 7, 8), (6, 10, 64), (16, 33, 96), (13, 2, 1536)])
def test_native_linear_equals_float64(rows, n, k):
    """x w^T + b for every remainder of the 6-row and 2-weight-row tiles (1, 6, 16 = 6 + 6 + 4, 13 rows;
    odd weight rows), into a column slice of a wider output with the other columns untouched, to
    float32 rounding; without a bias; added to what the output holds; and a K that is not a multiple
    of 8 refused with nothing written."""
    lib = native_elementwise()
    generator = torch.Generator().manual_seed(rows * n)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((rows, k), (n, k), (n,)))
    out = torch.full((rows, n + 5), 7.0)
    sliced = out[:, 3:]
    assert lib.linear_rows(x.data_ptr(), rows, k, w.data_ptr(), n, b.data_ptr(), sliced.data_ptr(), n + 5, 0, 2) == 0
    torch.testing.assert_close(out[:, 3:3 + n], (x.double() @ w.double().T + b.double()).float(), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)
    assert (out[:, :3] == 7.0).all() and (out[:, 3 + n:] == 7.0).all()
    plain = torch.empty(rows, n)
    assert lib.linear_rows(x.data_ptr(), rows, k, w.data_ptr(), n, None, plain.data_ptr(), n, 0, 1) == 0
    torch.testing.assert_close(plain, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5 * k ** 0.5)
    residual = torch.randn(rows, n, generator=generator)
    summed = residual.clone()  # accumulate: out += x w^T
    assert lib.linear_rows(x.data_ptr(), rows, k, w.data_ptr(), n, None, summed.data_ptr(), n, 1, 2) == 0
    torch.testing.assert_close(summed, (residual.double() + x.double() @ w.double().T).float(), rtol=1e-5,
                               atol=1e-5 * k ** 0.5)
    out.fill_(7.0)
    assert lib.linear_rows(x.data_ptr(), rows, k - 1, w.data_ptr(), n, None, out.data_ptr(), n + 5, 0, 1) == -1
    assert (out == 7.0).all()


@needs_native
@pytest.mark.parametrize("groups,dim,length", [(3, 64, 37), (1, 16, 8), (4, 24, 5)])
def test_native_decode_attention_equals_sdpa(groups, dim, length):
    """One query position per row against a strided prefix view of a cache buffer: torch's SDPA to
    float32 rounding (key rows in tiles of 8 and the rest, head dims that are and are not a multiple
    of 8); more query heads per key-value head than the kernel holds: None (the caller falls back)."""
    from harness.backends.hf_kernels import _native_decode_attention

    torch.manual_seed(8)
    batch, kv_heads = 3, 2
    heads = groups * kv_heads
    buffer_k, buffer_v = (torch.randn(batch, kv_heads, length + 11, dim) * 2 for _ in range(2))
    key, value = buffer_k[:, :, :length], buffer_v[:, :, :length]  # strided, as the in-place cache hands them
    query = torch.randn(batch, 1, heads, dim).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=0.3, enable_gqa=True)
    got = _native_decode_attention(query, key, value, 0.3)
    exact = torch.nn.functional.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=0.3,
                                                             enable_gqa=True).squeeze(2)
    torch.testing.assert_close(got, want.squeeze(2), rtol=1e-4, atol=1e-5)
    assert (got.double() - exact).abs().max() <= 4 * (want.squeeze(2).double() - exact).abs().max() + 1e-6
    wide = torch.randn(1, 17, 1, 8)  # 17 query heads on one key-value head: over the kernel's 16
    assert _native_decode_attention(wide, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 1.0) is None


@needs_native
@needs_packed_fp32
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_native_model_gives_the_plain_models_logits(family, monkeypatch):
    """Packed linears + the native passes on a small random fp32 Llama (norms, MLPs and attentions
    swapped) / Qwen2 (norms and MLPs: its attention is not one whose forward the native one
    replicates) give the plain model's logits to float32 rounding and its greedy tokens, through
    the native calls (counted); swapping again changes nothing, and a norm whose weight is no
    longer float32 runs its own forward."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    import harness.backends.hf_kernels as kernels

    torch.manual_seed(6)
    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = kind(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    plain = AutoModelForCausalLM.from_config(config).eval()
    fast = AutoModelForCausalLM.from_config(config).eval()
    fast.load_state_dict(plain.state_dict())
    pack_linears(fast)
    # per layer: 2 norms, the MLP, Llama's attention, and (native linear) o_proj and down_proj, then (Llama,
    # native linear) the whole layer; the final norm and (native linear) lm_head
    linear = native_linear_available()
    per_layer = {"llama": 4, "qwen2": 3}[family] + (2 + (family == "llama")) * linear
    assert use_native_elementwise(fast) == 2 * per_layer + 1 + linear
    assert use_native_elementwise(fast) == 0  # already swapped: left as they are
    counting = CountingLibrary(native_elementwise())
    monkeypatch.setattr(kernels, "native_elementwise", lambda: counting)
    own_layer_calls = []  # a fused layer's own forward (the modules' passes one by one)
    for layer in fast.model.layers:
        if "torch_forward" in vars(layer):
            own = layer.torch_forward
            layer.torch_forward = lambda *a, own=own, **k: own_layer_calls.append(1) or own(*a, **k)
    ids = torch.randint(0, 300, (3, 9))
    with torch.inference_mode():
        want = plain.generate(ids, do_sample=False, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
        got = fast.generate(ids, do_sample=False, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    # every swapped norm / MLP / attention at every forward (a prefill and 4 steps), Llama's decode attention at
    # each step; the native linears at the 4 decode steps only (3 rows; the prefill's 27 go to oneDNN): q, k, v
    # (Llama), gate, up, o_proj, down_proj per layer and lm_head
    elementwise = {"llama": 5 * (2 * 4 + 1) + 4 * 2, "qwen2": 5 * (2 * 3 + 1)}[family]
    assert counting.calls == elementwise + linear * 4 * (2 * {"llama": 7, "qwen2": 4}[family] + 1)
    # transformers' default cache: no in-place buffer for a fused layer to append to, so its own forward each time
    assert len(own_layer_calls) == (5 * 2 if family == "llama" and linear else 0)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls, own_layer_calls[:] = counting.calls, []
    with torch.inference_mode():  # the in-place cache: a fused layer's decode step is one native call
        cached = fast.generate(ids, do_sample=False, max_new_tokens=5, output_logits=True,
                               return_dict_in_generate=True, past_key_values=AppendedInPlaceCache(fast.config))
    if family == "llama" and linear:  # own forwards at the prefill only (its 2 x 4 passes and the final norm);
        assert len(own_layer_calls) == 2  # then a step: 2 layers in one call each, the final norm, lm_head
        assert counting.calls - calls == 2 * 4 + 1 + 4 * (2 + 1 + 1)
    assert torch.equal(cached.sequences, want.sequences)
    for a, b in zip(cached.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 4, 64)  # with autograd on, a swapped module runs its own forward: its weight gets a gradient
    norm = fast.model.layers[0].input_layernorm
    assert norm.forward.__func__ is not norm.torch_forward.__func__
    norm(x).sum().backward()
    assert norm.weight.grad is not None
    norm.to(torch.bfloat16)
    calls = counting.calls
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), norm.torch_forward(x))
    assert counting.calls == calls


@needs_native
@needs_packed_fp32
def test_native_swap_leaves_other_math_alone():
    """A module is swapped only where the native pass computes its forward: an RMSNorm scaling by
    1 + weight (Gemma's), a gated MLP with GELU, and bf16 modules keep their own forwards."""
    from transformers import AutoModelForCausalLM

    class OffsetRMSNorm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) / self.weight * (1.0 + self.weight)

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu")
    model = AutoModelForCausalLM.from_config(config).eval()
    model.model.norm = OffsetRMSNorm(32)
    model.model.norm.weight.data = torch.rand(32) + 0.5
    pack_linears(model)
    # the layer's two norms and its attention (and with the native linear o_proj, down_proj and lm_head)
    assert use_native_elementwise(model) == 3 + 3 * native_linear_available()
    assert "torch_forward" not in vars(model.model.norm) and "torch_forward" not in vars(model.model.layers[0].mlp)
    bf16 = torch.nn.Sequential(LlamaRMSNorm(32).to(torch.bfloat16))
    assert use_native_elementwise(bf16) == 0


def test_sample_rows_draws_by_the_probabilities():
    """Frequencies within 5 standard errors of the probabilities, zero-mass tokens (in the middle
    and at the end) never drawn, unnormalised rows accepted, and each row's draw depends only on
    its own generator."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = 20000
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    counts = torch.zeros(5)
    for _ in range(draws // 8):
        counts += torch.bincount(sample_rows(3.0 * probs.expand(8, -1), gens), minlength=5)
    assert counts[1] == counts[4] == 0
    for p, c in zip(probs.tolist(), counts.tolist(), strict=True):
        assert abs(c / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-12
    wide = torch.zeros(200)  # 200 tokens in blocks of 64 (the last one padded); the second block empty
    wide[[0, 130, 199]] = torch.tensor([0.2, 0.5, 0.3])
    counts = torch.zeros(200)
    for _ in range(draws // 8):
        counts += torch.bincount(sample_rows(wide.expand(8, -1), gens), minlength=200)
    assert set(counts.nonzero().squeeze(-1).tolist()) == {0, 130, 199}
    for i in (0, 130, 199):
        p = float(wide[i])
        assert abs(counts[i] / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws)
    rows = torch.softmax(torch.randn(4, 1000), -1)
    one = sample_rows(rows, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)])
    alone = sample_rows(rows[2:3], [torch.Generator().manual_seed(3)])
    assert one[2] == alone[0]
    again = sample_rows(rows, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)])
    assert torch.equal(one, again)


def test_sample_rows_when_rounding_reaches_the_total():
    """u * total can round up to the total: the draw is then the last token with mass, never a
    zero-mass token after it."""
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    real_rand = torch.rand
    try:
        torch.rand = lambda *a, **k: torch.tensor([1.0])  # the rounding case, forced
        assert sample_rows(probs, [gen]).tolist() == [1]
    finally:
        torch.rand = real_rand


def test_hf_linear_option_is_checked(smollm2_path):
    with pytest.raises(BackendError, match="unknown linear 'fused'"):
        get_backend("hf", str(smollm2_path), linear="fused")
    fp32 = get_backend("hf", str(smollm2_path), dtype="float32")  # auto: packed where oneDNN runs fp32
    assert fp32.packed_linears == (211 if packed_supported(torch.float32) else 0)  # 30 layers x 7 + lm_head
    assert get_backend("hf", str(smollm2_path), dtype="float32", linear="plain").packed_linears == 0
    with pytest.raises(BackendError, match="unknown elementwise 'fused'"):
        get_backend("hf", str(smollm2_path), elementwise="fused")
    if native_elementwise() is not None and packed_supported(torch.float32):
        # 61 norms, 30 MLPs, 30 attentions; with the native linear also 30 o_proj, 30 down_proj, lm_head and
        # the 30 decoder layers
        assert fp32.native_modules == (212 if native_linear_available() else 121)
        assert get_backend("hf", str(smollm2_path), dtype="float32", elementwise="torch").native_modules == 0
    with pytest.raises(BackendError, match="elementwise=native: no module was swapped"):
        get_backend("hf", str(smollm2_path), dtype="bfloat16", elementwise="native")
    if not packed_supported(torch.bfloat16):  # an AVX2-only CPU: auto stays plain, asking for packed is an error
        assert get_backend("hf", str(smollm2_path), dtype="bfloat16").packed_linears == 0
        with pytest.raises(BackendError, match="no oneDNN packed bfloat16 linear"):
            get_backend("hf", str(smollm2_path), dtype="bfloat16", linear="packed")


def completions_of_both(fast, plain, questions: list[str], max_tokens: int) -> dict:
    """Each backend's completions of the same chat requests (greedy, default and autodeco; 3 seeded
    samples per question), in one order: {"fast": [...], "plain": [...]}."""
    tok = fast.tokenizer
    requests = [Request(key=f"t/{i}/{preset}", preset=get_preset(preset), seed=1, n=3, max_tokens=max_tokens,
                        prompt=tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True))
                for i, q in enumerate(questions) for preset in ("greedy", "default", "autodeco")]
    return {name: sorted(b.generate(requests), key=lambda c: (c.key, c.sample_index))
            for name, b in (("fast", fast), ("plain", plain))}


@pytest.mark.slow
def test_fast_cpu_backend_gives_the_plain_backends_completions(smollm2_path, tmp_path):
    """bf16 SmolLM2 with AutoDeco heads: grouped attention + reused cache + packed linears against
    eager + dynamic cache + plain linears: the same greedy and sampled completions (seeded rows),
    and the same T / P traces to bf16 rounding."""
    from heads.checkpoint import construct

    heads = construct(str(smollm2_path), tmp_path / "ad", seed=3)
    fast = get_backend("hf", str(heads), dtype="bfloat16")
    plain = get_backend("hf", str(heads), dtype="bfloat16", attention="eager", cache="dynamic", linear="plain")
    assert (fast.model.llm.config._attn_implementation, fast.cache) == (GROUPED, "reused")
    assert fast.packed_linears == (211 if packed_supported(torch.bfloat16) else 0)  # SmolLM2: 30 layers x 7 + lm_head
    assert plain.packed_linears == 0
    assert all(p.dtype == torch.float32 for p in fast.model.temp_head.parameters())
    questions = ["What is 12 + 30?", "Write one sentence about rain.", "Name three colours."]
    got = completions_of_both(fast, plain, questions, max_tokens=40)
    assert len(got["fast"]) == 27
    for a, b in zip(got["fast"], got["plain"], strict=True):
        assert (a.key, a.token_ids, a.finish_reason) == (b.key, b.token_ids, b.finish_reason)
        if a.temperatures is not None:
            assert a.temperatures == pytest.approx(b.temperatures, abs=2e-2)
            assert a.top_ps == pytest.approx(b.top_ps, abs=2e-2)


@pytest.mark.slow
@needs_native
@needs_packed_fp32
def test_fast_fp32_backend_gives_the_plain_backends_completions(smollm2_path, tmp_path):
    """fp32 SmolLM2 with AutoDeco heads (an AVX2-only CPU's auto dtype): packed linears + native
    RMSNorm / rotary / SiLU·up / decode attention / decode linears, the layers' decode steps as one
    native call each, + in-place cache against plain linears, torch's
    ops and a dynamic cache: the same greedy completions; sampled ones the same but where a float32
    rounding of the logits moves a draw across a boundary (measured: 2 of 60 completions of 32
    tokens, at tokens 5 and 18), so at least 9 of the 12 here, each pair's T / P traces equal to
    float32 rounding up to where they part."""
    from heads.checkpoint import construct

    heads = construct(str(smollm2_path), tmp_path / "ad", seed=3)
    fast = get_backend("hf", str(heads), dtype="float32")
    plain = get_backend("hf", str(heads), dtype="float32", cache="dynamic", linear="plain", elementwise="torch")
    assert (fast.native_modules, fast.cache, plain.native_modules) == (212 if native_linear_available() else 121,
                                                                       "inplace", 0)
    got = completions_of_both(fast, plain, ["What is 12 + 30?", "Write one sentence about rain."], max_tokens=32)
    assert len(got["fast"]) == 18
    identical_sampled = 0
    for a, b in zip(got["fast"], got["plain"], strict=True):
        assert (a.key, a.sample_index) == (b.key, b.sample_index)
        if a.key.endswith("greedy"):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            continue
        identical_sampled += a.token_ids == b.token_ids
        shared = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                      min(len(a.token_ids), len(b.token_ids)))
        if a.temperatures is not None:  # the step that draws token i sees the same prefix up to i
            assert a.temperatures[:shared + 1] == pytest.approx(b.temperatures[:shared + 1], abs=1e-4)
            assert a.top_ps[:shared + 1] == pytest.approx(b.top_ps[:shared + 1], abs=1e-4)
    assert identical_sampled >= 9


def test_bench_nucleus_verdict_needs_the_whole_interval():
    """A cell meets the 1.01 goal only when its 95% interval lies at or below it, misses only when
    the interval lies above; a median on one side of 1.01 with noise across it settles nothing."""
    tight_under = ratio_interval([1.001, 1.003, 0.999, 1.002, 1.000])
    assert tight_under["verdict"] == "meets" and tight_under["ratio_ci"][1] <= GOAL
    assert tight_under["ratio_mean"] == pytest.approx(math.exp(sum(map(math.log, [1.001, 1.003, 0.999, 1.002,
                                                                                  1.0])) / 5))
    assert ratio_interval([1.05, 1.06, 1.04, 1.05])["verdict"] == "misses"
    noisy = ratio_interval([0.97, 1.05, 1.00, 1.04, 0.98])  # median 1.00 < 1.01, interval across it
    assert noisy["verdict"] == "undecided" and noisy["ratio_ci"][0] < GOAL < noisy["ratio_ci"][1]
    one = ratio_interval([0.9])
    assert one["verdict"] == "undecided" and one["ratio_ci"] is None and one["ratio_mean"] == pytest.approx(0.9)


def test_bench_nucleus_vllm_prompts_leave_one_token_past_the_cached_blocks():
    """vLLM recomputes a wholly cached prompt's last block: 256 tokens in blocks of 128 recompute 128,
    257 recompute one."""
    assert [cached_prompt_length(c, 128) for c in (24, 127, 128, 256, 300, 385)] == [24, 127, 129, 257, 257, 385]


def test_bench_nucleus_names_wall_intervals_below_one(capsys):
    """A wall-time interval wholly below 1 (AutoDeco faster than default sampling) is flagged as noise:
    AutoDeco only adds work to a step. An interval reaching 1 is not."""
    import types

    from harness.bench.nucleus import _print_table

    def cell(verdict, ratio_ci, share_verdict, share):
        return {"ratio": 0.95, "ratio_ci": ratio_ci, "verdict": verdict, "share_mean": share,
                "share_ci": [share * 0.9, share * 1.1], "share_verdict": share_verdict, "generation_ms": 2.0}

    results = {"vllm@2": {"step_ms": 170.0, "prompt_tokens": 257, "settings": {
        "P=0.8": cell("meets", [0.9, 0.99], "misses", 0.012), "P=0.9": cell("meets", [0.95, 1.0], "meets", 0.008),
        "P=0.99": cell("undecided", [0.9, 1.05], "misses", 0.02)}}}
    summary = {"worst_ratio": 0.95, "verdicts": {"meets": 2, "misses": 0, "undecided": 1}, "worst_share": 0.02,
               "share_verdicts": {"meets": 1, "misses": 2, "undecided": 0}}
    args = types.SimpleNamespace(model="smollm2", batch_size=16, context=256, new_tokens=32, repeats=6)
    _print_table(results, ["P=0.8", "P=0.9", "P=0.99"], "float32", args, summary)
    out = capsys.readouterr().out
    assert "context 256 (vllm: 257, whole KV blocks + 1)" in out
    assert "in generation 2.000 ms = 1.20% [1.08, 1.32] -" in out
    assert out.strip().splitlines()[-1].endswith("host noise, not findings): vllm@2 P=0.8")


def test_bench_nucleus_step_share_pairs_each_autodeco_run_with_its_default_run():
    """A repeat's share is the median of its AutoDeco run's step times over its own default run's
    step, the median spacing of that run's step starts (not pooled, not its wall time per token: with
    three spacings a slow first step does not count); the verdict against 1% needs the whole
    interval, as the ratio's."""
    heads = [[0.002, 0.001, 0.0012], [0.004, 0.0011, 0.0013]]  # medians 1.2 and 1.3 ms
    starts = [[5.0, 5.5, 5.6, 5.7], [9.0, 9.08, 9.16, 9.36]]  # steps 100 and 80 ms (5.0: a slow first step)
    assert step_seconds(starts[0]) == pytest.approx(0.1) and step_seconds(starts[1]) == pytest.approx(0.08)
    got = share_interval(heads, starts)
    assert got["shares"] == pytest.approx([0.012, 0.01625])
    assert got["default_step_ms"] == pytest.approx([100.0, 80.0]) and got["generation_ms"] == pytest.approx(1.25)
    assert got["share_mean"] == pytest.approx(math.sqrt(0.012 * 0.01625))
    assert got["share_verdict"] == "undecided" and got["share_ci"][0] < got["share_mean"] < got["share_ci"][1]
    steady = [[0.0, 0.1, 0.2], [0.0, 0.101, 0.202], [0.0, 0.0995, 0.199]]
    tight = share_interval([[0.0013]] * 3, steady)
    assert tight["share_verdict"] == "misses" and tight["share_ci"][0] > SHARE_GOAL
    assert share_interval([[0.0008]] * 3, steady)["share_verdict"] == "meets"
    with pytest.raises(ValueError):  # a run without its pair is a bug, not a shorter mean
        share_interval(heads, starts[:1])


@pytest.mark.slow
def test_bench_nucleus_times_the_backends_own_path(tmp_path):
    """`bench nucleus` at a tiny size: the hf child runs the backend (kernels, cache, row sampler) with
    the default and autodeco presets from one prefill, and reports the ratio, AutoDeco's own step (in
    generation, and natively and by its torch steps on one step's logits) and the default decode
    step it was measured against."""
    import json

    from harness.cli import main

    assert main(["bench", "nucleus", "--backends", "hf", "--threads", "1", "--top-ps", "0.9", "--repeats", "1",
                 "--new-tokens", "3", "--context", "24", "--batch-size", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_nucleus.json").read_text())
    column = result["results"]["hf@1"]
    row = column["settings"]["P=0.9"]
    assert row["ratio"] > 0 and len(row["default_seconds"]) == len(row["autodeco_seconds"]) == 1
    assert row["verdict"] == "undecided" and result["verdicts"] == {"meets": 0, "misses": 0, "undecided": 1}
    assert column["step_ms"] == pytest.approx(row["default_step_ms"][0])  # one default run: its median step
    assert 0 < column["step_ms"] < 1e3 * row["default_seconds"][0] / 2  # 3 steps, 2 spacings: under half the wall
    assert row["top_p_mean"] == pytest.approx(0.9, abs=1e-4)
    assert 0 <= row["slow_rows"] <= 2
    assert row["generation_ms"] > 0 and row["autodeco_ms"] > 0 and row["torch_steps_ms"] > 0
    assert row["shares"] == [pytest.approx(row["generation_ms"] / column["step_ms"])]  # one repeat, 3 steps
    assert row["share_verdict"] == "undecided" and row["share_ci"] is None
    assert result["share_verdicts"] == {"meets": 0, "misses": 0, "undecided": 1}


def test_matmul_throughput_times_the_packed_linear():
    """The compute bound's rate: FLOP/s of a batch-rows linear, more rows doing more work per
    weight read (a batch of 16 measured 6x a single row's rate here)."""
    from harness.bench.engine import matmul_throughput

    one, sixteen = (matmul_throughput(torch.float32, batch, size=256, calls=50) for batch in (1, 16))
    assert 1e8 < one < sixteen < 1e14


@pytest.mark.slow
def test_decode_against_the_bound_runs_the_backends_generate(smollm2_path):
    """bench backends' fixed-shape decode on hf: exactly the asked tokens through the backend's own
    generate (no EOS), a bound from the bandwidth, and the fraction between them; per repeat, against
    the bandwidth read just before it, the median repeat on top and the interval over the repeats;
    the compute bound from a given matmul rate."""
    from harness.bench.engine import decode_vs_bound

    backend = get_backend("hf", str(smollm2_path))
    prompt = backend.tokenizer("The rain in Spain", add_special_tokens=False).input_ids
    got = decode_vs_bound(backend, prompt, batch=2, tokens=4, bandwidth=20e9, repeats=3,
                          compute=lambda dtype, batch: 1e11)
    assert got["dtype"] == str(backend.llm.dtype).removeprefix("torch.") and got["new_tokens"] == 4
    assert got["seconds_all_tokens"] > got["seconds_one_token"]
    assert 0 < got["seconds_decode_steps"] < got["seconds_all_tokens"]  # hf: the steps alone, no prefill
    assert got["tokens_per_second"] == pytest.approx(2 * 3 / got["seconds_decode_steps"])
    assert got["bound_tokens_per_second"] == pytest.approx(2 * 20e9 / got["bytes_per_step"])
    assert got["fraction_of_bound"] == pytest.approx(got["tokens_per_second"] / got["bound_tokens_per_second"])
    config = backend.llm.config  # the compute bound: 2 x batch x weights + attention over the mean context
    flops = 2 * 2 * got["weight_bytes"] / 4 + 4 * 2 * config.num_hidden_layers * config.num_attention_heads * (
        config.hidden_size // config.num_attention_heads) * (len(prompt) + 2)
    assert got["dtype"] != "float32" or got["flops_per_step"] == pytest.approx(flops)
    assert got["compute_bound_tokens_per_second"] == pytest.approx(2 * 1e11 / got["flops_per_step"])
    assert got["fraction_of_compute_bound"] == pytest.approx(got["tokens_per_second"]
                                                             / got["compute_bound_tokens_per_second"])
    fractions = sorted(r["fraction_of_bound"] for r in got["repeats"])
    assert len(fractions) == 3 and got["fraction_of_bound"] == fractions[1]
    low, high = got["fraction_ci"]
    assert low < got["fraction_mean"] < high and fractions[0] <= got["fraction_mean"] <= fractions[2]
    measured = decode_vs_bound(backend, prompt, batch=2, tokens=4, repeats=2)  # the bandwidth read before each
    assert "compute_bound_tokens_per_second" not in measured
    reads = [r["read_bandwidth_bytes_per_second"] for r in measured["repeats"]]
    assert len(reads) == 2 and all(read > 1e8 for read in reads)
    for r in measured["repeats"]:
        assert r["bound_tokens_per_second"] == pytest.approx(2 * r["read_bandwidth_bytes_per_second"]
                                                             / measured["bytes_per_step"])
