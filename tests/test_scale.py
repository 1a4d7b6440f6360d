"""Running at scale: --shard I/N, `autodeco gather`, the store's writer lock, the Ray launcher, vLLM's
data parallelism. The slow tests run the real SmolLM2 in real processes and compare a sharded run
with an unsharded one file by file."""

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
from harness.gather import GatherError, find_jobs, merge_stores, record_shard
from harness.shards import Shard, ShardError, parse_shard
from harness.store import SampleStore, StoreLockedError, key_of, writer_lock

REPO = Path(__file__).resolve().parents[1]
EVAL = ["eval", "--model", "smollm2", "--tasks", "arith", "--decoding", "default", "--seeds", "2", "--samples", "2",
        "--limit", "3", "--max-tokens", "16", "--no-progress", "--wandb", "off"]
TOTAL = 3 * 2 * 2  # docs × seeds × samples
# Fields of a results file that say when and how long, not what: they differ between any two runs.
VOLATILE = ("date", "total_evaluation_time_seconds", "generation")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def autodeco(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def results_without_volatile(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE}


def wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Fast: shards, the lock, gather's checks


def test_shard_parse_and_round_robin_split():
    shard = parse_shard("1/3")
    assert shard == Shard(1, 3) and str(shard) == "1/3" and shard.tag == "shard-1-of-3"
    assert parse_shard(None) is None and parse_shard("") is None
    units = list(range(10))
    parts = [Shard(i, 3).take(units) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(u for part in parts for u in part) == units  # every unit once
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ShardError, match="--shard"):
            Shard.parse(bad)


def test_bad_shard_flag_is_one_line_error(capsys, tmp_path):
    assert main([*EVAL, "--out", str(tmp_path), "--shard", "2/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "autodeco eval: error: command line: --shard is '2/2'; expected I/N with 0 <= I < N, e.g. 3/8"


HOLD_LOCK = """
import sys, time
from harness.store import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_writer_lock_refuses_a_second_process_and_is_reentrant(tmp_path):
    store = tmp_path / "m" / "sample_store.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store)], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on "):
            with writer_lock(store):
                pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(store):  # the kernel dropped the dead holder's lock
        with writer_lock(store):  # re-entrant in one process (a sweep reopens its store per grid point)
            SampleStore(store).append({"model": "m", "task": "t", "doc_id": "0", "decoding": "d", "seed": 0,
                                       "sample_index": 0})
    assert len(SampleStore(store)) == 1


def test_writer_lock_of_a_run_that_wrote_nothing_leaves_nothing(tmp_path):
    store = tmp_path / "out" / "model" / "sample_store.jsonl"
    with pytest.raises(RuntimeError, match="failed before its first sample"):
        with writer_lock(store):
            assert store.with_name("sample_store.jsonl.lock").is_file()
            raise RuntimeError("failed before its first sample")
    assert list(tmp_path.iterdir()) == []  # no lock file, no folders made for it
    with writer_lock(store):  # and the lock works again afterwards
        SampleStore(store).append({"model": "m", "task": "t", "doc_id": "0", "decoding": "d", "seed": 0,
                                   "sample_index": 0})
    assert store.is_file() and store.with_name("sample_store.jsonl.lock").is_file()


def _shard_dir(root: Path, shard: Shard, config: dict, command: str = "eval", progress: str = "done") -> Path:
    record_shard(root, command, config, shard, progress=progress, models=["m"])
    return root


CONFIG = {"model": "smollm2", "backend": "hf", "tasks": "arith", "seeds": 2, "samples": 2, "limit": 3,
          "max_tokens": 16, "decoding": "default", "out": "x", "shard": None, "backend_arg": [], "data_dir": None}


def test_gather_refuses_missing_repeated_mixed_and_unfinished_shards(tmp_path):
    folders = iter(range(100))

    def shard(index: int, count: int = 2, command: str = "eval", progress: str = "done", **changes) -> Path:
        return _shard_dir(tmp_path / str(next(folders)), Shard(index, count), {**CONFIG, **changes}, command, progress)

    first = shard(0)
    with pytest.raises(GatherError, match=r"eval \w+: shard 1/2 missing from --runs \(found 0/2\)$"):
        find_jobs([first])
    with pytest.raises(GatherError, match=r"other settings: seeds = (2 vs 3|3 vs 2)$"):
        find_jobs([first, shard(1, seeds=3)])
    with pytest.raises(GatherError, match="shard 0/2 of eval is in both"):
        find_jobs([first, shard(0), shard(1)])
    with pytest.raises(GatherError, match="shard 1/2 of eval in .* has not finished"):
        find_jobs([first, shard(1, progress="started")])
    with pytest.raises(GatherError, match="shards of different splits"):
        find_jobs([first, shard(1), shard(1, 3)])
    with pytest.raises(GatherError, match="no shard manifests"):
        find_jobs([first / "shards"])
    # where files go and how the engine is spread may differ between shards
    second = shard(1, out="elsewhere", data_dir="/data", backend_arg=["data_parallel_size=2"])
    (job,) = find_jobs([first, second, first])  # a folder given twice counts once
    assert job.count == 2 and [m.root for m in job.shards] == [first, second]
    sweep = {"temperatures": "0.5,1.0", "top_ps": "0.5,1.0", "group": "g", "best_from": []}
    runs = [shard(i, command="sweep", progress="temperature-grid", **sweep) for i in (0, 1)]
    with pytest.raises(GatherError, match="temperature grid only: run every shard again with --best-from"):
        find_jobs(runs)
    assert len(find_jobs(runs, need="temperature-grid")) == 1


def test_gather_cli_error_is_one_line(tmp_path, capsys):
    _shard_dir(tmp_path / "a", Shard(0, 2), CONFIG)
    assert main(["gather", "--runs", str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autodeco gather: error: ") and "\n" not in err and "1/2 missing" in err


def test_merge_refuses_shards_made_from_other_prompts(tmp_path):
    def store(root: Path, shard: Shard, doc: str, prompt_hash: str) -> None:
        _shard_dir(root, shard, CONFIG)
        (root / "m").mkdir(parents=True, exist_ok=True)
        (root / "m" / "run_settings.json").write_text('{"model_path": "p", "backend": "hf"}')
        SampleStore(root / "m" / f"sample_store.{shard.tag}.jsonl").append(
            {"model": "m", "task": "arith", "doc_id": doc, "decoding": "default", "seed": 0, "sample_index": 0,
             "prompt_hash": prompt_hash, "max_tokens": 16, "response": "x"})

    store(tmp_path / "a", Shard(0, 2), "0", "aaaa")
    store(tmp_path / "b", Shard(1, 2), "0", "bbbb")
    (job,) = find_jobs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(GatherError, match=r"shards disagree on arith/0 of m: prompt_hash 'aaaa' in .*a/m/.*, 'bbbb' in .*b/m/"):
        merge_stores(job, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Slow: the real SmolLM2 in real processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_path) -> dict:
    """One unsharded run — and, while it runs, a second `autodeco eval` on the same --out (refused)."""
    out = tmp_path_factory.mktemp("unsharded")
    first = start([*EVAL, "--out", str(out)])
    lock = out / "smollm2" / "sample_store.jsonl.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().startswith("pid"), first)
    assert first.poll() is None, first.communicate()[1][-3000:]
    second = autodeco([*EVAL, "--out", str(out)])
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    return {"folder": out / "smollm2", "second": second, "first_pid": first.pid}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smollm2_path) -> dict:
    """Shard 1 in one process; shard 0 SIGKILLed midway, then run again; gathered into one folder."""
    root = tmp_path_factory.mktemp("sharded")
    s0, s1, merged = root / "s0", root / "s1", root / "merged"
    other = start([*EVAL, "--out", str(s1), "--shard", "1/2"])
    store = s0 / "smollm2" / "sample_store.shard-0-of-2.jsonl"
    killed = start([*EVAL, "--out", str(s0), "--shard", "0/2"])
    wait_for(lambda: store.is_file() and store.read_text().count("\n") >= 2, killed)
    assert killed.poll() is None, "shard 0 finished before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    before = len(SampleStore(store))
    again = autodeco([*EVAL, "--out", str(s0), "--shard", "0/2"])
    assert again.returncode == 0, again.stderr[-3000:]
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    gathered = autodeco(["gather", "--runs", str(s0), str(s1), "--out", str(merged), "--wandb", "off"])
    assert gathered.returncode == 0, gathered.stderr[-3000:]
    return {"folder": merged / "smollm2", "s0": s0, "s1": s1, "before": before, "again": again,
            "gathered": gathered}


@pytest.mark.slow
def test_second_writer_on_the_same_out_gets_one_line_error(reference):
    second = reference["second"]
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is being written by another autodeco process" in lines[0]
    assert f"pid {reference['first_pid']} on " in lines[0]
    records = [json.loads(line) for line in (reference["folder"] / "sample_store.jsonl").read_text().splitlines()]
    assert len(records) == TOTAL == len({key_of(r) for r in records})  # the first run's store is whole


@pytest.mark.slow
def test_two_shards_gathered_equal_one_run_bit_for_bit(reference, sharded):
    merged, full = sharded["folder"], reference["folder"]
    assert only(merged, "samples_arith_*.jsonl").read_bytes() == only(full, "samples_arith_*.jsonl").read_bytes()
    assert results_without_volatile(only(merged, "results_*.json")) == \
        results_without_volatile(only(full, "results_*.json"))
    stored = lambda folder: sorted((folder / "sample_store.jsonl").read_text().splitlines())  # noqa: E731
    assert stored(merged) == stored(full)  # the same records, byte for byte (file order differs)
    # each shard holds its own units only: (task, doc, seed) round-robin in the order seed, doc
    shard_units = {i: {(r["doc_id"], r["seed"]) for r in SampleStore(
        sharded[f"s{i}"] / "smollm2" / f"sample_store.shard-{i}-of-2.jsonl").records.values()} for i in (0, 1)}
    assert shard_units == {0: {("0", 0), ("2", 0), ("1", 1)}, 1: {("1", 0), ("0", 1), ("2", 1)}}
    assert not list(sharded["s0"].rglob("results_*.json"))  # a shard writes no partial results


@pytest.mark.slow
def test_killed_shard_resumes_without_redoing_samples(sharded):
    before, again = sharded["before"], sharded["again"]
    assert 2 <= before < TOTAL // 2
    assert f"{before} of {TOTAL // 2} samples already in" in again.stderr
    assert f"{TOTAL // 2 - before} samples generated" in again.stderr
    lines = (sharded["s0"] / "smollm2" / "sample_store.shard-0-of-2.jsonl").read_text().splitlines()
    assert len(lines) == TOTAL // 2  # nothing generated twice


@pytest.mark.slow
def test_ray_launcher_with_two_local_workers_matches_one_process(reference, tmp_path):
    out = tmp_path / "ray"
    done = autodeco(["launch", "ray", "--shards", "2", "--cpus-per-shard", "1", "--", *EVAL, "--out", str(out)],
                    timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("ok in ") == 2  # both shards ran as Ray tasks
    for i in (0, 1):
        log = out / "shards" / "logs" / f"eval-round-1.shard-{i}-of-2.log"
        assert f"shard {i}/2 of eval: 6 samples generated" in log.read_text()
    folder, full = out / "smollm2", reference["folder"]
    assert only(folder, "samples_arith_*.jsonl").read_bytes() == only(full, "samples_arith_*.jsonl").read_bytes()
    assert results_without_volatile(only(folder, "results_*.json")) == \
        results_without_volatile(only(full, "results_*.json"))


SWEEP = ["sweep", "--model", "smollm2", "--tasks", "arith", "--limit", "2", "--seeds", "1", "--samples", "2",
         "--max-tokens", "6", "--temperatures", "0.5,1.0", "--top-ps", "0.5,1.0", "--group", "g", "--wandb", "off",
         "--no-progress"]


@pytest.mark.slow
def test_sharded_sweep_in_two_rounds_equals_one_sweep(tmp_path, smollm2_path):
    """Every command in its own process, as in real use (the math grader's in-process cache marks a
    repeated answer's check "cached", so two runs compare only from equally fresh processes)."""
    full, shards, merged = tmp_path / "full", tmp_path / "shards", tmp_path / "merged"

    def in_parallel(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
        procs = [start(c) for c in commands]
        outputs = [p.communicate(timeout=900) for p in procs]
        done = [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]
        for d in done:
            assert d.returncode == 0, d.stderr[-3000:]
        return done

    # the unsharded sweep, and round 1 of both shards (the temperature grid; both share one --out)
    in_parallel([[*SWEEP, "--out", str(full)], *([*SWEEP, "--out", str(shards), "--shard", f"{i}/2"] for i in (0, 1))])
    early = autodeco(["gather", "--runs", str(shards), "--out", str(merged)])
    assert early.returncode == 2 and "temperature grid only" in early.stderr
    # round 2: the top-p grid at the best temperature over both shards' temperature grids
    second = in_parallel([[*SWEEP, "--out", str(shards), "--shard", f"{i}/2", "--best-from", str(shards)]
                          for i in (0, 1)])
    summary = json.loads((full / "smollm2" / "sweep_summary_arith.json").read_text())
    assert all(f"arith T={summary['best_temperature']}" in d.stderr for d in second)
    gathered = autodeco(["gather", "--runs", str(shards), "--out", str(merged), "--wandb", "off"])
    assert gathered.returncode == 0, gathered.stderr[-3000:]

    def files(folder: Path) -> list:
        results = [results_without_volatile(p) for p in sorted(folder.glob("results_*.json"))]  # in run order
        samples = [p.read_bytes() for p in sorted(folder.glob("samples_arith_*.jsonl"))]
        summary = json.loads((folder / "sweep_summary_arith.json").read_text())
        for row in summary["temperature_grid"] + summary["top_p_grid"]:
            row.pop("results_file")  # file names carry each run's timestamps
        return [results, samples, summary]

    points = {(r["temperature"], r["top_p"]) for r in summary["temperature_grid"] + summary["top_p_grid"]}
    assert len(points) >= 3  # greedy and T = 0.5, 1.0 at least; P grid unless greedy won
    assert len(list((merged / "smollm2").glob("results_*.json"))) == len(points)
    assert files(merged / "smollm2") == files(full / "smollm2")


@pytest.mark.slow
def test_sharded_reject_sampling_gathers_into_the_unsharded_file(tmp_path, smollm2_path, capsys):
    args = ["data", "reject-sample", "--model", "smollm2", "--task", "arith", "--difficulty", "1", "--limit", "5",
            "--samples", "2", "--max-tokens", "32", "--seed", "5", "--keep-truncated", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one" / "rs.jsonl")]) == 0
    for i in (0, 1):
        assert main([*args, "--out", str(tmp_path / "rs" / "rs.jsonl"), "--shard", f"{i}/2"]) == 0
    assert (tmp_path / "rs" / "rs.shard-1-of-2.jsonl").is_file()
    assert main(["gather", "--runs", str(tmp_path / "rs"), "--out", str(tmp_path / "merged")]) == 0
    one = (tmp_path / "one" / "rs.jsonl").read_bytes()
    assert one.count(b"\n") >= 1, "no correct completion to compare; raise --max-tokens"
    assert (tmp_path / "merged" / "rs.jsonl").read_bytes() == one


@pytest.mark.slow
def test_vllm_data_parallel_two_engines_match_one(tmp_path, smollm2_path):
    """`--backend-arg data_parallel_size=2`: vLLM's async client with two engine-core processes."""
    args = [*EVAL, "--backend", "vllm", "--backend-arg", "max_model_len=1024"]
    one = autodeco([*args, "--out", str(tmp_path / "dp1")], timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]
    two = autodeco([*args, "--backend-arg", "data_parallel_size=2", "--out", str(tmp_path / "dp2")], timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "data parallelism over 2 engine replicas" in two.stderr  # vLLM's client holds 2 engine cores
    dp1, dp2 = tmp_path / "dp1" / "smollm2", tmp_path / "dp2" / "smollm2"
    assert only(dp2, "samples_arith_*.jsonl").read_bytes() == only(dp1, "samples_arith_*.jsonl").read_bytes()
    assert results_without_volatile(only(dp2, "results_*.json"))["results"] == \
        results_without_volatile(only(dp1, "results_*.json"))["results"]


FAKE_SBATCH = '''#!{python}
"""Stands in for Slurm's sbatch: runs the --wrap command at once (each array index in turn), prints a job id."""
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["SBATCH_RECORD"], "a") as record:
    record.write(" ".join(args) + "\\n")
wrap = args[args.index("--wrap") + 1]
array = next((a.split("=", 1)[1] for a in args if a.startswith("--array=")), None)
indices = range(int(array.split("-")[0]), int(array.split("-")[1]) + 1) if array else [None]
for index in indices:
    env = dict(os.environ, **({{"SLURM_ARRAY_TASK_ID": str(index)}} if index is not None else {{}}))
    if subprocess.run(["sh", "-c", wrap], env=env).returncode:
        sys.exit(1)
print(abs(hash(wrap)) % 100000)
'''


@pytest.mark.slow
def test_slurm_array_script_shards_and_gathers(reference, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "slurm"
    done = subprocess.run([str(REPO / "configs" / "slurm" / "eval_array.sh"), "2", "--", *EVAL, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPUS_PER_SHARD": "0",
                               "AUTODECO": f"{sys.executable} -m harness.cli",
                               "SBATCH_RECORD": str(tmp_path / "sbatch.txt")})
    assert done.returncode == 0, done.stderr[-4000:]
    array, gather = (tmp_path / "sbatch.txt").read_text().splitlines()
    assert "--array=0-1" in array and "--shard ${SLURM_ARRAY_TASK_ID}/2" in array
    assert "--dependency=afterok:" in gather and f"gather --runs {out} --out {out}" in gather
    folder, full = out / "smollm2", reference["folder"]
    assert only(folder, "samples_arith_*.jsonl").read_bytes() == only(full, "samples_arith_*.jsonl").read_bytes()
    assert results_without_volatile(only(folder, "results_*.json")) == \
        results_without_volatile(only(full, "results_*.json"))
