"""The results viewer (reports/viewer.py, `autodeco view`), opened in a real headless Chromium.

- per-token texts (`harness.backends.token_texts`) with the real SmolLM2 tokenizer, and the
  runner's compact traces (chunk means, aligned with the token texts);
- pages built from result files in the runner's layout: tables with the 95% intervals of
  harness.stats, the size budget (breadth-first texts, one page per task), a cell that jumps to
  the problems behind it, old samples files without token texts;
- the slow end-to-end test: fresh AutoDeco heads and plain SmolLM2 through the real HF backend on
  two arith problems, `autodeco view` and `autodeco report all`, checked in the browser (rendered
  problems, coloured tokens, side by side, filters, no JS error, load time).

Browser tests skip with the reason when playwright or a chromium binary is missing (`make setup`
installs Debian's chromium where apt is available; AUTODECO_CHROMIUM names another binary).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from harness.backends import token_texts
from harness.cli import main
from harness.core.files import atomic_write_json
from harness.results import write_samples
from harness.runner import TRACE_POINTS, compact, trace_stride
from harness.stats import paired_difference, pass1_estimate
from reports.runs import find_runs, read_samples
from reports.viewer import write_viewer

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


# ---------------------------------------------------------------------------------------------
# Token texts and compact traces


def test_token_texts_concatenate_to_the_decoded_generation(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    text = "Héllo wörld! 12 + 30 = 42. 😀 漢字\n\n  x = [1, 2]  # ünïcode"
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    per_token = token_texts(tokenizer, ids)
    assert len(per_token) == len(ids) and "".join(per_token) == whole
    assert per_token[-1] == "" and per_token[:3] == ["H", "é", "llo"]
    # The emoji spans several byte-level tokens: earlier ones are "" and the last one holds it.
    emoji = [i for i, piece in enumerate(per_token) if "😀" in piece]
    assert len(emoji) == 1 and per_token[emoji[0] - 1] == ""
    for stride in (2, 3, 7, len(ids)):
        runs = token_texts(tokenizer, ids, stride)
        assert len(runs) == -(-len(ids) // stride) and "".join(runs) == whole


def test_compact_traces_are_chunk_means_aligned_with_the_token_texts():
    short = [0.5, 0.61234, 0.7]
    assert compact(short) == [0.5, 0.612, 0.7] and trace_stride(3) == 1
    long = [i / 1000 for i in range(3 * TRACE_POINTS + 1)]  # 769 values -> stride 4, 193 points
    assert trace_stride(len(long)) == 4
    points = compact(long)
    assert len(points) == 193 and points[0] == round(sum(long[:4]) / 4, 3) and points[-1] == round(long[-1], 3)


# ---------------------------------------------------------------------------------------------
# Result files in the runner's layout (written here so every number of the page is known)


def write_run(root: Path, model: str, decoding: str, task: str, rows: list[dict], stamp: str) -> Path:
    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    write_samples(folder / f"samples_{task}_{stamp}.jsonl", rows)
    seeds = sorted({r["seed"] for r in rows})
    atomic_write_json(folder / f"results_{stamp}.json", {
        "results": {task: {"pass@1": sum(r["correct"] for r in rows) / len(rows), "pass@1_std": 0.0,
                           "n_docs": len({r["doc_id"] for r in rows})}},
        "config": {"model": model, "model_name": model, "decoding": {"name": decoding, "params": {}},
                   "seeds": seeds, "samples": 2, "sweep": None}})
    return folder


def rows_for(verdicts: dict[str, list[bool]], traced: bool, tokens: bool = True, text_size: int = 40) -> list[dict]:
    """Sample rows: 2 samples per doc (seed 0), texts of ``text_size`` chars, an optional trace."""
    rows = []
    for doc, marks in verdicts.items():
        for index, correct in enumerate(marks):
            pieces = [f"d{doc}s{index}:"] + ["x" * 4] * (text_size // 4)
            row = {"doc_id": doc, "prompt_hash": "h", "seed": 0, "sample_index": index, "decoding": "m",
                   "response": "".join(pieces), "extracted": "7" if correct else "3", "correct": correct,
                   "n_tokens": len(pieces), "finish_reason": "stop" if index == 0 else "length"}
            if index == 0:
                row.update(prompt=f"What is 3 + 4? (problem {doc})", target="7")
            if traced:
                row["trace"] = {"T": [round(0.3 + 0.1 * (i % 8), 3) for i in range(len(pieces))],
                                "P": [round(0.9 - 0.05 * (i % 8), 3) for i in range(len(pieces))]}
                if tokens:
                    row["trace"].update(stride=1, tokens=pieces)
            rows.append(row)
    return rows


AUTODECO = {"0": [True, True], "1": [True, False], "2": [False, False], "3": [True, True]}
DEFAULT = {"0": [True, False], "1": [False, False], "2": [False, True], "3": [True, True]}


@pytest.fixture
def two_methods(tmp_path) -> Path:
    runs = tmp_path / "runs"
    write_run(runs, "ad", "autodeco", "arith", rows_for(AUTODECO, traced=True), "2026-01-01T00-00-00.000001")
    write_run(runs, "smollm2", "default", "arith", rows_for(DEFAULT, traced=False), "2026-01-01T00-00-00.000002")
    write_run(runs, "smollm2", "default", "aime24", rows_for({"0": [False, False]}, traced=False),
              "2026-01-01T00-00-00.000003")
    return runs


def page_data(path: Path) -> dict:
    text = path.read_text()
    start = text.index('<script type="application/json" id="viewer-data">') + len(
        '<script type="application/json" id="viewer-data">')
    return json.loads(text[start:text.index("</script>", start)])


def test_one_page_holds_every_task_with_tables_from_harness_stats(two_methods, tmp_path):
    out = tmp_path / "view.html"
    assert main(["view", "--runs", str(two_methods), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.html")) == ["view.html"]
    data = page_data(out)
    assert [t["name"] for t in data["tasks"]] == ["aime24", "arith"] and set(data["data"]) == {"aime24", "arith"}
    arith = next(t for t in data["tasks"] if t["name"] == "arith")
    assert arith["methods"] == ["ad · autodeco", "smollm2 · default"]
    expected = pass1_estimate(AUTODECO)
    got = arith["table"][0]["pass1"]
    assert got["mean"] == pytest.approx(0.625) and got["ci_low"] == pytest.approx(expected.ci_low)
    (pair,) = arith["pairs"]
    diff = paired_difference(AUTODECO, DEFAULT)
    assert pair["diff"]["mean"] == pytest.approx(diff.mean) and pair["diff"]["p_value"] == pytest.approx(diff.p_value)
    assert (pair["a_better"], pair["b_better"]) == (2, 1)  # docs 0, 1 vs doc 2
    problems = data["data"]["arith"]["problems"]
    assert problems[0] == {"id": "0", "prompt": "What is 3 + 4? (problem 0)", "target": "7"}
    first = data["data"]["arith"]["samples"][0][0][0]  # autodeco, doc 0, sample 0
    assert first[:6] == [0, 0, 1, 11, "stop", "7"]
    assert first[6] == len(read_samples(next((two_methods / "ad").glob("samples_*")))[0]["response"])
    assert first[7]["tokens"][0] == "d0s0:"
    assert data["scale"]["T"][0] == pytest.approx(0.3) and data["scale"]["T"][1] == pytest.approx(1.0)


def test_the_budget_splits_pages_by_task_and_fills_texts_breadth_first(tmp_path):
    runs = tmp_path / "runs"
    many = {str(d): [d % 2 == 0, d % 3 == 0] for d in range(30)}
    write_run(runs, "ad", "autodeco", "arith", rows_for(many, traced=True, text_size=2000), "2026-01-01T00-00-00.000001")
    write_run(runs, "smollm2", "default", "arith", rows_for(many, traced=False, text_size=2000),
              "2026-01-01T00-00-00.000002")
    write_run(runs, "smollm2", "default", "aime24", rows_for({"0": [True, False]}, traced=False),
              "2026-01-01T00-00-00.000003")
    out = tmp_path / "v.html"
    paths = write_viewer(find_runs([runs]), out, max_mb=0.5)
    assert [p.name for p in paths] == ["v.html", "v-aime24.html", "v-arith.html"]
    index = page_data(out)
    assert index["data"] == {} and [t["href"] for t in index["tasks"]] == ["v-aime24.html", "v-arith.html"]
    arith_page = tmp_path / "v-arith.html"
    assert arith_page.stat().st_size <= 0.5e6 + 60_000  # the budget covers the data; + script and style
    arith = page_data(arith_page)["data"]["arith"]
    assert 0 < arith["omitted"] < arith["n_samples"] == 120
    # Breadth first: every problem's first sample of both methods has its text before any second one.
    firsts = [doc[0][6] for method in arith["samples"] for doc in method]
    seconds = [doc[1][6] for method in arith["samples"] for doc in method]
    assert all(t is not None for t in firsts) and any(t is None for t in seconds)
    # Verdicts stay for every sample, texts or not: the tables are exact.
    assert all(s[2] in (0, 1) for method in arith["samples"] for doc in method for s in doc)
    # Everything fits in one page under a larger budget.
    assert [p.name for p in write_viewer(find_runs([runs]), tmp_path / "all.html", max_mb=5)] == ["all.html"]


def test_view_refuses_bad_options_with_one_line(tmp_path, capsys):
    assert main(["view", "--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "v.html")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["view", "--runs", str(tmp_path), "--out", str(tmp_path / "v.txt")]) == 2
    assert "--out must name an .html file" in capsys.readouterr().err
    assert main(["view", "--runs", str(tmp_path), "--out", str(tmp_path / "v.html")]) == 2
    assert "no results with samples files" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# In the browser


def find_chromium() -> str | None:
    for name in (os.environ.get("AUTODECO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium binary (make setup installs Debian's chromium via apt; or set AUTODECO_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Page:
    """A page of the viewer open in Chromium, collecting JS errors."""

    def __init__(self, browser, path: Path, fragment: str = ""):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        started = time.perf_counter()
        self.page.goto(path.resolve().as_uri() + fragment)
        self.page.wait_for_selector('body[data-ready="1"]')
        self.seconds = time.perf_counter() - started

    def docs(self) -> list[str]:
        return self.page.eval_on_selector_all("li.problem", "els => els.map(e => e.dataset.doc)")

    def state(self) -> dict:
        return dict(parse_qsl(self.page.evaluate("location.hash").lstrip("#")))

    def close(self) -> None:
        assert self.errors == []
        self.page.close()


def test_cells_jump_to_the_problems_behind_them_and_old_files_open(browser, two_methods, tmp_path):
    # The default run was written before token texts: its autodeco twin here has T/P but no tokens.
    old = tmp_path / "old"
    write_run(old, "ad", "autodeco", "arith", rows_for(AUTODECO, traced=True, tokens=False), "2026-01-01T00-00-00.1")
    write_run(old, "smollm2", "default", "arith", rows_for(DEFAULT, traced=False), "2026-01-01T00-00-00.2")
    out = tmp_path / "old.html"
    write_viewer(find_runs([old]), out)
    page = Page(browser, out)
    assert page.docs() == ["0", "1", "2", "3"]
    card = page.page.locator('.sample[data-method="ad · autodeco"]').first
    assert card.locator(".tok").count() == 0 and "d0s0:xxxx" in card.locator("pre.text").inner_text()
    assert "T/P line only" in card.inner_text() and card.locator("svg.spark polyline").count() == 2
    # "A better on 2": the problems where autodeco's accuracy beats default's.
    page.page.click('table.pairs td[data-winner="ad · autodeco"]')
    assert page.docs() == ["0", "1"] and page.state()["cell"] == "a_better"
    page.page.click('table.pairs td[data-winner="smollm2 · default"]')
    assert page.docs() == ["2"] and page.state()["a"] == "smollm2 · default"
    page.page.click("#cell-chip button")
    assert page.docs() == ["0", "1", "2", "3"]
    page.close()
    # Split pages: the index's task picker and links lead to the task pages, state carried along.
    write_viewer(find_runs([two_methods]), tmp_path / "split.html", max_mb=0.001)
    index = Page(browser, tmp_path / "split.html")
    assert index.docs() == [] and "its own page" in index.page.inner_text("#notice")
    index.page.select_option("#pick-task", "arith")
    index.page.wait_for_url("**/split-arith.html#*")
    index.page.wait_for_selector('body[data-ready="1"]')
    assert index.docs() == ["0", "1", "2", "3"]
    index.close()


def autodeco(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"autodeco {' '.join(map(str, argv))} exited {code}"


@pytest.mark.slow
def test_real_runs_in_the_browser(browser, tmp_path, smollm2_path):
    """Fresh AutoDeco heads and plain SmolLM2 (real HF backend) on the same two arith problems."""
    runs = tmp_path / "runs"
    autodeco("construct", "--base", "smollm2", "--out", tmp_path / "ad")
    common = ["--tasks", "arith", "--limit", "2", "--seeds", "1", "--samples", "2", "--max-tokens", "24",
              "--backend", "hf", "--out", runs, "--wandb", "off", "--no-progress"]
    autodeco("eval", "--model", tmp_path / "ad", "--decoding", "autodeco", *common)
    autodeco("eval", "--model", "smollm2", "--decoding", "default", *common)
    traced = read_samples(next((runs / "ad").glob("samples_arith_*.jsonl")))
    plain = read_samples(next((runs / "smollm2").glob("samples_arith_*.jsonl")))
    for row in traced:  # the runner stored the text under each trace point
        assert len(row["trace"]["tokens"]) == len(row["trace"]["T"]) == row["n_tokens"]
        assert "".join(row["trace"]["tokens"]).startswith(row["response"])
    assert all("trace" not in row for row in plain) and traced[0]["target"] == "-27"

    out = tmp_path / "viewer.html"
    autodeco("view", "--runs", runs, "--out", out)
    page = Page(browser, out)
    assert page.seconds < 2.0, f"the demo-sized page took {page.seconds:.2f} s to open"
    assert page.docs() == ["0", "1"]
    assert "Compute 38 - 65." in page.page.inner_text(".prompt pre")
    # Side by side: A = the traced method, B = default, paired by seed and sample index.
    assert page.state()["a"].startswith("ad") and page.state()["b"].startswith("smollm2")
    pairs = page.page.locator(".pair.two")
    assert pairs.count() == 2 and pairs.first.locator(".sample").count() == 2
    card = page.page.locator('.sample[data-method="ad · autodeco"][data-index="0"]')
    tokens = card.locator(".tok")
    assert tokens.count() == traced[0]["n_tokens"]
    colours = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert all(c.startswith("rgb(") for c in colours) and len(set(colours)) > 1
    shown = card.locator("pre.text").inner_text()
    assert shown.replace("∎", "").startswith(traced[0]["response"])
    assert page.page.locator('.sample[data-method="smollm2 · default"] .tok').count() == 0
    assert card.locator("svg.spark polyline").count() == 2
    tokens.nth(1).hover()
    assert "T " in page.page.inner_text("#tooltip") and page.page.is_visible("#tooltip")
    page.page.select_option("#pick-colour", "P")
    assert card.locator(".tok").evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)") != colours

    # Filters, checked against the samples files.
    def expect(keep) -> list[str]:
        docs = []
        for doc in ("0", "1"):
            a = {(r["seed"], r["sample_index"]): r for r in traced if r["doc_id"] == doc}
            b = {(r["seed"], r["sample_index"]): r for r in plain if r["doc_id"] == doc}
            if any(keep(a.get(k), b.get(k)) for k in sorted(set(a) | set(b))):
                docs.append(doc)
        return docs

    page.page.check("#filter-wrong")
    assert page.docs() == expect(lambda a, b: any(s is not None and not s["correct"] for s in (a, b)))
    page.page.uncheck("#filter-wrong")
    page.page.check("#filter-disagree")
    assert page.docs() == expect(lambda a, b: a and b and a["correct"] != b["correct"])
    page.page.uncheck("#filter-disagree")
    longest = max(r["n_tokens"] for r in traced + plain)
    page.page.fill("#filter-min", str(longest))
    page.page.dispatch_event("#filter-min", "change")
    assert page.docs() == expect(lambda a, b: any(s and s["n_tokens"] >= longest for s in (a, b)))
    page.page.fill("#filter-min", "")
    page.page.dispatch_event("#filter-min", "change")
    page.page.select_option("#pick-b", "")
    assert page.page.locator(".pair.two").count() == 0 and page.page.locator(".pair").count() == 2
    page.page.screenshot(path=str(tmp_path / "viewer.png"))
    page.close()

    # `autodeco report all` writes the same page and links it from index.md.
    autodeco("report", "all", "--runs", runs, "--out", tmp_path / "reports")
    assert "(viewer.html)" in (tmp_path / "reports" / "index.md").read_text()
    Page(browser, tmp_path / "reports" / "viewer.html").close()
