"""Decoding presets: registry, parameters, the filters' math, per-sample seeded sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.backends import sample_seed
from harness.backends.hf import RowSampler
from harness.decoding import (
    PRESETS,
    PresetError,
    for_model,
    get_preset,
    min_p_filter,
    parse_spec,
    parse_specs,
    top_p_filter,
)

PAPER_PRESETS = {"greedy", "default", "static", "autodeco", "autodeco-temp", "autodeco-top-p",
                 "min-p", "top-n-sigma", "edt", "eta"}


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_registry_holds_every_preset_and_keys_are_canonical():
    assert PAPER_PRESETS <= set(PRESETS)
    needs = {"meanshift": {"temperature": 0.4, "top_p": 0.9}}  # presets that take no defaults
    for name in PRESETS:
        preset = get_preset(name, **needs.get(name, {}))
        assert preset.name == name and parse_spec(preset.key).key == preset.key
    assert get_preset("autodeco").heads == (True, True)
    assert get_preset("autodeco-temp").heads == (True, False)
    assert get_preset("autodeco-top-p").heads == (False, True)
    assert get_preset("default").heads is None
    static = parse_spec("static:top_p=0.95,temperature=0.6")
    assert (static.temperature, static.top_p, static.key) == (0.6, 0.95, "static:temperature=0.6,top_p=0.95")


@pytest.mark.parametrize("spec, message", [
    ("nucleus", "unknown decoding preset 'nucleus'"),
    ("static:temp=0.5", "takes no parameter temp"),
    ("static:temperature=0", "temperature must be > 0"),
    ("static:top_p=hot", "is not a number"),
    ("min-p:min_p", "expected key=value"),
])
def test_bad_presets_are_named(spec, message):
    with pytest.raises(PresetError, match=message):
        parse_spec(spec)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == {0}
    assert kept(top_p_filter(logits, 0.79)) == {0, 1}
    assert kept(top_p_filter(logits, 0.81)) == {0, 1, 2}
    assert kept(top_p_filter(logits, 1e-6)) == {0}
    assert kept(min_p_filter(logits, 0.5)) == {0, 1}  # p >= 0.25


def test_adaptive_processors():
    logits = torch.tensor([[4.0, 3.5, 0.0, -1.0, -2.0, -3.0]])
    sigma = logits.std(unbiased=False).item()
    n_sigma = get_preset("top-n-sigma", n=1.0).warp(logits)
    assert kept(n_sigma) == {i for i, v in enumerate(logits[0].tolist()) if v >= 4.0 - sigma}
    # edt: T = 0.8 ** (1 / H) < 1 sharpens
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum().item()
    scaled = get_preset("edt").warp(logits)
    assert torch.allclose(scaled, logits / (0.8 ** (1.0 / entropy)), atol=1e-5)
    # eta: threshold min(eps, sqrt(eps) * exp(-H)); the top token always survives
    eps = 0.05
    eta = get_preset("eta", epsilon=eps).warp(logits)
    threshold = min(eps, math.sqrt(eps) * math.exp(-entropy))
    assert kept(eta) == {i for i, p in enumerate(probs[0].tolist()) if p >= threshold} | {0}


def test_each_sample_draws_the_same_tokens_whatever_its_batch():
    torch.manual_seed(0)
    scores = torch.randn(1, 50).expand(4, -1).clone()
    preset = get_preset("static", temperature=0.9, top_p=0.9)

    def draw(indices, steps=20):
        gens = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed(sample_seed(3, "task/7", i))
            gens.append(g)
        sampler = RowSampler(preset, gens)
        rows = [sampler(None, scores[: len(indices)]).argmax(-1).tolist() for _ in range(steps)]
        return [list(col) for col in zip(*rows, strict=True)]

    full = draw([0, 1, 2, 3])
    assert draw([2, 3]) == full[2:]
    assert draw([1]) == [full[1]]
    assert len({tuple(r) for r in full}) == 4  # different samples differ
    assert sample_seed(3, "task/7", 0) != sample_seed(4, "task/7", 0)


def test_several_presets_in_one_string():
    presets = parse_specs("greedy, static:temperature=0.7,top_p=0.9,autodeco,min-p:min_p=0.05")
    assert [p.key for p in presets] == [parse_spec(s).key for s in
                                        ("greedy", "static:temperature=0.7,top_p=0.9", "autodeco", "min-p:min_p=0.05")]
    with pytest.raises(PresetError, match="given twice: greedy"):
        parse_specs("greedy,default,greedy")
    with pytest.raises(PresetError, match="no decoding preset"):
        parse_specs(" , ")
    with pytest.raises(PresetError, match="unknown decoding preset 'nope'"):
        parse_specs("greedy,nope")


def test_meanshift_reads_an_autodeco_runs_mean_predictions(tmp_path):
    results = tmp_path / "results_1.json"
    results.write_text(json.dumps({"results": {"arith": {"temperature_mean": 0.31234567, "top_p_mean": 0.97},
                                               "aime24": {"pass@1": 0.1}}}))
    preset = parse_specs(f"greedy,meanshift:source={results},task=arith")[1]
    assert (preset.temperature, preset.top_p, preset.do_sample) == (0.3123, 0.97, True)
    assert preset.describe()["params"] == {"temperature": 0.3123, "top_p": 0.97, "source": str(results), "task": "arith"}
    assert parse_spec("meanshift:temperature=0.5,top_p=0.8").key == "meanshift:temperature=0.5,top_p=0.8"
    with pytest.raises(PresetError, match="holds tasks arith, aime24: name one with task="):
        parse_spec(f"meanshift:source={results}")
    with pytest.raises(PresetError, match="task 'aime24' has no temperature_mean/top_p_mean"):
        parse_spec(f"meanshift:source={results},task=aime24")
    with pytest.raises(PresetError, match="not found"):
        parse_spec(f"meanshift:source={tmp_path / 'nope.json'}")


def test_recommended_is_the_models_own_setting(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    bare = parse_spec("recommended")
    resolved = for_model(bare, str(model))
    assert (resolved.temperature, resolved.top_p, resolved.key) == (0.6, 0.95, "recommended:temperature=0.6,top_p=0.95")
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))  # SmolLM2's: no advice
    notes = []
    fallback = for_model(bare, str(model), log=notes.append)
    assert (fallback.temperature, fallback.top_p) == (1.0, 1.0) and "recommends no sampling settings" in notes[0]
    pinned = parse_spec("recommended:temperature=0.7")
    assert for_model(pinned, str(model)) is pinned
    from harness.runner import RunError, RunSpec

    with pytest.raises(RunError, match="must be resolved"):
        RunSpec("m", str(model), "m", "hf", bare, [0], 1).check()
