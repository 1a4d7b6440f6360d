"""Training across processes: the trainer under `accelerate launch` with 2 local CPU processes (gloo)
trains the same heads as one process with the same global batch — bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import write_arith_rows

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(model: Path, data: Path, out: Path, grad_accum: int) -> list[str]:
    # easy_token_drop 0: the easy-token mask is seeded per (step, micro-batch), and a micro-batch's
    # index differs between accumulation (0, 1) and two ranks (0, 0); everything else is deterministic.
    return ["train", "--model", str(model), "--train_file", str(data), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
            str(grad_accum), "--learning_rate", "1e-3", "--max_length", "96", "--save_steps", "1000", "--seed", "3",
            "--easy_token_drop", "0", "--report_to", "none", "--logging_steps", "1"]


def _fresh_heads(model: Path) -> dict:
    """The heads `autodeco train` starts from (seed 3), built the way the trainer builds them."""
    from transformers import set_seed

    from harness.core import config as configs
    from heads.training.trainer import AutoDecoTrainingConfig, build_model

    set_seed(3)
    cfg = configs.build(AutoDecoTrainingConfig, ("test", {"model": str(model), "train_file": "x", "report_to": "none"}))
    net, _ = build_model(cfg)
    return {k: v.detach().clone() for k, v in net.heads_state_dict().items()}


@pytest.mark.slow
def test_two_gloo_processes_train_the_heads_of_one_process(tmp_path, smollm2_path):
    import torch
    from safetensors.torch import load_file

    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path, n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # One process: micro-batches of 1, two accumulated per step = 2 examples per optimizer step.
    single = subprocess.run([sys.executable, "-m", "harness.cli", *_train_args(smollm2_path, data, tmp_path / "one", 2)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    # Two processes (torchrun via accelerate; on CPU the gloo backend): 1 example each per step.
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "harness.cli",
              *_train_args(smollm2_path, data, tmp_path / "two", 1)]
    double = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert double.returncode == 0, double.stderr[-4000:]

    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert set(one) == set(two) and one
    # trained: the heads moved away from their (seeded, hence shared) initial weights
    fresh = _fresh_heads(smollm2_path)
    assert all(not torch.allclose(one[name], fresh[name], atol=1e-4) for name in one if name.endswith("weight"))
    # Same examples per step, same weighting (the mean of the 2 micro-batch means: accumulation divides
    # each by 2, the ranks' gradients are summed and divided by 2 — exact in binary floating point):
    # the same heads, bit for bit, and the same logged loss at every step.
    for name in one:
        assert torch.equal(one[name], two[name]), (name, (one[name] - two[name]).abs().max())
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "log_history.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert len(logs[0]) == STEPS and logs[0] == logs[1]
