"""AutoDeco models through the runner: T/P traces in the samples, training-run candidates."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, smollm2_path):
    """A training-run-shaped folder: two heads-only candidates (fresh heads, other seeds) on SmolLM2."""
    from heads.checkpoint import construct

    run = tmp_path_factory.mktemp("runs") / "train1"
    construct(str(smollm2_path), run / "checkpoint-1", seed=1)
    construct(str(smollm2_path), run / "final", seed=2)
    (run / "log_history.jsonl").write_text("")
    return run


def samples_of(folder, task: str = "arith") -> list[dict]:
    """The rows of every samples file of ``task`` in a run folder (one file per preset run)."""
    return [json.loads(x) for path in sorted(folder.glob(f"samples_{task}_*.jsonl"))
            for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_eval_training_run_evaluates_every_candidate_with_traces(training_run, tmp_path, capsys):
    args = ["eval", "--model", str(training_run), "--tasks", "arith", "--decoding", "autodeco", "--limit", "1",
            "--seeds", "1", "--samples", "2", "--max-tokens", "3", "--out", str(tmp_path), "--wandb", "off",
            "--no-progress"]
    assert main(args) == 0
    for name, step in (("checkpoint-1", 1), ("final", None)):
        folder = tmp_path / f"train1-{name}"
        results = json.loads(next(folder.glob("results_*.json")).read_text())
        assert results["config"]["candidate"] == {"run": str(training_run.resolve()), "name": name, "step": step}
        assert results["config"]["decoding"]["heads"] == [True, True]
        metrics = results["results"]["arith"]
        assert 0 < metrics["temperature_mean"] < 2 and 0 < metrics["top_p_mean"] < 1
        rows = [json.loads(x) for x in next(folder.glob("samples_arith_*.jsonl")).read_text().splitlines()]
        assert len(rows) == 2
        for row in rows:
            assert len(row["trace"]["T"]) == len(row["trace"]["P"]) == row["n_tokens"]
            assert row["temperature_mean"] == pytest.approx(sum(row["trace"]["T"]) / row["n_tokens"], abs=1e-3)


@pytest.mark.slow
def test_candidates_share_one_load_and_match_a_fresh_load(training_run, tmp_path, capsys):
    """Several presets × candidates: the second candidate's heads are swapped into the loaded
    model, and its samples equal those of a run that loads that checkpoint alone."""
    common = ["--tasks", "arith", "--limit", "1", "--seeds", "1", "--samples", "2", "--max-tokens", "4",
              "--wandb", "off", "--no-progress"]
    both = tmp_path / "both"
    assert main(["eval", "--model", str(training_run), "--decoding", "autodeco,autodeco-temp",
                 "--out", str(both), *common]) == 0
    err = capsys.readouterr().err
    assert err.count("heads swapped into the loaded hf engine") == 1
    for name in ("checkpoint-1", "final"):
        results = sorted((both / f"train1-{name}").glob("results_*.json"))
        keys = {json.loads(p.read_text())["config"]["decoding"]["key"] for p in results}
        assert keys == {"autodeco", "autodeco-temp"}
    alone = tmp_path / "alone"
    assert main(["eval", "--model", str(training_run / "final"), "--decoding", "autodeco", "--out", str(alone),
                 *common]) == 0
    swapped = [r for r in samples_of(both / "train1-final") if r["decoding"] == "autodeco"]
    fresh = samples_of(alone / "final")
    first = [r for r in samples_of(both / "train1-checkpoint-1") if r["decoding"] == "autodeco"]
    strip = lambda rows: [(r["response"], r["trace"]) for r in rows]  # noqa: E731
    assert strip(swapped) == strip(fresh)
    assert [r["trace"]["T"] for r in first] != [r["trace"]["T"] for r in fresh]  # other heads, other T


@pytest.mark.slow
def test_autodeco_preset_on_a_plain_model_is_refused(tmp_path, capsys, smollm2_path):
    args = ["eval", "--model", "smollm2", "--tasks", "arith", "--decoding", "autodeco-temp", "--limit", "1",
            "--out", str(tmp_path), "--wandb", "off"]
    assert main(args) == 2
    assert "needs an AutoDeco model" in capsys.readouterr().err
