"""Run untrusted Python (model-written code) in a sandbox: one program, one process tree.

With bubblewrap (``bwrap``, Debian package ``bubblewrap``; ``make setup`` installs it when it
can) a program gets:
- new user/pid/net/ipc/uts namespaces (``--unshare-all --unshare-user``): no network at all, no
  view of host processes or their environments; no capabilities (``--cap-drop ALL``) and no
  further user namespaces (``--disable-userns``, bwrap >= 0.8);
- a seccomp filter (``--seccomp``, x86_64 and aarch64): no ``ptrace``/``process_vm_*``/
  ``pidfd_getfd`` (nothing in the box can inspect or steer another process, the supervisor
  included), no mounts or namespaces, no ``memfd_create``/SysV ``shmget``/``userfaultfd``/
  ``io_uring``/``bpf``/``perf_event_open``/keyrings (memory outside the rlimits, kernel attack
  surface); anything else of a foreign ABI (x32, i386) fails;
- a read-only view of /usr only (the system Python, standard library, no site-packages), its
  code read-only under /box, a read-only root and /dev, and size-limited tmpfs mounts for the
  writable places: the cwd (/work), /tmp and /dev/shm (tmpfs pages are memory that RLIMIT_AS
  does not count, so every writable mount has a size);
- a scrubbed environment (``--clearenv``; PATH, HOME, LANG only);
- rlimits set before exec and inherited by everything inside: CPU seconds, address space,
  file size, process count (the host user is dropped to ``nobody`` when we are root, so the
  process limit counts only sandbox processes), open files, no core dumps;
- a wall-clock limit enforced from outside and an output cap;
- a pid-1 supervisor that makes itself non-dumpable (``PR_SET_DUMPABLE 0``: no ptrace and no
  /proc/1/mem from the program, even without seccomp) and fails a program that leaves
  processes running after it exits (graded wrong: see README, "Code sandbox");
- teardown of the whole box: bwrap reports the box's pid 1 and pid namespace (``--info-fd``);
  when the run ends (exit, wall limit, output cap) the harness SIGKILLs that pid 1 — the kernel
  then kills every process of the namespace — and kills and waits for anything of that pid
  namespace still on the host, so nothing of a box outlives its run.

Fallback without bwrap (reported in every result's ``isolation`` field and warned once): the
same rlimits, scrubbed environment, fresh temp dir as cwd and, when we are root, uid
``nobody`` and a new network namespace (``unshare --net``: no network); not root: a Python
audit hook refuses sockets (a determined program can bypass that — install bwrap). Leftover
daemons are found by a per-run marker in their environment and killed. The fallback does not
hide the host's files from reading, and has no seccomp filter or pid namespace.

Namespaces, user and rlimits are applied between fork and exec by util-linux (``unshare``,
``setpriv``, ``prlimit``), so no Python runs in the child and graders may call this from threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import pwd
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SANDBOX_PYTHON = "/usr/bin/python3"
NOBODY = "nobody"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `wall_s` is enforced from outside; the rest are rlimits."""

    cpu_s: int = 6
    wall_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 4 * 1024 * 1024
    tmpfs_mb: int = 64


RUN_MARKER = "AUTODECO_SANDBOX_RUN"  # fallback only: tags a run's processes in their environment
LEFTOVER_EXIT = 87  # the supervisor's exit code when the program left processes running
SUPERVISOR_FAILED = 86  # the supervisor could not make itself non-dumpable (the box is refused)

# pid 1 inside the sandbox: makes itself non-dumpable (the program, same uid, can then neither
# ptrace it nor write its memory through /proc/1/mem — refusing to run if that fails), runs the
# program, then reports processes it left behind (daemons, background jobs) with a distinct exit
# code; its exit tears the whole pid namespace down.
SUPERVISOR = f"""\
import os, subprocess, sys
try:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        raise OSError(ctypes.get_errno(), "prctl")
except Exception as err:
    os.write(2, f"sandbox: cannot make the supervisor non-dumpable ({{err}})\\n".encode())
    os._exit({SUPERVISOR_FAILED})
code = subprocess.call(sys.argv[1:])
left = []
for pid in os.listdir("/proc"):
    if pid.isdigit() and pid != "1":
        try:
            state = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(pid)
if left:
    os.write(2, b"sandbox: the program left processes running\\n")
    os._exit({LEFTOVER_EXIT})
os._exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Result:
    """What happened: exit code (negative = signal), captured output, and why it stopped."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0
    isolation: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded

    @property
    def left_processes(self) -> bool:
        return self.returncode == LEFTOVER_EXIT


@cache
def isolation_mode() -> str:
    """'bwrap' when a trial run of the full box (supervisor, seccomp filter) works here, else 'fallback'."""
    if not shutil.which("bwrap") or not Path(SANDBOX_PYTHON).exists():
        return "fallback"
    try:
        result = _run_bwrap({"probe.py": "print(1)"}, "probe.py", b"", Limits(wall_s=20.0), None)
    except (OSError, subprocess.SubprocessError):
        return "fallback"
    return "bwrap" if result.returncode == 0 and result.stdout.strip() == b"1" else "fallback"


@cache
def _bwrap_options() -> frozenset[str]:
    """The options this bwrap knows (``--disable-userns`` needs 0.8, ``--size`` 0.5)."""
    try:
        text = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word for word in text.split() if word.startswith("--"))


def _nobody() -> tuple[int, int] | None:
    if os.getuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(NOBODY)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _drop_privileges() -> None:
    ids = _nobody()
    if ids:
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _rlimits(limits: Limits, base_processes: int) -> list[tuple[int, int]]:
    mb = 1024 * 1024
    return [
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_AS, limits.memory_mb * mb),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
        (resource.RLIMIT_NPROC, base_processes + limits.processes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ]


def _bwrap_prefix(box: Path, limits: Limits, seccomp_fd: int | None = None, info_fd: int | None = None) -> list[str]:
    known = _bwrap_options()
    args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--as-pid-1", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if "--disable-userns" in known:
        args.append("--disable-userns")
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "lib32", "bin", "sbin"):
        target = Path("/") / name
        if target.is_symlink():
            args += ["--symlink", os.readlink(target), f"/{name}"]
        elif target.is_dir():
            args += ["--ro-bind", str(target), f"/{name}"]
    size = str(limits.tmpfs_mb * 1024 * 1024)
    args += ["--ro-bind", str(box), "/box",
             "--size", size, "--tmpfs", "/work",
             "--size", size, "--tmpfs", "/tmp",
             "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/work",
             "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work",
             "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--"]
    return args


# ---------------------------------------------------------------------------------------------
# The seccomp filter (classic BPF, as bwrap's --seccomp reads it: an array of sock_filter)

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000
# Denied with EPERM: tracing other processes, mounts and namespaces, memory the rlimits do not
# count (memfd, SysV shm), and kernel interfaces a test program never needs.
_DENIED = {
    "x86_64": {"ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
               "pidfd_getfd": 438, "process_madvise": 440, "mount": 165, "umount2": 166, "pivot_root": 155,
               "unshare": 272, "setns": 308, "memfd_create": 319, "memfd_secret": 447, "shmget": 29,
               "userfaultfd": 323, "bpf": 321, "perf_event_open": 298, "io_uring_setup": 425,
               "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
               "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
               "add_key": 248, "request_key": 249, "keyctl": 250},
    "aarch64": {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
                "pidfd_getfd": 438, "process_madvise": 440, "mount": 40, "umount2": 39, "pivot_root": 41,
                "unshare": 97, "setns": 268, "memfd_create": 279, "memfd_secret": 447, "shmget": 194,
                "userfaultfd": 282, "bpf": 280, "perf_event_open": 241, "io_uring_setup": 425,
                "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
                "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
                "add_key": 217, "request_key": 218, "keyctl": 219},
}
_CLONE = {"x86_64": (56, 435), "aarch64": (220, 435)}  # clone, clone3
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: refused in clone's flags
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


@cache
def seccomp_program(machine: str | None = None) -> bytes | None:
    """The box's seccomp filter for this machine's architecture (None: not supported here)."""
    machine = machine or platform.machine()
    if machine not in _AUDIT_ARCH:
        return None
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # ld [k]; jeq/jge/jset #k; ret #k
    deny, nosys = _RET_ERRNO | _EPERM, _RET_ERRNO | _ENOSYS
    clone, clone3 = _CLONE[machine]
    prog = [_bpf(load, 0, 0, 4),                          # seccomp_data.arch
            _bpf(jeq, 1, 0, _AUDIT_ARCH[machine]),
            _bpf(ret, 0, 0, nosys),                       # another ABI (i386 on x86_64, ...)
            _bpf(load, 0, 0, 0)]                          # seccomp_data.nr
    if machine == "x86_64":
        prog += [_bpf(jge, 0, 1, _X32_BIT), _bpf(ret, 0, 0, nosys)]
    for number in sorted(_DENIED[machine].values()):
        prog += [_bpf(jeq, 0, 1, number), _bpf(ret, 0, 0, deny)]
    prog += [_bpf(jeq, 0, 1, clone3), _bpf(ret, 0, 0, nosys),  # libc falls back to clone, checked below
             _bpf(jeq, 1, 0, clone), _bpf(ret, 0, 0, _RET_ALLOW),
             _bpf(load, 0, 0, 16),                             # clone's flags (args[0], low half)
             _bpf(jset, 0, 1, _CLONE_NAMESPACES), _bpf(ret, 0, 0, deny),
             _bpf(ret, 0, 0, _RET_ALLOW)]
    if sys.byteorder != "little":
        return None  # the args[0] offset above is the low half on little-endian machines only
    return b"".join(prog)


_AUDIT_NO_NET = (
    "import sys\n"
    "def _no_net(event, args):\n"
    "    if event.startswith('socket.') and event != 'socket.gethostname':\n"
    "        raise PermissionError('network disabled in the sandbox')\n"
    "sys.addaudithook(_no_net)\n"
)


def _unshare_net() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0
    except OSError:
        return False


_WARNED = False


def _warn_fallback() -> None:
    global _WARNED
    if not _WARNED:
        warnings.warn("bubblewrap (bwrap) is not available: running code with the fallback sandbox "
                      "(rlimits, temp cwd, scrubbed env, no network) — install bubblewrap for full isolation",
                      RuntimeWarning, stacklevel=3)
        _WARNED = True


def run_python(files: dict[str, str], main: str, stdin: bytes = b"", limits: Limits = Limits(),
               args: list[str] | None = None) -> Result:
    """Run ``python main`` where `files` (name -> text) are the program's files; see module doc."""
    if isolation_mode() == "bwrap":
        return _run_bwrap(files, main, stdin, limits, args)
    return _run_fallback(files, main, stdin, limits, args)


@contextlib.contextmanager
def _box_folders(files: dict[str, str], ids: tuple[int, int] | None) -> Iterator[tuple[Path, Path]]:
    """(box, work): the program's files read-only, and an empty working folder; removed afterwards."""
    box = Path(tempfile.mkdtemp(prefix="autodeco-box-"))
    work = Path(tempfile.mkdtemp(prefix="autodeco-work-"))
    try:
        for name, text in files.items():
            (box / name).write_text(text, encoding="utf-8", errors="surrogatepass")
            (box / name).chmod(0o444)
        box.chmod(0o555)
        if ids:
            os.chown(work, *ids)
        yield box, work
    finally:
        for path in (box, work):
            _force_remove(path)


def _run_bwrap(files: dict[str, str], main: str, stdin: bytes, limits: Limits, args: list[str] | None) -> Result:
    ids = _nobody()
    notes: list[str] = []
    program = seccomp_program()
    if program is None:
        notes.append(f"seccomp: no filter for {platform.machine()} (the supervisor is still non-dumpable)")
    to_close: list[int] = []  # our fds; _execute closes the child's ends once it has them
    info_read = None
    try:
        seccomp_fd = None
        if program is not None:
            seccomp_fd, write_end = os.pipe()
            to_close.append(seccomp_fd)
            with os.fdopen(write_end, "wb") as handle:  # a few hundred bytes: fits in the pipe
                handle.write(program)
        info_read, info_write = os.pipe()
        to_close.append(info_write)
        with _box_folders({**files, "_supervisor.py": SUPERVISOR}, ids) as (box, work):
            command = _bwrap_prefix(box, limits, seccomp_fd, info_write) + [
                SANDBOX_PYTHON, "-I", "-S", "/box/_supervisor.py", SANDBOX_PYTHON, "-I", "-S", f"/box/{main}", *(args or [])]
            rlimits = _rlimits(limits, _user_process_count(ids[0] if ids else os.getuid()))
            prefix, preexec = _launcher("bwrap", ids, rlimits)
            return _execute(prefix + command, {}, work, stdin, limits, preexec, "bwrap", notes,
                            pass_fds=tuple(to_close), info_fd=info_read, close_after_start=to_close)
    finally:
        for fd in [*to_close, *([info_read] if info_read is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)


def _run_fallback(files: dict[str, str], main: str, stdin: bytes, limits: Limits, args: list[str] | None) -> Result:
    ids = _nobody()
    _warn_fallback()
    notes = ["network: new namespace" if os.getuid() == 0 else "network: audit hook only"]
    with _box_folders({**files, "_sandbox_prelude.py": "" if ids else _AUDIT_NO_NET}, ids) as (box, work):
        python = SANDBOX_PYTHON if Path(SANDBOX_PYTHON).exists() else sys.executable
        launcher = (f"exec(open({str(box / '_sandbox_prelude.py')!r}).read()); import runpy, sys; "
                    f"sys.argv = [{str(box / main)!r}, *{args or []!r}]; "
                    f"runpy.run_path({str(box / main)!r}, run_name='__main__')")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", RUN_MARKER: uuid.uuid4().hex}
        rlimits = _rlimits(limits, _user_process_count(ids[0] if ids else os.getuid()))
        prefix, preexec = _launcher("fallback", ids, rlimits)
        result = _execute(prefix + [python, "-I", "-S", "-c", launcher], env, work, stdin, limits, preexec,
                          "fallback", notes)
        if _kill_marked(ids[0] if ids else os.getuid(), env[RUN_MARKER]):
            result.returncode = LEFTOVER_EXIT  # daemons that left the process group
        return result


_RLIMIT_FLAGS = {resource.RLIMIT_CPU: "cpu", resource.RLIMIT_AS: "as", resource.RLIMIT_FSIZE: "fsize",
                 resource.RLIMIT_NPROC: "nproc", resource.RLIMIT_NOFILE: "nofile", resource.RLIMIT_CORE: "core"}


def _launcher(mode: str, ids: tuple[int, int] | None, rlimits: list[tuple[int, int]]):
    """(command prefix, preexec_fn): util-linux tools set the namespace, user and rlimits between
    fork and exec without running Python in the child (safe when the caller grades in threads);
    without them, a preexec_fn does the same."""
    tools = {tool: shutil.which(tool) for tool in ("prlimit", "setpriv", "unshare")}
    if all(tools.values()):
        prefix = [tools["unshare"], "--net", "--"] if mode == "fallback" and os.getuid() == 0 else []
        if ids:
            prefix += [tools["setpriv"], f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--"]
        prefix += [tools["prlimit"], *(f"--{_RLIMIT_FLAGS[which]}={value}:{value}" for which, value in rlimits), "--"]
        return prefix, None

    def preexec() -> None:
        if mode == "fallback" and os.getuid() == 0:
            _unshare_net()
        _drop_privileges()
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))

    return [], preexec


def _kill_marked(uid: int, marker: str) -> int:
    """Fallback only: SIGKILL processes of `uid` whose environment carries this run's marker
    (daemons that left the process group); return how many there were. A program that also
    rewrites its environment escapes this — one reason bwrap is the real sandbox."""
    killed = 0
    needle = f"{RUN_MARKER}={marker}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if entry.stat().st_uid == uid and needle in Path(f"/proc/{entry.name}/environ").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
            except (OSError, ProcessLookupError):
                continue
    return killed


def _execute(command: list[str], env: dict, cwd: Path, stdin: bytes, limits: Limits, preexec,
             mode: str, notes: list[str], pass_fds: tuple[int, ...] = (), info_fd: int | None = None,
             close_after_start: list[int] | None = None) -> Result:
    """Run, feed stdin and collect output under the wall limit and output cap, then tear down:
    the box (when bwrap reported it on `info_fd`) and the launcher's process group."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=cwd, env=env, preexec_fn=preexec, start_new_session=True, pass_fds=pass_fds)
    while close_after_start:  # the child has them; our copies would hide bwrap's EOF (each closed once)
        with contextlib.suppress(OSError):
            os.close(close_after_start.pop())
    box = _Box()
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": [], "info": []}
    sizes = {"stdout": 0, "stderr": 0, "info": 0}
    timed_out = exceeded = False
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "stdout")
    selector.register(process.stderr, selectors.EVENT_READ, "stderr")
    if info_fd is not None:
        selector.register(info_fd, selectors.EVENT_READ, "info")
    pending = memoryview(stdin)
    if pending:  # fed as the program reads it: a program that never reads cannot block us
        os.set_blocking(process.stdin.fileno(), False)
        selector.register(process.stdin, selectors.EVENT_WRITE, "stdin")
    else:
        process.stdin.close()
    deadline = start + limits.wall_s
    while any(key.data != "stdin" for key in selector.get_map().values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            if key.data == "stdin":
                try:
                    pending = pending[os.write(process.stdin.fileno(), pending[:65536]):]
                except BlockingIOError:
                    continue
                except OSError:  # the program closed its stdin
                    pending = pending[:0]
                if not pending:
                    selector.unregister(process.stdin)
                    process.stdin.close()
                continue
            data = os.read(key.fd, 65536)
            if not data:
                selector.unregister(key.fileobj)
                if key.data == "info":
                    box.learn(b"".join(chunks["info"]))
                continue
            sizes[key.data] += len(data)
            if key.data != "info" and sizes[key.data] > limits.output_bytes:
                exceeded = True
                break
            chunks[key.data].append(data)
        if exceeded:
            break
    if info_fd is not None and box.pid is None:  # stopped before bwrap's report was read
        box.learn(b"".join(chunks["info"]) + _read_now(info_fd))
    box.kill()
    _kill_group(process)
    selector.close()
    if not process.stdin.closed:
        process.stdin.close()
    try:
        returncode = process.wait(timeout=max(0.1, deadline - time.monotonic()) + 5)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
        returncode = process.wait()
    left = box.wait_gone(timeout=5.0)
    if left:
        notes.append(f"teardown: {len(left)} process(es) of the box were still running and were killed")
    process.stdout.close()
    process.stderr.close()
    return Result(returncode=returncode, stdout=b"".join(chunks["stdout"]), stderr=b"".join(chunks["stderr"])[-4000:],
                  timed_out=timed_out, output_exceeded=exceeded, wall_s=time.monotonic() - start,
                  isolation=mode, notes=notes)


def _read_now(fd: int) -> bytes:
    """What a pipe holds right now (non-blocking)."""
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
        return os.read(fd, 65536)
    return b""


class _Box:
    """A bwrap box seen from the host: its pid 1 and pid namespace, as bwrap reports them on
    ``--info-fd``. Killing that pid 1 makes the kernel kill every process of the namespace, however
    the program detached them (setsid, double fork, a cleared parent-death signal)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.namespace: str | None = None  # "pid:[inode]", as /proc/<pid>/ns/pid reads
        self.pidfd: int | None = None

    def learn(self, report: bytes) -> None:
        try:
            info = json.loads(report)
            pid, inode = int(info["child-pid"]), info.get("pid-namespace")
        except (ValueError, KeyError, TypeError):
            return
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(pid)  # this process, even if the number is later reused
        namespace = _pid_namespace(pid)
        expected = f"pid:[{inode}]" if inode is not None else None
        if namespace is None or namespace == _pid_namespace(os.getpid()) or (expected and namespace != expected):
            self.close()  # already gone (its namespace died with it), or the number was reused
            return
        self.pid, self.namespace = pid, namespace

    def kill(self) -> None:
        """SIGKILL the box's pid 1 (stopped or traced, it dies; its namespace goes with it)."""
        if self.pid is None:
            return
        with contextlib.suppress(OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif _pid_namespace(self.pid) == self.namespace:
                os.kill(self.pid, signal.SIGKILL)

    def wait_gone(self, timeout: float) -> list[int]:
        """Wait until no process of the box's pid namespace is left (killing stragglers); return
        the stragglers found. pid 1 exits only after the kernel has killed the rest, so a finished
        pid 1 means an empty namespace; without a pidfd, /proc is searched."""
        if self.pid is None:
            return []
        deadline = time.monotonic() + timeout
        if self.pidfd is not None:
            with selectors.DefaultSelector() as waiter:
                waiter.register(self.pidfd, selectors.EVENT_READ)
                if waiter.select(timeout=timeout):  # readable: pid 1 has exited
                    self.close()
                    return []
        stragglers: list[int] = []
        while time.monotonic() < deadline:
            members = [pid for pid in _proc_pids() if _pid_namespace(pid) == self.namespace]
            if not members:
                break
            stragglers += [pid for pid in members if pid not in stragglers]
            for pid in members:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.close()
        return stragglers

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
        self.pidfd = None


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _proc_pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (it was started in its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _force_remove(path: Path) -> None:
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    os.chmod(path, 0o755)
    shutil.rmtree(path, ignore_errors=True)
