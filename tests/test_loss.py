"""The AutoDeco loss: soft top-p against the formula, limits, chunked == direct, masking stats."""

from __future__ import annotations

import math

import pytest
import torch

from heads.training.loss import autodeco_loss, easy_token_drop_mask, soft_top_p_probs


def soft_top_p_by_formula(logits, temperature, top_p, alpha, eps=1e-9):
    """One row, plain Python loops: p = softmax(l/T); order by p desc (ties by index);
    c = inclusive cumsum; m = exp(-alpha relu(c - P)); p̃ = p m / (Σ p m + eps)."""
    z = [x / temperature for x in logits]
    zmax = max(z)
    e = [math.exp(v - zmax) for v in z]
    total = sum(e)
    p = [v / total for v in e]
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    mask = [0.0] * len(p)
    cum = 0.0
    for i in order:
        cum += p[i]
        mask[i] = math.exp(-alpha * max(cum - top_p, 0.0))
    q = [pi * mi for pi, mi in zip(p, mask, strict=True)]
    s = sum(q)
    return [qi / (s + eps) for qi in q]


def test_soft_top_p_matches_formula_and_sums_to_one():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=gen, dtype=torch.float64) * 2
    temperature = torch.tensor([0.3, 0.7, 1.0, 1.5, 1.99], dtype=torch.float64)
    top_p = torch.tensor([0.2, 0.5, 0.9, 0.95, 0.05], dtype=torch.float64)
    for alpha in (1.0, 30.0, 300.0):
        got = soft_top_p_probs(logits, temperature, top_p, alpha=alpha)
        for r in range(5):
            want = soft_top_p_by_formula(logits[r].tolist(), temperature[r].item(), top_p[r].item(), alpha)
            torch.testing.assert_close(got[r], torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
        # Sums to 1 (eps = 0; with eps = 1e-9 it is 1 - eps/(Σ p·m + eps), far off only when the
        # top token alone overshoots P so much that Σ p·m is near eps).
        exact = soft_top_p_probs(logits, temperature, top_p, alpha=alpha, eps=0.0)
        torch.testing.assert_close(exact.sum(-1), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_large_alpha_limit_is_hard_top_p():
    """alpha → ∞: p̃ → p restricted to tokens whose inclusive cumulative mass is ≤ P, renormalized."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 50, generator=gen, dtype=torch.float64) * 3
    temperature = torch.full((8,), 0.8, dtype=torch.float64)
    probs = torch.softmax(logits / 0.8, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    cum = sorted_probs.cumsum(-1)
    # P halfway between two cumulative values past the top token, so no c_k sits near P.
    k = torch.full((8, 1), 3)
    top_p = ((cum.gather(-1, k) + cum.gather(-1, k + 1)) / 2).squeeze(-1)
    keep = torch.zeros_like(probs).scatter(-1, order, (cum <= top_p.unsqueeze(-1)).double())
    hard = probs * keep / (probs * keep).sum(-1, keepdim=True)
    errors = [
        (soft_top_p_probs(logits, temperature, top_p, alpha=alpha) - hard).abs().max().item()
        for alpha in (30.0, 1e3, 1e5)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6
    assert (keep.sum(-1) == 4).all()


@pytest.mark.parametrize("temperature", [1e-2 + 1e-4, 0.05, 1.999999])
@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_gradients_finite_near_temperature_bounds(temperature, kernel):
    """The chunked kernels work in log space: finite even where p̃ at the label underflows."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 12, 100, generator=gen) * 5
    labels = torch.randint(0, 100, (1, 12), generator=gen)
    t = torch.full((1, 12), temperature, requires_grad=True)
    p = torch.tensor([[0.01, 0.5, 0.99, 0.999999] * 3], requires_grad=True)
    out = autodeco_loss(logits, t, p, labels, seed=0, chunk_size=4, kernel=kernel)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(t.grad).all() and torch.isfinite(p.grad).all()
    assert t.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1e-3, 1.999999])
def test_soft_top_p_gradients_finite_near_bounds(temperature):
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 5
    t = torch.full((6,), temperature, requires_grad=True)
    p = torch.tensor([1e-6, 0.1, 0.5, 0.9, 0.99, 1 - 1e-6], requires_grad=True)
    probs = soft_top_p_probs(logits, t, p)
    (probs * torch.randn(6, 64)).sum().backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(p.grad).all()


def _batch(seed=0, batch=2, length=48, vocab=211):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :6] = -100  # prompt
    labels[-1, -5:] = -100  # padding
    labels[:, 12:30] = logits.argmax(-1)[:, 11:29]  # easy tokens (base argmax == label)
    temperature = torch.rand(batch, length, generator=gen) * 1.8 + 0.1
    top_p = torch.rand(batch, length, generator=gen) * 0.98 + 0.01
    return logits, labels, temperature, top_p


@pytest.mark.parametrize("train_temperature,train_top_p", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dft", [True, False])
def test_chunked_kernels_agree_with_direct(train_temperature, train_top_p, dft):
    logits, labels, temperature, top_p = _batch()
    results = {}
    for name, chunk, kernel in [("direct", None, "torch"), ("torch", 5, "torch"), ("numba", 7, "numba")]:
        t = temperature.clone().requires_grad_()
        p = top_p.clone().requires_grad_()
        out = autodeco_loss(
            logits, t, p, labels, seed=11, chunk_size=chunk, kernel=kernel,
            train_temperature=train_temperature, train_top_p=train_top_p, dft_weighting=dft,
        )
        out.loss.backward()
        results[name] = (out, t.grad, p.grad)
    ref, ref_t, ref_p = results["direct"]
    assert ref.n_kept < ref.n_tokens  # some easy tokens were dropped
    for name in ("torch", "numba"):
        out, grad_t, grad_p = results[name]
        assert (out.n_tokens, out.n_easy, out.n_dropped, out.n_kept) == (
            ref.n_tokens, ref.n_easy, ref.n_dropped, ref.n_kept)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.temp_loss, ref.temp_loss, rtol=1e-5, atol=1e-7)
        if train_top_p:
            torch.testing.assert_close(out.top_p_loss, ref.top_p_loss, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grad_p, ref_p, rtol=1e-4, atol=1e-6)
        else:
            assert out.top_p_loss is None and grad_p is None
        torch.testing.assert_close(grad_t, ref_t, rtol=1e-4, atol=1e-6)


def test_chunked_gradients_match_finite_differences():
    """The analytic d/dT and d/dP (float64 direct path checked by gradcheck-style differences)."""
    logits, labels, temperature, top_p = _batch(seed=3, batch=1, length=10, vocab=40)
    logits = logits.double()
    t = temperature.double().clamp(0.2, 1.8).requires_grad_()
    p = top_p.double().clamp(0.05, 0.95).requires_grad_()
    out = autodeco_loss(logits, t, p, labels, seed=0, chunk_size=3, kernel="numba", easy_token_drop=0.0)
    out.loss.backward()
    h = 1e-5
    for tensor, grad in ((t, t.grad), (p, p.grad)):
        for j in (6, 7, 8):
            base = tensor.detach().clone()
            plus, minus = base.clone(), base.clone()
            plus[0, j] += h
            minus[0, j] -= h
            args = {"t": t.detach(), "p": p.detach()}
            name = "t" if tensor is t else "p"
            values = []
            for shifted in (plus, minus):
                args[name] = shifted
                values.append(autodeco_loss(logits, args["t"], args["p"], labels, chunk_size=None,
                                            easy_token_drop=0.0).loss.item())
            numeric = (values[0] - values[1]) / (2 * h)
            assert grad[0, j].item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_only_labelled_positions_count_and_shift():
    """Position t predicts labels[t + 1]; -100 contributes nothing (changing those logits is a no-op)."""
    logits, labels, temperature, top_p = _batch(seed=4)
    base = autodeco_loss(logits, temperature, top_p, labels, seed=1).loss
    changed = logits.clone()
    changed[:, :5] = torch.randn_like(changed[:, :5])  # rows 0..4 predict labels 1..5: all -100
    changed[1, -6:] = torch.randn_like(changed[1, -6:])  # rows whose next label is padding / none
    assert autodeco_loss(changed, temperature, top_p, labels, seed=1).loss.item() == pytest.approx(base.item())
    changed[0, 5, labels[0, 6]] += 1.0  # row 5 predicts labels[6], a completion token
    assert autodeco_loss(changed, temperature, top_p, labels, seed=1).loss.item() != pytest.approx(base.item())


def test_easy_token_masking_statistics():
    gen = torch.Generator().manual_seed(5)
    easy = torch.rand(200_000, generator=gen) < 0.5
    dropped = easy_token_drop_mask(easy, 0.6, torch.Generator().manual_seed(6))
    assert not dropped[~easy].any()  # hard tokens are never dropped
    rate = dropped[easy].float().mean().item()
    assert abs(rate - 0.6) < 0.01
    again = easy_token_drop_mask(easy, 0.6, torch.Generator().manual_seed(6))
    assert torch.equal(dropped, again)  # seeded
    with pytest.raises(ValueError):
        easy_token_drop_mask(easy, 1.5)


def test_masking_inside_the_loss():
    """Through autodeco_loss: ~60% of easy tokens dropped over many positions, no hard ones."""
    gen = torch.Generator().manual_seed(7)
    vocab, length = 16, 4000
    logits = torch.randn(1, length, vocab, generator=gen)
    labels = torch.randint(0, vocab, (1, length), generator=gen)
    t = torch.ones(1, length)
    p = torch.full((1, length), 0.9)
    out = autodeco_loss(logits, t, p, labels, seed=3, chunk_size=512)
    n_hard = out.n_tokens - out.n_easy
    assert out.n_easy > 150 and n_hard > 3000
    assert abs(out.n_dropped / out.n_easy - 0.6) < 0.08
    assert out.n_kept == n_hard + out.n_easy - out.n_dropped
    none = autodeco_loss(logits, t, p, labels, seed=3, easy_token_drop=0.0)
    assert none.n_dropped == 0 and none.n_kept == none.n_tokens


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_easy_token_scope(chunk_size):
    """Dropping every easy token: scope "temperature" (official) leaves the top-p loss over all tokens,
    scope "both" removes them from it too; the temperature loss is the same either way."""
    logits, labels, temperature, top_p = _batch(seed=4)
    kwargs = dict(chunk_size=chunk_size, seed=0, easy_token_drop=1.0)
    official = autodeco_loss(logits, temperature, top_p, labels, easy_token_scope="temperature", **kwargs)
    both = autodeco_loss(logits, temperature, top_p, labels, easy_token_scope="both", **kwargs)
    nothing_dropped = autodeco_loss(logits, temperature, top_p, labels, chunk_size=chunk_size, easy_token_drop=0.0)
    assert official.n_easy > 20 and official.n_dropped == official.n_easy
    torch.testing.assert_close(official.temp_loss, both.temp_loss)
    torch.testing.assert_close(official.top_p_loss, nothing_dropped.top_p_loss)
    assert not torch.isclose(both.top_p_loss, nothing_dropped.top_p_loss)
    with pytest.raises(ValueError, match="easy_token_scope"):
        autodeco_loss(logits, temperature, top_p, labels, easy_token_scope="top_p")


def test_bad_input_is_rejected():
    logits, labels, temperature, top_p = _batch()
    with pytest.raises(ValueError, match="at least one"):
        autodeco_loss(logits, temperature, top_p, labels, train_temperature=False, train_top_p=False)
    with pytest.raises(ValueError, match="expected logits"):
        autodeco_loss(logits[0], temperature, top_p, labels)
    bad = labels.clone()
    bad[0, 10] = 10_000
    with pytest.raises(ValueError, match="labels must be"):
        autodeco_loss(logits, temperature, top_p, bad)
    with pytest.raises(ValueError, match="unknown kernel"):
        autodeco_loss(logits, temperature, top_p, labels, kernel="cuda-magic")


# ---------------------------------------------------------------------------------------------
# The CPU kernel's truncated sort: only the head (first 1 - ε of the mass) is ordered; the tail
# shares one mask. Checked against the exact per-token loss (float64 autograd of the formula).

def _exact_per_token(logits, labels, temperature, top_p, alpha=30.0):
    """Per-token top-p CE and its d/dT, d/dP in float64 (direct autograd; each token's CE
    depends only on its own T and P, so the gradient of the sum holds the per-token derivatives)."""
    t = temperature.double().clone().requires_grad_()
    p = top_p.double().clone().requires_grad_()
    soft = soft_top_p_probs(logits.double(), t, p, alpha=alpha)
    ce = -torch.log(soft.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    ce.sum().backward()
    return ce.detach(), t.grad, p.grad


def _kernel_per_token(logits, labels, temperature, top_p, tail_mass, alpha=30.0):
    from heads.training.loss import _terms_numba

    rows = torch.arange(logits.shape[0])
    terms = _terms_numba(logits.float(), rows, labels, temperature.float(), top_p.float(), alpha, 1e-9, {},
                         tail_mass=tail_mass)
    return terms[2].double(), terms[3].double(), terms[4].double()


def _lm_rows(smollm2_path, n=48):
    """Real next-token logits of SmolLM2 on natural text (the distributions training sees)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = ("The history of mathematics spans thousands of years. Early civilizations developed "
            "arithmetic and geometry for trade and astronomy. Question: what is 17 times 23? Answer: "
            "17 times 23 is 391, because 17 times 20 is 340 and 17 times 3 is 51.")
    ids = AutoTokenizer.from_pretrained(smollm2_path)(text, return_tensors="pt").input_ids[:, :n]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return logits, ids[0, 1:]


def _tail_bounds(logits, temperature, top_p, tail_mass, alpha=30.0):
    """The docstring's bounds per token, with δ the actual tail mass (<= tail_mass):
    |Δ CE| <= b = α²δ³/(8(1-δ)); |Δ d/dP| <= 2αb; |Δ d/dT| <= (3/2)α²δ²γ/(1-δ) + (1+α) R/T · b,
    γ = Σ_tail |dp/dT|, R = max |z - z̄| (which bounds |∂T log S| / (1+α) · T)."""
    t = temperature.double().unsqueeze(-1)
    z = logits.double() / t
    probs = torch.softmax(z, -1)
    z_bar = (probs * z).sum(-1, keepdim=True)
    sorted_probs, order = probs.sort(-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    target = torch.maximum(torch.full_like(top_p.double(), 1 - tail_mass), (1 + top_p.double()) / 2)
    cut = (cumulative < target.unsqueeze(-1)).sum(-1, keepdim=True)  # index of the first c >= target
    delta = (1 - cumulative.gather(-1, cut.clamp(max=logits.shape[-1] - 1))).squeeze(-1).clamp_min(0)
    assert (delta <= tail_mass + 1e-6).all()
    g = (sorted_probs * (z.gather(-1, order) - z_bar)).abs() / t
    in_tail = torch.arange(logits.shape[-1]) > cut
    gamma = (g * in_tail).sum(-1)
    spread = (z - z_bar).abs().amax(-1) / t.squeeze(-1)
    loss_bound = alpha**2 * delta**3 / (8 * (1 - delta))
    t_bound = 1.5 * alpha**2 * delta**2 * gamma / (1 - delta) + (1 + alpha) * spread * loss_bound
    return loss_bound, 2 * alpha * loss_bound, t_bound


@pytest.mark.parametrize("tail_mass", [1e-3, 0.02])
def test_truncated_kernel_within_its_bound_on_real_logits(smollm2_path, tail_mass):
    logits, labels = _lm_rows(smollm2_path)
    gen = torch.Generator().manual_seed(8)
    n = logits.shape[0]
    temperature = torch.rand(n, generator=gen) * 1.2 + 0.4
    top_p = torch.tensor([0.3, 0.8, 0.9, 0.95, 0.99, 0.999])[torch.arange(n) % 6]
    ce, d_t, d_p = _exact_per_token(logits, labels, temperature, top_p)
    got, got_t, got_p = _kernel_per_token(logits, labels, temperature, top_p, tail_mass)
    loss_bound, p_bound, t_bound = _tail_bounds(logits, temperature, top_p, tail_mass)
    # plus float32 rounding (the kernel's logits and exps are float32)
    assert ((got - ce).abs() <= loss_bound + 2e-5 * (1 + ce.abs())).all()
    assert ((got_p - d_p).abs() <= p_bound + 2e-4 * (1 + d_p.abs())).all()
    assert ((got_t - d_t).abs() <= t_bound + 2e-4 * (1 + d_t.abs())).all()
    if tail_mass > 0.01:  # the approximation acts (differs from exact by more than rounding) ...
        assert (got - ce).abs().max() > 1e-5
    else:  # ... and at the default it is below float32 rounding
        torch.testing.assert_close(got, ce, rtol=2e-5, atol=2e-6)


def test_truncated_kernel_flat_rows_and_p_near_one():
    """Flat rows (the head is most of the vocabulary), P close to and at 1, tail_mass 0 = exact."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.cat([torch.randn(4, 3000, generator=gen) * s for s in (0.05, 1.0, 4.0)])
    labels = torch.randint(0, 3000, (12,), generator=gen)
    temperature = torch.rand(12, generator=gen) + 0.5
    top_p = torch.tensor([0.5, 0.99, 0.9995, 1 - 1e-10] * 3)
    ce, d_t, d_p = _exact_per_token(logits, labels, temperature, top_p)
    for tail_mass in (0.0, 1e-3):
        got, got_t, got_p = _kernel_per_token(logits, labels, temperature, top_p, tail_mass)
        torch.testing.assert_close(got, ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_t, d_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_p, d_p, rtol=1e-4, atol=1e-5)


def test_truncated_kernel_gradients_are_its_own_derivatives():
    """With a large tail the kernel's d/dT, d/dP are the exact derivatives of its own (approximate)
    loss: central differences of the kernel's values agree."""
    gen = torch.Generator().manual_seed(10)
    logits = (torch.randn(6, 2000, generator=gen) * 2.5).double()
    labels = torch.randint(0, 2000, (6,), generator=gen)
    temperature = torch.rand(6, generator=gen).double() + 0.6
    top_p = torch.tensor([0.6, 0.8, 0.9, 0.95, 0.97, 0.9]).double()
    _, got_t, got_p = _kernel_per_token(logits, labels, temperature, top_p, 0.05)
    h = 1e-3
    for which, grad in (("t", got_t), ("p", got_p)):
        values = []
        for sign in (1, -1):
            t = temperature + (sign * h if which == "t" else 0)
            p = top_p + (sign * h if which == "p" else 0)
            values.append(_kernel_per_token(logits, labels, t, p, 0.05)[0])
        numeric = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=2e-3)
