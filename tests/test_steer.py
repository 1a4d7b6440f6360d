"""`autodeco steer` (Table 4: T/P under natural-language commands) and `autodeco report steering`.

The slow test runs the real CLI on SmolLM2 with freshly constructed AutoDeco heads (hf backend,
3 prompts × 3 commands × 1 seed × 6 tokens), then checks the steer_*.json against numbers
recomputed here from its per-sample entries, and the report against the file and the paper.
"""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from harness.cli import main
from harness.steer import DEFAULT_CONFIG, Command, SteerError, load_config, summarize, user_message

COMMANDS = [Command("baseline", None), Command("low", "Be certain.", "lower"), Command("high", "Be diverse.", "higher")]


def entry(i: int, command: str, seed: int, t: float, p: float) -> dict:
    return {"prompt_index": i, "command": command, "seed": seed, "temperature_mean": t, "top_p_mean": p}


def test_summary_math_on_hand_built_entries():
    samples = [
        entry(0, "baseline", 0, 0.5, 0.8), entry(0, "baseline", 1, 0.7, 0.8),  # prompt 0: T 0.6, P 0.8
        entry(1, "baseline", 0, 0.9, 0.6), entry(1, "baseline", 1, 0.9, 0.6),  # prompt 1: T 0.9, P 0.6
        entry(0, "low", 0, 0.4, 0.9), entry(0, "low", 1, 0.6, 0.9),            # T 0.5 (lower), P 0.9 (higher)
        entry(1, "low", 0, 0.9, 0.5), entry(1, "low", 1, 0.9, 0.5),            # T tie (not moved), P lower
        entry(0, "high", 0, 0.8, 0.85), entry(0, "high", 1, 0.8, 0.85),        # T up, P up
        entry(1, "high", 0, 1.2, 0.7), entry(1, "high", 1, 1.0, 0.7),          # T 1.1 up, P up
    ]
    per_prompt, summary = summarize(samples, COMMANDS)
    base, low, high = summary["baseline"], summary["low"], summary["high"]
    assert base["temperature_mean"] == pytest.approx(0.75) and base["top_p_mean"] == pytest.approx(0.7)
    assert base["delta_temperature"] is None and base["consistency_top_p"] is None
    assert low["temperature_mean"] == pytest.approx(0.7) and low["delta_temperature"] == pytest.approx(-0.05)
    assert low["delta_top_p"] == pytest.approx(0.0)
    assert low["consistency_temperature"] == 0.5 and low["consistency_top_p"] == 0.5
    assert high["delta_temperature"] == pytest.approx(0.2) and high["delta_top_p"] == pytest.approx(0.075)
    assert high["consistency_temperature"] == 1.0 and high["consistency_top_p"] == 1.0
    assert low["n_prompts"] == 2 and low["n_samples"] == 4
    row = next(r for r in per_prompt if r["prompt_index"] == 1 and r["command"] == "high")
    assert row["temperature_mean"] == pytest.approx(1.1) and row["delta_temperature"] == pytest.approx(0.2)
    with pytest.raises(SteerError, match="prompt 1 under command 'high'"):
        summarize([s for s in samples if not (s["prompt_index"] == 1 and s["command"] == "high")], COMMANDS)


def test_user_message_and_default_config():
    assert user_message("Write a poem.", COMMANDS[0]) == "Write a poem."
    assert user_message("Write a poem.", COMMANDS[1]) == "Write a poem. Be certain."
    config = load_config(DEFAULT_CONFIG)
    assert len(config.prompts) >= 20 and len(set(config.prompts)) == len(config.prompts)
    texts = {c.name: (c.text, c.direction) for c in config.commands}
    assert texts == {"baseline": (None, None),
                     "low": ("I hope the answers can be as certain as possible.", "lower"),
                     "high": ("I hope the answers can be more innovative and diverse.", "higher")}


@pytest.mark.parametrize("text, match", [
    ("commands: {baseline: {text: null}}\n", r"key 'prompts'"),
    ("prompts: [a]\ncommands: {a: {text: x, direction: lower}}\n", "exactly one command with text null"),
    ("prompts: [a]\ncommands: {b: null, a: {text: x, direction: sideways}}\n", r"commands\.a\.direction"),
    ("prompts: [a]\ncommands: {b: null}\nseeds: 0\n", "'seeds' must be an integer >= 1"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SteerError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_cli_bad_config_exits_2(tmp_path, capsys):
    path = tmp_path / "no_prompts.yaml"
    path.write_text("commands:\n  baseline: {text: null}\n")
    assert main(["steer", "--model", "smollm2", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'prompts'" in err


@pytest.mark.slow
def test_cli_plain_model_exits_2(capsys):
    assert main(["steer", "--model", "smollm2", "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "plain causal LM" in err and "AutoDeco" in err


@pytest.mark.slow
def test_steer_cli_file_and_report(tmp_path, smollm2_path, capsys):
    import torch

    from heads.checkpoint import construct

    torch.set_num_threads(1)
    heads = construct(str(smollm2_path), tmp_path / "ad-fresh", seed=0)
    out, rep = tmp_path / "runs", tmp_path / "rep"
    assert main(["steer", "--model", str(heads), "--limit", "3", "--seeds", "1", "--max-tokens", "6",
                 "--out", str(out), "--no-progress"]) == 0
    path, = (out / "ad-fresh").glob("steer_*.json")
    data = json.loads(path.read_text())
    config = data["config"]
    assert config["n_prompts"] == 3 and config["seeds"] == [0] and config["max_tokens"] == 6
    assert config["backend"] == "hf" and config["decoding"] == "autodeco" and config["baseline"] == "baseline"
    assert [c["name"] for c in config["commands"]] == ["baseline", "low", "high"]
    assert data["prompts"] == load_config(DEFAULT_CONFIG).prompts[:3]
    samples = data["samples"]
    assert len(samples) == 9 and data["generation"]["samples"] == 9
    for s in samples:
        assert 1 <= s["n_tokens"] <= 6 and len(s["trace"]["T"]) == len(s["trace"]["P"]) == s["n_tokens"]
        assert s["temperature_mean"] == pytest.approx(statistics.fmean(s["trace"]["T"]), abs=1e-3)
        assert s["top_p_mean"] == pytest.approx(statistics.fmean(s["trace"]["P"]), abs=1e-3)
        assert 0 < s["temperature_mean"] < 2 and 0 < s["top_p_mean"] < 1
    mean = {(s["prompt_index"], s["command"]): (s["temperature_mean"], s["top_p_mean"]) for s in samples}
    # the command reaches the model: same prompt, same seed, another user message → other T
    assert all(mean[(i, "low")][0] != mean[(i, "baseline")][0] for i in range(3))
    summary = data["summary"]
    for q, field in ((0, "temperature"), (1, "top_p")):
        base = statistics.fmean(mean[(i, "baseline")][q] for i in range(3))
        assert summary["baseline"][f"{field}_mean"] == pytest.approx(base)
        for command, sign in (("low", -1), ("high", 1)):
            avg = statistics.fmean(mean[(i, command)][q] for i in range(3))
            assert summary[command][f"{field}_mean"] == pytest.approx(avg)
            assert summary[command][f"delta_{field}"] == pytest.approx(avg - base)
            moved = sum(sign * (mean[(i, command)][q] - mean[(i, "baseline")][q]) > 0 for i in range(3)) / 3
            assert summary[command][f"consistency_{field}"] == moved

    assert main(["report", "steering", "--runs", str(out), "--out", str(rep)]) == 0
    for name in ("steering.md", "steering.tex", "steering.csv", "steering_prompts.csv",
                 "steering_traces.png", "steering_traces.pdf", "steering_deltas.png"):
        assert (rep / name).stat().st_size > 0, name
    assert (rep / "steering_traces.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (rep / "steering.md").read_text()
    assert "Table 4 (ours)" in md and "after targeted training, N=100" in md
    assert "| 0.72 | 0.61 | -0.11 | 0.99 | 0.82 | +0.10 | 0.96 |" in md  # the paper's avg temperature row
    assert f"{summary['low']['temperature_mean']:.3f}" in md and f"{summary['high']['top_p_mean']:.3f}" in md
    rows = list(csv.DictReader((rep / "steering.csv").open()))
    ours = [r for r in rows if r["Source"].startswith("Ours: ad-fresh")]
    assert [r["Quantity"] for r in ours] == ["avg temperature", "avg top-p"]
    assert float(ours[0]["Δ low"]) == pytest.approx(summary["low"]["delta_temperature"])
    assert float(ours[1]["consistency high"]) == pytest.approx(summary["high"]["consistency_top_p"])
    assert r"\toprule" in (rep / "steering.tex").read_text()
