"""`autodeco eval` / `autodeco sweep` end to end with the real SmolLM2: outputs, W&B files, a
SIGKILL'ed run resumed to identical results, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.metrics import pass_at_k
from harness.store import SampleStore, key_of
from harness.tracking import read_offline_run

REPO = Path(__file__).resolve().parents[1]
RUN = ["eval", "--model", "smollm2", "--tasks", "arith", "--decoding", "default", "--seeds", "2",
       "--samples", "2", "--limit", "2", "--max-tokens", "8", "--no-progress"]
TOTAL = 2 * 2 * 2  # docs × seeds × samples


def autodeco(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=_env(), **kwargs)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smollm2_path) -> Path:
    """One uninterrupted CLI run, W&B offline."""
    out = tmp_path_factory.mktemp("full")
    done = autodeco([*RUN, "--out", str(out), "--wandb", "offline"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "smollm2"


@pytest.mark.slow
def test_cli_run_writes_lm_eval_layout_and_wandb_files(full_run):
    results = json.loads(only(full_run, "results_*.json").read_text())
    stamp = only(full_run, "results_*.json").stem.removeprefix("results_")
    assert {"results", "configs", "versions", "n-samples", "config", "git_hash", "date",
            "total_evaluation_time_seconds"} <= set(results)
    config = results["config"]
    assert config["model_name"] == "smollm2" and config["backend"] == "hf"
    assert config["decoding"]["name"] == "default" and config["seeds"] == [0, 1] and config["samples"] == 2
    assert results["n-samples"]["arith"]["effective"] == 2
    metrics = results["results"]["arith"]
    assert (metrics["n_docs"], metrics["n_samples_per_doc"]) == (2, 4)

    rows = read_rows(full_run / f"samples_arith_{stamp}.jsonl")
    assert len(rows) == TOTAL
    assert {"doc_id", "prompt_hash", "seed", "sample_index", "response", "extracted", "correct", "n_tokens",
            "finish_reason"} <= set(rows[0])
    assert all(0 < r["n_tokens"] <= 8 for r in rows)
    per_seed = []
    for seed in (0, 1):
        docs = {r["doc_id"] for r in rows}
        per_seed.append(sum(sum(r["correct"] for r in rows if r["seed"] == seed and r["doc_id"] == d) / 2
                            for d in docs) / len(docs))
    assert metrics["pass@1_per_seed"] == pytest.approx(per_seed)
    assert metrics["pass@1"] == pytest.approx(sum(per_seed) / 2)
    pooled = [sum(r["correct"] for r in rows if r["doc_id"] == d) for d in sorted({r["doc_id"] for r in rows})]
    assert pass_at_k(4, pooled[0], 1) + pass_at_k(4, pooled[1], 1) == pytest.approx(2 * metrics["pass@1"])

    run_dir = only(full_run / "wandb", "offline-run-*")
    logged = read_offline_run(run_dir)
    assert logged["summary"]["arith/pass@1"] == pytest.approx(metrics["pass@1"])
    assert logged["summary"]["arith/n_docs"] == 2
    assert logged["config"]["decoding"]["name"] == "default" and logged["config"]["seeds"] == [0, 1]
    assert any(a["type"] == "results" and a["files"] == [f"results_{stamp}.json"] for a in logged["artifacts"])
    table = only(run_dir / "files" / "media" / "table" / "samples", "arith_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == TOTAL


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_identical_results(full_run, tmp_path):
    out = tmp_path / "crash"
    store_path = out / "smollm2" / "sample_store.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *RUN, "--out", str(out), "--wandb", "off"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store_path.exists() and store_path.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(SampleStore(store_path))
    assert 3 <= before < TOTAL
    with open(store_path, "a") as f:  # and a torn write on top
        f.write('{"model": "smollm2", "task": "ari')
    bad_line = store_path.read_text().count("\n") + 1

    again = autodeco([*RUN, "--out", str(out), "--wandb", "off"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"line {bad_line}" in again.stderr and "skipped" in again.stderr
    assert f"{before} of {TOTAL} samples already in" in again.stderr

    resumed = json.loads(only(out / "smollm2", "results_*.json").read_text())
    reference = json.loads(only(full_run, "results_*.json").read_text())
    assert resumed["results"] == reference["results"]
    assert resumed["generation"]["generated"] == TOTAL - before  # no finished sample redone
    lines = [json.loads(x) for x in store_path.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert len(lines) == TOTAL and len({key_of(r) for r in lines}) == TOTAL

    def comparable(folder):
        return sorted(read_rows(only(folder, "samples_arith_*.jsonl")), key=lambda r: (r["seed"], r["doc_id"], r["sample_index"]))

    assert comparable(out / "smollm2") == comparable(full_run)


@pytest.mark.slow
def test_sweep_one_load_reuses_store_and_shares_a_group(tmp_path, smollm2_path, capsys):
    args = ["sweep", "--model", "smollm2", "--tasks", "arith", "--limit", "1", "--seeds", "1", "--samples", "1",
            "--max-tokens", "4", "--temperatures", "0.5,1.0", "--top-ps", "0.5,1.0", "--out", str(tmp_path),
            "--wandb", "offline", "--group", "g1", "--no-progress"]
    assert main(args) == 0
    folder = tmp_path / "smollm2"
    summary = json.loads((folder / "sweep_summary_arith.json").read_text())
    assert [r["temperature"] for r in summary["temperature_grid"]] == [0.0, 0.5, 1.0]  # greedy first
    greedy_wins = summary["best_temperature"] == 0.0
    assert [r["top_p"] for r in summary["top_p_grid"]] == ([] if greedy_wins else [0.5, 1.0])
    assert summary["best_temperature"] in (0.0, 0.5, 1.0) and summary["best_top_p"] in (0.5, 1.0)
    points = 3 if greedy_wins else 5
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("results_*.json"))]
    assert len(results) == points  # one per grid point
    assert {r["config"]["sweep"]["group"] for r in results} == {"g1"}
    assert len(SampleStore(folder / "sample_store.jsonl")) == points - (0 if greedy_wins else 1)  # (T*, 1) once
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == points and {read_offline_run(r)["group"] for r in runs} == {"g1"}


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["--decoding", "nucleus"], "unknown decoding preset 'nucleus'"),
    (["--model", "./no/such/model"], "unknown model './no/such/model'"),
    (["--seeds", "0"], "--seeds must be in 1..1024, got 0"),
    (["--samples", "0"], "--samples must be in 1..4096, got 0"),
    (["--backend", "tgi"], "unknown backend 'tgi'"),
    (["--decoding", "static:temperature=-1"], "temperature must be > 0"),
])
def test_bad_input_exits_2_with_a_clear_message(extra, message, tmp_path, capsys, smollm2_path):
    base = ["eval", "--model", "smollm2", "--tasks", "arith", "--out", str(tmp_path), "--wandb", "off"]
    assert main([*base, *extra]) == 2
    assert message in capsys.readouterr().err


def test_output_dir_with_other_settings_is_refused(tmp_path, capsys, smollm2_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "run_settings.json").write_text(json.dumps({"model_path": "/some/other/model", "backend": "hf"}))
    assert main(["eval", "--model", "smollm2", "--tasks", "arith", "--out", str(tmp_path), "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "/some/other/model" in err
