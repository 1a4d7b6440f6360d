"""Benchmark rows: from the Hugging Face hub (default) or from local files in a data dir.

Every source is declared once in ``SOURCES``: its hub id, the local file name (as in
../shared/data), the fields each row must have (with their types), and a ``normalize``
function that turns a raw row — hub schema or local schema — into the task's doc.
A malformed local row raises :class:`DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import pickle
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.core.files import iter_jsonl


class DataError(UserError, ValueError):
    """A data row that does not match its schema (names file, line and field)."""


@dataclass(frozen=True)
class Source:
    """Where a task's rows come from and how they become docs."""

    name: str
    hub_path: str | None                       # None: generated (arith)
    hub_name: str | None = None
    hub_split: str = "train"
    hub_files: tuple[str, ...] = ()             # load these files of the hub repo with the json builder
    local_file: str | None = None
    fields: dict[str, tuple[type, ...]] = field(default_factory=dict)
    normalize: Callable[[dict, dict], dict] = lambda row, opts: row


# ---------------------------------------------------------------- normalizers (raw row -> doc)

def _math_doc(row: dict, opts: dict) -> dict:
    answer = row["answer"] if "answer" in row else row["gt"]
    return {"problem": row["problem"], "answer": answer}


def _mmlu_pro_doc(row: dict, opts: dict) -> dict:
    options = [o for o in row["options"] if o != "N/A"]
    return {
        "question_id": row.get("question_id"),
        "question": row["question"],
        "options": options,
        "answer": row["answer"],
        "category": row.get("category", ""),
    }


def _ifeval_doc(row: dict, opts: dict) -> dict:
    for index, kw in enumerate(row["kwargs"]):
        if not isinstance(kw, dict):
            raise DataError(f"field 'kwargs' item {index} is {type(kw).__name__}, expected an object")
    kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in row["kwargs"]]
    return {"key": row["key"], "prompt": row["prompt"],
            "instruction_id_list": list(row["instruction_id_list"]), "kwargs": kwargs}


def _gpqa_doc(row: dict, opts: dict) -> dict:
    from tasks.choice_grader import shuffle_gpqa

    return shuffle_gpqa(row)


def _json_field(row: dict, name: str, empty):
    """A field that holds JSON text (LiveCodeBench's tests and metadata)."""
    if not row.get(name):
        return empty
    try:
        return json.loads(row[name])
    except ValueError as err:
        raise DataError(f"field {name!r} is not valid JSON ({err})") from None


def _lcb_doc(row: dict, opts: dict) -> dict:
    public = _json_field(row, "public_test_cases", [])
    metadata = _json_field(row, "metadata", {})
    if not isinstance(metadata, dict):
        raise DataError("field 'metadata' is not a JSON object")
    return {
        "question_id": row["question_id"],
        "question_title": row["question_title"],
        "question_content": row["question_content"],
        "platform": row["platform"],
        "contest_date": str(row["contest_date"]),
        "difficulty": row["difficulty"],
        "starter_code": row.get("starter_code") or "",
        "public_test_cases": public,
        "private_test_cases": _private_tests(row["private_test_cases"]),
        "fn_name": metadata.get("func_name"),
    }


def _private_tests(blob: str) -> list[dict]:
    try:
        return decode_lcb_private_tests(blob)
    except (ValueError, pickle.UnpicklingError, zlib.error, EOFError) as err:
        raise DataError(f"field 'private_test_cases' cannot be decoded ({type(err).__name__})") from None


class _StrOnlyUnpickler(pickle.Unpickler):
    """LCB-lite packs private tests as base64(zlib(pickle(json str))): unpickle strings only."""

    def find_class(self, module: str, name: str):  # noqa: ARG002
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def decode_lcb_private_tests(blob: str) -> list[dict]:
    """Decode LiveCodeBench's private test cases (plain JSON, or the lite packed form)."""
    if not blob:
        return []
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        raw = zlib.decompress(base64.b64decode(blob.encode("utf-8")))
        text = _StrOnlyUnpickler(io.BytesIO(raw)).load()
        if not isinstance(text, str):
            raise pickle.UnpicklingError("private test blob is not a JSON string") from None
        return json.loads(text)


def encode_lcb_private_tests(tests: list[dict]) -> str:
    """The inverse of :func:`decode_lcb_private_tests` (the hub's packed form), for fixtures."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("utf-8")


_STR = (str,)
_MATH = {"problem": _STR, "gt|answer": (str, int)}

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("aime24", "HuggingFaceH4/aime_2024", local_file="aime24.jsonl", fields=_MATH, normalize=_math_doc),
    Source("aime25", "MathArena/aime_2025", local_file="aime25.jsonl", fields=_MATH, normalize=_math_doc),
    Source("hmmt25", "MathArena/hmmt_feb_2025", local_file="hmmt25.jsonl", fields=_MATH, normalize=_math_doc),
    Source("brumo25", "MathArena/brumo_2025", local_file="brumo25.jsonl", fields=_MATH, normalize=_math_doc),
    Source("beyondaime", "ByteDance-Seed/BeyondAIME", hub_split="test", local_file="beyondaime.jsonl",
           fields=_MATH, normalize=_math_doc),
    Source("mmlu_pro_100", "koiwave/100MMLUpro", hub_split="test", local_file="mmlu_pro_100.json",
           fields={"question": _STR, "options": (list,), "answer": _STR}, normalize=_mmlu_pro_doc),
    Source("mmlu_pro", "TIGER-Lab/MMLU-Pro", hub_split="test", local_file="mmlu_pro.jsonl",
           fields={"question": _STR, "options": (list,), "answer": _STR}, normalize=_mmlu_pro_doc),
    Source("ifeval", "google/IFEval", local_file="ifeval.jsonl",
           fields={"key": (int,), "prompt": _STR, "instruction_id_list": (list,), "kwargs": (list,)},
           normalize=_ifeval_doc),
    Source("gpqa_diamond", "Idavidrein/gpqa", hub_name="gpqa_diamond", local_file="gpqa_diamond.csv",
           fields={"Question": _STR, "Correct Answer": _STR, "Incorrect Answer 1": _STR,
                   "Incorrect Answer 2": _STR, "Incorrect Answer 3": _STR, "Record ID": _STR},
           normalize=_gpqa_doc),
    Source("livecodebench", "livecodebench/code_generation_lite",
           hub_files=("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"),
           local_file="livecodebench.jsonl",
           fields={"question_title": _STR, "question_content": _STR, "platform": _STR, "question_id": _STR,
                   "contest_date": (str, datetime), "starter_code": _STR, "difficulty": _STR,
                   "public_test_cases": _STR, "private_test_cases": _STR, "metadata": _STR},
           normalize=_lcb_doc),
]}

# LiveCodeBench release tags -> the hub files they span (releases are cumulative).
LCB_RELEASES = {f"release_v{i}": SOURCES["livecodebench"].hub_files[:i] for i in range(1, 7)}


# ---------------------------------------------------------------- reading

def _read_local(path: Path) -> Iterable[tuple[str, dict]]:
    """Yield (location, row) from .jsonl, .json (array) or .csv; location is 'line N' / 'item N'."""
    if not path.exists():
        raise DataError(f"{path}: file not found (expected in the data dir)")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not a file")
    if path.suffix == ".jsonl":
        for number, row in iter_jsonl(path, error=DataError):
            yield f"{number}", row
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file (not UTF-8)") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        for index, row in enumerate(rows):
            yield f"item {index}", row
    elif path.suffix == ".csv":
        try:
            with path.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                for row in reader:
                    yield f"{reader.line_num}", dict(row)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file (not UTF-8)") from None
        except csv.Error as err:
            raise DataError(f"{path}: not a CSV file ({err})") from None
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}")


def check_row(row: Any, fields: dict[str, tuple[type, ...]], where: str) -> None:
    """Raise DataError unless `row` has every field with an allowed type ('a|b' = either name)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {type(row).__name__}, expected an object")
    for spec, types in fields.items():
        names = spec.split("|")
        present = [n for n in names if n in row]
        if not present:
            raise DataError(f"{where}: missing field {spec.replace('|', ' or ')!r}")
        value = row[present[0]]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise DataError(f"{where}: field {present[0]!r} is {type(value).__name__}, expected {wanted}")


def _hub_rows(source: Source, options: dict) -> list[dict]:
    try:
        return _download(source, options)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - offline, gated (GPQA), renamed: say what to do
        raise DataError(f"cannot load {source.hub_path} from the Hugging Face hub ({type(err).__name__}: "
                        f"{str(err)[:300]}); log in / accept its terms, or pass --data-dir with "
                        f"{source.local_file}") from None


def _download(source: Source, options: dict) -> list[dict]:
    import datasets

    if source.hub_files:
        release = options.get("release", "release_v6")
        if release not in LCB_RELEASES:
            raise DataError(f"unknown LiveCodeBench release {release!r}; choose from {sorted(LCB_RELEASES)}")
        files = [f"hf://datasets/{source.hub_path}/{name}" for name in LCB_RELEASES[release]]
        dataset = datasets.load_dataset("json", data_files=files, split="train")
    else:
        splits = datasets.load_dataset(source.hub_path, source.hub_name)
        if source.hub_split in splits:
            dataset = splits[source.hub_split]
        elif len(splits) == 1:  # single-file uploads (e.g. the 100-question MMLU-Pro subset) have one split
            dataset = next(iter(splits.values()))
        else:
            raise DataError(f"{source.hub_path}: no split {source.hub_split!r} (has {', '.join(splits)})")
    return [dict(row) for row in dataset]


def load_rows(name: str, data_dir: Path | None, options: dict | None = None) -> list[dict]:
    """The docs of source `name`: local file when `data_dir` is given, else the hub."""
    source = SOURCES[name]
    options = options or {}
    docs: list[dict] = []
    if data_dir is not None:
        path = Path(data_dir) / source.local_file
        for location, row in _read_local(path):
            where = f"{path}:{location}"
            check_row(row, source.fields, where)
            try:
                docs.append(source.normalize(row, options))
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            except (KeyError, TypeError, ValueError, AttributeError, pickle.UnpicklingError, zlib.error) as err:
                raise DataError(f"{where}: cannot read row ({type(err).__name__}: {err})") from None
        if not docs:
            raise DataError(f"{path}: no rows")
    else:
        for index, row in enumerate(_hub_rows(source, options)):
            check_row(row, source.fields, f"{source.hub_path} row {index}")
            docs.append(source.normalize(row, options))
    if name == "livecodebench":
        docs = filter_by_date(docs, options.get("start_date"), options.get("end_date"))
    return docs


def _as_date(value: Any) -> date | None:
    if value in (None, ""):
        return None
    if isinstance(value, date):
        return value
    return datetime.fromisoformat(str(value)).date()


def filter_by_date(docs: list[dict], start: Any, end: Any) -> list[dict]:
    """LiveCodeBench's contamination window: keep problems with start <= contest_date <= end."""
    start_d, end_d = _as_date(start), _as_date(end)
    kept = []
    for doc in docs:
        try:
            day = datetime.fromisoformat(doc["contest_date"]).date()
        except ValueError:
            raise DataError(f"LiveCodeBench problem {doc.get('question_id')!r}: field 'contest_date' = "
                            f"{doc['contest_date']!r} is not a date") from None
        if (start_d is None or day >= start_d) and (end_d is None or day <= end_d):
            kept.append(doc)
    return kept


# ---------------------------------------------------------------- dataset options

_ARITH_OPTIONS = ("split", "n", "difficulty", "seed")
ARITH_MAX_N = 100_000  # generating that many takes ~10 s; more is a typo (n=100000000 ran for minutes)


def _int_option(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise DataError(f"task option {name!r} = {value!r}: must be an integer {bound}")
    return value


def _date_option(name: str, value: Any) -> Any:
    if value in (None, "") or isinstance(value, date):
        return value
    try:
        datetime.fromisoformat(str(value))
    except ValueError:
        raise DataError(f"task option {name!r} = {value!r}: must be a date YYYY-MM-DD") from None
    return value


def check_options(source: str, options: dict) -> dict:
    """A source's dataset options with their values checked (type and range); DataError names the option."""
    options = dict(options)
    if source == "arith":
        from tasks.arith import SPLITS

        if "split" in options and options["split"] not in SPLITS:
            raise DataError(f"task option 'split' = {options['split']!r}: must be one of {', '.join(SPLITS)}")
        if "n" in options:
            _int_option("n", options["n"], 1, ARITH_MAX_N)
        if "difficulty" in options:
            _int_option("difficulty", options["difficulty"], 1, 5)
        if "seed" in options:
            _int_option("seed", options["seed"], 0)
    elif source == "livecodebench":
        if "release" in options and options["release"] not in LCB_RELEASES:
            raise DataError(f"task option 'release' = {options['release']!r}: must be one of "
                            f"{', '.join(sorted(LCB_RELEASES))}")
        for name in ("start_date", "end_date"):
            if name in options:
                _date_option(name, options[name])
    return options


# ---------------------------------------------------------------- docs for the harness and for lm-eval


def load_docs(source: str, data_dir: Path | None, options: dict | None = None) -> list[dict]:
    """Docs of a source with a string ``doc_id`` (row index; IFEval's ``key``)."""
    options = dict(options or {})
    if source == "arith":
        from tasks.arith import generate

        check_options(source, options)
        try:
            docs = generate(**{k: options[k] for k in _ARITH_OPTIONS if k in options})
        except ValueError as err:
            raise DataError(f"arith: {err}") from None
    elif source in SOURCES:
        docs = load_rows(source, data_dir, options)
    else:
        raise DataError(f"unknown data source {source!r}; known: arith, {', '.join(SOURCES)}")
    for index, doc in enumerate(docs):
        doc["doc_id"] = str(doc["key"]) if source == "ifeval" else str(index)
    return docs


def lm_eval_dataset(source: str, **options: Any):
    """lm-eval's ``custom_dataset`` hook: a DatasetDict with a ``test`` split.

    lm-eval passes the YAML's ``dataset_kwargs`` and ``metadata`` as keyword arguments; the
    data dir comes from ``$AUTODECO_DATA_DIR`` (unset: the hub), as for every autodeco command.
    """
    import datasets

    from harness.core.paths import data_dir

    known = {k: v for k, v in options.items() if k in (*_ARITH_OPTIONS, "release", "start_date", "end_date")}
    docs = load_docs(source, data_dir(None), known)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
