"""Steering training (`autodeco train-steer`, heads/training/steering.py + steer_data.py).

- the ranking loss on tensors: sign, margin, zero once the ordering holds by the margin (hinge),
  the logistic variant, the gradients' direction;
- the training/held-out split of configs/steer: disjoint prompts and wordings, >= 20 training
  wordings per direction, the paper's Figure 5 wording held out;
- a command with several wordings (prompt i gets wording i mod k) and the wording deck;
- on the real SmolLM2 (slow): the gradient of the whole steering objective reaches only the heads,
  and the CLI end to end (tiny sizes) → heads that load, provenance, the data cache reused, and
  `autodeco steer` + `autodeco report steering` (Table 4 with both models, the accuracy table).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.core.paths import CONFIGS_DIR
from harness.steer import Command, SteerError, load_config, user_message
from heads.training.steer_config import SteerTrainingConfig
from heads.training.steer_data import SteerData, deal_pairs, wordings
from heads.training.steering import masked_mean, ranking_loss, steer_loss

TRAIN, HELDOUT, DEFAULT = (CONFIGS_DIR / "steer" / f"{n}.yaml" for n in ("train", "heldout", "default"))


def means(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# ---------------------------------------------------------------------------------------------
# The loss on tensors


def test_hinge_is_zero_when_the_ordering_holds_by_the_margin():
    base, low, high = means(0.5, 0.7), means(0.35, 0.55), means(0.65, 0.9)  # gaps 0.15/0.15 and 0.15/0.2
    loss = ranking_loss(base, low, high, margin=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert all(t.grad.abs().sum() == 0 for t in (base, low, high))
    assert ranking_loss(base, low, high, margin=0.15).item() == pytest.approx(0.0, abs=1e-6)  # exactly at the margin


def test_hinge_value_is_the_shortfall_per_triple():
    # triple 0: lower is 0.02 below (short by 0.08), higher 0.1 above (ok);
    # triple 1: lower is 0.1 ABOVE (short by 0.2), higher 0.05 below (short by 0.15)
    base, low, high = means(0.5, 0.5), means(0.48, 0.6), means(0.6, 0.45)
    loss = ranking_loss(base, low, high, margin=0.1)
    assert loss.item() == pytest.approx((0.08 + 0.0 + 0.2 + 0.15) / 2)
    assert ranking_loss(base, low, high, margin=0.0).item() == pytest.approx((0.0 + 0.0 + 0.1 + 0.05) / 2)


def test_gradients_push_lower_down_and_higher_up():
    base, low, high = means(0.5), means(0.55), means(0.45)  # both commands moved the wrong way
    for kind in ("hinge", "logistic"):
        for t in (base, low, high):
            t.grad = None
        ranking_loss(base, low, high, margin=0.1, kind=kind).backward()
        assert low.grad.item() > 0 and high.grad.item() < 0  # gradient descent: low decreases, high increases
        assert base.grad.item() == pytest.approx(-(low.grad.item() + high.grad.item()))  # base pulled between
    base.grad = low.grad = high.grad = None
    ranking_loss(base, means(0.3), high, margin=0.1).backward()  # only the higher side is short: base goes down
    assert base.grad.item() > 0


def test_logistic_is_positive_smooth_and_falls_as_the_gaps_grow():
    base = means(0.5)
    values = [ranking_loss(base, means(0.5 - gap), means(0.5 + gap), margin=0.1, kind="logistic",
                           softness=0.02).item() for gap in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert all(v > 0 for v in values) and values == sorted(values, reverse=True)
    assert values[2] == pytest.approx(2 * 0.02 * torch.log(torch.tensor(2.0)).item())  # at the margin: 2 s log 2
    assert values[-1] < 1e-6
    with pytest.raises(ValueError, match="hinge or logistic"):
        ranking_loss(base, base, base, 0.1, kind="square")


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).tolist() == [1.5, 4.0]


# ---------------------------------------------------------------------------------------------
# Configs: the held-out split


def test_training_and_heldout_sets_are_disjoint():
    train, heldout = load_config(TRAIN), load_config(HELDOUT)
    assert not set(train.prompts) & set(heldout.prompts)
    train_words = set(wordings(train.commands, "lower")) | set(wordings(train.commands, "higher"))
    heldout_words = set(wordings(heldout.commands, "lower")) | set(wordings(heldout.commands, "higher"))
    assert not train_words & heldout_words
    normalized = {w.lower().strip(" .!") for w in train_words}
    assert not normalized & {w.lower().strip(" .!") for w in heldout_words}  # not even up to case/punctuation
    for direction in ("lower", "higher"):
        assert len(set(wordings(train.commands, direction))) >= 20
        assert len(set(wordings(heldout.commands, direction))) >= 5
    assert len(set(train.prompts)) == len(train.prompts) >= 48
    assert len(set(heldout.prompts)) == len(heldout.prompts) >= 20
    # the paper's Figure 5 sentences (default.yaml) are evaluation wordings, never training ones
    paper = {c.text for c in load_config(DEFAULT).commands if c.text}
    assert paper <= heldout_words and not paper & train_words


# Words too common in instructions to make two sentences the same request.
GENERIC = set("""a an the and or of to in on with as be is are it you your me my i can could would please for that
this than more most any every each what do not no so up its like from at by has have who how why about write tell
explain describe give make suggest invent plan answer answers response reply story short new let get keep something
one things way possible all small someone ways day old year town""".split())


def _content(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in GENERIC}


def test_no_training_entry_paraphrases_a_heldout_one():
    """Beyond exact strings: no training prompt or wording shares two content words with a held-out
    one (of the same direction), e.g. "Let your answer wander somewhere strange." against "Let the
    answer wander in strange directions.", or a lighthouse keeper's story against his poem."""
    train, heldout = load_config(TRAIN), load_config(HELDOUT)
    pairs = [(p, q) for p in train.prompts for q in heldout.prompts]
    for direction in ("lower", "higher"):
        pairs += [(w, v) for w in wordings(train.commands, direction) for v in wordings(heldout.commands, direction)]
    close = [(a, b) for a, b in pairs if len(_content(a) & _content(b)) >= 2]
    assert not close, close
    assert len(_content("Let your answer wander somewhere strange.")
               & _content("Let the answer wander in strange directions.")) == 2  # the rule catches those


def test_several_wordings_rotate_over_prompts():
    command = Command("low", ("Be sure.", "Be exact.", "Be plain."), "lower")
    assert [command.wording(i) for i in range(4)] == ["Be sure.", "Be exact.", "Be plain.", "Be sure."]
    assert user_message("Name a cat.", command, 4) == "Name a cat. Be exact."
    assert Command("baseline", None).wording(3) is None and Command("low", "One.", "lower").wordings == ("One.",)


@pytest.mark.parametrize("text, match", [
    ("[]", "distinct non-empty strings"),
    ("['a', 'a']", "distinct non-empty strings"),
    ("['a', 3]", "distinct non-empty strings"),
    ("{x: 1}", "a non-empty string, a list of them, or null"),
])
def test_bad_wording_lists_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(f"prompts: [p]\ncommands:\n  b: null\n  low: {{direction: lower, text: {text}}}\n")
    with pytest.raises(SteerError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value) and "commands.low.text" in str(err.value)


def test_wordings_are_dealt_evenly():
    lower, higher = [f"l{i}" for i in range(5)], [f"h{i}" for i in range(7)]
    pairs = deal_pairs(20, lower, higher, 2, seed=3)
    assert len(pairs) == 20 and all(len(p) == 2 for p in pairs)
    uses_low = Counter(low for item in pairs for low, _ in item)
    uses_high = Counter(high for item in pairs for _, high in item)
    assert set(uses_low) == set(lower) and max(uses_low.values()) - min(uses_low.values()) <= 1
    assert set(uses_high) == set(higher) and max(uses_high.values()) - min(uses_high.values()) <= 1
    assert deal_pairs(20, lower, higher, 2, seed=3) == pairs != deal_pairs(20, lower, higher, 2, seed=4)


def test_config_check_names_the_field():
    from harness.core import config as configs
    from harness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--init-from is required"):
        configs.build(SteerTrainingConfig, ("x.yaml", {}))
    with pytest.raises(ConfigError, match="x.yaml: field 'margin_temperature'"):
        configs.build(SteerTrainingConfig, ("x.yaml", {"init_from": "m", "margin_temperature": -0.1}))
    with pytest.raises(ConfigError, match="--train-file is required when autodeco_weight > 0"):
        configs.build(SteerTrainingConfig, ("x.yaml", {"init_from": "m"}))  # the AutoDeco term needs rows
    with pytest.raises(ConfigError, match="sample_decoding"):
        configs.build(SteerTrainingConfig, ("x.yaml", {"init_from": "m", "autodeco_weight": 0,
                                                       "sample_decoding": "sideways"}))
    cfg = configs.build(SteerTrainingConfig, ("x.yaml", {"init_from": "m", "autodeco_weight": 0}))
    assert cfg.rank_loss == "hinge" and cfg.steer_config.endswith("configs/steer/train.yaml")


# ---------------------------------------------------------------------------------------------
# On the real SmolLM2


@pytest.fixture(scope="module")
def fresh_heads(tmp_path_factory, smollm2_path) -> Path:
    from heads.checkpoint import construct

    torch.set_num_threads(1)
    return construct(str(smollm2_path), tmp_path_factory.mktemp("steer_train") / "ad-fresh", seed=0)


@pytest.mark.slow
def test_gradient_reaches_only_the_heads(fresh_heads):
    from transformers import AutoTokenizer

    from heads.model import AutoDecoModelForCausalLM
    from heads.training.steer_data import _prompt_ids, anchor_rows, context_hidden
    from heads.training.steering import frozen_heads

    model = AutoDecoModelForCausalLM.from_pretrained(str(fresh_heads))
    tokenizer = AutoTokenizer.from_pretrained(model.config.base_model_name_or_path)
    completion = tokenizer(" Once upon a time there was a", add_special_tokens=False).input_ids
    contexts = [(_prompt_ids(tokenizer, "Tell a story.", w), completion) for w in (None, "Be plain.", "Be wild.")]
    hidden, mask = context_hidden(model, contexts, len(completion), progress=False)
    assert hidden.shape == (3, len(completion), model.config.hidden_size) and bool(mask.all())
    anchor_hidden, anchor_labels = anchor_rows(
        model, tokenizer, [{"prompt": "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n", "completion": "2"}],
        progress=False)
    assert anchor_labels[0, 0] == -100 and anchor_labels[0, -1] == tokenizer.eos_token_id
    data = SteerData(hidden, mask, torch.tensor([[0, 1, 2]]), anchor_hidden, anchor_labels)
    # the base's logits are lm_head(hidden) at those positions: the hidden states are the real ones
    ids = torch.tensor([contexts[1][0] + completion])
    with torch.no_grad():
        _, logits, _ = model.base_forward(ids)
    start = len(contexts[1][0]) - 1
    assert torch.allclose(model.llm.get_output_embeddings()(hidden[1]), logits[0, start : start + len(completion)],
                          atol=1e-4)

    cfg = SteerTrainingConfig(init_from="m", train_file="t", margin_temperature=1.5, margin_top_p=0.9,
                              autodeco_rows=1, top_p_positions=4)
    reference = frozen_heads(model)
    with torch.no_grad():  # move the heads off the reference so that the anchor term has a gradient too
        for p in model.temp_head.parameters():
            p.add_(0.01)
    loss, stats = steer_loss(model, data, torch.tensor([0]), cfg, torch.Generator().manual_seed(0), reference)
    assert stats["rank_temperature"] > 0 and stats["rank_top_p"] > 0 and stats["anchor"] > 0
    assert stats["autodeco_loss"] > 0
    loss.backward()
    named = dict(model.named_parameters())
    assert all(p.grad is None for n, p in named.items() if n.startswith("llm."))
    heads = [n for n in named if n.startswith(("temp_head.", "top_p_head."))]
    assert heads and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in heads)
    assert all(p.grad is None for head in reference for p in head.parameters())


@pytest.mark.slow
def test_train_steer_cli_end_to_end(tmp_path, fresh_heads, capsys):
    from safetensors.torch import load_file

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"<|im_start|>user\nWhat is {a}+{a}?<|im_end|>\n"
                                                  f"<|im_start|>assistant\n", "completion": f"{2 * a}"}) + "\n"
                            for a in (2, 3)))
    out = tmp_path / "steer"
    argv = ["train-steer", "--config", str(CONFIGS_DIR.parent / "configs/train/smollm2_steer.yaml"),
            "--init_from", str(fresh_heads), "--train_file", str(rows), "--output_dir", str(out),
            "--max_prompts", "2", "--completions_per_prompt", "1", "--completion_tokens", "6",
            "--pairs_per_completion", "2", "--sample_decoding", "autodeco", "--sample_backend", "hf",
            "--max_steps", "4", "--batch_size", "2", "--top_p_triples", "2", "--logging_steps", "2",
            "--top_p_positions", "3", "--autodeco_rows", "1", "--sample_under_commands", "false", "--no_progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    n_words = len(wordings(load_config(TRAIN).commands, "lower")), len(wordings(load_config(TRAIN).commands, "higher"))
    assert f"4 triples from 2 completions of 2 prompts, {n_words[0]} + {n_words[1]} wordings, 2 AutoDeco rows" in err
    final = out / "final"
    provenance = json.loads((final / "steering_training.json").read_text())
    assert provenance["init_from"] == str(fresh_heads.resolve()) and provenance["data"]["n_triples"] == 4
    assert provenance["prompts"] == load_config(TRAIN).prompts[:2] and len(provenance["lower_wordings"]) == n_words[0]
    assert set(provenance["ordering_after"]) == {"temperature", "top_p"}
    log = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert all(k in log[0] for k in ("loss", "rank_temperature", "rank_top_p", "anchor", "autodeco_loss"))
    before, after = load_file(str(fresh_heads / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "steer_data.pt").is_file() and (out / "steer_train_config.yaml").is_file()

    assert main(argv + ["--max_steps", "1", "--output_dir", str(out)]) == 0  # loss settings only: the cache serves
    assert "reused" in capsys.readouterr().err

    # Table 4 with both models, and the accuracy table pairing the steered heads with their start.
    runs, rep = tmp_path / "runs", tmp_path / "rep"
    for model in (fresh_heads, out):
        assert main(["steer", "--model", str(model), "--config", str(HELDOUT), "--limit", "2", "--max-tokens", "4",
                     "--out", str(runs), "--no-progress"]) == 0
        assert main(["eval", "--model", str(model), "--tasks", "arith", "--decoding", "autodeco", "--limit", "3",
                     "--max-tokens", "4", "--seeds", "1", "--samples", "2", "--out", str(runs), "--wandb", "off",
                     "--no-progress"]) == 0
    steered, = (runs / "steer-final").glob("steer_*.json")
    data = json.loads(steered.read_text())
    assert data["config"]["targeted_training"]["init_from"] == str(fresh_heads.resolve())
    assert [s["text"] for s in data["samples"] if s["command"] == "low"] == list(load_config(HELDOUT).commands[1].text[:2])
    untrained, = (runs / "ad-fresh").glob("steer_*.json")
    assert json.loads(untrained.read_text())["config"]["targeted_training"] is None

    assert main(["report", "steering", "--runs", str(runs), "--out", str(rep)]) == 0
    md = (rep / "steering.md").read_text()
    assert "Ours: ad-fresh, before steering training" in md and "Ours: steer-final, after steering training" in md
    assert md.index("before steering training") < md.index("after steering training")
    assert "Seen in that training: 0 of this file's 2 prompts, 0 of its 4 wordings." in md
    rows_csv = list(csv.DictReader((rep / "steering_accuracy.csv").open()))
    assert len(rows_csv) == 1 and rows_csv[0]["Task"] == "arith"
    assert rows_csv[0]["Before"] == "ad-fresh" and rows_csv[0]["After (steering-trained)"] == "steer-final"
    assert rows_csv[0]["problems"] == "3" and rows_csv[0]["samples/problem"] == "2"


def test_bar_line_names_each_miss():
    from reports.steering import bar_line

    def data(low, high):
        commands = [{"name": "baseline", "direction": None}, {"name": "low", "direction": "lower"},
                    {"name": "high", "direction": "higher"}]
        summary = {"baseline": {}, "low": {"consistency_temperature": low[0], "delta_temperature": low[1]},
                   "high": {"consistency_temperature": high[0], "delta_temperature": high[1]}}
        return {"config": {"model_name": "m", "baseline": "baseline", "commands": commands}, "summary": summary}

    assert bar_line(data((0.92, -0.08), (0.95, 0.2))).endswith(" met")
    line = bar_line(data((0.88, -0.19), (0.96, 0.03)))
    assert "NOT met (low consistency 88% < 90%; high ΔT +0.030 short of +0.05)" in line
    assert "short of" in bar_line(data((1.0, -0.01), (1.0, 0.1)))  # the right sign, too small a move


def test_demo_headline_keeps_the_steered_heads_out_of_smollm2s_rows(tmp_path):
    """The steered heads' own eval (runs/steer-final, newer) must not stand in for the trained heads'."""
    from harness.cli.demo import headline
    from tests.test_viewer import rows_for, write_run

    runs = tmp_path / "runs"
    write_run(runs, "final", "autodeco", "arith", rows_for({"0": [True, True], "1": [True, False]}, False),
              "2026-01-01T00-00-00.000001")
    write_run(runs, "steer-final", "autodeco", "arith", rows_for({"0": [False, False], "1": [False, False]}, False),
              "2026-01-02T00-00-00.000001")
    autodeco = [line for line in headline(tmp_path) if line.strip().startswith("autodeco ")]
    assert len(autodeco) == 1 and "Pass@1 =  75.0%" in autodeco[0], autodeco
