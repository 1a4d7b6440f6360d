"""One model resolution for every command: presets, folders, hub ids, training runs, `smollm2`."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.models import ModelError, is_autodeco, model_preset, resolve_model, resolve_targets


@pytest.fixture()
def tiny_preset(tmp_path, monkeypatch, smollm2_path):
    """A preset `tiny-local` in a folder of its own ($AUTODECO_MODELS_DIR), pointing at SmolLM2 by a
    path relative to the YAML."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (tmp_path / "weights").symlink_to(smollm2_path, target_is_directory=True)
    (presets / "tiny-local.yaml").write_text("name: tiny-local\npath: ../weights\nbackend: hf\n")
    monkeypatch.setenv("AUTODECO_MODELS_DIR", str(presets))
    return "tiny-local"


def test_names_resolve_the_same_way(tiny_preset, tmp_path, smollm2_path):
    assert resolve_model(tiny_preset) == str((tmp_path / "weights").resolve())
    assert model_preset("r1-distill-qwen-7b")["hub_id"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert resolve_model("r1-distill-qwen-7b") == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert resolve_model("smollm2") == str(smollm2_path)
    assert resolve_model("org/some-model") == "org/some-model"
    assert resolve_model(str(smollm2_path)) == str(smollm2_path.resolve())
    (target,) = resolve_targets(tiny_preset)
    assert (target.name, target.candidate) == ("tiny-local", None)
    assert not is_autodeco(resolve_model(tiny_preset))


def test_bad_names_are_clear(tmp_path, tiny_preset):
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*tiny-local"):
        resolve_model("nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="pick one of its candidates: checkpoint-3"):
        resolve_model(str(run))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"broken/config.json: not valid JSON"):
        is_autodeco(str(broken))


def test_every_command_takes_a_preset_name(tiny_preset, tmp_path, smollm2_path, capsys):
    """construct, train and bench efficiency (and eval) with the same preset name, on the real model."""
    heads = tmp_path / "heads"
    assert main(["construct", "--base", tiny_preset, "--out", str(heads)]) == 0
    assert is_autodeco(str(heads))
    assert json.loads((heads / "config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "weights").resolve())

    from tests.test_trainer import write_arith_rows

    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path, n=4)
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_preset, "--train_file", str(data), "--output_dir", str(run),
                 "--max_steps", "1", "--max_length", "64", "--report_to", "none", "--per_device_train_batch_size",
                 "2"]) == 0
    assert (run / "final" / "model.safetensors").is_file()

    out = tmp_path / "eff" / "efficiency.json"
    assert main(["bench", "efficiency", "--model", tiny_preset, "--prompt-lengths", "16", "--gen-tokens", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == tiny_preset

    assert main(["eval", "--model", tiny_preset, "--tasks", "arith", "--decoding", "greedy", "--limit", "1",
                 "--max-tokens", "4", "--wandb", "off", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / tiny_preset).is_dir()
    capsys.readouterr()
    for argv in (["construct", "--base", "nope", "--out", str(tmp_path / "x")],
                 ["train", "--model", "nope", "--train_file", str(data), "--report_to", "none"],
                 ["bench", "efficiency", "--model", "nope", "--repeats", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "unknown model 'nope'" in err and "tiny-local" in err and "Traceback" not in err, err
