"""The code sandbox against hostile programs: contained, graded wrong, host and test process unharmed.

Every program is a model "answer" to the stdin problem "print A+B" (or the LeetCode twoSum
problem) from the LiveCodeBench fixture and goes through the real grader and the real sandbox.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
from pathlib import Path

import pytest

from tasks import code_grader
from tasks.code_grader import extract_code, stdout_matches
from tasks.sandbox import Limits, isolation_mode, run_python

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FAST = Limits(cpu_s=2, wall_s=4.0, memory_mb=512)


@pytest.fixture(scope="module")
def lcb_docs():
    from tasks import get_task

    docs = get_task("livecodebench", data_dir=FIXTURES).docs()
    return {doc["question_id"]: doc for doc in docs}


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def _sandbox_processes() -> set[int]:
    """Live (non-zombie) processes of sandboxed programs: their interpreter, or the hostile `sleep 60`."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            uid = entry.stat().st_uid
        except OSError:
            continue
        ours = b"/box/main.py" in cmdline or b"autodeco-box-" in cmdline
        hostile_sleep = cmdline == b"sleep\x0060\x00" and (os.getuid() != 0 or uid == 65534)
        if state != "Z" and (ours or hostile_sleep):
            pids.add(int(entry.name))
    return pids


def test_isolation_is_reported():
    mode = isolation_mode()
    assert mode in ("bwrap", "fallback")
    result = run_python({"m.py": "print('hi')"}, "m.py", limits=FAST)
    assert result.ok and result.stdout == b"hi\n" and result.isolation == mode


def test_good_solutions_pass(lcb_docs):
    add = "a, b = map(int, input().split())\nprint(a + b)"
    assert code_grader.grade(lcb_docs["abc999_a"], _fenced(add), limits=FAST).correct
    two_sum = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
               "        seen = {}\n        for i, x in enumerate(nums):\n"
               "            if target - x in seen:\n                return [seen[target - x], i]\n"
               "            seen[x] = i\n")
    assert code_grader.grade(lcb_docs["9001"], _fenced(two_sum), limits=FAST).correct
    halve = "print(' '.join(str(int(x) / 2) for x in input().split()))"
    verdict = code_grader.grade(lcb_docs["2050A"], _fenced(halve), limits=FAST)
    assert verdict.correct, verdict.details


def test_wrong_and_missing_code(lcb_docs):
    doc = lcb_docs["abc999_a"]
    assert not code_grader.grade(doc, _fenced("print(3)"), limits=FAST).correct  # passes the public test only
    verdict = code_grader.grade(doc, "I would add the numbers.", limits=FAST)
    assert not verdict.correct and verdict.details["reason"] == "no code block"


def test_official_comparison_rules():
    assert stdout_matches("3\n", "3")
    assert stdout_matches("  1 2  \n\n", "1 2")
    assert stdout_matches("0.50 1.5", "0.5 1.50")          # Decimal-equal tokens
    assert not stdout_matches("1 2\n3", "1 2")              # line count differs
    assert not stdout_matches("0.5000001", "0.5")           # no float tolerance beyond Decimal equality
    assert not stdout_matches("abc", "abd")
    assert extract_code("```python\nA\n```\ntext\n```py\nB\n```") == "B\n"
    assert extract_code("<think>```python\nA\n```</think> ```python\nC\n```") == "C\n"


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "infinite_loop": "while True:\n    pass",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))",
    "disk_filler": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1048576)",
    "many_files": "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'y' * 1048576)\n    i += 1",
    "delete_outside": "import shutil\nshutil.rmtree(SENTINEL_DIR)\nprint(3)",
    "read_parent_env": ("import os\nprint(dict(os.environ))\nfor pid in ('1', str(os.getppid())):\n"
                        "    try:\n        print(open(f'/proc/{pid}/environ').read())\n    except OSError as e:\n"
                        "        print(e)"),
    "network": ("import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\n"
                "s.sendall(b'leak')\nprint(3)"),
    "outlive": ("import os, subprocess, time\nif os.fork() == 0:\n    os.setsid()\n"
                "    subprocess.Popen(['sleep', '60'])\n    time.sleep(60)\n"
                "a, b = map(int, input().split())\nprint(a + b)"),
    "huge_output": "import sys\nchunk = 'x' * 1048576\nfor _ in range(100):\n    sys.stdout.write(chunk)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "exit_early": "import sys\nsys.exit(0)\nprint(3)",
    "patch_checker": ("import builtins, json\njson.loads = lambda *a, **k: [0, 1]\n"
                      "for path in ('/box/main.py', CHECKER):\n    try:\n"
                      "        open(path, 'w').write('print(3)')\n    except OSError:\n        pass\n"
                      "class Solution:\n    def twoSum(self, nums, target):\n"
                      "        class Always:\n            def __eq__(self, other):\n                return True\n"
                      "        return Always()"),
    "sleep_past_limit": "import time\ntime.sleep(30)\nprint(3)",
    "kill_parent": "import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nprint(3)",
}


@pytest.mark.slow
def test_hostile_programs_are_contained(lcb_docs, tmp_path):
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    sentinel = sentinel_dir / "keep.txt"
    sentinel.write_text("precious")
    os.chmod(tmp_path, 0o755)
    os.environ["AUTODECO_TEST_SECRET"] = "s3cret-token-1234"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    received: list[bytes] = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    listener = threading.Thread(target=accept_loop, daemon=True)
    listener.start()
    checker = str(Path(code_grader.__file__).resolve())
    checker_before = Path(checker).read_bytes()
    before = _sandbox_processes()
    pid = os.getpid()
    try:
        for name, code in HOSTILE.items():
            code = (code.replace("SENTINEL_DIR", repr(str(sentinel_dir))).replace("PORT", str(port))
                    .replace("CHECKER", repr(checker)))
            doc = lcb_docs["9001" if name == "patch_checker" else "abc999_a"]
            start = time.monotonic()
            verdict = code_grader.grade(doc, _fenced(code), limits=FAST)
            elapsed = time.monotonic() - start
            assert not verdict.correct, f"{name} was graded correct: {verdict.details}"
            assert elapsed < FAST.wall_s + 8, f"{name} took {elapsed:.1f}s"
            if name == "read_parent_env":
                result = run_python({"m.py": code}, "m.py", limits=FAST)
                assert b"s3cret-token-1234" not in result.stdout + result.stderr
            if name == "huge_output":
                assert verdict.details["reason"] == "output limit exceeded"
            if name == "sleep_past_limit":
                assert "time limit" in verdict.details["reason"]
    finally:
        stop.set()
        listener.join(timeout=2)
        server.close()
        os.environ.pop("AUTODECO_TEST_SECRET", None)
    assert os.getpid() == pid  # the test process is alive and is still itself
    assert sentinel.read_text() == "precious"
    assert Path(checker).read_bytes() == checker_before
    assert received == [], "a sandboxed program reached the host network"
    deadline = time.monotonic() + 5  # SIGKILLed trees take a moment to disappear on a busy machine
    while (leftover := _sandbox_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover, f"processes outlived their sandbox: {leftover}"
    assert not list(Path("/tmp").glob("autodeco-box-*")) or all(
        p.stat().st_mtime < time.time() - 3600 for p in Path("/tmp").glob("autodeco-box-*"))


def test_limits_are_rlimits_inside():
    code = ("import resource\nfor r in ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_NOFILE'):\n"
            "    print(r, resource.getrlimit(getattr(resource, r))[0])\nimport os\nprint('cwd', os.getcwd(), os.listdir('.'))")
    result = run_python({"m.py": code}, "m.py", limits=FAST)
    text = result.stdout.decode()
    assert result.ok, result.stderr
    assert "RLIMIT_CPU 2" in text and f"RLIMIT_AS {512 * 1024 * 1024}" in text
    assert f"RLIMIT_FSIZE {16 * 1024 * 1024}" in text and "RLIMIT_NOFILE 64" in text
    assert "cwd" in text and "[]" in text  # a fresh, empty working directory


@pytest.mark.slow
def test_fallback_without_bwrap(monkeypatch, lcb_docs, tmp_path):
    """Where bubblewrap is missing: rlimits, scrubbed env, temp cwd, no network, reported as fallback."""
    import tasks.sandbox as sandbox

    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "fallback")
    with pytest.warns(RuntimeWarning, match="bubblewrap"):
        sandbox._WARNED = False
        result = run_python({"m.py": "import os; print(sorted(os.environ), os.getcwd())"}, "m.py", limits=FAST)
    assert result.ok and result.isolation == "fallback"
    assert b"['AUTODECO_SANDBOX_RUN', 'HOME', 'LANG', 'PATH']" in result.stdout  # scrubbed, plus the run marker
    assert b"autodeco-work-" in result.stdout
    add = "a, b = map(int, input().split())\nprint(a + b)"
    assert code_grader.grade(lcb_docs["abc999_a"], _fenced(add), limits=FAST).correct
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("precious")
    os.chmod(tmp_path, 0o755)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for name in ("fork_bomb", "network", "delete_outside", "outlive", "exit_early", "segfault"):
            code = HOSTILE[name].replace("SENTINEL_DIR", repr(str(tmp_path))).replace("PORT", str(port))
            verdict = code_grader.grade(lcb_docs["abc999_a"], _fenced(code), limits=FAST)
            assert not verdict.correct, f"{name} (fallback) was graded correct: {verdict.details}"
            assert verdict.details["isolation"] == "fallback"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert sentinel.read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# The box as a whole: no ptrace of the supervisor, nothing outlives the run, memory stays bounded

# The escape of issue 15, as a model could write it (x86_64): ptrace-attach to the box's pid-1
# supervisor, make it run prctl(PR_SET_PDEATHSIG, 0) so bwrap's death no longer kills it, leave it
# stopped, start a setsid daemon, print the right answer. Without the defences the supervisor and
# the daemon kept running on the host after the wall limit.
PTRACE_ESCAPE = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PEEKTEXT, GETREGS, SETREGS, ATTACH, DETACH, SINGLESTEP, WALL = 1, 12, 13, 16, 17, 9, 0x40000000

class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulong) for n in ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi "
                                               "orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs").split()]

def escape():
    if libc.ptrace(ATTACH, 1, None, None) != 0:
        return "attach: " + os.strerror(ctypes.get_errno())
    os.waitpid(1, WALL)
    regs = Regs()
    libc.ptrace(GETREGS, 1, None, ctypes.byref(regs))
    if libc.ptrace(PEEKTEXT, 1, ctypes.c_void_p(regs.rip - 2), None) & 0xFFFF != 0x050F:
        return "not stopped at a syscall"
    regs.orig_rax, regs.rip = 2**64 - 1, regs.rip - 2          # no restart; run the syscall again
    regs.rax, regs.rdi, regs.rsi = 157, 1, 0                   # prctl(PR_SET_PDEATHSIG, 0)
    libc.ptrace(SETREGS, 1, None, ctypes.byref(regs))
    libc.ptrace(SINGLESTEP, 1, None, None)
    os.waitpid(1, WALL)
    libc.ptrace(GETREGS, 1, None, ctypes.byref(regs))
    libc.ptrace(DETACH, 1, None, ctypes.c_void_p(19))          # leave it stopped (SIGSTOP)
    return "escaped" if regs.rax == 0 else f"prctl failed {regs.rax}"

print(escape(), file=sys.stderr, flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 3)
        os.execv("/bin/sleep", ["sleep", "4242"])
    os._exit(0)
a, b = map(int, input().split())
print(a + b)
'''


def _box_leftovers() -> set[int]:
    """Live processes on the host that belong to a box: the supervisor, a program, the daemon."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (b"/box/_supervisor.py" in cmdline or b"/box/main.py" in cmdline
                             or cmdline == b"sleep\x004242\x00"):
            pids.add(int(entry.name))
    return pids


def _wait_no_leftovers(before: set[int], seconds: float = 5.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := _box_leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.slow
@pytest.mark.skipif(isolation_mode() != "bwrap", reason="needs bubblewrap (the fallback has no pid-1 supervisor)")
def test_ptrace_escape_is_blocked(lcb_docs):
    before = _box_leftovers()
    verdict = code_grader.grade(lcb_docs["abc999_a"], _fenced(PTRACE_ESCAPE), limits=FAST)
    assert not verdict.correct and verdict.details["reason"] == "left processes running after exit", verdict.details
    result = run_python({"main.py": PTRACE_ESCAPE}, "main.py", stdin=b"1 2\n", limits=FAST)
    assert b"attach: Operation not permitted" in result.stderr, result.stderr  # seccomp (and PR_SET_DUMPABLE 0)
    assert result.stdout == b"3\n" and result.left_processes and not result.timed_out
    assert not _wait_no_leftovers(before), "a process of the box outlived it"


@pytest.mark.slow
@pytest.mark.skipif(isolation_mode() != "bwrap", reason="needs bubblewrap")
def test_supervisor_is_not_traceable_without_seccomp(monkeypatch):
    """PR_SET_DUMPABLE 0 alone refuses ptrace and /proc/1/mem (e.g. where no filter exists for the CPU)."""
    import tasks.sandbox as sandbox

    monkeypatch.setattr(sandbox, "seccomp_program", lambda machine=None: None)
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('attach', libc.ptrace(16, 1, None, None), os.strerror(ctypes.get_errno()))\n"
            "for path in ('/proc/1/mem', '/proc/1/environ'):\n    try:\n        open(path, 'rb').close()\n"
            "        print(path, 'opened')\n    except OSError as err:\n        print(path, type(err).__name__)\n")
    result = run_python({"main.py": code}, "main.py", limits=FAST)
    text = result.stdout.decode()
    assert result.ok, result.stderr
    assert "attach -1 Operation not permitted" in text
    assert "/proc/1/mem PermissionError" in text and "/proc/1/environ PermissionError" in text


@pytest.mark.slow
@pytest.mark.skipif(isolation_mode() != "bwrap" or platform.machine() != "x86_64",
                    reason="the escape program is x86_64 and needs bubblewrap")
def test_teardown_kills_an_escaped_box(monkeypatch):
    """Even with seccomp and PR_SET_DUMPABLE switched off (the escape then works inside), the
    teardown kills the stopped supervisor and the setsid daemon: nothing of the box is left."""
    import tasks.sandbox as sandbox

    monkeypatch.setattr(sandbox, "seccomp_program", lambda machine=None: None)
    monkeypatch.setattr(sandbox, "SUPERVISOR", sandbox.SUPERVISOR.replace("prctl(4, 0, 0, 0, 0) != 0", "getpid() < 0"))
    before = _box_leftovers()
    result = run_python({"main.py": PTRACE_ESCAPE}, "main.py", stdin=b"1 2\n", limits=FAST)
    assert b"escaped" in result.stderr, result.stderr  # the supervisor was stopped with no parent-death signal
    assert result.timed_out and not result.ok  # the stopped supervisor never reports: the wall limit ends it
    assert not _wait_no_leftovers(before), "the escaped supervisor or its daemon survived the box"


SHM_FILLER = r'''
import ctypes, os
chunk = b"x" * 1048576
def fill(folder):
    total = 0
    try:
        for i in range(256):                        # up to 2 GiB in 8 MiB files (RLIMIT_FSIZE is per file)
            with open(os.path.join(folder, f"f{i}"), "wb") as handle:
                for _ in range(8):
                    handle.write(chunk)
                    handle.flush()
                    total += 1
    except OSError as err:
        return f"{total} {type(err).__name__}"
    return f"{total} ok"
for folder in ("/dev/shm", "/dev", "/", "/tmp", "."):
    print(folder, fill(folder), flush=True)
try:
    os.write(os.memfd_create("m"), chunk)
    print("memfd ok")
except OSError as err:
    print("memfd", type(err).__name__)
libc = ctypes.CDLL(None, use_errno=True)
print("shmget", libc.shmget(0, 1 << 30, 0o1000 | 0o600), os.strerror(ctypes.get_errno()))
'''


def _shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.skipif(isolation_mode() != "bwrap", reason="needs bubblewrap")
def test_shared_memory_filler_is_bounded():
    """/dev/shm is a size-limited tmpfs like /tmp; / and /dev are read-only; memfd and SysV shm are
    refused: the host's shared memory grows by at most the tmpfs sizes while the program runs."""
    limits = Limits(cpu_s=8, wall_s=20.0, memory_mb=512, tmpfs_mb=32)
    base, peak, stop = _shmem_bytes(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _shmem_bytes() - base)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_python({"main.py": SHM_FILLER}, "main.py", limits=limits)
    finally:
        stop.set()
        watcher.join()
    lines = dict(line.split(" ", 1) for line in result.stdout.decode().splitlines())
    assert result.ok, (result.stdout, result.stderr)
    for folder in ("/dev/shm", "/tmp", "."):
        written, outcome = lines[folder].split()
        assert int(written) <= 32 and outcome == "OSError", (folder, lines[folder])  # ENOSPC at the tmpfs size
    for folder in ("/dev", "/"):
        assert lines[folder] == "0 OSError", (folder, lines[folder])  # read-only
    assert lines["memfd"] == "PermissionError" and lines["shmget"] == "-1 Operation not permitted"
    assert peak[0] < 3 * 32 * 2**20 + 64 * 2**20, f"host shared memory grew by {peak[0] / 2**20:.0f} MiB"
    assert _shmem_bytes() - base < 32 * 2**20  # freed with the box


def test_seccomp_program_shape():
    """The filter is whole sock_filter records and exists for the two architectures we know."""
    from tasks.sandbox import seccomp_program

    for machine in ("x86_64", "aarch64"):
        program = seccomp_program(machine)
        assert program and len(program) % 8 == 0 and len(program) // 8 < 4096
    assert seccomp_program("mips") is None


def test_threads_and_subprocesses_work_in_the_box():
    """clone3 answers ENOSYS (libc falls back to clone, checked for namespace flags): threads,
    fork and subprocess still work."""
    code = ("import os, subprocess, threading\nt = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
            "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n")
    result = run_python({"main.py": code}, "main.py", limits=FAST)
    assert result.ok, result.stderr
    assert result.stdout.decode().split("\n")[:3] == ["thread", "fork 7", "child"]


def test_program_that_never_reads_a_large_stdin_is_stopped_at_the_wall_limit():
    """stdin is fed as the program reads it: 8 MiB the program ignores cannot block the grader."""
    limits = Limits(cpu_s=2, wall_s=2.0, memory_mb=512)
    start = time.monotonic()
    result = run_python({"main.py": "import time\ntime.sleep(30)"}, "main.py", stdin=b"1 2\n" * (2 * 1024 * 1024),
                        limits=limits)
    assert result.timed_out and time.monotonic() - start < limits.wall_s + 8
    echo = run_python({"main.py": "import sys\nsys.stdout.write(str(len(sys.stdin.read())))"}, "main.py",
                      stdin=b"y" * (3 * 1024 * 1024 + 7), limits=Limits(wall_s=20.0))
    assert echo.ok and echo.stdout == str(3 * 1024 * 1024 + 7).encode()
