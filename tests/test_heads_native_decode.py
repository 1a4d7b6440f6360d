"""The native AutoDeco decoding step (heads.model.native_decode, ``autodeco_rows``) against the
torch steps it replaces: the same T and P to float32 rounding, and the exact nucleus of its own
z = l / T at its own P, bit for bit, on SmolLM2's real logits, synthetic extremes and rows handed
back to the torch-exp path."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

import heads.model as model
import heads.nucleus as nucleus
from heads.model import AutoDecoModelForCausalLM, decode, native_decode
from heads.modules import TempHead, TopPHead

from .test_heads_nucleus import sorted_reference

pytestmark = pytest.mark.skipif(nucleus.native() is None, reason="no C++ compiler: the native step is not built")


@pytest.fixture(scope="module")
def smollm2_rows(smollm2_path):
    """(hidden [40, H], logits [40, V]) of SmolLM2 at 40 positions of natural text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = ("The history of mathematics spans thousands of years. Early civilizations developed "
            "arithmetic and geometry for trade and astronomy. Question: a train travels 120 kilometres "
            "in 1.5 hours. What is its average speed? Answer: 120 / 1.5 = 80 kilometres per hour.")
    ids = AutoTokenizer.from_pretrained(smollm2_path)(text, return_tensors="pt").input_ids[:, :40]
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = base(ids, output_hidden_states=True)
    return out.hidden_states[-1][0].contiguous(), out.logits[0].contiguous()


def heads(hidden_size: int, *, temperature: float | None = None, top_p: float | None = None, seed: int = 0,
          enhanced: bool = True) -> tuple[TempHead, TopPHead]:
    """Random heads; with ``temperature`` / ``top_p`` their last layer predicts that value for every row."""
    torch.manual_seed(seed)
    temp, top = TempHead(hidden_size), TopPHead(hidden_size, use_enhanced_features=enhanced)
    with torch.no_grad():
        for head, value in ((temp, None if temperature is None else temperature / 2), (top, top_p)):
            torch.nn.init.normal_(head.mlp[0].weight, std=0.05)
            if value is None:
                torch.nn.init.normal_(head.mlp[2].weight, std=0.5)
            else:
                head.mlp[2].weight.zero_()
                head.mlp[2].bias.fill_(float(torch.logit(torch.tensor(value, dtype=torch.float64))))
    return temp, top


def torch_steps(temp, top, hidden, logits):
    """decode's torch steps (the path native_decode replaces)."""
    saved = model.native_decode
    model.native_decode = lambda *args: None
    try:
        return decode(temp, top, hidden, logits, use_temperature=True, use_top_p=True)
    finally:
        model.native_decode = saved


def check_exact(z, temperature, top_p, logits):
    """The native output is the reference nucleus of its own z = l / T at its own P."""
    scaled = logits.float() / temperature.float().clamp_min(1e-6).unsqueeze(-1)
    want = sorted_reference(scaled, top_p.float())
    assert torch.equal(z, want), f"{(z != want).sum()} entries differ"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999])
def test_real_rows_forced_heads_match_the_torch_steps_exactly(smollm2_rows, threads, temperature, top_p):
    """T and P forced (the heads' last layers zero): both paths give the same T, P and logits, bit for
    bit, at the P where trained heads live (most rows on the slow path from P = 0.9 on)."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], temperature=temperature, top_p=top_p)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden, logits)
        z_ref, t_ref, p_ref = torch_steps(temp, top, hidden, logits)
    assert torch.equal(t, t_ref) and torch.equal(p, p_ref)
    assert torch.equal(z, z_ref)
    check_exact(z, t, p, logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_rows_random_heads(smollm2_rows, threads, seed):
    """Random heads (T from ~0 to 2, P from ~0 to ~1 - 1e-7, rows handed back near P = 1): T and P
    within float32 rounding of the torch steps, the nucleus exact for the native T and P."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], seed=seed)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden, logits)
        _, t_ref, p_ref = torch_steps(temp, top, hidden, logits)
    torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    check_exact(z, t, p, logits)


def _count_hand_backs(monkeypatch):
    """Spies on native_decode's two hand-back finishes: {"exact_rows": rows finished by torch's exp
    and nucleus_exact, "whole_rows": rows through nucleus_from_stats}."""
    lib, calls = nucleus.native(), {"exact_rows": 0, "whole_rows": 0}

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def nucleus_exact(self, *args):
            calls["exact_rows"] += args[4]
            return lib.nucleus_exact(*args)

    original = model.nucleus_from_stats

    def whole(z, stats, top_p, inplace=False):
        calls["whole_rows"] += z.shape[0]
        return original(z, stats, top_p, inplace)

    monkeypatch.setattr(model, "native", lambda: Spy())
    monkeypatch.setattr(model, "nucleus_from_stats", whole)
    return calls


@pytest.mark.parametrize("close", [3e-5, 1.0])
def test_rows_handed_back_go_through_the_torch_exp_path(smollm2_rows, monkeypatch, close):
    """Without torch's exp in the native call, a wide closeness margin hands rows back: at 3e-5
    (P = 0.99) with their candidates, finished by torch's exp and nucleus_exact; at 1 whole (even the
    sum above the band is within it), finished by nucleus_from_stats. Either way the result is exact."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], temperature=1.0, top_p=0.99)
    calls = _count_hand_backs(monkeypatch)
    monkeypatch.setattr(model, "CLOSE", close)
    monkeypatch.setattr(model, "torch_exp", lambda: None)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden, logits)
    if close == 1.0:
        assert calls == {"exact_rows": 0, "whole_rows": hidden.shape[0]}
    else:
        assert calls["exact_rows"] >= 10 and calls["exact_rows"] > 2 * calls["whole_rows"], calls
    check_exact(z, t, p, logits)


@pytest.mark.skipif(nucleus.torch_exp() is None, reason="torch's exp is not reachable natively here (no MKL)")
@pytest.mark.parametrize("top_p", [0.95, 0.99, 0.999])
@pytest.mark.parametrize("close", [3e-5, 3e-4])
def test_close_rows_are_settled_natively_with_torch_exp(smollm2_rows, monkeypatch, threads, close, top_p):
    """With torch's exp in the call, the rows a widened margin calls close (the hand-back gets some:
    asserted) are finished inside it instead, to the very output the hand-back gives."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], temperature=1.0, top_p=top_p)
    monkeypatch.setattr(model, "CLOSE", close)
    with torch.inference_mode():
        monkeypatch.setattr(model, "torch_exp", lambda: None)
        before = _count_hand_backs(monkeypatch)
        handed = native_decode(temp, top, hidden, logits)
        monkeypatch.undo()
        monkeypatch.setattr(model, "CLOSE", close)
        calls = _count_hand_backs(monkeypatch)
        z, t, p = native_decode(temp, top, hidden, logits)
    assert before["exact_rows"] > 0, before  # there were close rows to settle
    assert calls["exact_rows"] == 0, calls
    for mine, theirs in zip((z, t, p), handed, strict=True):
        assert torch.equal(mine, theirs)
    check_exact(z, t, p, logits)


def _exp_function(address: int):
    """torch_exp's function, callable from Python: fn(n, in, out, mode)."""
    return ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(address)


@pytest.mark.skipif(not (torch.backends.mkl.is_available() and platform.system() == "Linux"
                         and platform.machine() in ("x86_64", "AMD64")), reason="torch without MKL here")
def test_torch_exp_is_found_where_torch_has_mkl():
    """With MKL in torch (the x86 Linux wheels), torch_exp finds it: a broken probe would otherwise
    only show as skipped tests and slower decoding."""
    assert nucleus.torch_exp() is not None


def test_torch_exp_is_torch_exp():
    """The native function torch_exp finds gives torch.exp's float32 bits on its check values and on
    random ones over the range masses take (odd lengths and unaligned buffers: no tail or head differs)."""
    found = nucleus.torch_exp()
    if found is None:
        pytest.skip("torch's exp is not reachable natively here (no MKL)")
    address, mode = found
    fn = _exp_function(address)
    g = torch.Generator().manual_seed(0)
    for x in (nucleus._torch_exp_check(), -torch.rand(1_000_003, generator=g) * 110, torch.tensor([-3.5])):
        for start, at in ((0, 0), (1, 2), (3, 7)):  # aligned and unaligned input and output
            view, out = x[start:], torch.empty(x.numel() + 8)
            y = out[at : at + view.numel()]
            fn(view.numel(), view.data_ptr(), y.data_ptr(), mode)
            assert torch.equal(y.view(torch.int32), torch.exp(view.clone()).view(torch.int32))


@pytest.mark.slow
def test_torch_exp_is_torch_exp_on_every_float_that_matters():
    """Every float32 from -0 down to -104 (1.12e9 values; below, exp is 0): the same bits as torch.exp."""
    found = nucleus.torch_exp()
    if found is None:
        pytest.skip("torch's exp is not reachable natively here (no MKL)")
    address, mode = found
    fn = _exp_function(address)
    start, stop, step = 0x80000000, 0xC2D00001, 1 << 24
    out = torch.empty(step)
    differ = 0
    for first in range(start, stop, step):
        x = torch.arange(first, min(first + step, stop), dtype=torch.int64).to(torch.int32).view(torch.float32)
        y = out[: x.numel()]
        fn(x.numel(), x.data_ptr(), y.data_ptr(), mode)
        differ += int((y.view(torch.int32) != torch.exp(x).view(torch.int32)).sum())
    assert differ == 0


def _synthetic(vocab: int, hidden_size: int):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, hidden_size, generator=g)
    yield "random", hidden, torch.randn(8, vocab, generator=g) * 3
    yield "peaked", hidden, torch.randn(8, vocab, generator=g) * 12
    yield "flat", hidden, torch.randn(8, vocab, generator=g) * 0.05
    yield "ties", hidden, torch.randint(0, 4, (8, vocab), generator=g).float()
    one_hot = torch.full((8, vocab), -30.0)
    one_hot[:, 7] = 10.0
    yield "one-hot", hidden, one_hot
    masked = torch.randn(8, vocab, generator=g) * 2
    masked[:, ::3] = float("-inf")
    yield "masked", hidden, masked


@pytest.mark.parametrize("vocab", [49152, 1000, 333, 1001, 1003, 39])
@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_synthetic_rows(threads, vocab, top_p):
    """Ties, one-hot, flat and -inf-masked rows, vocabularies not a multiple of the blocks (every
    remainder of the sums pass' 8 lanes: 0, 5, 1, 3, 7) or smaller than the 64 top candidates: exact."""
    for name, hidden, logits in _synthetic(vocab, 16):
        temp, top = heads(16, temperature=1.3, top_p=min(top_p, 1 - 1e-7) if top_p < 1 else 0.99999994)
        with torch.inference_mode():
            z, t, p = native_decode(temp, top, hidden, logits)
        check_exact(z, t, p, logits)
        assert torch.isfinite(z).sum(-1).min() >= 1, name


def test_p_exactly_one_keeps_every_row_whole(smollm2_rows, threads):
    """A top-p head saturated to P = 1.0 (float32): z = l / T, nothing masked."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], temperature=0.7)
    with torch.no_grad():
        top.mlp[2].bias.fill_(100.0)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden, logits)
    assert bool((p == 1.0).all())
    assert torch.equal(z, logits / t.clamp_min(1e-6).unsqueeze(-1))


def test_nan_rows_follow_the_torch_path():
    """A row with NaN logits is handed back; the others are exact."""
    g = torch.Generator().manual_seed(4)
    hidden, logits = torch.randn(4, 16, generator=g), torch.randn(4, 2000, generator=g) * 3
    logits[2, 5] = float("nan")
    temp, top = heads(16, temperature=1.0, top_p=0.9)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden, logits)
    ok = torch.tensor([0, 1, 3])
    check_exact(z[ok], t[ok], p[ok], logits[ok])


def test_heads_without_features_and_batched_shapes(smollm2_rows):
    """A top-p head without the enhanced features; [B, L, H] inputs give [B, L] T and P."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], seed=5, enhanced=False)
    with torch.inference_mode():
        z, t, p = native_decode(temp, top, hidden[:12].reshape(3, 4, -1), logits[:12].reshape(3, 4, -1))
        _, t_ref, p_ref = torch_steps(temp, top, hidden[:12], logits[:12])
    assert z.shape == (3, 4, logits.shape[-1]) and t.shape == p.shape == (3, 4)
    torch.testing.assert_close(p.reshape(-1), p_ref, rtol=1e-5, atol=1e-6)
    check_exact(z.reshape(12, -1), t.reshape(-1), p.reshape(-1), logits[:12])
    with torch.inference_mode():  # the last position of each sequence: rows strided by L * V (a view, no copy)
        strided = native_decode(temp, top, hidden[:12].reshape(3, 4, -1)[:, -1], logits[:12].reshape(3, 4, -1)[:, -1])
        packed = native_decode(temp, top, hidden[3:12:4].clone(), logits[3:12:4].clone())
    for a, b in zip(strided, packed, strict=True):
        assert torch.equal(a, b)


def test_where_it_does_not_apply_decode_runs_the_torch_steps(smollm2_rows):
    """Gradients on or heads not float32: no native step (None), decode's torch steps instead."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], seed=6)
    assert native_decode(temp, top, hidden[:2], logits[:2]) is None  # gradients enabled
    with torch.inference_mode():
        assert native_decode(temp.double(), top, hidden[:2], logits[:2]) is None
        z, t, p = decode(temp.double(), top.double(), hidden[:2], logits[:2], use_temperature=True, use_top_p=True)
    assert z.shape == logits[:2].shape and t.dtype == torch.float64


def test_heads_changed_between_steps_are_read_afresh(smollm2_rows):
    """The native step keeps each head's checked addresses between calls: weights updated in place,
    replaced through ``.data``, or converted to another dtype and back are all seen at the next step."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], seed=7)
    rows = hidden[:4], logits[:4]

    def same_as_torch_steps():
        with torch.inference_mode():
            z, t, p = native_decode(temp, top, *rows)
            _, t_ref, p_ref = torch_steps(temp, top, *rows)
        torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        check_exact(z, t, p, rows[1])
        return t, p

    t0, p0 = same_as_torch_steps()
    with torch.no_grad():
        temp.mlp[2].bias.add_(0.7)  # in place: same tensor, same address
    t1, _ = same_as_torch_steps()
    assert not torch.equal(t0, t1)
    with torch.no_grad():
        top.mlp[0].weight.data = top.mlp[0].weight.data * 1.5  # a new tensor under the same parameter
    _, p2 = same_as_torch_steps()
    assert not torch.equal(p0, p2)
    top.double()
    with torch.inference_mode():
        assert native_decode(temp, top, *rows) is None
    top.float()
    same_as_torch_steps()


def test_model_with_heads_off_runs_no_heads(smollm2_path):
    """set_decoding(False, False): the base logits and no T / P (as the vLLM plugin)."""
    ad = AutoDecoModelForCausalLM.from_base(str(smollm2_path)).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        off = ad.set_decoding(False, False)(ids)
        on = ad.set_decoding(True, True)(ids)
    assert off.temperature is None and off.top_p is None
    assert torch.equal(off.logits, off.base_logits) and torch.equal(off.base_logits, on.base_logits)
    assert on.temperature.shape == (1, 4)


def test_rows_in_blocks_default_dtype_and_mismatched_rows(smollm2_rows, monkeypatch):
    """More rows than one native call takes run in blocks with the same result; a float64 default
    dtype changes nothing (the buffers the C side writes are float32 by name); hidden and logits
    with different row counts get no native step."""
    hidden, logits = smollm2_rows
    temp, top = heads(hidden.shape[-1], seed=7)
    with torch.inference_mode():
        whole = native_decode(temp, top, hidden, logits)
        monkeypatch.setattr(model, "NATIVE_ROWS", 16)  # 40 rows: blocks of 16, 16, 8
        blocks = native_decode(temp, top, hidden, logits)
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            wide = native_decode(temp, top, hidden, logits)
        finally:
            torch.set_default_dtype(saved)
        assert native_decode(temp, top, hidden[:5], logits[:6]) is None
    for got in (blocks, wide):
        assert all(torch.equal(a, b) for a, b in zip(whole, got, strict=True))
    assert wide[0].dtype == torch.float32
