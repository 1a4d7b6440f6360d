"""Table writers, the paper-numbers data file and small pure helpers of reports/ (fast)."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess

import pytest

from harness.bench.efficiency import analytic_forward_flops, generation_flops, parse_lengths
from reports import paper
from reports.passk import relative_error_reduction
from reports.render import Table, mark_best, to_csv, to_latex, to_markdown, write_table
from reports.runs import unbiased_pass_at_k


def small_table() -> Table:
    table = Table(name="t", title="Pass@1 (%) — a & b", columns=["Model", "Method", "task_a", "Average"],
                  rows=[["m_1", "default", (10.0, 1.5), 10.0], ["m_1", "autodeco", (20.0, 2.5), 20.0],
                        ["m_1", "oracle", None, None]], notes=["Δ = ours − paper ± std"])
    mark_best(table, [2, 3])
    return table


def test_mark_best_bolds_the_highest_mean_per_column():
    table = small_table()
    assert table.bold == {(1, 2), (1, 3)}
    md = to_markdown(table)
    assert "| m_1 | autodeco | **20.00 ± 2.50** | **20.00** |" in md
    assert "| m_1 | oracle | – | – |" in md


def test_csv_splits_mean_and_std_and_names_best_columns():
    rows = list(csv.reader(io.StringIO(to_csv(small_table()))))
    assert rows[0] == ["Model", "Method", "task_a", "task_a_std", "Average", "best_columns"]
    assert rows[2] == ["m_1", "autodeco", "20.0", "2.5", "20.0", "task_a;Average"]
    assert rows[3][2:5] == ["", "", ""]


def test_latex_is_booktabs_and_escaped():
    tex = to_latex(small_table())
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lccc}", r"\&", r"m\_1",
                  r"\textbf{20.00 $\pm$ 2.50}", r"$\Delta$"):
        assert token in tex
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert all(line.count("&") == 3 for line in body)  # header + 3 rows, 4 columns each


def test_latex_compiles(tmp_path):
    """With a TeX engine installed (texlive-latex-base + -recommended), the tables compile."""
    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    write_table(small_table(), tmp_path)
    write_table(paper.paper_table("table1", "paper1"), tmp_path)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}"
                                      "\\input{t.tex}\\input{paper1.tex}\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_paper_numbers_cite_a_source_for_every_row():
    data = paper.load_paper()
    sources = set(data["sources"])
    for key in ("table1", "table2", "passk"):
        for row in data[key]["rows"]:
            assert row["source"] in sources, row
            assert row["values"] and all(isinstance(v, float) for v in row["values"].values()), row
            assert set(row["values"]) <= set(data[key].get("benchmarks") or row["values"])
    for row in data["table3"]["rows"]:
        assert set(row["source"].replace("(", " ").replace(",", " ").split()) & sources
    assert data["not_found"], "say which cells could not be found"


def test_paper_value_prefers_the_full_text_and_averages_agree_within_source_b():
    value, source = paper.paper_value("table1", "Llama-Nemotron-8B", "autodeco", "Avg.")
    assert (value, source) == (46.05, "P")  # the arXiv v2 full text wins over A (same value) and B (47.05)
    assert paper.paper_value("table1", "Llama-Nemotron-8B", "autodeco", "AIME") == (55.43, "P")
    assert set(paper.load_paper()["source_order"]) == set(paper.load_paper()["sources"])
    for row in paper.load_paper()["table1"]["rows"]:  # B's rows carry their own averages
        if row["source"] == "B":
            cells = [v for k, v in row["values"].items() if k != "Avg."]
            assert abs(sum(cells) / len(cells) - row["values"]["Avg."]) < 0.02, row


def test_paper_delta_table_maps_tasks_to_paper_columns():
    ours = {("ours-7b", "autodeco"): {"aime24": 40.0, "aime25": 50.0, "brumo25": 60.0, "arith": 9.0}}
    table = paper.delta_table("table1", "d", ours, {"ours-7b": "Llama-Nemotron-8B"})
    rows = {r[3]: r for r in table.rows}
    assert rows["AIME"][4:8] == [45.0, 55.43, pytest.approx(45.0 - 55.43), "P"]  # AIME = mean of 24 and 25
    assert "Avg." not in rows  # HMMT25 and BeyondAIME missing: no average against the paper's
    ours[("ours-7b", "autodeco")].update(hmmt25=20.0, beyondaime=30.0)
    rows = {r[3]: r for r in paper.delta_table("table1", "d", ours, {"ours-7b": "Llama-Nemotron-8B"}).rows}
    assert rows["Avg."][4:] == [pytest.approx(38.75), 46.05, pytest.approx(38.75 - 46.05), "P"]


def test_pass_at_k_and_error_reduction():
    assert unbiased_pass_at_k(4, 0, 2) == 0.0
    assert unbiased_pass_at_k(4, 3, 2) == 1.0
    assert unbiased_pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert relative_error_reduction(89.68, 91.55) == pytest.approx(18.12, abs=0.01)  # the paper's 18.1%
    assert relative_error_reduction(100.0, 100.0) is None


def test_prompt_lengths_and_analytic_flops():
    assert parse_lengths("1k, 2k,512") == [1024, 2048, 512]
    with pytest.raises(ValueError, match="bad prompt length"):
        parse_lengths("1k,abc")
    shape = {"layers": 2, "heads": 3, "head_dim": 4, "hidden": 12, "vocab": 100}
    # one token, 5 keys: 2·(block + heads) + attention 4·L·H·d·5 + lm_head 2·d·V
    assert analytic_forward_flops(shape, 1000, 10, 1, 5, 1) == 2 * 1010 + 4 * 2 * 3 * 4 * 5 + 2 * 12 * 100
    total = generation_flops(shape, 1000, 0, prompt=3, new=2)
    prefill = 2 * 3 * 1000 + 4 * 24 * 9 + 2 * 1200
    step = 2 * 1000 + 4 * 24 * 4 + 2 * 1200
    assert math.isclose(total, prefill + step)


@pytest.mark.slow  # building the full parser imports torch (~5 s here)
def test_demo_commands_parse_with_the_real_cli(tmp_path, monkeypatch):
    """Every command the demo runs is accepted by the other areas' parsers (catches flag drift)."""
    from harness.cli import build_parser, demo

    issued: list[list[str]] = []
    monkeypatch.setattr(demo, "autodeco", issued.append)
    config = demo.DemoConfig(out=str(tmp_path / "demo"), data_dir=str(tmp_path))
    ours = tmp_path / "demo" / "runs" / "final"  # the AutoDeco run whose mean T/P MeanShift takes
    ours.mkdir(parents=True)
    (ours / "results_x.json").write_text(json.dumps({"config": {"decoding": {"name": "autodeco"}},
                                                     "results": {"arith": {"temperature_mean": 0.5}}}))
    for title, thunk in demo.steps(config):
        if not title.startswith("write every report"):
            thunk()
    parser = build_parser()
    for argv in issued:
        args, extra = parser.parse_known_args(argv)  # `train` takes any SFTConfig field as --name VALUE
        assert callable(args.func), argv
        assert not extra or args._takes_extra, argv
    commands = [argv[0] if argv[0] not in ("data", "bench") else " ".join(argv[:2]) for argv in issued]
    assert commands[:5] == ["model", "construct", "data reject-sample", "data reject-sample", "train"]
    train = issued[4]
    assert train[train.index("--train_file") + 1].count(",") == 1  # both difficulties' rows
    evals = [argv for argv in issued if argv[0] == "eval"]
    presets = {p.split(":")[0] for argv in evals for p in argv[argv.index("--decoding") + 1].split(",")
               if "=" not in p or ":" in p}
    assert presets == set(demo.METHODS) | {"meanshift"}
    # one engine per command: the checkpoints (dev split), the in-domain presets, MeanShift, the real-benchmark
    # slice, the steering-trained heads (in-domain, autodeco only)
    assert len(evals) == 5
    assert [argv[argv.index("--tasks") + 1] for argv in evals[:3]] == ["arith_dev", "arith", "arith"]
    steered = evals[4]
    assert steered[steered.index("--model") + 1].endswith("steer") and steered[steered.index("--decoding") + 1] == "autodeco"
    train_steer, = [argv for argv in issued if argv[0] == "train-steer"]
    assert train_steer[train_steer.index("--init_from") + 1].endswith("train/final")
    steer, = [argv for argv in issued if argv[0] == "steer"]
    assert steer[steer.index("--model") + 1].count(",") == 1 and "configs/steer/heldout.yaml" in " ".join(steer)
    assert "sweep" in commands and "bench efficiency" in commands
