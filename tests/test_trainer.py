"""The TRL trainer on the real SmolLM2: loss goes down, only heads change, heads-only checkpoints, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.core import config as configs
from harness.core.errors import ConfigError
from heads.training.trainer import AutoDecoTrainingConfig

ROWS = 16
STEPS = 10
SAVE = 5


def write_arith_rows(path: Path, model_path: Path, n: int = ROWS) -> Path:
    """Prompt (chat template) / worked-answer completion rows from the arith train split."""
    from transformers import AutoTokenizer

    from tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = get_task("arith", split="train", n=n, seed=7, difficulty=1)
    with path.open("w") as handle:
        for doc in task.docs():
            expression = doc["problem"].removeprefix("Compute ").rstrip(".")
            completion = f"{expression} = {doc['answer']}. The answer is \\boxed{{{doc['answer']}}}."
            handle.write(json.dumps({"prompt": task.prompt(doc, tokenizer), "completion": completion}) + "\n")
    return path


def _config(tmp: Path, data: Path, model_path: Path, **changes) -> AutoDecoTrainingConfig:
    values = dict(model=str(model_path), train_file=str(data), output_dir=str(tmp / "run"), max_steps=STEPS,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
                  max_length=96, save_steps=SAVE, logging_steps=1, seed=3, report_to="none")
    values.update(changes)
    return configs.build(AutoDecoTrainingConfig, ("test", values))


def _objective(model, data: Path, model_path: Path) -> float:
    """The AutoDeco loss over all rows in one padded batch, deterministic (no easy-token dropping)."""
    import torch
    from transformers import AutoTokenizer

    from heads.training.loss import autodeco_loss

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids, labels = [], []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(map(len, ids))
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
    with torch.no_grad():
        hidden, logits, _ = model.base_forward(input_ids=ids, attention_mask=mask)
        t, p = model.heads_forward(hidden, logits)
        return autodeco_loss(logits, t, p, labels, easy_token_drop=0.0).loss.item()


@pytest.mark.slow
def test_training_run_checkpoints_and_resume(tmp_path, smollm2_path, monkeypatch):
    import torch
    from safetensors import safe_open

    from harness.cli import main
    from heads.model import AutoDecoModelForCausalLM
    from heads.training import trainer as trainer_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(2)
    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path)
    cfg = _config(tmp_path, data, smollm2_path, report_to="wandb")

    # Keep the model the trainer builds, to compare its tensors before and after.
    built = {}
    real_build = trainer_module.build_model

    def spy(config):
        model, path = real_build(config)
        built["model"] = model
        built["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        built["objective_before"] = _objective(model, data, smollm2_path)
        return model, path

    monkeypatch.setattr(trainer_module, "build_model", spy)
    final = trainer_module.train(cfg)
    run = Path(cfg.output_dir)

    # Only head tensors changed; every base tensor is bit-identical.
    after = built["model"].state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, built["before"][k])}
    heads = {k for k in after if k.startswith(("temp_head.", "top_p_head."))}
    assert changed and changed <= heads
    assert {k for k in heads if k.endswith("weight")} <= changed

    # The objective went down on the training rows (measured deterministically: no token dropping,
    # same rows before and after; the per-step logged loss is too noisy for that with 10 steps).
    assert _objective(built["model"], data, smollm2_path) < 0.9 * built["objective_before"]
    log = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, STEPS + 1))
    for key in ("loss", "temp_loss", "top_p_loss", "temperature_mean", "temperature_std", "top_p_mean",
                "top_p_std", "tokens_per_second"):
        assert all(isinstance(row[key], float) for row in log), key
    assert all(0 < row["temperature_mean"] <= 2 and 0 < row["top_p_mean"] <= 1 for row in log)
    assert (run / "train_config.yaml").is_file()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))

    # Checkpoints hold the heads only (plus the heads' optimizer state), and load.
    for folder in (run / f"checkpoint-{SAVE}", run / f"checkpoint-{STEPS}", final):
        weights = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"]
        assert weights == ["model.safetensors"], weights
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            assert all(k.startswith(("temp_head.", "top_p_head.")) for k in handle.keys())
        assert (folder / "model.safetensors").stat().st_size < 2_000_000
    assert (run / f"checkpoint-{SAVE}" / "optimizer.pt").stat().st_size < 5_000_000
    loaded = AutoDecoModelForCausalLM.from_pretrained(final)
    for name, tensor in loaded.heads_state_dict().items():
        assert torch.equal(tensor, after[name])

    # Resume from the first checkpoint (through the CLI) in a copy: continues after it and ends where
    # the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / f"checkpoint-{SAVE}", resumed / f"checkpoint-{SAVE}")
    code = main(["train", "--model", str(smollm2_path), "--train_file", str(data), "--output_dir", str(resumed),
                 "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                 "1", "--learning_rate", "1e-3", "--max_length", "96", "--save_steps", str(SAVE), "--seed", "3",
                 "--report_to", "none", "--resume_from_checkpoint", "latest"])
    assert code == 0
    resumed_log = [json.loads(line) for line in (resumed / "log_history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed_log] == list(range(SAVE + 1, STEPS + 1))
    for first, second in zip(log[SAVE:], resumed_log, strict=True):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-4, abs=1e-6)
    again = AutoDecoModelForCausalLM.from_pretrained(resumed / "final").heads_state_dict()
    for name, tensor in loaded.heads_state_dict().items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-4, atol=1e-6)


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 5.0e-6\nbf16: true\nmax_length: 16384\n")
    flags = {"max_length": "256", "bf16": "false", "train_top_p": "no"}
    cfg = configs.build(AutoDecoTrainingConfig, (str(path), configs.load_yaml(path)), ("command line", flags))
    assert (cfg.learning_rate, cfg.max_length, cfg.bf16, cfg.train_top_p) == (5e-6, 256, False, False)
    path.write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown field 'learning_rat'"):
        configs.build(AutoDecoTrainingConfig, (str(path), configs.load_yaml(path)))
    with pytest.raises(ConfigError, match="command line: --max-steps expects a finite int, got 'many'"):
        configs.build(AutoDecoTrainingConfig, ("command line", {"max_steps": "many"}))
    with pytest.raises(ConfigError, match=r"x\.yaml: field 'train_top_p' enable at least one head"):
        configs.build(AutoDecoTrainingConfig, ("x.yaml", {"train_temperature": False, "train_top_p": False}))


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    paper = configs.build(AutoDecoTrainingConfig, ("paper.yaml", configs.load_yaml(root / "paper.yaml")))
    assert (paper.learning_rate, paper.per_device_train_batch_size, paper.gradient_accumulation_steps,
            paper.max_length, paper.alpha, paper.num_train_epochs, paper.bf16, paper.optim) == (
        5e-6, 1, 4, 16384, 30.0, 1.0, True, "adamw_torch")
    configs.build(AutoDecoTrainingConfig, ("cpu.yaml", configs.load_yaml(root / "smollm2_cpu.yaml")))


def test_bad_train_file_is_a_cli_error(tmp_path, capsys):
    from harness.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "there"}\n{"prompt": "only a prompt"}\n')
    code = main(["train", "--train_file", str(bad), "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert code == 2
    assert "bad.jsonl:2: field 'completion' missing" in capsys.readouterr().err


@pytest.mark.slow
def test_same_config_and_seed_give_bit_identical_heads_and_a_finished_run_does_not_resume(tmp_path, smollm2_path,
                                                                                        capsys):
    """Two runs of the shipped CPU config with its seed: the same heads, bit for bit, and the same log
    (the heads used to be created before the seed was set). Resuming the finished run: nothing to do."""
    import torch
    from safetensors.torch import load_file

    from harness.cli import main
    from heads.training import trainer as trainer_module

    torch.set_num_threads(2)
    data = write_arith_rows(tmp_path / "train.jsonl", smollm2_path, n=8)
    shipped = Path(__file__).resolve().parents[1] / "configs" / "train" / "smollm2_cpu.yaml"
    runs = []
    for name in ("a", "b"):
        overrides = {"model": str(smollm2_path), "train_file": str(data), "output_dir": str(tmp_path / name),
                     "max_steps": 3, "save_steps": 3, "max_length": 64, "report_to": "none"}
        cfg = configs.build(AutoDecoTrainingConfig, (str(shipped), configs.load_yaml(shipped)), ("test", overrides))
        assert cfg.seed == 42
        runs.append(trainer_module.train(cfg))
    first, second = (load_file(str(final / "model.safetensors")) for final in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    logs = [(tmp_path / name / "log_history.jsonl").read_text().splitlines() for name in ("a", "b")]
    assert [json.loads(line)["loss"] for line in logs[0]] == [json.loads(line)["loss"] for line in logs[1]]

    run = tmp_path / "a"
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    code = main(["train", "--config", str(shipped), "--model", str(smollm2_path), "--train_file", str(data),
                 "--output_dir", str(run), "--max_steps", "3", "--save_steps", "3", "--max_length", "64",
                 "--report_to", "none", "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert code == 0 and "nothing to do" in out and "checkpoint-3 is at step 3 of 3" in out
    assert sorted(p.name for p in run.iterdir()) == before  # no checkpoint-4/, no new log line
    assert (run / "log_history.jsonl").read_text().splitlines() == logs[0]


def test_train_file_may_list_several_files(tmp_path):
    """`train_file: a.jsonl,b.jsonl` reads both in order; one empty file among several is fine (a
    reject-sampling run that solved nothing), all empty is an error, a bad row names its file:line."""
    from heads.training.trainer import read_prompt_completion

    a, b, empty = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "empty.jsonl"
    a.write_text('{"prompt": "p1", "completion": "c1"}\n')
    b.write_text('{"prompt": "p2", "completion": "c2"}\n{"prompt": "p3", "completion": "c3"}\n')
    empty.write_text("")
    rows = read_prompt_completion(f"{a},{empty}, {b}")
    assert [r["prompt"] for r in rows] == ["p1", "p2", "p3"]
    assert len(read_prompt_completion(f"{a},{b}", max_rows=2)) == 2
    with pytest.raises(ConfigError, match="no rows"):
        read_prompt_completion(f"{empty},{empty}")
    b.write_text('{"prompt": "p2", "completion": "c2"}\n{"prompt": "p3"}\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl:2: field 'completion'"):
        read_prompt_completion(f"{a},{b}")
