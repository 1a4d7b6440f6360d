"""Training the heads from a cache of the base's last hidden states, on the real SmolLM2.

- the loss from hidden states equals the loss from the base's logits (same batch, same draws),
  on both kernels, both easy-token scopes, one chunk or several; with bfloat16 storage of a
  float32 base, within the tolerances stated below (measured here);
- the cache: what it stores, its key (a change of base, data, max_length or dtype names another
  folder), damaged files rebuilt with a warning, a base whose logits are not lm_head(h) refused;
- a training run from the cache equals one without it (float32 base and cache), and a second run
  reads the cache instead of building it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core import config as configs
from heads.training import hidden_cache
from heads.training.loss import autodeco_loss, autodeco_loss_from_hidden

# 16-bit storage of a float32 base's hidden states: the loss and the heads' gradients of one batch
# move by at most these relative amounts (loss, gradient norm). Measured on SmolLM2 (these rows and
# 4 rows of 200 tokens, 3 seeds): bfloat16 (8 bits of mantissa) loss <= 2.6e-4, gradients <= 2.5e-2
# (temperature head) and <= 6.6e-2 (the top-p head's first layer: alpha = 30 makes the soft mask
# sensitive to the logits); float16 (11 bits) loss <= 8.2e-5, gradients <= 6.4e-3. Running the base
# itself in bfloat16 moves them 10-50x more than bfloat16 storage (loss 0.8-14%, gradients
# 10-250%): the storage rounding is far below the precision the default bf16 base trains at.
STORAGE_RTOL = {torch.bfloat16: (1e-3, 1e-1), torch.float16: (2e-4, 1.5e-2)}
TEXTS = (
    "Question: what is 17 times 23? Answer: 17 times 20 is 340 and 17 times 3 is 51, so the product is 391.",
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp.",
    "Rivers carry sediment from the mountains to the plains, and over thousands of years the deposits build deltas.",
)


# The two paths reach the same per-token terms through different kernels and reduce them in float32
# in different orders: measured 2.1e-5 relative on an AVX2-only CPU (AMD EPYC, Zen 3; the code before
# the native nucleus passes gives the same there), under 1e-5 on the AVX-512 machine.
LOSS_RTOL = 5e-5


@pytest.fixture(scope="module")
def model(smollm2_path):
    """SmolLM2 (float32) with fresh heads, seeded."""
    from transformers import AutoModelForCausalLM

    from heads.model import AutoDecoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    return AutoDecoModelForCausalLM.from_base(base).eval()


@pytest.fixture(scope="module")
def rows(smollm2_path):
    """(token ids, labels) per row: the first third of each text is the prompt (-100)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    out = []
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        cut = len(ids) // 3
        out.append((ids, [-100] * cut + ids[cut:]))
    return out


def _padded(rows):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return ids, labels, mask


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _from_logits(model, rows, seed, **options):
    """The trainer's path without the cache: base forward, heads, autodeco_loss; and the heads' gradients."""
    ids, labels, mask = _padded(rows)
    with torch.no_grad():
        hidden, logits, _ = model.base_forward(input_ids=ids, attention_mask=mask)
    temperature, top_p = model.heads_forward(hidden, logits)
    out = autodeco_loss(logits, temperature, top_p, labels, generator=torch.Generator().manual_seed(seed), **options)
    out.loss.backward()
    return out, _grads(model)


def _cached_inputs(model, rows, dtype=torch.float32):
    """hidden [N, H] at the loss positions (rounded to ``dtype``), targets, easy, base_prob — what a
    cache stores — from one base forward of the padded batch."""
    ids, labels, mask = _padded(rows)
    with torch.no_grad():
        hidden, logits, _ = model.base_forward(input_ids=ids, attention_mask=mask)
    b, t = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[:, 1:][b, t]
    rows_logits = logits[b, t].float()
    easy = rows_logits.argmax(-1) == targets
    base_prob = torch.softmax(rows_logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return hidden[b, t].to(dtype), targets, easy, base_prob


def _from_hidden(model, inputs, seed, **options):
    hidden, targets, easy, base_prob = inputs
    output_layer = model.get_output_embeddings()
    out, temperature, top_p = autodeco_loss_from_hidden(
        hidden.to(output_layer.weight.dtype), output_layer, model.temp_head, model.top_p_head, targets, easy,
        base_prob, generator=torch.Generator().manual_seed(seed), **options)
    out.loss.backward()
    return out, _grads(model), temperature, top_p


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("scope", ["temperature", "both"])
@pytest.mark.parametrize("chunk", [256, 16])
def test_loss_from_hidden_states_equals_the_loss_from_logits(model, rows, kernel, scope, chunk):
    """Same batch, same easy-token draws: the same loss, counts and head gradients (float32 rounding;
    the CPU kernel's features come from its own pass there, a separate pass here)."""
    options = dict(easy_token_scope=scope, kernel=kernel, chunk_size=chunk)
    reference, reference_grads = _from_logits(model, rows, seed=5, **options)
    cached, grads, temperature, top_p = _from_hidden(model, _cached_inputs(model, rows), seed=5, **options)
    assert (cached.n_tokens, cached.n_easy, cached.n_dropped, cached.n_kept) == (
        reference.n_tokens, reference.n_easy, reference.n_dropped, reference.n_kept)
    assert 0 < reference.n_dropped < reference.n_easy  # the draws matter here
    torch.testing.assert_close(cached.loss, reference.loss, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(cached.temp_loss, reference.temp_loss, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(cached.top_p_loss, reference.top_p_loss, rtol=LOSS_RTOL, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and len(grads) == 8
    for name, grad in grads.items():
        scale = reference_grads[name].norm()
        assert (grad - reference_grads[name]).norm() <= 1e-4 * scale + 1e-9, name
    assert temperature.shape == top_p.shape == (cached.n_tokens,)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["temperature-only", "top-p-only", "plain-features", "tiny-temperature"])
def test_loss_from_hidden_states_equals_the_loss_from_logits_in_the_other_setups(model, rows, case):
    """One head trained, the top-p head without the distribution features, and a temperature head
    below min_temperature (the loss then floors T, the features do not: the kernel's own exps)."""
    options = {"temperature-only": dict(train_top_p=False), "top-p-only": dict(train_temperature=False)}.get(case, {})
    from heads.modules import TopPHead

    saved, top_p_head = {k: v.clone() for k, v in model.heads_state_dict().items()}, model.top_p_head
    try:
        if case == "plain-features":  # a top-p head that reads hidden + T only
            torch.manual_seed(1)
            model.top_p_head = TopPHead(model.config.top_p_hidden_size, model.config.head_width, False)
        if case == "tiny-temperature":
            with torch.no_grad():
                model.temp_head.mlp[2].bias.fill_(-9.0)  # T = 2 sigmoid(-9 + ...) ~ 2e-4 < 1e-2
        reference, reference_grads = _from_logits(model, rows, seed=7, **options)
        cached, grads, temperature, _ = _from_hidden(model, _cached_inputs(model, rows), seed=7, **options)
    finally:
        model.top_p_head = top_p_head
        model.load_heads(saved)
    if case == "tiny-temperature":
        assert temperature.max() < 1e-2
    torch.testing.assert_close(cached.loss, reference.loss, rtol=LOSS_RTOL, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert (grad - reference_grads[name]).norm() <= 1e-4 * reference_grads[name].norm() + 1e-9, name


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_storage_of_a_float32_base_stays_within_the_stated_tolerance(model, rows, smollm2_path, dtype):
    from transformers import AutoModelForCausalLM

    from heads.model import AutoDecoModelForCausalLM

    loss_rtol, grad_rtol = STORAGE_RTOL[dtype]
    exact, exact_grads, _, _ = _from_hidden(model, _cached_inputs(model, rows), seed=2)
    rounded, grads, _, _ = _from_hidden(model, _cached_inputs(model, rows, dtype), seed=2)
    assert rounded.n_kept == exact.n_kept  # easy flags and DFT weights come from the exact logits
    loss_error = abs(rounded.loss.item() - exact.loss.item()) / exact.loss.item()
    assert 0 < loss_error <= loss_rtol  # the rounding is there, and small
    for name, grad in grads.items():
        assert (grad - exact_grads[name]).norm() <= grad_rtol * exact_grads[name].norm(), name
    # The same heads on the base run in bfloat16 (exact storage of its own hidden states) are much further off.
    bf16 = AutoDecoModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16))
    bf16.load_heads(model.heads_state_dict())
    other, _, _, _ = _from_hidden(bf16, _cached_inputs(bf16.eval(), rows, torch.bfloat16), seed=2)
    assert abs(other.loss.item() - exact.loss.item()) / exact.loss.item() > 10 * loss_error


# --------------------------------------------------------------------------------------------
# The cache store


@pytest.mark.slow
def test_build_stores_the_base_values_and_reopens(model, rows, tmp_path):
    key = hidden_cache.cache_key(model.llm, rows, 64, torch.float32)
    cache = hidden_cache.build(model, rows, tmp_path / key, key, torch.float32, batch_size=2, chunk=8, progress=False)
    hidden, targets, easy, base_prob = _cached_inputs(model, rows)
    got = cache.batch(list(range(len(rows))))
    assert cache.rows == len(rows) and cache.positions == len(targets)
    assert torch.equal(got["targets"], targets) and torch.equal(got["easy"], easy)
    torch.testing.assert_close(got["hidden"], hidden, rtol=1e-4, atol=1e-4)  # other batch shapes: rounding
    torch.testing.assert_close(got["base_prob"], base_prob, rtol=1e-4, atol=1e-6)
    assert int(got["n_tokens"]) == sum(len(ids) for ids, _ in rows)
    # rows in any order: each row's positions, in that order
    one = cache.batch([2, 0])
    assert torch.equal(one["targets"], torch.cat([cache.batch([2])["targets"], cache.batch([0])["targets"]]))
    again = hidden_cache.open_cache(tmp_path / key, key)
    assert np.array_equal(np.asarray(again.hidden), np.asarray(cache.hidden))
    # bfloat16 storage keeps the bits of the rounded values
    key16 = hidden_cache.cache_key(model.llm, rows, 64, torch.bfloat16)
    small = hidden_cache.build(model, rows, tmp_path / key16, key16, torch.bfloat16, progress=False)
    assert small.batch([0])["hidden"].dtype == torch.bfloat16
    assert torch.equal(small.batch([0, 1])["hidden"], cache.batch([0, 1])["hidden"].to(torch.bfloat16))


@pytest.mark.slow
def test_a_writer_filled_in_any_order_is_the_built_cache(model, rows, tmp_path):
    """What the first epoch does: rows computed in the trainer's order and grouping (each step gets
    the base's logits at its loss positions back), the rest by `finish`; nothing is visible under the
    folder before `finish`, and a discarded writer leaves nothing behind."""
    key = hidden_cache.cache_key(model.llm, rows, 64, torch.float32)
    built = hidden_cache.build(model, rows, tmp_path / "built" / key, key, torch.float32, progress=False)
    writer = hidden_cache.CacheWriter(model, rows, tmp_path / "filled" / key, key, torch.float32)
    assert writer.missing == [0, 1, 2] and not writer.has([2])
    step = writer.compute([2, 0])
    assert writer.missing == [1] and writer.has([0, 2]) and not (tmp_path / "filled" / key).exists()
    expected = built.batch([2, 0])
    for name in ("targets", "easy", "n_tokens"):
        assert torch.equal(step[name], expected[name]), name
    torch.testing.assert_close(step["hidden"], expected["hidden"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step["logits"].float(), model.get_output_embeddings()(expected["hidden"]).float(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(writer.batch([2, 0])["hidden"], step["hidden"])
    filled = writer.finish(progress=False)
    everything = list(range(len(rows)))
    got, want = filled.batch(everything), built.batch(everything)
    assert torch.equal(got["targets"], want["targets"]) and torch.equal(got["easy"], want["easy"])
    torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["base_prob"], want["base_prob"], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "filled").iterdir()) == [key]
    dropped = hidden_cache.CacheWriter(model, rows, tmp_path / "dropped" / key, key, torch.float32)
    dropped.compute([1])
    dropped.discard()
    assert list((tmp_path / "dropped").iterdir()) == []


@pytest.mark.slow
def test_the_key_changes_with_base_data_max_length_and_dtype(model, rows):
    key = hidden_cache.cache_key(model.llm, rows, 64, torch.float32)
    assert hidden_cache.cache_key(model.llm, [tuple(r) for r in rows], 64, torch.float32) == key
    other_rows = [rows[0], rows[1], (rows[2][0][:-1], rows[2][1][:-1])]
    labels = list(rows[2][1])
    labels[labels.index(next(x for x in labels if x != -100))] = -100  # one target fewer
    other_labels = [rows[0], rows[1], (rows[2][0], labels)]
    assert len({key, hidden_cache.cache_key(model.llm, other_rows, 64, torch.float32),
                hidden_cache.cache_key(model.llm, other_labels, 64, torch.float32),
                hidden_cache.cache_key(model.llm, rows, 96, torch.float32),
                hidden_cache.cache_key(model.llm, rows, 64, torch.bfloat16)}) == 5
    weight = model.llm.model.layers[3].mlp.down_proj.weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
    try:
        assert hidden_cache.cache_key(model.llm, rows, 64, torch.float32) != key
    finally:
        with torch.no_grad():
            weight[0, 0] -= 1e-3
    assert hidden_cache.cache_key(model.llm, rows, 64, torch.float32) == key


def _damage_truncate(folder: Path) -> None:
    path = folder / "hidden.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _damage_flip(folder: Path) -> None:
    path = folder / "hidden.npy"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def _damage_meta(folder: Path) -> None:
    (folder / "meta.json").unlink()


def _damage_targets(folder: Path) -> None:
    path = folder / "targets.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_meta, _damage_targets])
def test_a_damaged_cache_is_rebuilt_with_a_warning(model, rows, tmp_path, damage, monkeypatch):
    warnings = []
    first = hidden_cache.prepare(model, rows, tmp_path, max_length=64, dtype=torch.float32, progress=False,
                                 warn=warnings.append)
    expected = first.batch([0, 1, 2])
    folder = first.folder
    del first
    damage(folder)
    with pytest.raises(hidden_cache.CacheDamaged):
        hidden_cache.open_cache(folder, folder.name)
    rebuilt = hidden_cache.prepare(model, rows, tmp_path, max_length=64, dtype=torch.float32, progress=False,
                                   warn=warnings.append)
    assert len(warnings) == 1 and str(folder) in warnings[0] and "damaged" in warnings[0]
    assert rebuilt.folder == folder
    got = rebuilt.batch([0, 1, 2])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a sound cache is opened as it is: no warning, no rebuild
    built = []
    real_build = hidden_cache.build
    monkeypatch.setattr(hidden_cache, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    hidden_cache.prepare(model, rows, tmp_path, max_length=64, dtype=torch.float32, progress=False,
                         warn=warnings.append)
    assert not built and len(warnings) == 1
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


@pytest.mark.slow
def test_a_base_whose_logits_are_not_lm_head_of_its_hidden_state_is_refused(model, rows, tmp_path):
    def capped(_module, _inputs, output):  # Gemma-2-style soft-capping of the logits
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)
        return output

    handle = model.llm.register_forward_hook(capped)
    try:
        with pytest.raises(hidden_cache.CacheUnusable, match="not its output embedding"):
            hidden_cache.build(model, rows, tmp_path / "k", "k", torch.float32, progress=False)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Training from the cache


def _train(tmp: Path, data: Path, model_path: Path, name: str, **changes):
    from heads.training.trainer import AutoDecoTrainingConfig, train

    values = dict(model=str(model_path), train_file=str(data), output_dir=str(tmp / name), max_steps=4,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, max_length=96,
                  save_steps=100, logging_steps=1, seed=3, report_to="none", bf16=False, disable_tqdm=True)
    values.update(changes)
    final = train(configs.build(AutoDecoTrainingConfig, ("test", values)))
    log = [json.loads(line) for line in (tmp / name / "log_history.jsonl").read_text().splitlines()]
    return final, log


@pytest.mark.slow
def test_training_from_the_cache_equals_training_without_it(tmp_path, smollm2_path, capsys, monkeypatch):
    """Two epochs of 4 steps: without the cache; with it written by the first epoch's steps (the
    default: the second epoch reads it); with it built before the first step. Same losses, heads."""
    from safetensors.torch import load_file

    from tests.test_trainer import write_arith_rows

    torch.set_num_threads(2)
    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path, n=8)
    plain, plain_log = _train(tmp_path, data, smollm2_path, "plain", hidden_cache="off", max_steps=8)
    assert "hidden cache" not in capsys.readouterr().out
    store = tmp_path / "cache"
    cached, cached_log = _train(tmp_path, data, smollm2_path, "cached", hidden_cache=str(store), max_steps=8)
    out = capsys.readouterr().out
    (folder,) = store.iterdir()
    assert f"hidden cache: {folder} is written by the first epoch (8 rows)" in out
    assert f"hidden cache: {folder} (8 rows," in out and "float32; written by the first epoch)" in out
    before, before_log = _train(tmp_path, data, smollm2_path, "before", hidden_cache=str(tmp_path / "cache-before"),
                                hidden_cache_fill="before", max_steps=8)
    assert "written by the first epoch" not in capsys.readouterr().out
    heads_a = load_file(str(plain / "model.safetensors"))
    for log, run in ((cached_log, cached), (before_log, before)):
        assert [row["step"] for row in log] == list(range(1, 9))
        for a, b in zip(plain_log, log, strict=True):
            for key in ("loss", "temp_loss", "top_p_loss", "temperature_mean", "top_p_mean"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
            assert (a["kept_tokens"], a["easy_fraction"], a["num_tokens"]) == (
                b["kept_tokens"], b["easy_fraction"], b["num_tokens"])
        heads_b = load_file(str(run / "model.safetensors"))
        for name, tensor in heads_a.items():
            torch.testing.assert_close(heads_b[name], tensor, rtol=1e-3, atol=1e-4)

    # A second run reads the cache: nothing is built, the same heads come out.
    calls = []
    real_compute = hidden_cache.CacheWriter.compute
    monkeypatch.setattr(hidden_cache.CacheWriter, "compute", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    again, again_log = _train(tmp_path, data, smollm2_path, "again", hidden_cache=str(store), max_steps=8)
    assert not calls and f"hidden cache: {folder}" in capsys.readouterr().out
    assert [row["loss"] for row in again_log[4:]] == [row["loss"] for row in cached_log[4:]]
    heads_b, heads_c = load_file(str(cached / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(heads_c[name], heads_b[name]) for name in heads_b)

    # Another max_length tokenizes other rows: another key. A run shorter than an epoch keeps no
    # partial cache (nothing appears in the store); built before the first step, it is kept.
    _train(tmp_path, data, smollm2_path, "shorter", hidden_cache=str(store), max_length=64, max_steps=1)
    assert "hidden cache: not kept (2 of 8 rows written" in capsys.readouterr().out
    assert len(list(store.iterdir())) == 1
    _train(tmp_path, data, smollm2_path, "shorter-before", hidden_cache=str(store), max_length=64, max_steps=1,
           hidden_cache_fill="before")
    assert len(list(store.iterdir())) == 2


@pytest.mark.slow
def test_hidden_cache_auto_steps_aside_for_packed_batches(tmp_path, smollm2_path, capsys):
    from tests.test_trainer import write_arith_rows

    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path, n=4)
    _train(tmp_path, data, smollm2_path, "packed", packing=True, max_steps=1, per_device_train_batch_size=1)
    assert "hidden cache: off (not with packed or padding-free batches)" in capsys.readouterr().out
