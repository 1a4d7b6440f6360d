"""Report generators on files written by the REAL runner (`autodeco eval` / `autodeco sweep` on
SmolLM2, tiny settings), and the efficiency bench on the real model. Table cells are checked
against numbers recomputed here from the samples files; figures must decode and be non-trivial.

One session fixture runs everything once: arith --limit 1, 2 seeds, 8 samples for
default/autodeco (so Pass@16 exists), 1 sample for the rest, 4 new tokens; a 2+1-point sweep;
a training-run folder with two candidates. Most of its time is the runner's per-run overhead.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from harness.cli import main
from reports import paper
from reports.runs import find_runs, find_sweeps, pass1_from_samples, pass_k_from_samples, read_samples

pytestmark = pytest.mark.slow

COMMON = ["--tasks", "arith", "--seeds", "2", "--limit", "1", "--max-tokens", "4", "--wandb", "off",
          "--no-progress"]


def autodeco(*argv: str) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"autodeco {' '.join(map(str, argv))} exited {code}"


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory, smollm2_path) -> dict:
    root = tmp_path_factory.mktemp("reports_real")
    runs, train, data = root / "runs", root / "train", root / "train.jsonl"
    rows = [{"prompt": f"<|im_start|>user\nWhat is {a}+{b}?<|im_end|>\n<|im_start|>assistant\n",
             "completion": f"{a}+{b} = {a + b}. The answer is \\boxed{{{a + b}}}.<|im_end|>"}
            for a, b in ((2, 3), (7, 6))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The real trainer: 1 step, a heads-only checkpoint, final/ and log_history.jsonl.
    autodeco("train", "--model", "smollm2", "--train_file", data, "--output_dir", train, "--max_steps", "1",
             "--gradient_accumulation_steps", "1", "--save_steps", "1", "--report_to", "none")
    heads = train / "final"
    for method, model, samples in (("greedy", "smollm2", 1), ("default", "smollm2", 8),
                                   ("autodeco", heads, 8), ("autodeco-temp", heads, 1),
                                   ("autodeco-top-p", heads, 1)):
        autodeco("eval", "--model", model, "--decoding", method, "--samples", samples, "--out", runs, *COMMON)
    autodeco("sweep", "--model", "smollm2", "--temperatures", "0.5,1.0", "--top-ps", "1.0",
             "--samples", "1", "--out", runs, *COMMON)
    # A training-run folder as --model: the runner evaluates every candidate in it.
    autodeco("eval", "--model", train, "--decoding", "autodeco", "--samples", "1", "--out", root / "candidates",
             *COMMON)
    return {"root": root, "runs": runs, "train": train, "candidates": root / "candidates",
            "alias": f"{heads.name}=smollm2"}


def read_csv(path: Path) -> list[dict]:
    """Rows of a table's CSV; task columns lose their "(problems×samples)" header suffix."""
    with open(path) as fh:
        return [{re.sub(r" \([0-9×/]+\)", "", k): v for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_figure(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 10_000, path
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 200
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(99)) > 20  # not a blank canvas
    assert path.with_suffix(".pdf").stat().st_size > 5_000


def test_pass1_cells_equal_recomputation_from_samples(real_runs, tmp_path):
    autodeco("report", "pass1", "--runs", real_runs["runs"], "--out", tmp_path, "--alias", real_runs["alias"])
    rows = {(r["Model"], r["Method"]): r for r in read_csv(tmp_path / "pass1.csv")}
    checked = 0
    for run in find_runs([real_runs["runs"]]):
        if run.sweep:
            continue
        mean, std, _ = pass1_from_samples(read_samples(run.tasks["arith"].samples_path))
        row = rows[("smollm2", run.label)]
        assert float(row["arith"]) == pytest.approx(100 * mean)
        assert float(row["arith_std"]) == pytest.approx(100 * std)
        checked += 1
    assert checked == 5
    sweep = find_sweeps([real_runs["runs"]])[0]
    assert float(rows[("smollm2", "oracle")]["arith"]) == pytest.approx(100 * sweep.best_pass1)
    best = max(round(float(r["arith"]), 2) for r in rows.values())
    marked = {k for k, r in rows.items() if "arith" in r["best_columns"].split(";")}
    anecdotal = all(r["arith_n"] and int(float(r["arith_n"])) < 10 for r in rows.values() if r["Method"] != "oracle")
    assert marked == (set() if anecdotal else {k for k, r in rows.items() if round(float(r["arith"]), 2) == best})
    assert "\\toprule" in (tmp_path / "pass1.tex").read_text()


def test_passk_and_error_reduction_recomputed(real_runs, tmp_path):
    autodeco("report", "passk", "--runs", real_runs["runs"], "--out", tmp_path, "--alias", real_runs["alias"])
    rows = {r["Method"]: r for r in read_csv(tmp_path / "passk_k16.csv")}
    values = {}
    for run in find_runs([real_runs["runs"]]):
        if run.label in ("default", "autodeco"):
            values[run.label] = 100 * pass_k_from_samples(read_samples(run.tasks["arith"].samples_path), 16)
            assert float(rows[run.label]["arith"]) == pytest.approx(values[run.label])
    reduction = rows["err. red. autodeco vs default"]["arith"]
    if values["default"] < 100:
        expected = 100 * (values["autodeco"] - values["default"]) / (100 - values["default"])
        assert float(reduction) == pytest.approx(expected)
    else:
        assert reduction == ""


def test_oracle_figure_and_gap(real_runs, tmp_path):
    autodeco("report", "oracle", "--runs", real_runs["runs"], "--out", tmp_path)
    row = read_csv(tmp_path / "oracle.csv")[0]
    sweep = find_sweeps([real_runs["runs"]])[0]
    summary = json.loads(sweep.path.read_text())
    assert float(row["Oracle (test-tuned)"]) == pytest.approx(100 * summary["best_pass@1"])
    best_t = 0.0 if row["best T"] == "greedy" else float(row["best T"])
    assert best_t == summary["best_temperature"] and float(row["best P"]) == summary["best_top_p"]
    autodeco_run = [r for r in find_runs([real_runs["runs"]]) if r.label == "autodeco"][-1]
    mean, _, _ = pass1_from_samples(read_samples(autodeco_run.tasks["arith"].samples_path))
    assert float(row["AutoDeco − Oracle"]) == pytest.approx(100 * mean - 100 * summary["best_pass@1"])
    assert_figure(tmp_path / "oracle.png")


def test_ablation_traces_compare_and_index(real_runs, tmp_path):
    dirs = [real_runs["runs"], real_runs["candidates"], real_runs["train"]]
    autodeco("report", "all", "--runs", *dirs, "--out", tmp_path, "--alias", real_runs["alias"])
    index = (tmp_path / "index.md").read_text()
    for name in ("pass1", "passk_k16", "oracle", "ablation", "traces", "compare", "training", "training_candidates"):
        assert f"({name}.md)" in index or f"({name}.png)" in index, name
    for figure in ("ablation", "traces", "compare", "oracle"):
        assert_figure(tmp_path / f"{figure}.png")
    ablation = {r["Method"] for r in read_csv(tmp_path / "ablation.csv")}
    assert ablation == {"default", "autodeco-temp", "autodeco-top-p", "autodeco"}
    traces = {r["Method"]: r for r in read_csv(tmp_path / "traces.csv")}
    run = [r for r in find_runs([real_runs["runs"]]) if r.label == "autodeco"][-1]
    ts = [t for row in read_samples(run.tasks["arith"].samples_path) for t in row["trace"]["T"]]
    assert float(traces["autodeco"]["mean T"]) == pytest.approx(sum(ts) / len(ts))
    assert all(0 < t < 2 for t in ts)
    compare = read_csv(tmp_path / "compare.csv")
    assert len(compare) == len([r for r in find_runs(dirs) if not r.sweep])
    candidates = read_csv(tmp_path / "training_candidates.csv")
    assert [c["Candidate"] for c in candidates] == ["checkpoint-1", "final"]
    assert candidates[0]["Step"] == "1"
    for candidate in candidates:  # each cell = Pass@1 recomputed from that candidate's samples
        run = [r for r in find_runs([real_runs["candidates"]]) if r.model_name.endswith(candidate["Candidate"])][0]
        mean, _, _ = pass1_from_samples(read_samples(run.tasks["arith"].samples_path))
        assert float(candidate["arith"]) == pytest.approx(100 * mean)
    assert not any("arith" in c["best_columns"] for c in candidates)  # fewer than 10 problems: never bold
    log = [json.loads(line) for line in (real_runs["train"] / "log_history.jsonl").read_text().splitlines()]
    curves = read_csv(tmp_path / "training_log.csv")
    assert [int(r["step"]) for r in curves] == [r["step"] for r in log] == [1]
    assert [float(r["loss"]) for r in curves] == pytest.approx([r["loss"] for r in log])
    assert_figure(tmp_path / "training.png")


def test_report_errors_are_one_line(real_runs, tmp_path, capsys):
    assert main(["report", "efficiency", "--runs", str(real_runs["runs"]), "--out", str(tmp_path)]) == 2
    assert "no efficiency.json" in capsys.readouterr().err
    assert main(["report", "pass1", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_efficiency_bench_and_report(tmp_path):
    out = tmp_path / "bench" / "efficiency.json"
    autodeco("bench", "efficiency", "--model", "smollm2", "--prompt-lengths", "32,64", "--gen-tokens", "4",
             "--repeats", "1", "--threads", "1", "--out", out)
    data = json.loads(out.read_text())
    assert {(r["prompt_length"], r["method"]) for r in data["rows"]} == {
        (32, "default"), (32, "autodeco"), (64, "default"), (64, "autodeco")}
    for check in data["flops_check"]:  # the analytic formula against torch's flop counter
        assert check["ratio"] == pytest.approx(1.0, abs=0.01), check
    rows = {(r["prompt_length"], r["method"]): r for r in data["rows"]}
    assert rows[(64, "autodeco")]["flops"] > rows[(64, "default")]["flops"] > rows[(32, "default")]["flops"]
    assert all(r["latency_s"] > 0 and r["peak_memory_mb"] > 100 for r in data["rows"])
    autodeco("report", "efficiency", "--runs", out.parent, "--out", tmp_path / "rep")
    table = read_csv(tmp_path / "rep" / "efficiency.csv")
    assert len(table) == 4
    assert_figure(tmp_path / "rep" / "efficiency.png")
    published = len(paper.load_paper()["table3"]["rows"])  # the paper's Table 3, every length and method
    assert (tmp_path / "rep" / "efficiency_paper.md").read_text().count("| R1-Distill-Qwen-7B |") == published
