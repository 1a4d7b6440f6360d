"""AutoDeco on tiny random Llama / Qwen2 / Qwen3 / Qwen3-MoE / GPT-OSS bases, and checkpoint formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from heads.model import AutoDecoModelForCausalLM, CheckpointError, predict

torch.set_num_threads(1)

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TINY = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=16, decoder_sparse_step=1),
}
if hasattr(transformers, "GptOssConfig"):
    TINY["gpt_oss"] = lambda: transformers.GptOssConfig(**COMMON, head_dim=8, num_local_experts=4,
                                                        num_experts_per_tok=2, sliding_window=8)


def tiny_base(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY[kind]()).eval()


def tiny_autodeco(kind: str = "llama", seed: int = 0, **options) -> AutoDecoModelForCausalLM:
    model = AutoDecoModelForCausalLM.from_base(tiny_base(kind, seed), **options).eval()
    with torch.no_grad():  # spread the untrained heads so T and P vary
        for head in (model.temp_head, model.top_p_head):
            head.mlp[2].weight.mul_(20)
    return model


def saved_heads(tmp_path: Path) -> AutoDecoModelForCausalLM:
    """A tiny AutoDeco whose base is saved at tmp_path/base and heads at tmp_path/heads."""
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    model = tiny_autodeco("llama")
    model.llm.load_state_dict(base.state_dict())
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "heads")
    return model


def reference_nucleus(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Independent: softmax, full sort, keep the shortest prefix with mass >= P (+ ties), float64."""
    probs = torch.softmax(z.double(), -1)
    values, order = torch.sort(z.double(), -1, descending=True)
    mass_before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
    last_kept = torch.where(mass_before < top_p.double()[..., None], values, float("inf")).amin(-1, keepdim=True)
    return torch.where(z.double() >= last_kept, z.double(), float("-inf"))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_forward_shapes_ranges_and_generate(kind):
    model = tiny_autodeco(kind)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == out.base_logits.shape == (2, 7, 300)
    assert out.temperature.shape == out.top_p.shape == (2, 7)
    assert out.hidden.shape == (2, 7, 32)
    assert ((out.temperature > 0) & (out.temperature < 2)).all()
    assert ((out.top_p > 0) & (out.top_p < 1)).all()
    assert (torch.isfinite(out.logits).sum(-1) >= 1).all()
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                               top_p=1.0, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    assert generated.shape == (2, 11)


def test_logits_are_base_over_t_with_nucleus_mask():
    model = tiny_autodeco("llama")
    ids = torch.randint(0, 300, (3, 9))
    with torch.no_grad():
        out = model(ids)
        base = model.llm(ids).logits
    assert torch.equal(out.base_logits, base)
    scaled = base.double() / out.temperature.double()[..., None]
    want = reference_nucleus(scaled, out.top_p)
    kept = torch.isfinite(out.logits)
    assert torch.equal(kept, torch.isfinite(want))
    torch.testing.assert_close(out.logits[kept].double(), want[kept], rtol=1e-6, atol=1e-6)
    assert 1 < kept.sum(-1).float().mean() < 300  # the mask actually bites


def test_logits_to_keep_and_cache_match_full_forward():
    model = tiny_autodeco("qwen3")
    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=1)
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True)
    assert last.logits.shape == (2, 1, 300) and last.temperature.shape == (2, 1)
    torch.testing.assert_close(last.temperature, full.temperature[:, -1:])
    torch.testing.assert_close(step.top_p, full.top_p[:, -1:], rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isfinite(last.logits), torch.isfinite(full.logits[:, -1:]))


def test_set_decoding_modes_and_greedy():
    model = tiny_autodeco("llama")
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        both = model(ids)
        base = model.set_decoding(False, False)(ids)
        temp = model.set_decoding(True, False)(ids)
        top_p = model.set_decoding(False, True)(ids)
    assert torch.equal(base.logits, both.base_logits)
    torch.testing.assert_close(temp.logits, both.base_logits / both.temperature[..., None])
    # top-p head alone (the ablation): it sees T = 1, as in the official setup, and cuts the raw logits
    _, unit_p, _, _ = predict(model.temp_head, model.top_p_head, both.hidden, both.base_logits, unit_temperature=True)
    torch.testing.assert_close(top_p.top_p, unit_p)
    assert not torch.allclose(top_p.top_p, both.top_p)  # T != 1 changes what the head predicts
    assert torch.equal(torch.isfinite(top_p.logits), torch.isfinite(reference_nucleus(both.base_logits, unit_p)))
    model.set_decoding(True, True)
    greedy = model.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0)
    plain = model.llm.generate(ids, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(greedy, plain)  # dividing by T > 0 and masking never change the argmax


def test_trace_and_heads_forward_train_only_heads():
    model = tiny_autodeco("qwen2")
    ids = torch.randint(0, 300, (2, 10))
    t, p = model.trace(ids)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(t, out.temperature)
    torch.testing.assert_close(p, out.top_p)
    with torch.no_grad():
        hidden, logits, _ = model.base_forward(ids)
    t, p = model.heads_forward(hidden, logits)
    (t.sum() + p.sum()).backward()
    assert all(param.grad is not None for param in model.temp_head.parameters())
    assert all(param.grad is not None for param in model.top_p_head.parameters())
    assert all(param.grad is None for param in model.llm.parameters())


def test_features_in_blocks_equal_one_pass(monkeypatch):
    """heads_forward computes the top-p head's features a few rows at a time (bounded memory at
    paper scale); blocks of 1 and 7 rows give what one pass over all rows gives, and bf16 base
    logits are left untouched."""
    import heads.model as hm
    from heads.modules import distribution_features

    model = tiny_autodeco("llama")
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        hidden, logits, _ = model.base_forward(ids)
        t_ref = model.temp_head(hidden)
        want = distribution_features(logits, t_ref)
        p_ref = model.top_p_head(hidden.reshape(-1, 32), t_ref.reshape(-1), want.reshape(-1, 4)).reshape(2, 13)
    for rows in (1, 7, 1000):
        monkeypatch.setattr(hm, "FEATURE_BLOCK", rows * 300)
        got = hm.block_features(logits.reshape(-1, 300), t_ref.reshape(-1))
        torch.testing.assert_close(got, want.reshape(-1, 4), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            t, p = model.heads_forward(hidden, logits)
        torch.testing.assert_close(t, t_ref)
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    half = logits.bfloat16()
    before = half.clone()
    hm.block_features(half.reshape(-1, 300), t_ref.reshape(-1))
    assert torch.equal(half, before)


def test_save_load_heads_roundtrip(tmp_path):
    model = saved_heads(tmp_path)
    files = sorted(os.listdir(tmp_path / "heads"))
    assert {"config.json", "model.safetensors", "model.py", "modules.py", "nucleus.py"} <= set(files)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["model_type"] == "autodeco" and config["architectures"] == ["AutoDecoModelForCausalLM"]
    assert config["base_model_type"] == "llama" and config["hidden_size"] == 32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert isinstance(loaded, AutoDecoModelForCausalLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert (tmp_path / "heads" / "model.safetensors").stat().st_size < 200_000


def _official_checkpoint(folder, base_dir, hidden, legacy=False, generator=None):
    """Build a checkpoint exactly as the issue describes the published format."""
    g = generator or torch.Generator().manual_seed(7)
    base_config = json.loads((base_dir / "config.json").read_text())
    config = dict(base_config, model_type="autodeco", architectures=["AutoDecoModelForCausalLM"],
                  base_model_name_or_path=str(base_dir), base_model_type=base_config["model_type"],
                  enable_temperature_head=True, enable_top_p_head=True, use_enhanced_features=True,
                  temperature_hidden_size=hidden, top_p_hidden_size=hidden)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for head, n_in in (("temp_head", hidden), ("top_p_head", hidden + 1 + 4)):
        tensors[f"{head}.mlp.0.weight"] = torch.randn(256, n_in, generator=g) * 0.3
        tensors[f"{head}.mlp.0.bias"] = torch.randn(256, generator=g) * 0.1
        tensors[f"{head}.mlp.2.weight"] = torch.randn(1, 256, generator=g) * 0.3
        tensors[f"{head}.mlp.2.bias"] = torch.randn(1, generator=g) * 0.1
    save_file(tensors, str(folder / ("autodeco_heads.safetensors" if legacy else "model.safetensors")))
    return tensors


@pytest.mark.parametrize("legacy", [False, True])
def test_official_format_checkpoint_loads(tmp_path, legacy):
    base = tiny_base("qwen2")
    base.save_pretrained(tmp_path / "base")
    w = _official_checkpoint(tmp_path / "official", tmp_path / "base", 32, legacy=legacy)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "official")
    assert isinstance(model, AutoDecoModelForCausalLM)
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        out = model(ids)
        h = base.model(ids).last_hidden_state.double()
        logits = base(ids).logits.double()
    w = {k: v.double() for k, v in w.items()}

    def mlp(head, x):
        return torch.relu(x @ w[f"{head}.mlp.0.weight"].T + w[f"{head}.mlp.0.bias"]) @ w[f"{head}.mlp.2.weight"].T + w[f"{head}.mlp.2.bias"]

    temperature = 2 * torch.sigmoid(mlp("temp_head", h))
    probs = torch.softmax(logits / temperature, -1)
    features = torch.cat([probs.max(-1, keepdim=True).values, -(probs * torch.log(probs + 1e-8)).sum(-1, keepdim=True),
                          probs.var(-1, keepdim=True), probs.topk(5, -1).values.sum(-1, keepdim=True)], -1)
    top_p = torch.sigmoid(mlp("top_p_head", torch.cat([h, temperature, features], -1)))
    torch.testing.assert_close(out.temperature.double(), temperature.squeeze(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.top_p.double(), top_p.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_hidden_size_mismatch_is_a_clear_error(tmp_path):
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    _official_checkpoint(tmp_path / "wrong", tmp_path / "base", 48)
    with pytest.raises(CheckpointError, match="hidden"):
        AutoDecoModelForCausalLM.from_pretrained(tmp_path / "wrong")


@pytest.mark.slow
def test_trust_remote_code_without_the_package(tmp_path):
    model = saved_heads(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(ids).temperature
    code = (
        "import sys, torch; sys.modules['heads'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'heads')!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m)\n"
        "print(m(torch.tensor([[5, 6, 7, 8]])).temperature.tolist())\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got), want)
