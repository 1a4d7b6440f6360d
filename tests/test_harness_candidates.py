"""`--model RUN_DIR`: a training run folder is evaluated candidate by candidate."""

from __future__ import annotations

import pytest

from harness.models import ModelError, candidates, resolve_targets


def test_training_run_folder_lists_checkpoints_by_step_then_final(tmp_path, monkeypatch):
    import harness.models

    monkeypatch.setattr(harness.models, "check_model", lambda path: None)  # empty configs: names only here
    run = tmp_path / "train1"
    for name in ("checkpoint-10", "checkpoint-2", "final"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    (run / "checkpoint-5").mkdir()  # no config.json: not a model, skipped
    assert [c[0] for c in candidates(run)] == ["checkpoint-2", "checkpoint-10", "final"]
    targets = resolve_targets(str(run))
    assert [t.name for t in targets] == ["train1-checkpoint-2", "train1-checkpoint-10", "train1-final"]
    assert targets[0].candidate == {"run": str(run.resolve()), "name": "checkpoint-2", "step": 2}
    assert targets[2].candidate["step"] is None


def test_folder_without_models_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json and no checkpoint"):
        resolve_targets(str(tmp_path))
