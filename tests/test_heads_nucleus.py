"""The fast nucleus is exactly the full-sort nucleus; the features match their textbook definitions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import heads.nucleus as nucleus
from heads.modules import distribution_features
from heads.nucleus import nucleus_filter, nucleus_filter_sorted

torch.set_num_threads(1)


@pytest.fixture(autouse=True, params=["native", "numpy"])
def slow_path(request, monkeypatch):
    """Every test runs on both implementations of the slow path and the masking: the compiled
    passes (heads/nucleus_native.cpp) and the numpy/torch ones used where no compiler exists."""
    if request.param == "numpy":
        monkeypatch.setattr(nucleus, "native", lambda: None)
    elif nucleus.native() is None:
        pytest.skip("no C++ compiler here: the native passes are not built")
    return request.param


def test_native_passes_build_where_a_compiler_exists(slow_path):
    if slow_path == "numpy" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("checks the compiled build")
    assert nucleus.native() is not None


def test_a_failing_compiler_leaves_the_numpy_path(slow_path, monkeypatch, tmp_path):
    if slow_path == "numpy":
        pytest.skip("checks the compiled build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    assert nucleus._build_native(nucleus.NATIVE_SOURCE) is None
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written


def sorted_reference(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Full sort of each row, same arithmetic for the masses: exp(z - lse) in float32, with the lse
    of logit_stats (the contract; test_logit_stats_match_float64 checks that lse itself)."""
    z = z.float()
    lse = nucleus.logit_stats(z.contiguous(), moments=False).lse.unsqueeze(-1)
    values = z.sort(-1, descending=True).values
    cumulative = torch.exp(values - lse).cumsum(-1)
    first = (cumulative < top_p[:, None]).sum(-1, keepdim=True)
    threshold = values.gather(1, first.clamp(max=z.shape[-1] - 1))
    keep_all = (first >= z.shape[-1]) | (top_p[:, None] >= 1)
    threshold = torch.where(keep_all, torch.full_like(threshold, float("-inf")), threshold)
    return torch.where(z >= threshold, z, float("-inf"))


def float64_kept(z: torch.Tensor, top_p: float) -> set[int]:
    """Textbook definition in float64 for one row: shortest prefix reaching P, plus boundary ties."""
    probs = torch.softmax(z.double(), -1)
    order = torch.argsort(z.double(), descending=True)
    total, kept = 0.0, []
    for i in order.tolist():
        if total >= top_p and kept and z[i] < z[kept[-1]]:
            break
        kept.append(i)
        total += probs[i].item()
    return set(kept)


def _cases(vocab: int):
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(8, vocab, generator=g) * 3
    yield "peaked", torch.randn(8, vocab, generator=g) * 12
    yield "flat", torch.randn(8, vocab, generator=g) * 0.05
    yield "ties", torch.randint(0, 4, (8, vocab), generator=g).float()
    one_hot = torch.full((8, vocab), -30.0)
    one_hot[:, 7] = 10.0
    yield "one-hot", one_hot


@pytest.mark.parametrize("vocab", [49152, 1000, 300])
@pytest.mark.parametrize("top_p", [0.0, 1e-6, 0.3, 0.9, 0.999, 1 - 1e-5, 1.0])
def test_matches_full_sort_reference(vocab, top_p):
    for name, z in _cases(vocab):
        p = torch.full((z.shape[0],), top_p)
        got = nucleus_filter(z, p)
        want = sorted_reference(z, p)
        assert torch.equal(got, want), f"{name}: {(got != want).sum()} entries differ"
        assert torch.isfinite(got).sum(-1).min() >= 1


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0, 12.0, 40.0])
def test_logit_stats_match_float64(scale, slow_path):
    """lse, the entropy and sum p^2 against float64 torch: within float32 rounding (the entropy
    relative to itself, also on peaked rows where lse - E_p[z] would cancel)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 49152, generator=g) * scale
    z[5, ::4] = float("-inf")  # a masked vocabulary adds nothing (and no NaN)
    stats = nucleus.logit_stats(z)
    d = z.double()
    p = torch.softmax(d, -1)
    assert torch.allclose(stats.lse.double(), torch.logsumexp(d, -1), rtol=1e-7, atol=2e-6)  # float32 rounding
    entropy = -(p * torch.log(p)).nan_to_num(nan=0.0).sum(-1)
    if slow_path == "native":  # log(sum e) + E_p[max - z]: relative accuracy even at entropy 1e-8
        assert torch.allclose(stats.entropy.double(), entropy, rtol=2e-5, atol=0)
    else:  # lse - E_p[z]: float32 cancellation, about lse * 1e-7
        assert torch.allclose(stats.entropy.double(), entropy, rtol=1e-4, atol=2e-7 * d.amax().item())
    assert torch.allclose(stats.sum_p2.double(), p.square().sum(-1), rtol=1e-5, atol=0)


def test_per_row_top_p_and_escalation_paths():
    g = torch.Generator().manual_seed(1)
    # Flat rows force the 1024/8192/full-sort fallbacks; peaked rows resolve from 64 candidates.
    z = torch.cat([torch.randn(6, 49152, generator=g) * s for s in (0.01, 0.5, 2.0, 8.0)])
    p = torch.rand(z.shape[0], generator=g)
    p[::5] = 0.999
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))


def test_agrees_with_float64_definition():
    g = torch.Generator().manual_seed(2)
    for scale, top_p in [(1.0, 0.5), (3.0, 0.9), (6.0, 0.95), (0.3, 0.2)]:
        z = torch.randn(3, 2000, generator=g) * scale
        got = nucleus_filter(z, top_p)
        for row in range(3):
            assert set(torch.isfinite(got[row]).nonzero().squeeze(-1).tolist()) == float64_kept(z[row], top_p)


def test_bfloat16_and_shapes():
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 3, 4096, generator=g) * 4).bfloat16()
    p = torch.rand(2, 3, generator=g)
    got = nucleus_filter(z, p)
    assert got.dtype == torch.bfloat16 and got.shape == z.shape
    want = sorted_reference(z.reshape(6, -1).float(), p.reshape(-1)).reshape(z.shape).bfloat16()
    assert torch.equal(got, want)
    kept = torch.isfinite(got)
    assert torch.equal(got[kept], z[kept])  # kept logits are untouched


def test_naive_sorted_agrees_away_from_ties():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 5000, generator=g) * 3
    p = torch.rand(8, generator=g)
    assert torch.equal(torch.isfinite(nucleus_filter_sorted(z, p)), torch.isfinite(nucleus_filter(z, p)))


def test_distribution_features_match_definitions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 3000, generator=g) * 4
    temperature = torch.rand(2, 5, generator=g) + 0.3
    probs = torch.softmax(logits.double() / temperature[..., None].double(), -1)
    want = torch.stack(
        [
            probs.max(-1).values,
            -(probs * torch.log(probs)).sum(-1),
            probs.var(-1),
            probs.topk(5, dim=-1).values.sum(-1),
        ],
        dim=-1,
    )
    got = distribution_features(logits, temperature)
    assert got.shape == (2, 5, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The vectorised slow path (rows the 64 top candidates cannot settle): real next-token logits at
# the P where trained heads live, the whole-row fallback, -inf logits, mixed keep-all rows.

@pytest.fixture(scope="module")
def smollm2_logits(smollm2_path, n=40):
    """SmolLM2's next-token logits at n positions of natural text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path
    text = ("The history of mathematics spans thousands of years. Early civilizations developed "
            "arithmetic and geometry for trade and astronomy. Question: a train travels 120 kilometres "
            "in 1.5 hours. What is its average speed? Answer: 120 / 1.5 = 80 kilometres per hour.")
    ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids[:, :n]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_real_logits_at_realistic_top_p(smollm2_logits, temperature):
    z = smollm2_logits / temperature
    for top_p in (0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999):  # the last two: a top-p head near P = 1
        p = torch.full((z.shape[0],), top_p)
        assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p)), top_p
    g = torch.Generator().manual_seed(6)
    p = 0.75 + 0.25 * torch.rand(z.shape[0], generator=g)  # per-row P, some of them 1
    p[::7] = 1.0
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))


def _spy_full_sorts(monkeypatch):
    import heads.nucleus as nucleus

    rows = []
    original = nucleus._full_sort_thresholds

    def spy(z, lse, top_p):
        rows.append(z.shape[0])
        return original(z, lse, top_p)

    monkeypatch.setattr(nucleus, "_full_sort_thresholds", spy)
    return rows


def test_near_one_the_narrow_band_still_holds_the_crossing(smollm2_logits, monkeypatch):
    """At P = 0.9999 the band is a tenth of the tail wide (TAIL_SHARE): the crossing still lies in
    it for real logits (no whole-row sort), and the result is the reference's."""
    rows = _spy_full_sorts(monkeypatch)
    z = smollm2_logits
    p = torch.full((z.shape[0],), 0.9999)
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))
    assert sum(rows) == 0


def test_slow_path_falls_back_to_whole_rows(monkeypatch):
    """A margin that misplaces the band sends every slow row to the whole-row sort: still exact."""
    import heads.nucleus as nucleus

    sorted_rows = _spy_full_sorts(monkeypatch)
    monkeypatch.setattr(nucleus, "MARGIN", -0.3)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5000, generator=g) * 2
    p = torch.tensor([0.9, 0.95, 0.99, 0.5, 0.97, 0.999])
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))
    assert sum(sorted_rows) >= 5  # the rows the 64 candidates could not settle


def test_tiny_masses_are_summed_by_the_sort(monkeypatch):
    """Masses below 2^-29 are not exact in an unordered float64 sum: such a row is sorted whole."""
    sorted_rows = _spy_full_sorts(monkeypatch)
    z = torch.full((2, 40000), -22.0)  # each p ~ 2.8e-10 < 2^-29; the tail holds ~1.1e-5
    z[:, :3] = torch.tensor([0.0, -0.5, -1.0])
    z[1, 3:200] = -3.0  # a row whose crossing is among ordinary masses
    p = torch.tensor([1 - 5e-6, 0.999])
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))
    assert sorted_rows == [1]  # only the first row needed the whole-row sort


def test_slow_path_with_masked_vocabulary_and_bfloat16():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 8192, generator=g) * 0.5
    z[:, ::3] = float("-inf")  # e.g. a banned part of the vocabulary
    z[5] = float("-inf")
    z[5, 4] = 1.0  # one live token
    p = torch.tensor([0.9, 0.99, 0.999, 0.95, 1 - 1e-6, 0.9])
    assert torch.equal(nucleus_filter(z, p), sorted_reference(z, p))
    half = (torch.randn(4, 32768, generator=g) * 0.8).bfloat16()  # many exact ties
    p = torch.tensor([0.8, 0.9, 0.99, 0.999])
    want = sorted_reference(half.float(), p).bfloat16()
    assert torch.equal(nucleus_filter(half, p), want)


def test_nan_logits_do_not_break_the_passes():
    """NaN logits have no nucleus to speak of; the passes must still stay in bounds and return."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(4, 8192, generator=g)
    z[0, ::7] = float("nan")
    z[1, 5] = float("nan")
    out = nucleus_filter(z, torch.tensor([0.9, 0.99, 0.5, 0.999]))
    assert out.shape == z.shape
    assert torch.equal(out[2:], sorted_reference(z[2:], torch.tensor([0.5, 0.999])))  # clean rows unaffected


def test_scratch_buffers_work_in_and_out_of_inference_mode():
    """A buffer first made under torch.inference_mode (an engine's decode) must not break a later
    call outside it (training, a plain forward): each mode keeps its own scratch."""
    from heads.nucleus import logit_stats

    z = torch.randn(3, 4096)
    with torch.inference_mode():
        inside = logit_stats(z.clone())
    outside = logit_stats(z)
    assert torch.allclose(inside.lse, outside.lse) and torch.equal(inside.top_indices, outside.top_indices)


def _threads_in_a_fresh_process(env: dict, pin_first: bool = False) -> str:
    """'<CPUs the main thread may use> <nucleus._threads()>' in a new interpreter with 2 torch threads."""
    pin = f"import os; os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}}); " if pin_first else ""
    code = pin + ("import os, torch, heads.nucleus as n; assert n.native() is not None; "
                  "print(len(os.sched_getaffinity(0)), n._threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **env})
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or nucleus.native() is None or not nucleus.native().native_openmp(),
                    reason="needs Linux, 2 CPUs and the native passes built with OpenMP")
def test_native_threads_span_the_cpus_their_team_may_use():
    """vLLM's CPU worker binds its OpenMP threads with GOMP_CPU_AFFINITY: the main thread on CPU 0, the
    second worker on CPU 1. The native call runs on that team, so it takes both threads (it used to
    count the main thread's one CPU and run single-threaded in vLLM: 3.4 against 2.0 ms a step).
    A caller pinned to one CPU before the team exists gets a team that inherits that CPU: one thread."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert _threads_in_a_fresh_process({"GOMP_CPU_AFFINITY": f"{first} {second}"}) == "1 2"
    assert _threads_in_a_fresh_process({}, pin_first=True) == "1 1"
    assert _threads_in_a_fresh_process({}) == f"{len(os.sched_getaffinity(0))} 2"
