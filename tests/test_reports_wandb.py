"""`autodeco report ... --wandb`: W&B runs written by the real tracker read back as report rows.

The runs come from the real runner (`harness.runner.evaluate`: arith task, math grader, results
and samples files) with W&B offline through `harness.tracking.start_run` / `Tracker.log_results`.
Only generation is scripted (no model load): a backend answering each arith problem right or
wrong by a fixed rule on the per-sample seed, so Pass@1 and its std are non-trivial.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from harness.backends.base import Backend, Completion, sample_seed
from harness.cli import main
from harness.decoding import get_preset
from harness.runner import RunSpec, evaluate
from harness.tracking import read_offline_run, start_run
from reports.runs import ReportInputError, find_runs
from reports.wandb_runs import find_wandb_runs
from tasks.registry import get_task

pytestmark = pytest.mark.slow  # each W&B run starts wandb's service (~2 s)


class ChatTemplate:
    """The one tokenizer method the runner's planning uses (`task.prompt`)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


class Scripted(Backend):
    """Answers `arith/<doc_id>` right unless the sample's seed says otherwise (about 1 in 3 wrong)."""

    name = "scripted"
    model_path = "scripted"

    def __init__(self, answers: dict[str, int]):
        self.tokenizer = ChatTemplate()
        self.answers = answers

    def generate(self, requests):
        for request in requests:
            for index in request.indices:
                answer = self.answers[request.key]
                if sample_seed(request.seed, request.key, index) % 3 == 0:
                    answer += 1
                yield Completion(request.key, index, f"The answer is \\boxed{{{answer}}}.", 8, "stop",
                                 seed=request.seed)


def eval_run(out: Path, decoding: str, seeds: list[int], samples: int, config_drop: str | None = None) -> Path:
    """One real runner evaluation logged to an offline W&B run; returns the results file."""
    task = get_task("arith")
    backend = Scripted({f"arith/{task.doc_id(d)}": d["answer"] for d in task.docs(4)})
    spec = RunSpec(model="scripted", model_path="scripted", model_name="scripted", backend="scripted",
                   preset=get_preset(decoding), seeds=seeds, samples=samples, limit=4)

    def tracker(folder, config, name=None):
        if config_drop:
            config = {k: v for k, v in config.items() if k != config_drop}
        return start_run(folder, config, mode="offline", job_type="eval")

    return evaluate(backend, [task], spec, out, tracker_factory=tracker, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wandb_reports")
    out = root / "runs"
    results = [eval_run(out, "default", [0, 1, 2], 2), eval_run(out, "greedy", [0], 1)]
    train = start_run(root / "train", {"learning_rate": 1e-3}, mode="offline", job_type="train")
    train.log_metrics({"train/loss": 1.5}, step=1)
    train.finish()
    crashed = start_run(root / "crashed", {"model_name": "scripted", "decoding": {"name": "default"}},
                        mode="offline", job_type="eval")
    crashed.finish()  # an evaluation that never logged results
    folders = sorted((out / "scripted" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    return {"root": root, "out": out, "results": results, "folders": folders}


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{re.sub(r" \([0-9×/]+\)", "", k): v for k, v in row.items()} for row in csv.DictReader(fh)]


def test_compare_cells_equal_the_wandb_summary(logged, tmp_path, capsys):
    rep = tmp_path / "rep"
    assert main(["report", "compare", "--wandb", str(logged["root"]), "--out", str(rep)]) == 0
    err = capsys.readouterr().err
    assert "job_type 'train' is not an evaluation" in err and "the run logged no results" in err
    rows = {r["Source"]: r for r in read_csv(rep / "compare.csv")}
    assert len(rows) == 2  # neither the training run nor the one without results is a row
    pass1 = []
    for folder in logged["folders"]:
        summary = read_offline_run(folder)["summary"]
        row = rows[f"W&B offline {folder.name.rsplit('-', 1)[-1]}"]
        assert float(row["arith"]) == pytest.approx(100 * summary["arith/pass@1"])
        assert float(row["arith_std"]) == pytest.approx(100 * summary["arith/pass@1_std"])
        assert float(row["Average"]) == pytest.approx(100 * summary["arith/pass@1"])
        pass1.append(summary["arith/pass@1"])
    assert 0 < pass1[0] < 1  # the scripted backend really got some wrong
    assert {r["Run"] for r in rows.values()} == {"scripted · default", "scripted · greedy"}
    assert rows[next(s for s in rows if rows[s]["Run"].endswith("default"))]["seeds×samples"] == "3×2"
    assert "W&B offline" in (rep / "compare.md").read_text()
    assert (rep / "compare.png").stat().st_size > 10_000 and (rep / "compare.pdf").stat().st_size > 1_000


def test_same_run_from_results_file_and_wandb_gives_identical_rows(logged, tmp_path):
    rep = tmp_path / "rep"
    assert main(["report", "compare", "--runs", str(logged["out"]), "--wandb", str(logged["out"]),
                 "--out", str(rep)]) == 0
    rows = read_csv(rep / "compare.csv")
    assert len(rows) == 4
    by_source = {"results": {}, "wandb": {}}
    for row in rows:
        kind = "results" if row["Source"].startswith("results: ") else "wandb"
        assert row.pop("Source")
        time = row.pop("time (s)")
        assert (float(time) > 0) if kind == "results" else time == ""  # W&B does not log the eval time
        by_source[kind][row["Run"]] = row
    assert by_source["results"] == by_source["wandb"]
    # The records themselves: same model, method, seeds and every numeric metric.
    files, wandb = find_runs([logged["out"]]), find_wandb_runs([logged["out"]])
    assert [r.label for r in files] == [r.label for r in wandb] == ["default", "greedy"]
    for a, b in zip(files, wandb, strict=True):
        assert (a.model_name, a.decoding, a.seeds, a.samples, a.sweep) == (b.model_name, b.decoding, b.seeds,
                                                                             b.samples, b.sweep)
        numeric = {k: v for k, v in a.tasks["arith"].metrics.items() if isinstance(v, (int, float))}
        assert numeric == b.tasks["arith"].metrics
        assert b.tasks["arith"].samples_path is None and b.raw["config"] == json.loads(
            a.path.read_text())["config"]


def test_pass1_reads_wandb_runs_too(logged, tmp_path):
    rep = tmp_path / "rep"
    assert main(["report", "pass1", "--wandb", str(logged["folders"][0]), "--out", str(rep)]) == 0
    row = read_csv(rep / "pass1.csv")[0]
    summary = read_offline_run(logged["folders"][0])["summary"]
    assert (row["Model"], row["Method"]) == ("scripted", "default")
    assert float(row["arith"]) == pytest.approx(100 * summary["arith/pass@1"])


def test_bad_inputs_give_clear_errors(logged, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportInputError, match="no W&B runs"):
        find_wandb_runs([empty])
    assert main(["report", "compare", "--wandb", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert f"{empty}: no W&B runs" in capsys.readouterr().err

    eval_run(tmp_path / "bad", "greedy", [0], 1, config_drop="model_name")
    folder = next((tmp_path / "bad").rglob("offline-run-*"))
    with pytest.raises(ReportInputError, match="missing field 'config.model_name'") as err:
        find_wandb_runs([tmp_path / "bad"])
    assert str(folder.resolve()) in str(err.value)

    foreign = tmp_path / "foreign" / "offline-run-20260101_000000-abc123"
    foreign.mkdir(parents=True)
    (foreign / "run-abc123.wandb").write_bytes(b"not a wandb log")
    with pytest.raises(ReportInputError, match="cannot read the W&B run file .*not a W&B run file"):
        find_wandb_runs([foreign.parent])

    assert main(["report", "compare", "--out", str(tmp_path / "r")]) == 2
    assert "--runs DIR... and/or --wandb SRC" in capsys.readouterr().err
    assert main(["report", "compare", "--wandb", "no/such/run/path", "--out", str(tmp_path / "r")]) == 2
    assert "not a W&B run folder nor entity/project[/run_id]" in capsys.readouterr().err
