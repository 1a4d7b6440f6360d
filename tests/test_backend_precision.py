"""Backend precision and KV cache: bf16 only where the CPU has it natively, the `dtype` / `cache`
options, the static cache equal to the dynamic one, and bf16 against fp32 on the demo's problems."""

from __future__ import annotations

import pytest
import torch

from harness.backends import BackendError, Request, get_backend
from harness.backends.dtype import cpu_flags, native_bf16, resolve_dtype, torch_dtype
from harness.backends.hf import default_attention
from harness.backends.hf_kernels import AppendedInPlaceCache, ReusedBuffersCache, packed_supported
from harness.decoding import get_preset

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("extra,native", [("avx512_bf16 avx512_vnni", True), ("amx_bf16 amx_tile", True),
                                          ("avx512_vnni", False), ("", False)])
def test_native_bf16_from_cpu_flags(tmp_path, extra, native):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    assert native_bf16(info) is native
    assert "avx512f" in cpu_flags(info)


def test_resolve_dtype(monkeypatch):
    import harness.backends.dtype as dtype

    monkeypatch.setattr(dtype, "native_bf16", lambda: True)
    assert resolve_dtype("auto") == "bfloat16" and torch_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(dtype, "native_bf16", lambda: False)
    assert resolve_dtype("auto") == "float32"
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(BackendError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_this_machine_matches_its_flags():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_hf_options_are_checked(smollm2_path):
    with pytest.raises(BackendError, match="unknown cache 'paged'"):
        get_backend("hf", str(smollm2_path), cache="paged")
    with pytest.raises(BackendError, match="unknown dtype"):
        get_backend("hf", str(smollm2_path), dtype="double")


@pytest.fixture(scope="module")
def autodeco_heads(tmp_path_factory, smollm2_path):
    from heads.checkpoint import construct

    return construct(str(smollm2_path), tmp_path_factory.mktemp("heads") / "ad", seed=3)


def _requests(prompt_of, preset: str, n: int, max_tokens: int, stop=()):
    questions = ["What is 12 + 30?", "A shop sells 7 pens for 21 dollars. What does one pen cost?"]
    return [Request(key=f"t/{i}", prompt=prompt_of(q), preset=get_preset(preset), seed=5, n=n,
                    max_tokens=max_tokens, stop=tuple(stop)) for i, q in enumerate(questions)]


def test_cpu_caches_equal_dynamic_cache(autodeco_heads):
    """AutoDeco sampling (heads on, per-row seeded sampler, logits_to_keep=1) and greedy with a stop
    string give the same completions and traces with the pre-allocated cache, the in-place one, the
    reused buffers and the growing one."""
    backends = {cache: get_backend("hf", str(autodeco_heads), dtype="float32", cache=cache)
                for cache in ("dynamic", "static", "inplace", "reused")}
    assert backends["static"].cache_implementation() == "static"
    assert backends["dynamic"].cache_implementation() is None and backends["dynamic"].new_cache() is None
    tok = backends["static"].tokenizer

    def prompt_of(question):
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)

    for preset, n, stop in (("autodeco", 3, ()), ("greedy", 1, ("\n",))):
        requests = _requests(prompt_of, preset, n, 12, stop)
        got = {cache: sorted(b.generate(requests), key=lambda c: (c.key, c.sample_index))
               for cache, b in backends.items()}
        assert len(got["dynamic"]) == len(requests) * n
        for cache in ("static", "inplace", "reused"):
            for a, b in zip(got[cache], got["dynamic"], strict=True):
                assert (a.text, a.n_tokens, a.finish_reason) == (b.text, b.n_tokens, b.finish_reason), cache
                if preset == "autodeco":
                    assert a.temperatures == pytest.approx(b.temperatures, abs=1e-5)
                    assert a.top_ps == pytest.approx(b.top_ps, abs=1e-5)


def test_cache_and_attention_choices(smollm2_path):
    backend = get_backend("hf", str(smollm2_path), dtype="float32")
    assert backend.static_ok  # Llama: transformers' StaticCache supports it
    assert backend.cache_implementation() is None  # auto: a growing cache (measured faster here) ...
    assert backend.model.config._attn_implementation == "sdpa"
    assert backend.cache == "inplace" and isinstance(backend.new_cache(), AppendedInPlaceCache)  # ... in place
    eager = get_backend("hf", str(smollm2_path), dtype="float32", attention="eager")
    assert eager.cache == "reused" and isinstance(eager.new_cache(), ReusedBuffersCache)  # bmm copies strided batches
    assert backend.packed_linears == (211 if packed_supported(torch.float32) else 0)  # oneDNN-packed fp32
    bf16 = get_backend("hf", str(smollm2_path), dtype="bfloat16", cache="static", attention="eager")
    assert bf16.cache_implementation() == "static" and bf16.new_cache() is None
    assert bf16.model.config._attn_implementation == "eager"
    assert default_attention(torch.bfloat16, "cpu", "llama") == "grouped-eager"  # torch's bf16 SDPA is slow on CPU
    assert default_attention(torch.bfloat16, "cpu", "gemma2") == "eager"  # soft-capped: plain eager
    assert default_attention(torch.bfloat16, "cuda", "llama") is None and default_attention(torch.float32, "cpu") is None
    with pytest.raises(BackendError, match="unknown attention"):
        get_backend("hf", str(smollm2_path), attention="flash")


def test_autodeco_heads_stay_float32_on_a_bf16_base(autodeco_heads):
    backend = get_backend("hf", str(autodeco_heads), dtype="bfloat16")
    assert backend.model.llm.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in backend.model.temp_head.parameters())
    assert all(p.dtype == torch.float32 for p in backend.model.top_p_head.parameters())


@pytest.mark.slow
def test_bf16_and_fp32_agree_on_the_demos_problems(smollm2_path):
    """The accuracy check of `autodeco bench precision` (its stated tolerance) on the demo's 16 held-out
    arith problems (128 tokens, as `make demo` evaluates them), hf."""
    from harness.bench.precision import accuracy_check, greedy_texts
    from tasks import get_task

    task = get_task("arith")
    docs = task.docs(limit=16)
    texts = {}
    for dtype in ("float32", "bfloat16"):
        backend = get_backend("hf", str(smollm2_path), dtype=dtype)
        texts[dtype] = greedy_texts(backend, task, docs, max_tokens=128)
        backend.close()
    check = accuracy_check(task, docs, texts["float32"], texts["bfloat16"])
    assert check["passed"], (check, texts)
    assert check["accuracy_reference"] > 0  # the problems are within the model's reach: a real check
