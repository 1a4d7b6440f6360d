"""Bad input, command by command: exit 2, one stderr line naming the culprit, nothing left behind.

Every case is one `autodeco` command line with one thing wrong: a flag out of range, a file that
is missing, a folder, binary or malformed, a model that is corrupt or belongs to another base, a
config with the wrong types. Each runs in its own empty folder (the working directory, so default
outputs land there too) and must end with

- exit code 2;
- exactly one line on stderr, ``autodeco <command>: error: ...``, containing every expected
  fragment (the file, line, field or flag at fault);
- no traceback;
- the folder exactly as the case set it up: no partial output file or folder.

A few cases also run as a real subprocess (`test_subprocess_sample`) to check that nothing else
(warnings, library logging) reaches the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 120


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path, dict], list[str]]  # (case folder, model folders) -> the command line
    expect: tuple[str, ...]  # fragments of the one error line; "{tmp}" is the case folder


def case(id: str, argv, *expect: str) -> Case:
    return Case(id, argv, expect)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


BINARY = bytes(range(256)) * 8 + b"\xff\xfe\x00\x80"
GOOD_ROW = json.dumps({"prompt": "What is 1+1?", "completion": "2"}) + "\n"


def data_dir(tmp: Path, name: str, text: str | bytes) -> str:
    """A data dir holding one benchmark file."""
    write(tmp / "data" / name, text)
    return str(tmp / "data")


def responses(tmp: Path, text: str | bytes) -> str:
    return str(write(tmp / "r.jsonl", text))


def results_dir(tmp: Path, files: dict[str, str | bytes]) -> str:
    for name, text in files.items():
        write(tmp / "runs" / name, text)
    return str(tmp / "runs")


GOOD_RESULTS = json.dumps({"results": {"arith": {"pass@1": 0.5, "pass@1_std": 0.1, "n_docs": 2}},
                           "config": {"model_name": "m", "model": "m", "decoding": {"name": "greedy"},
                                      "seeds": [0], "samples": 1}})


def train(tmp: Path, *extra: str, data: str | bytes | None = GOOD_ROW) -> list[str]:
    argv = ["train", "--output_dir", str(tmp / "run"), "--report_to", "none", "--max_steps", "1"]
    if data is not None:
        argv += ["--train_file", str(write(tmp / "train.jsonl", data))]
    return argv + list(extra)


def train_steer(tmp: Path, m: dict, *extra: str, data: str | bytes | None = GOOD_ROW) -> list[str]:
    argv = ["train-steer", "--init_from", m["heads"], "--output_dir", str(tmp / "steer"), "--no_progress"]
    if data is not None:
        argv += ["--train_file", str(write(tmp / "train.jsonl", data))]
    return argv + list(extra)


def eval_(tmp: Path, *extra: str) -> list[str]:
    return ["eval", "--tasks", "arith", "--limit", "1", "--out", str(tmp / "out"), "--wandb", "off",
            "--no-progress", *extra]


def sweep(tmp: Path, *extra: str) -> list[str]:
    return ["sweep", "--tasks", "arith", "--limit", "1", "--out", str(tmp / "out"), "--wandb", "off",
            "--no-progress", *extra]


def steer(tmp: Path, m: dict, *extra: str) -> list[str]:
    return ["steer", "--model", m["heads"], "--out", str(tmp / "out"), "--no-progress", *extra]


def reject(tmp: Path, *extra: str) -> list[str]:
    return ["data", "reject-sample", "--task", "arith", "--limit", "2", "--samples", "1",
            "--out", str(tmp / "rs.jsonl"), "--no-progress", *extra]


def report(tmp: Path, kind: str, runs: str, *extra: str) -> list[str]:
    return ["report", kind, "--runs", runs, "--out", str(tmp / "rep"), *extra]


CASES = [
    # ------------------------------------------------------------------ the command line itself
    case("unknown-command", lambda t, m: ["nosuch"], "nosuch"),
    case("unknown-flag", lambda t, m: eval_(t, "--nosuch-flag"), "--nosuch-flag"),
    case("flag-missing-value", lambda t, m: ["construct", "--base"], "--base"),
    case("argparse-int", lambda t, m: ["construct", "--base", "smollm2", "--out", str(t / "o"), "--head-width",
                                       "wide"], "--head-width", "wide"),
    case("argparse-choice", lambda t, m: ["generate", "--decoding", "sideways"], "--decoding", "sideways"),
    case("report-unknown-kind", lambda t, m: ["report", "table9", "--runs", ".", "--out", str(t / "rep")], "table9"),

    # ------------------------------------------------------------------ tasks show
    case("show-unknown-task", lambda t, m: ["tasks", "show", "aime42"], "aime42"),
    case("show-group", lambda t, m: ["tasks", "show", "aime"], "'aime' is a group", "aime24"),
    case("show-n-negative", lambda t, m: ["tasks", "show", "arith", "-n", "-1"], "-n", "-1"),
    case("show-option-n-negative", lambda t, m: ["tasks", "show", "arith", "--task-option", "n=-5"], "n", "-5"),
    case("show-option-n-huge", lambda t, m: ["tasks", "show", "arith", "--task-option", "n=100000000"],
         "n", "100000000"),
    case("show-option-n-text", lambda t, m: ["tasks", "show", "arith", "--task-option", "n=many"], "n", "many"),
    case("show-option-n-float", lambda t, m: ["tasks", "show", "arith", "--task-option", "n=2.5"], "n", "2.5"),
    case("show-option-unknown", lambda t, m: ["tasks", "show", "arith", "--task-option", "colour=blue"],
         "colour", "split"),
    case("show-option-no-equals", lambda t, m: ["tasks", "show", "arith", "--task-option", "n"], "--task-option", "'n'"),
    case("show-option-difficulty", lambda t, m: ["tasks", "show", "arith", "--task-option", "difficulty=9"],
         "difficulty", "9"),
    case("show-option-split", lambda t, m: ["tasks", "show", "arith", "--task-option", "split=validation"], "split", "validation"),
    case("show-option-seed-text", lambda t, m: ["tasks", "show", "arith", "--task-option", "seed=abc"], "seed", "abc"),
    case("show-option-lcb-date", lambda t, m: ["tasks", "show", "livecodebench", "--task-option", "start_date=soon",
                                               "--data-dir", data_dir(t, "livecodebench.jsonl", "")],
         "start_date", "soon"),
    case("show-option-lcb-release", lambda t, m: ["tasks", "show", "livecodebench", "--task-option",
                                                  "release=release_v99"], "release", "release_v99"),
    case("show-data-dir-missing", lambda t, m: ["tasks", "show", "aime24", "--data-dir", str(t / "nowhere")],
         "{tmp}/nowhere", "does not exist"),
    case("show-data-dir-is-file", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                                str(write(t / "file.txt", "x"))], "{tmp}/file.txt", "not a folder"),
    case("show-data-file-missing", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                                 data_dir(t, "other.jsonl", "")], "aime24.jsonl", "not found"),
    case("show-data-file-is-dir", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                                data_dir(t, "aime24.jsonl/x", "")], "aime24.jsonl", "folder"),
    case("show-data-binary", lambda t, m: ["tasks", "show", "aime24", "--data-dir", data_dir(t, "aime24.jsonl", BINARY)],
         "{tmp}/data/aime24.jsonl", "UTF-8"),
    case("show-data-bad-json", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                             data_dir(t, "aime24.jsonl", '{"problem": "x", "answer": "1"}\n{oops\n')],
         "aime24.jsonl:2", "invalid JSON"),
    case("show-data-missing-field", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                                  data_dir(t, "aime24.jsonl", '{"problem": "x"}\n')],
         "aime24.jsonl:1", "answer"),
    case("show-data-wrong-type", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                               data_dir(t, "aime24.jsonl", '{"problem": 5, "answer": "1"}\n')],
         "aime24.jsonl:1", "'problem'"),
    case("show-data-row-not-object", lambda t, m: ["tasks", "show", "aime24", "--data-dir",
                                                   data_dir(t, "aime24.jsonl", '[1, 2]\n')], "aime24.jsonl:1", "object"),
    case("show-data-empty", lambda t, m: ["tasks", "show", "aime24", "--data-dir", data_dir(t, "aime24.jsonl", "\n")],
         "aime24.jsonl", "no rows"),
    case("show-json-not-array", lambda t, m: ["tasks", "show", "mmlu_pro", "--data-dir",
                                              data_dir(t, "mmlu_pro_100.json", '{"a": 1}')],
         "mmlu_pro_100.json", "array"),
    case("show-json-invalid", lambda t, m: ["tasks", "show", "mmlu_pro", "--data-dir",
                                            data_dir(t, "mmlu_pro_100.json", '[{"question": "q",')],
         "mmlu_pro_100.json", "invalid JSON"),
    case("show-json-binary", lambda t, m: ["tasks", "show", "mmlu_pro", "--data-dir",
                                           data_dir(t, "mmlu_pro_100.json", BINARY)], "mmlu_pro_100.json", "UTF-8"),
    case("show-csv-missing-column", lambda t, m: ["tasks", "show", "gpqa_diamond", "--data-dir",
                                                  data_dir(t, "gpqa_diamond.csv", "Question,Record ID\nq,1\n")],
         "gpqa_diamond.csv:2", "Correct Answer"),
    case("show-csv-binary", lambda t, m: ["tasks", "show", "gpqa_diamond", "--data-dir",
                                          data_dir(t, "gpqa_diamond.csv", BINARY)], "gpqa_diamond.csv", "UTF-8"),
    case("show-ifeval-kwargs-type", lambda t, m: ["tasks", "show", "ifeval", "--data-dir", data_dir(
        t, "ifeval.jsonl", json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["a"], "kwargs": [5]}) + "\n")],
         "ifeval.jsonl:1", "kwargs"),
    case("show-lcb-bad-tests", lambda t, m: ["tasks", "show", "livecodebench", "--data-dir", data_dir(
        t, "livecodebench.jsonl", json.dumps({
            "question_title": "t", "question_content": "c", "platform": "p", "question_id": "1",
            "contest_date": "2025-01-01", "starter_code": "", "difficulty": "easy", "public_test_cases": "[",
            "private_test_cases": "", "metadata": "{}"}) + "\n")], "livecodebench.jsonl:1", "public_test_cases"),

    # ------------------------------------------------------------------ grade
    case("grade-responses-missing", lambda t, m: ["grade", "--task", "arith", "--responses", str(t / "no.jsonl"),
                                                  "--out", str(t / "g")], "{tmp}/no.jsonl", "does not exist"),
    case("grade-responses-dir", lambda t, m: ["grade", "--task", "arith", "--responses", str(t),
                                              "--out", str(t / "g")], "--responses", "is a folder"),
    case("grade-responses-binary", lambda t, m: ["grade", "--task", "arith", "--responses", responses(t, BINARY),
                                                 "--out", str(t / "g")], "{tmp}/r.jsonl", "UTF-8"),
    case("grade-responses-bad-json", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                   responses(t, '{"doc_id": 0, "response": "x"}\n{"doc_id"\n'),
                                                   "--out", str(t / "g")], "r.jsonl:2", "invalid JSON"),
    case("grade-responses-empty", lambda t, m: ["grade", "--task", "arith", "--responses", responses(t, "\n\n"),
                                                "--out", str(t / "g")], "r.jsonl", "no responses"),
    case("grade-row-not-object", lambda t, m: ["grade", "--task", "arith", "--responses", responses(t, '"x"\n'),
                                               "--out", str(t / "g")], "r.jsonl:1", "JSON object"),
    case("grade-seed-text", lambda t, m: ["grade", "--task", "arith", "--responses",
                                          responses(t, '{"doc_id": 0, "response": "x", "seed": "abc"}\n'),
                                          "--out", str(t / "g")], "r.jsonl:1", "'seed'"),
    case("grade-sample-index-text", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                  responses(t, '{"doc_id": 0, "response": "x", "sample_index": "x"}\n'),
                                                  "--out", str(t / "g")], "r.jsonl:1", "'sample_index'"),
    case("grade-sample-index-negative", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                      responses(t, '{"doc_id": 0, "response": "x", "sample_index": -1}\n'),
                                                      "--out", str(t / "g")], "r.jsonl:1", "'sample_index'"),
    case("grade-sample-index-float", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                   responses(t, '{"doc_id": 0, "response": "x", "sample_index": 1.5}\n'),
                                                   "--out", str(t / "g")], "r.jsonl:1", "'sample_index'"),
    case("grade-response-null", lambda t, m: ["grade", "--task", "arith", "--responses",
                                              responses(t, '{"doc_id": 0, "response": null}\n'), "--out", str(t / "g")],
         "r.jsonl:1", "'response'"),
    case("grade-responses-not-list", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                   responses(t, '{"doc_id": 0, "responses": "x"}\n'),
                                                   "--out", str(t / "g")], "r.jsonl:1", "'responses'"),
    case("grade-doc-id-unknown", lambda t, m: ["grade", "--task", "arith", "--responses",
                                               responses(t, '{"doc_id": 99999, "response": "x"}\n'),
                                               "--out", str(t / "g")], "r.jsonl:1", "'doc_id'"),
    case("grade-out-is-file", lambda t, m: ["grade", "--task", "arith", "--responses",
                                            responses(t, '{"doc_id": 0, "response": "x"}\n'),
                                            "--out", str(write(t / "g", "x"))], "--out", "{tmp}/g", "file"),
    case("grade-workers-negative", lambda t, m: ["grade", "--task", "arith", "--responses",
                                                 responses(t, '{"doc_id": 0, "response": "x"}\n'),
                                                 "--out", str(t / "g"), "--workers", "-2"], "--workers", "-2"),
    case("grade-workers-zero", lambda t, m: ["grade", "--task", "arith", "--responses",
                                             responses(t, '{"doc_id": 0, "response": "x"}\n'),
                                             "--out", str(t / "g"), "--workers", "0"], "--workers", "0"),
    case("grade-unknown-task", lambda t, m: ["grade", "--task", "nosuch", "--responses",
                                             responses(t, '{"doc_id": 0, "response": "x"}\n'), "--out", str(t / "g")],
         "nosuch"),
    case("grade-task-option-unknown", lambda t, m: ["grade", "--task", "arith", "--task-option", "colour=blue",
                                                    "--responses", responses(t, '{"doc_id": 0, "response": "x"}\n'),
                                                    "--out", str(t / "g")], "colour"),

    # ------------------------------------------------------------------ construct / split / merge
    case("construct-width-negative", lambda t, m: ["construct", "--base", "smollm2", "--out", str(t / "o"),
                                                   "--head-width", "-5"], "--head-width", "-5"),
    case("construct-width-zero", lambda t, m: ["construct", "--base", "smollm2", "--out", str(t / "o"),
                                               "--head-width", "0"], "--head-width", "0"),
    case("construct-width-huge", lambda t, m: ["construct", "--base", "smollm2", "--out", str(t / "o"),
                                               "--head-width", "100000000"], "--head-width", "100000000"),
    case("construct-seed-negative", lambda t, m: ["construct", "--base", "smollm2", "--out", str(t / "o"),
                                                  "--seed", "-1"], "--seed", "-1"),
    case("construct-unknown-base", lambda t, m: ["construct", "--base", "nosuchmodel", "--out", str(t / "o")],
         "nosuchmodel"),
    case("construct-base-empty-dir", lambda t, m: ["construct", "--base", str(write(t / "e" / ".keep", "").parent),
                                                   "--out", str(t / "o")], "{tmp}/e", "config.json"),
    case("construct-base-bad-config", lambda t, m: ["construct", "--base", m["bad_config"], "--out", str(t / "o")],
         "config.json", "not valid JSON"),
    case("construct-base-corrupt", lambda t, m: ["construct", "--base", m["corrupt"], "--out", str(t / "o")],
         "model.safetensors"),
    case("construct-out-exists", lambda t, m: ["construct", "--base", "smollm2", "--out",
                                               str(write(t / "o" / "x", "").parent)], "{tmp}/o", "--overwrite"),
    case("construct-out-is-file", lambda t, m: ["construct", "--base", "smollm2", "--out", str(write(t / "o", "")),
                                                "--overwrite"], "{tmp}/o", "file"),
    case("split-full-missing", lambda t, m: ["split", "--full", str(t / "nope"), "--out", str(t / "o")],
         "{tmp}/nope"),
    case("split-full-plain", lambda t, m: ["split", "--full", m["plain"], "--out", str(t / "o")],
         "config.json", "autodeco"),
    case("split-full-is-file", lambda t, m: ["split", "--full", str(write(t / "f", "x")), "--out", str(t / "o")],
         "{tmp}/f", "is a file"),
    case("split-full-corrupt", lambda t, m: ["split", "--full", m["heads_corrupt"], "--out", str(t / "o")],
         "model.safetensors"),
    case("merge-heads-missing", lambda t, m: ["merge", "--heads", str(t / "nope"), "--base", "smollm2",
                                              "--out", str(t / "o")], "{tmp}/nope"),
    case("merge-heads-plain", lambda t, m: ["merge", "--heads", m["plain"], "--base", "smollm2", "--out", str(t / "o")],
         "autodeco"),
    case("merge-hidden-mismatch", lambda t, m: ["merge", "--heads", m["heads_w64"], "--base", "smollm2",
                                                "--out", str(t / "o")], "hidden", "576"),
    case("merge-heads-corrupt", lambda t, m: ["merge", "--heads", m["heads_corrupt"], "--base", "smollm2",
                                              "--out", str(t / "o")], "model.safetensors"),
    case("merge-base-unknown", lambda t, m: ["merge", "--heads", m["heads"], "--base", "nosuchbase",
                                             "--out", str(t / "o")], "nosuchbase"),
    case("merge-base-corrupt", lambda t, m: ["merge", "--heads", m["heads"], "--base", m["corrupt"],
                                             "--out", str(t / "o")], "model.safetensors"),
    case("merge-out-is-file", lambda t, m: ["merge", "--heads", m["heads"], "--base", "smollm2", "--out",
                                            str(write(t / "o", "x")), "--overwrite"], "{tmp}/o", "file"),

    # ------------------------------------------------------------------ generate
    case("generate-max-new-tokens-negative", lambda t, m: ["generate", "--max-new-tokens", "-1"],
         "--max-new-tokens", "-1"),
    case("generate-max-new-tokens-zero", lambda t, m: ["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    case("generate-unknown-model", lambda t, m: ["generate", "--model", "nosuchmodel"], "nosuchmodel"),
    case("generate-corrupt-heads", lambda t, m: ["generate", "--model", m["heads_corrupt"]], "model.safetensors"),
    case("generate-hidden-mismatch", lambda t, m: ["generate", "--model", m["heads_w64"]], "hidden", "576"),
    case("generate-seed-negative", lambda t, m: ["generate", "--seed", "-3"], "--seed", "-3"),

    # ------------------------------------------------------------------ train
    case("train-no-file", lambda t, m: train(t, data=None), "train_file"),
    case("train-file-missing", lambda t, m: ["train", "--train_file", str(t / "no.jsonl"), "--output_dir",
                                             str(t / "run"), "--report_to", "none"], "{tmp}/no.jsonl", "not found"),
    case("train-file-dir", lambda t, m: ["train", "--train_file", str(t), "--output_dir", str(t / "run"),
                                         "--report_to", "none"], "train_file", "folder"),
    case("train-file-binary", lambda t, m: train(t, data=BINARY), "{tmp}/train.jsonl", "UTF-8"),
    case("train-file-bad-json", lambda t, m: train(t, data=GOOD_ROW + "{oops\n"), "train.jsonl:2", "invalid JSON"),
    case("train-file-missing-field", lambda t, m: train(t, data='{"prompt": "p"}\n'), "train.jsonl:1", "completion"),
    case("train-file-empty", lambda t, m: train(t, data=""), "train.jsonl", "no rows"),
    case("train-resume-latest-none", lambda t, m: train(t, "--resume_from_checkpoint", "latest"),
         "resume_from_checkpoint", "no checkpoint"),
    case("train-resume-missing", lambda t, m: train(t, "--resume_from_checkpoint", str(t / "ck")),
         "resume_from_checkpoint", "{tmp}/ck"),
    case("train-corrupt-model", lambda t, m: train(t, "--model", m["corrupt"]), "model.safetensors"),
    case("train-unknown-model", lambda t, m: train(t, "--model", "nosuchmodel"), "nosuchmodel"),
    case("train-hidden-mismatch", lambda t, m: train(t, "--model", m["heads_w64"]), "hidden", "576"),
    case("train-config-invalid-yaml", lambda t, m: train(t, "--config", str(write(t / "c.yaml", "a: [1,\n"))),
         "{tmp}/c.yaml", "YAML"),
    case("train-config-wrong-type", lambda t, m: train(t, "--config", str(write(t / "c.yaml", "learning_rate: fast\n"))),
         "{tmp}/c.yaml", "learning_rate", "fast"),
    case("train-config-unknown-field", lambda t, m: train(t, "--config", str(write(t / "c.yaml", "lr: 1\n"))),
         "{tmp}/c.yaml", "'lr'"),
    case("train-config-list", lambda t, m: train(t, "--config", str(write(t / "c.yaml", "- 1\n- 2\n"))),
         "{tmp}/c.yaml", "mapping"),
    case("train-config-missing", lambda t, m: train(t, "--config", str(t / "none.yaml")), "{tmp}/none.yaml"),
    case("train-config-dir", lambda t, m: train(t, "--config", str(t)), "folder"),
    case("train-config-binary", lambda t, m: train(t, "--config", str(write(t / "c.yaml", BINARY))), "{tmp}/c.yaml"),
    case("train-lr-negative", lambda t, m: train(t, "--learning_rate", "-1"), "--learning-rate"),
    case("train-lr-nan", lambda t, m: train(t, "--learning_rate", "nan"), "--learning-rate", "nan"),
    case("train-max-steps-text", lambda t, m: train(t, "--max_steps", "many"), "max-steps", "many"),
    case("train-head-width", lambda t, m: train(t, "--head_width", "-1"), "head-width"),
    case("train-easy-drop", lambda t, m: train(t, "--easy_token_drop", "2"), "easy-token-drop"),
    case("train-unknown-field", lambda t, m: train(t, "--nosuch_field", "3"), "nosuch_field"),
    case("train-output-is-file", lambda t, m: ["train", "--train_file", str(write(t / "train.jsonl", GOOD_ROW)),
                                               "--output_dir", str(write(t / "run", "x")), "--report_to", "none"],
         "{tmp}/run", "file"),
    case("train-batch-zero", lambda t, m: train(t, "--per_device_train_batch_size", "0"), "--per-device-train-batch-size"),
    # ------------------------------------------------------------------ train-steer
    case("trainsteer-no-init", lambda t, m: ["train-steer", "--output_dir", str(t / "steer")], "--init-from"),
    case("trainsteer-plain-model", lambda t, m: train_steer(t, m, "--init_from", "smollm2"), "plain causal LM",
         "init_from"),
    case("trainsteer-unknown-model", lambda t, m: train_steer(t, m, "--init_from", "nosuchmodel"), "nosuchmodel"),
    case("trainsteer-corrupt-heads", lambda t, m: train_steer(t, m, "--init_from", m["heads_corrupt"]),
         "model.safetensors"),
    case("trainsteer-no-train-file", lambda t, m: train_steer(t, m, data=None), "--train-file", "autodeco_weight"),
    case("trainsteer-train-file-bad", lambda t, m: train_steer(t, m, data='{"prompt": "p"}\n'), "train.jsonl:1",
         "completion"),
    case("trainsteer-steer-config-missing", lambda t, m: train_steer(t, m, "--steer_config", str(t / "no.yaml")),
         "{tmp}/no.yaml"),
    case("trainsteer-steer-config-one-direction", lambda t, m: train_steer(
        t, m, "--steer_config", str(write(t / "s.yaml", "prompts: [p]\ncommands: {b: null, low: {text: x, "
                                                        "direction: lower}}\n"))), "{tmp}/s.yaml", "higher"),
    case("trainsteer-margin-negative", lambda t, m: train_steer(t, m, "--margin_temperature", "-1"),
         "--margin-temperature"),
    case("trainsteer-rank-loss", lambda t, m: train_steer(t, m, "--rank_loss", "square"), "--rank-loss", "square"),
    case("trainsteer-decoding", lambda t, m: train_steer(t, m, "--sample_decoding", "sideways"), "--sample-decoding",
         "sideways"),
    case("trainsteer-output-is-file", lambda t, m: train_steer(t, m, "--output_dir", str(write(t / "o", "x"))),
         "{tmp}/o", "file"),
    case("train-report-to-unknown", lambda t, m: train(t, "--report_to", "carrier-pigeon"), "report-to",
         "carrier-pigeon"),
    case("train-hidden-cache-file", lambda t, m: train(t, "--hidden_cache", str(write(t / "cache", "x"))),
         "hidden_cache", "{tmp}/cache", "file"),
    case("train-hidden-cache-under-file", lambda t, m: train(t, "--hidden_cache", str(write(t / "f", "x")) + "/c"),
         "hidden_cache", "{tmp}/f", "file"),
    case("train-hidden-cache-dtype", lambda t, m: train(t, "--hidden_cache_dtype", "int8"), "--hidden-cache-dtype",
         "int8"),
    case("train-hidden-cache-fill", lambda t, m: train(t, "--hidden_cache_fill", "never"), "--hidden-cache-fill",
         "never"),
    case("train-hidden-cache-dtype-yaml", lambda t, m: train(t, "--config", str(write(t / "c.yaml",
                                                                                    "hidden_cache_dtype: int8\n"))),
         "{tmp}/c.yaml", "hidden_cache_dtype", "float32"),

    # ------------------------------------------------------------------ data reject-sample
    case("reject-out-dir", lambda t, m: reject(t)[:-3] + ["--out", str(write(t / "d" / "x", "").parent),
                                                           "--no-progress"], "--out", "{tmp}/d", "folder"),
    case("reject-limit-negative", lambda t, m: reject(t, "--limit", "-4"), "--limit", "-4"),
    case("reject-limit-huge", lambda t, m: reject(t, "--limit", "100000000"), "--limit", "100000000"),
    case("reject-samples-zero", lambda t, m: reject(t, "--samples", "0"), "--samples", "0"),
    case("reject-samples-huge", lambda t, m: reject(t, "--samples", "1000000"), "--samples", "1000000"),
    case("reject-unknown-task", lambda t, m: reject(t, "--task", "nosuch"), "nosuch"),
    case("reject-difficulty", lambda t, m: reject(t, "--difficulty", "9"), "difficulty", "9"),
    case("reject-max-tokens", lambda t, m: reject(t, "--max-tokens", "-1"), "--max-tokens", "-1"),
    case("reject-decoding", lambda t, m: reject(t, "--decoding", "sideways"), "sideways"),
    case("reject-backend", lambda t, m: reject(t, "--backend", "abacus"), "abacus"),
    case("reject-backend-arg", lambda t, m: reject(t, "--backend-arg", "nokey"), "--backend-arg", "nokey"),
    case("reject-model", lambda t, m: reject(t, "--model", "nosuchmodel"), "nosuchmodel"),
    case("reject-data-file-missing", lambda t, m: reject(t, "--task", "deepmath", "--data-file", str(t / "dm.jsonl")),
         "{tmp}/dm.jsonl"),
    case("reject-data-file-binary", lambda t, m: reject(t, "--task", "deepmath", "--data-file",
                                                        str(write(t / "dm.jsonl", BINARY))), "{tmp}/dm.jsonl"),
    case("reject-out-parent-is-file", lambda t, m: reject(t)[:-3] + ["--out", str(write(t / "f", "x") / "rs.jsonl"),
                                                                      "--no-progress"], "--out", "{tmp}/f"),
    case("reject-seed-negative", lambda t, m: reject(t, "--seed", "-1"), "--seed", "-1"),

    # ------------------------------------------------------------------ eval
    case("eval-no-tasks", lambda t, m: ["eval", "--out", str(t / "out")], "--tasks is required"),
    case("eval-unknown-task", lambda t, m: ["eval", "--tasks", "aime42", "--out", str(t / "out")], "aime42"),
    case("eval-seeds-negative", lambda t, m: eval_(t, "--seeds", "-1"), "--seeds", "got -1"),
    case("eval-seeds-huge", lambda t, m: eval_(t, "--seeds", "100000"), "--seeds", "100000"),
    case("eval-samples-zero", lambda t, m: eval_(t, "--samples", "0"), "--samples", "0"),
    case("eval-limit-negative", lambda t, m: eval_(t, "--limit", "-3"), "--limit", "-3"),
    case("eval-limit-float", lambda t, m: eval_(t, "--limit", "1.5"), "--limit", "1.5"),
    case("eval-max-tokens-zero", lambda t, m: eval_(t, "--max-tokens", "0"), "--max-tokens"),
    case("eval-max-tokens-huge", lambda t, m: eval_(t, "--max-tokens", "100000000000"), "--max-tokens"),
    case("eval-decoding-unknown", lambda t, m: eval_(t, "--decoding", "sideways"), "sideways"),
    case("eval-decoding-param-text", lambda t, m: eval_(t, "--decoding", "static:temperature=warm"), "warm"),
    case("eval-decoding-param-inf", lambda t, m: eval_(t, "--decoding", "static:temperature=inf"), "temperature", "inf"),
    case("eval-decoding-param-nan", lambda t, m: eval_(t, "--decoding", "static:top_p=nan"), "top_p", "nan"),
    case("eval-decoding-param-range", lambda t, m: eval_(t, "--decoding", "static:top_p=1.5"), "top_p", "1.5"),
    case("eval-decoding-twice", lambda t, m: eval_(t, "--decoding", "greedy,greedy"), "greedy"),
    case("eval-unknown-model", lambda t, m: eval_(t, "--model", "nosuchmodel"), "nosuchmodel"),
    case("eval-model-is-file", lambda t, m: eval_(t, "--model", str(write(t / "m.bin", "x"))), "{tmp}/m.bin"),
    case("eval-corrupt-model", lambda t, m: eval_(t, "--model", m["corrupt"]), "model.safetensors"),
    case("eval-corrupt-heads", lambda t, m: eval_(t, "--model", m["heads_corrupt"]), "model.safetensors"),
    case("eval-truncated-heads", lambda t, m: eval_(t, "--model", m["heads_truncated"]), "model.safetensors"),
    case("eval-hidden-mismatch", lambda t, m: eval_(t, "--model", m["heads_w64"]), "hidden", "576"),
    case("eval-model-bad-config", lambda t, m: eval_(t, "--model", m["bad_config"]), "config.json", "not valid JSON"),
    case("eval-model-empty-run", lambda t, m: eval_(t, "--model", str(write(t / "e" / ".keep", "").parent)),
         "{tmp}/e"),
    case("eval-out-is-file", lambda t, m: eval_(t)[:-5] + ["--out", str(write(t / "o", "x")), "--wandb", "off",
                                                             "--no-progress"], "{tmp}/o", "file"),
    case("eval-config-invalid-yaml", lambda t, m: eval_(t, "--config", str(write(t / "c.yaml", "seeds: [\n"))),
         "{tmp}/c.yaml", "YAML"),
    case("eval-config-wrong-type", lambda t, m: ["eval", "--config", str(write(t / "c.yaml", "tasks: arith\nseeds: many\n")),
                                                 "--out", str(t / "out")], "{tmp}/c.yaml", "'seeds'", "many"),
    case("eval-config-unknown-field", lambda t, m: eval_(t, "--config", str(write(t / "c.yaml", "colour: blue\n"))),
         "{tmp}/c.yaml", "'colour'"),
    case("eval-config-bad-value-blamed-on-file", lambda t, m: ["eval", "--config", str(write(t / "c.yaml", "tasks: arith\n")),
                                                               "--seeds", "0", "--out", str(t / "out")],
         "command line", "--seeds"),
    case("eval-backend-unknown", lambda t, m: eval_(t, "--backend", "abacus"), "abacus"),
    case("eval-backend-arg", lambda t, m: eval_(t, "--backend-arg", "nokey"), "--backend-arg", "nokey"),
    case("eval-backend-arg-unknown", lambda t, m: eval_(t, "--backend-arg", "colour=blue"), "colour"),
    case("eval-data-dir-missing", lambda t, m: ["eval", "--tasks", "aime24", "--data-dir", str(t / "nowhere"),
                                                "--out", str(t / "out")], "{tmp}/nowhere"),
    case("eval-data-bad-row", lambda t, m: ["eval", "--tasks", "aime24", "--data-dir",
                                            data_dir(t, "aime24.jsonl", '{"problem": "x"}\n'), "--out", str(t / "out"),
                                            "--wandb", "off"], "aime24.jsonl:1", "answer"),
    case("eval-autodeco-preset-plain-model", lambda t, m: eval_(t, "--decoding", "greedy,autodeco"),
         "--decoding", "autodeco", "plain"),
    case("eval-no-chat-template", lambda t, m: eval_(t, "--model", m["no_template"], "--decoding", "greedy"),
         "chat template"),
    case("eval-wandb-choice", lambda t, m: eval_(t, "--wandb", "sometimes"), "--wandb", "sometimes"),

    # ------------------------------------------------------------------ sweep
    case("sweep-grid-huge", lambda t, m: sweep(t, "--temperatures", "0.1:100000:0.0000001"), "--temperatures"),
    case("sweep-grid-list-huge", lambda t, m: sweep(t, "--top-ps", ",".join(["0.5"] * 1001)), "--top-ps", "1001 points"),
    case("sweep-temperature-inf", lambda t, m: sweep(t, "--temperatures", "inf"), "--temperatures", "inf"),
    case("sweep-temperature-nan", lambda t, m: sweep(t, "--temperatures", "0.5,nan"), "--temperatures", "nan"),
    case("sweep-temperature-zero", lambda t, m: sweep(t, "--temperatures", "0,0.5"), "--temperatures"),
    case("sweep-temperature-huge", lambda t, m: sweep(t, "--temperatures", "1e300"), "--temperatures"),
    case("sweep-top-p-range", lambda t, m: sweep(t, "--top-ps", "0.5,1.5"), "--top-ps", "1.5"),
    case("sweep-grid-text", lambda t, m: sweep(t, "--temperatures", "warm"), "--temperatures", "warm"),
    case("sweep-grid-reversed", lambda t, m: sweep(t, "--temperatures", "1.0:0.1:0.1"), "--temperatures"),
    case("sweep-grid-step-zero", lambda t, m: sweep(t, "--top-ps", "0.1:1:0"), "--top-ps"),
    case("sweep-grid-empty", lambda t, m: sweep(t, "--temperatures", ","), "--temperatures"),
    case("sweep-inf-range", lambda t, m: sweep(t, "--temperatures", "0.1:inf:0.1"), "--temperatures", "inf"),
    case("sweep-training-run", lambda t, m: sweep(t, "--model", m["run"]), "training run"),
    case("sweep-seeds-zero", lambda t, m: sweep(t, "--seeds", "0"), "--seeds"),

    # ------------------------------------------------------------------ steer
    case("steer-plain-model", lambda t, m: ["steer", "--model", "smollm2", "--out", str(t / "out")], "plain"),
    case("steer-seeds-zero", lambda t, m: steer(t, m, "--seeds", "0"), "--seeds"),
    case("steer-max-tokens", lambda t, m: steer(t, m, "--max-tokens", "-5"), "--max-tokens", "-5"),
    case("steer-limit-zero", lambda t, m: steer(t, m, "--limit", "0"), "--limit"),
    case("steer-config-missing", lambda t, m: steer(t, m, "--config", str(t / "none.yaml")), "{tmp}/none.yaml"),
    case("steer-config-prompts", lambda t, m: steer(t, m, "--config", str(write(t / "s.yaml", "prompts: []\n"))),
         "{tmp}/s.yaml", "prompts"),
    case("steer-corrupt-heads", lambda t, m: steer(t, m, "--model", m["heads_corrupt"]), "model.safetensors"),

    # ------------------------------------------------------------------ report
    case("report-no-inputs", lambda t, m: ["report", "pass1", "--out", str(t / "rep")], "--runs"),
    case("report-runs-missing", lambda t, m: report(t, "pass1", str(t / "nope")), "{tmp}/nope"),
    case("report-all-empty-folder", lambda t, m: report(t, "all", str((t / "empty").mkdir() or t / "empty")),
         "{tmp}/empty", "no result files"),
    case("report-all-only-junk", lambda t, m: report(t, "all", results_dir(t, {"results_x.json": BINARY})),
         "no usable"),
    case("report-all-out-is-file", lambda t, m: ["report", "all", "--runs", results_dir(t, {"results_a.json": GOOD_RESULTS}),
                                                 "--out", str(write(t / "rep", "x"))], "--out", "{tmp}/rep", "file"),
    case("report-pass1-truncated", lambda t, m: report(t, "pass1", results_dir(t, {"results_a.json": GOOD_RESULTS[:40]})),
         "results_a.json"),
    case("report-pass1-wrong-shape", lambda t, m: report(t, "pass1", results_dir(t, {"results_a.json": "[1, 2]"})),
         "results_a.json"),
    case("report-ks-text", lambda t, m: report(t, "passk", results_dir(t, {"results_a.json": GOOD_RESULTS}),
                                               "--ks", "a,b"), "--ks", "a,b"),
    case("report-ks-zero", lambda t, m: report(t, "passk", results_dir(t, {"results_a.json": GOOD_RESULTS}),
                                               "--ks", "0"), "--ks", "0"),
    case("report-max-lines", lambda t, m: report(t, "traces", results_dir(t, {"results_a.json": GOOD_RESULTS}),
                                                 "--max-lines", "-1"), "--max-lines", "-1"),
    case("report-alias", lambda t, m: report(t, "pass1", results_dir(t, {"results_a.json": GOOD_RESULTS}),
                                             "--alias", "noequals"), "--alias", "noequals"),

    # ------------------------------------------------------------------ demo
    case("demo-seeds-zero", lambda t, m: ["demo", "--seeds", "0", "--out", str(t / "demo")], "--seeds"),
    case("demo-grid-huge", lambda t, m: ["demo", "--sweep-temperatures", "0.1:100000:0.0000001", "--out",
                                         str(t / "demo")], "--sweep-temperatures"),
    case("demo-grid-text", lambda t, m: ["demo", "--sweep-top-ps", "warm", "--out", str(t / "demo")], "--sweep-top-ps"),
    case("demo-top-p-above-1", lambda t, m: ["demo", "--sweep-top-ps", "0.5,1.5", "--out", str(t / "demo")],
         "--sweep-top-ps", "1.5"),
    case("demo-easy-negative", lambda t, m: ["demo", "--easy-problems", "-1", "--out", str(t / "demo")],
         "--easy-problems"),
    case("demo-profile-unknown", lambda t, m: ["demo", "--profile", "huge", "--out", str(t / "demo")],
         "--profile huge", "full"),
    case("demo-profile-and-config", lambda t, m: ["demo", "--profile", "full", "--config", str(write(t / "d.yaml", "seeds: 2\n")),
                                                  "--out", str(t / "demo")], "--profile and --config"),
    case("demo-bench-task", lambda t, m: ["demo", "--bench-tasks", "aime42", "--out", str(t / "demo")], "aime42"),
    case("demo-decoding", lambda t, m: ["demo", "--reject-decoding", "sideways", "--out", str(t / "demo")], "sideways"),
    case("demo-out-is-file", lambda t, m: ["demo", "--out", str(write(t / "demo", "x"))], "{tmp}/demo", "file"),
    case("demo-config-yaml", lambda t, m: ["demo", "--config", str(write(t / "d.yaml", "seeds: [\n")),
                                           "--out", str(t / "demo")], "{tmp}/d.yaml"),

    # ------------------------------------------------------------------ bench
    case("bench-overhead-repeats", lambda t, m: ["bench", "overhead", "--repeats", "0"], "--repeats", "0"),
    case("bench-overhead-limit", lambda t, m: ["bench", "overhead", "--limit", "-1"], "--limit", "-1"),
    case("bench-decode-batch", lambda t, m: ["bench", "decode", "--batch-size", "-2"], "--batch-size", "-2"),
    case("bench-decode-new-tokens", lambda t, m: ["bench", "decode", "--new-tokens", "0"], "--new-tokens"),
    case("bench-grading-samples", lambda t, m: ["bench", "grading", "--samples", "-1"], "--samples", "-1"),
    case("bench-grading-workers", lambda t, m: ["bench", "grading", "--workers", "0"], "--workers"),
    case("bench-grading-data-dir", lambda t, m: ["bench", "grading", "--data-dir", str(t / "nowhere")],
         "{tmp}/nowhere"),
    case("bench-loss-length", lambda t, m: ["bench", "loss", "--length", "0"], "--length"),
    case("bench-train-steps", lambda t, m: ["bench", "train", "--steps", "0"], "--steps"),
    case("bench-train-epochs", lambda t, m: ["bench", "train", "--epochs", "1"], "--epochs"),
    case("bench-train-cache-dtype", lambda t, m: ["bench", "train", "--cache-dtype", "int8"], "--cache-dtype", "int8"),
    case("bench-efficiency-lengths", lambda t, m: ["bench", "efficiency", "--prompt-lengths", "abc",
                                                   "--out", str(t / "e.json")], "--prompt-lengths", "abc"),
    case("bench-efficiency-gen", lambda t, m: ["bench", "efficiency", "--gen-tokens", "-1",
                                               "--out", str(t / "e.json")], "--gen-tokens", "-1"),
    case("bench-efficiency-dtype", lambda t, m: ["bench", "efficiency", "--dtype", "float99",
                                                 "--out", str(t / "e.json")], "--dtype", "float99"),
    case("bench-efficiency-device", lambda t, m: ["bench", "efficiency", "--device", "abacus",
                                                  "--out", str(t / "e.json")], "--device", "abacus"),
    case("bench-backends-unknown", lambda t, m: ["bench", "backends", "--backends", "abacus"], "abacus"),

    # ------------------------------------------------------------------ model prepare
    case("prepare-home-is-file", lambda t, m: ["model", "prepare", "--home", str(write(t / "h", "x"))], "{tmp}/h"),
]


# ---------------------------------------------------------------------------------------------
# Model folders the cases point at (built once)

@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file, save_file

    from heads.checkpoint import construct

    root = tmp_path_factory.mktemp("models")
    heads = construct(str(smollm2_path), root / "heads")
    found = {"heads": str(heads)}

    plain = root / "plain"  # a plain causal LM folder: config + tokenizer, no AutoDeco
    plain.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, plain / name)
    found["plain"] = str(plain)

    corrupt = root / "corrupt"  # a plain model whose weights are cut after 1 MB
    shutil.copytree(plain, corrupt)
    with open(smollm2_path / "model.safetensors", "rb") as source:
        (corrupt / "model.safetensors").write_bytes(source.read(1 << 20))
    found["corrupt"] = str(corrupt)

    bad_config = root / "bad_config"
    shutil.copytree(plain, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama", ')
    found["bad_config"] = str(bad_config)

    heads_corrupt = root / "heads_corrupt"  # garbage where the head tensors should be
    shutil.copytree(heads, heads_corrupt)
    (heads_corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    found["heads_corrupt"] = str(heads_corrupt)

    heads_truncated = root / "heads_truncated"  # a valid header, the tensor data cut short
    shutil.copytree(heads, heads_truncated)
    data = (heads / "model.safetensors").read_bytes()
    (heads_truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    found["heads_truncated"] = str(heads_truncated)

    heads_w64 = root / "heads_w64"  # heads trained for a base with hidden_size 64, pointed at SmolLM2 (576)
    shutil.copytree(heads, heads_w64)
    tensors = load_file(str(heads / "model.safetensors"))
    for name in ("temp_head.mlp.0.weight", "top_p_head.mlp.0.weight"):
        extra = tensors[name].shape[1] - 576
        tensors[name] = torch.zeros(tensors[name].shape[0], 64 + extra)
    save_file(tensors, str(heads_w64 / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((heads_w64 / "config.json").read_text())
    config.update(temperature_hidden_size=64, top_p_hidden_size=64)
    (heads_w64 / "config.json").write_text(json.dumps(config))
    found["heads_w64"] = str(heads_w64)

    no_template = root / "no_template"  # SmolLM2 without its chat template (a base model's layout)
    no_template.mkdir()
    for file in smollm2_path.iterdir():
        if file.name != "chat_template.jinja":
            (no_template / file.name).symlink_to(file)
    found["no_template"] = str(no_template)

    run = root / "run"  # a training run folder: one candidate
    shutil.copytree(heads, run / "checkpoint-1")
    found["run"] = str(run)
    return found


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input(bad: Case, models, tmp_path, monkeypatch, capfd):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    argv = bad.argv(tmp_path, models)
    before = _tree(tmp_path)
    capfd.readouterr()

    def too_long(signum, frame):
        raise TimeoutError(f"{bad.id} ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(CASE_SECONDS)  # a bad input must fail fast, not run for minutes
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capfd.readouterr().err
    lines = _error_lines(err)
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-3000:]}"
    line = lines[0]
    if os.environ.get("AUTODECO_BAD_INPUTS_LOG"):  # to read every message at once
        with open(os.environ["AUTODECO_BAD_INPUTS_LOG"], "a") as log:
            log.write(f"{bad.id}\t{line.replace(str(tmp_path), '{tmp}')}\n")
    assert line.startswith("autodeco") and ": error: " in line, line
    for fragment in bad.expect:
        fragment = fragment.replace("{tmp}", str(tmp_path))
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert _tree(tmp_path) == before, f"left behind: {sorted(_tree(tmp_path) - before)}"


def test_report_all_skips_damaged_inputs(tmp_path, capsys):
    """One warning line per damaged input (file and reason); the rest is reported."""
    from harness.cli import main

    runs = Path(results_dir(tmp_path, {
        "good/results_2025-01-01T00-00-00.json": GOOD_RESULTS,
        "cut/results_2025-01-02T00-00-00.json": GOOD_RESULTS[:50],
        "shape/results_2025-01-03T00-00-00.json": "[1, 2, 3]",
        "junk/results_2025-01-04T00-00-00.json": BINARY,
        "sweep/sweep_summary_arith.json": '{"task": "arith", "temperature_grid": [',
    }))
    assert main(["report", "all", "--runs", str(runs), "--out", str(tmp_path / "rep")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 4 and all(line.startswith("autodeco report: warning: ") for line in err), err
    for name in ("cut/results_", "shape/results_", "junk/results_", "sweep_summary_arith.json"):
        assert sum(name in line for line in err) == 1, name
    assert (tmp_path / "rep" / "index.md").is_file()
    table = next((tmp_path / "rep").rglob("pass1*.md")).read_text()
    assert "greedy" in table


def test_eval_failing_after_the_model_load_leaves_nothing(tmp_path, monkeypatch, capfd):
    """A failure once the model is loaded (here: a prompt the chat template cannot render) writes no
    run_settings.json, no sample store, no folder."""
    from harness.cli import main
    from tasks.registry import Task

    def unrenderable(self, doc, tokenizer):
        raise ValueError("the template cannot render these messages")

    monkeypatch.setattr(Task, "prompt", unrenderable)
    monkeypatch.chdir(tmp_path)
    code = main(eval_(tmp_path, "--decoding", "greedy"))
    lines = _error_lines(capfd.readouterr().err)
    assert code == 2 and "cannot build the prompt" in lines[-1] and "Traceback" not in "".join(lines)
    assert _tree(tmp_path) == set()


@pytest.mark.slow
def test_train_failing_after_the_model_load_leaves_nothing(tmp_path, monkeypatch, capfd):
    """A failure once the model is loaded (here: in the trainer's constructor) writes no
    train_config.yaml and leaves no output_dir."""
    from harness.cli import main
    from harness.core.errors import UserError
    from heads.training import trainer

    def refuse(self, *args, **kwargs):
        raise UserError("the trainer refused")

    monkeypatch.setattr(trainer.AutoDecoTrainer, "__init__", refuse)
    monkeypatch.chdir(tmp_path)
    argv = train(tmp_path)
    before = _tree(tmp_path)
    code = main(argv)
    lines = _error_lines(capfd.readouterr().err)
    assert code == 2 and "the trainer refused" in lines[-1]
    assert _tree(tmp_path) == before and not (tmp_path / "run").exists()


def test_table_size():
    """At least 100 cases, over every command."""
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"show", "grade", "construct", "split", "merge", "generate", "train", "trainsteer", "reject", "eval",
            "sweep", "steer", "report", "demo", "bench", "prepare"} <= prefixes


SUBPROCESS = ["eval-corrupt-model", "eval-hidden-mismatch", "train-corrupt-model", "grade-out-is-file",
              "report-all-only-junk", "sweep-grid-huge", "show-data-binary", "argparse-int"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS)
def test_subprocess_sample(name, models, tmp_path):
    """The real entry point: nothing but the one error line reaches stderr (no warnings, no logging)."""
    bad = next(c for c in CASES if c.id == name)
    argv = bad.argv(tmp_path, models)
    before = _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600)
    lines = _error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert all(f.replace("{tmp}", str(tmp_path)) in lines[0] for f in bad.expect), lines[0]
    assert _tree(tmp_path) == before
