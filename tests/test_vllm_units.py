"""vLLM backend pieces that need no engine: preset -> SamplingParams, the preset logits processor,
the heads switches and the T/P trace files."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # importing vLLM alone takes seconds

from harness.backends.base import Request, sample_seed  # noqa: E402
from harness.backends.vllm import EXTRA_KEY, PresetProcessor, sampling_params  # noqa: E402
from harness.decoding import get_preset, parse_spec  # noqa: E402
from heads.vllm_plugin import TRACE_KEY, TraceRecorder, heads_enabled, read_traces  # noqa: E402


def request(spec: str) -> Request:
    return Request("task/3", "prompt", parse_spec(spec), seed=5, n=4, max_tokens=9, stop=("\n\n",))


def test_presets_map_to_sampling_params():
    greedy = sampling_params(request("greedy"), 2)
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.max_tokens == 9
    static = sampling_params(request("static:temperature=0.6,top_p=0.9,top_k=20"), 2)
    assert (static.temperature, static.top_p, static.top_k) == (0.6, 0.9, 20)
    assert static.seed == sample_seed(5, "task/3", 2) and static.stop == ["\n\n"]
    assert sampling_params(request("min-p:min_p=0.2"), 0).min_p == 0.2
    auto = sampling_params(request("autodeco"), 1, trace_dir="/tmp/t")
    assert (auto.temperature, auto.top_p) == (1.0, 1.0)
    assert auto.extra_args[TRACE_KEY] == "/tmp/t" and auto.extra_args["autodeco_request"] == "task/3#1"
    eta = sampling_params(request("eta:epsilon=0.01"), 0)
    assert eta.extra_args[EXTRA_KEY] == {"name": "eta", "params": {"epsilon": 0.01}}


def test_preset_processor_applies_only_to_its_rows():
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc = PresetProcessor(None, torch.device("cpu"), False)
    eta = sampling_params(request("top-n-sigma:n=0.5"), 0)
    plain = sampling_params(request("default"), 0)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, plain, [], []), (1, eta, [], [])], moved=[]))
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])
    want = get_preset("top-n-sigma", n=0.5).processor()(logits[1:2])
    assert torch.equal(out[1:2], want) and torch.isinf(out[1]).any()
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_heads_switches():
    class Config:
        enable_temperature_head = True
        enable_top_p_head = True

    config = Config()
    assert heads_enabled(config) == (True, True)
    config.autodeco_top_p = False
    assert heads_enabled(config) == (True, False)
    config.enable_temperature_head, config.autodeco_temperature = True, False
    assert heads_enabled(config) == (False, False)


def test_trace_recorder_and_reader(tmp_path, monkeypatch):
    from vllm.v1.sample.logits_processor import BatchUpdate

    import heads.vllm_plugin as plugin

    params = sampling_params(request("autodeco"), 0, trace_dir=str(tmp_path))
    output: list[int] = []
    rec = TraceRecorder(None, torch.device("cpu"), False)
    rec.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, [1, 2], output)], moved=[]))
    logits = torch.zeros(1, 8)
    for step, (t, p) in enumerate([(0.5, 0.1), (0.7, 0.2), (0.9, 0.3), (1.1, 0.4)]):
        monkeypatch.setitem(plugin.LAST_STEP, "temperature", torch.tensor([t]))
        monkeypatch.setitem(plugin.LAST_STEP, "top_p", torch.tensor([p]))
        assert rec.apply(logits) is logits
        if step > 0:  # step 0 is a partial prefill: no token, rewritten by step 1
            output.append(step)
    temps, top_ps = read_traces(tmp_path)["task/3#0"]
    assert temps == pytest.approx([0.7, 0.9, 1.1]) and top_ps == pytest.approx([0.2, 0.3, 0.4])
    lines = [json.loads(x) for f in tmp_path.glob("trace-*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 4


def test_cpu_threads_bound_to_every_allowed_core_unless_chosen(monkeypatch):
    import os

    from harness.backends.vllm import bind_cpu_threads

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    said = []
    cores = sorted(os.sched_getaffinity(0))
    binding = bind_cpu_threads(log=said.append)
    assert binding == os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    assert binding in (f"{cores[0]}-{cores[-1]}", ",".join(map(str, cores)))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and binding in said[0]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's choice wins
    assert bind_cpu_threads(log=said.append) is None and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"
