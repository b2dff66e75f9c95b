"""Run a ``python`` grader's ``source`` in a process of its own, cut off from the machine it runs on.

    from serve.graders.sandbox import isolation, run_python_grader
    run_python_grader(source, sample, item)   # SandboxResult(ok, reward, error, kind, isolation, ...)
    isolation()                                # what this OS grants (probed once per process): Isolation

Each grader runs in a new interpreter (``python -I``: no PYTHON* variables, no user site, not the caller's
cwd on sys.path) that applies these layers to itself before the grader's code is compiled:

- **environment**: only PATH, LANG, HOME and TMPDIR (both its working directory) and one-thread settings
  for BLAS/OpenMP: no API key or other variable of the server is inherited, and no file descriptor but
  its log and its result file (opened by the runner, outside the grader's directory);
- **working directory**: a new empty directory (the only place it may write), deleted afterwards;
- **namespaces** (``unshare`` through libc): a new user namespace (no privilege outside it), a new network
  namespace (no interface but a downed loopback: no network, the server's own port included) and a new
  PID namespace (it sees and can signal only its own processes; when the runner is killed, the kernel
  kills every process in it, so a process that left the process group with ``setsid`` dies too);
- **filesystem** (Landlock, kernel >= 5.13, via the raw syscalls): read access only to the Python runtime
  (the standard library and site-packages of the interpreter, the system's shared libraries under
  /lib, /lib64, /usr/lib, /usr/lib64 and /usr/local/lib, /etc/ld.so.cache) and /dev/null; read and write
  only in its working directory. Everything else is refused (EACCES): /etc/passwd, /proc (other
  processes' environments), the server's cwd and its ``.env``, the project's files and runs, /tmp.
  Landlock also refuses mount and ``ptrace`` of processes outside the sandbox; from ABI 4 TCP bind and
  connect, and from ABI 6 signals and abstract Unix sockets beyond the sandbox (this kernel's ABI is
  recorded in each result);
- **no new processes** (a seccomp filter, x86_64 and aarch64): fork, vfork and clone without CLONE_THREAD
  fail with EAGAIN (clone3 with ENOSYS, so glibc makes threads with clone), other architectures' syscall
  tables (i386, x32) with ENOSYS. A fork bomb ends at its first fork; threads are allowed, bounded by the
  address space. Besides, RLIMIT_NPROC (``processes``, default 8 tasks, threads included) is set after
  entering the new user namespace, where it counts the grader's own tasks only (Linux >= 5.14 counts per
  user per namespace); the kernel does not apply it to a server running as root (uid 0), the filter does;
- **limits** (``setrlimit``): address space (``memory_mb``, default 2048: a 10 GB allocation is a
  MemoryError), CPU seconds (the timeout + 1), file size 16 MB (an EFBIG error, not a signal), 64 open
  files, no core dumps;
- **time**: a wall-clock timeout (default 120 s, OpenAI's "about 2 minutes"), after which the runner's
  process group and with it the PID namespace are killed.

The grader's stdout and stderr go to a log file in the sandbox's folder (16 MB at most); only its last
line of traceback comes back (``error``). Its result comes back through a file the runner opened before
the layers applied; the caller reads at most 1 MB of it.

Where the OS refuses a layer (no unprivileged user namespaces, Landlock off or too old, seccomp on another
architecture: some containers and older kernels), ``isolation().complete`` is False and python graders are refused (``kind="server"``,
``python_grader_server_error``) unless the caller allows them explicitly (``allow_unisolated=True``, or
the environment variable ``TUNEKIT_PYTHON_GRADERS=on``, which the fine-tuning API's ``python_graders: on``
sets for its jobs): they then run with the layers that remain, and each result says which
(``isolation``). Not covered: the seccomp filter blocks process creation only, so the rest of the kernel's
syscall surface is reachable, as for any unprivileged process; a grader may create nested namespaces of its
own (Landlock still applies inside them and refuses mounts).

Cost (bench/grader_sandbox.py, on a 2-core Intel Xeon (AMX-BF16, AVX512-BF16), 24 GB, Python 3.11.7, with
other work running: load average 13): 150-170 ms per grade one after another, of which 70-80 ms is the
interpreter's start (``python -I -c pass``); 36 ms per grade with 8 grading at once. Timed inside the runner, the
layers themselves (namespaces and the fork, Landlock, seccomp, the limits) take 3-6 ms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .templates import MISSING

MAX_SOURCE_BYTES = 256 * 1024
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_PROCESSES = 8
MAX_RESULT_BYTES = 1 << 20
ALLOW_ENV = "TUNEKIT_PYTHON_GRADERS"  # "on": run python graders even where the isolation is incomplete
SYSTEM_LIBS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")
LAYERS = ("user_ns", "net_ns", "pid_ns", "landlock", "no_fork")  # every one required; nproc is extra

# The runner: argv = io folder, work folder, memory MB, CPU s, processes, strict (1/0), read-only paths...
# It reads request.json and opens result.json (both in the io folder, which the grader cannot reach once
# Landlock applies), enters new user + network + PID namespaces, forks the PID namespace's first process,
# which sets its limits, applies Landlock and runs grade(sample, item); the runner waits for it and exits
# as it did. Only the first process writes the result (a forked child of the grader exits without one).
RUNNER = r"""
import ctypes, json, math, os, resource, signal, struct, sys
io_dir, work, mem_mb, cpu_s, nproc, strict = sys.argv[1:7]
ro_paths = sys.argv[7:]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
got = {"user_ns": False, "net_ns": False, "pid_ns": False, "landlock": 0, "no_fork": False, "nproc": False}
req = json.load(open(os.path.join(io_dir, "request.json")))
result = open(os.path.join(io_dir, "result.json"), "w")
os.unlink(os.path.join(io_dir, "request.json"))

def finish(res):
    result.write(json.dumps({**res, "isolation": got}) + "\n")
    result.flush()
    os._exit(0)

NEWUSER, NEWNET, NEWPID = 0x10000000, 0x40000000, 0x20000000
if libc.unshare(NEWUSER | NEWNET | NEWPID) == 0:
    got.update(user_ns=True, net_ns=True, pid_ns=True)
elif libc.unshare(NEWUSER | NEWNET) == 0:
    got.update(user_ns=True, net_ns=True)
if got["pid_ns"]:
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the runner's death ends the namespace

def landlock():
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    attr = struct.pack("=QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        return 0
    file_rights = 1 | 2 | 4 | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            rights &= file_rights
        rule = struct.pack("=Qi", rights & fs, fd)
        rc = libc.syscall(445, ruleset, 1, ctypes.c_char_p(rule), 0)
        os.close(fd)
        if rc != 0:
            raise OSError(ctypes.get_errno(), "landlock_add_rule " + path)
    for path in ro_paths:
        allow(path, 1 | 4 | 8)  # execute, read file, read dir
    allow("/dev/null", 2 | 4)
    allow(work, fs)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset, 0) != 0:  # NO_NEW_PRIVS, restrict_self
        return 0
    return abi

ARCHES = {"x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
          "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}

def no_fork():
    # A seccomp filter: fork, vfork and clone without CLONE_THREAD fail with EAGAIN, clone3 with ENOSYS (glibc
    # then creates threads with clone); any other architecture's syscalls (i386 on x86_64, x32) with ENOSYS.
    arch = ARCHES.get(os.uname().machine)
    if arch is None:
        return False
    audit, nr = arch
    allow, eagain, enosys = 0x7FFF0000, 0x00050000 | 11, 0x00050000 | 38
    code = [("ld", 4), ("jeq", audit, None, "enosys"), ("ld", 0), ("jge", 0x40000000, "enosys", None)]
    code += [("jeq", nr[name], "eagain", None) for name in ("fork", "vfork") if name in nr]
    code += [("jeq", nr["clone3"], "enosys", None), ("jeq", nr["clone"], None, "allow"), ("ld", 16),
             ("jset", 0x10000, "allow", "eagain"), ("label", "allow"), ("ret", allow), ("label", "eagain"),
             ("ret", eagain), ("label", "enosys"), ("ret", enosys)]
    body = [c for c in code if c[0] != "label"]
    where, i = {}, 0
    for c in code:
        if c[0] == "label":
            where[c[1]] = i
        else:
            i += 1
    ops = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}
    raw = b""
    for i, c in enumerate(body):
        jump = lambda label: 0 if label is None else where[label] - i - 1
        jt, jf = (jump(c[2]), jump(c[3])) if c[0] in ("jeq", "jge", "jset") else (0, 0)
        raw += struct.pack("=HBBI", ops[c[0]], jt, jf, c[1])
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = struct.pack("=HxxxxxxQ", len(body), ctypes.addressof(buf))
    return libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.c_char_p(prog), 0, 0) == 0

try:
    mem = int(mem_mb) * 1024 * 1024
    for lim, val in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1)),
                     (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)), (resource.RLIMIT_NOFILE, (64, 64)),
                     (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(lim, val)
    if got["user_ns"]:  # counted in the new namespace only (see the module doc)
        resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
        got["nproc"] = True
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    got["landlock"] = landlock()
    got["no_fork"] = no_fork()
except Exception as exc:
    finish({"ok": False, "server": True, "error": f"the sandbox could not be set up: {exc}"})
missing = [k for k in ("user_ns", "net_ns", "pid_ns", "landlock", "no_fork") if not got[k]]
if missing and strict == "1":
    finish({"ok": False, "server": True, "error": "refused: this OS does not allow " + ", ".join(missing)})
os.chdir(work)
sys.stdout = sys.stderr
main = os.getpid()
try:
    ns = {"__name__": "grader"}
    exec(compile(req["source"], "<grader>", "exec"), ns)
    fn = ns.get("grade")
    if not callable(fn):
        raise NameError("the source defines no function grade(sample, item)")
    value = fn(req["sample"], req["item"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"grade() returned {type(value).__name__}, expected a float")
    if not math.isfinite(value):
        raise ValueError(f"grade() returned {value}")
    res = {"ok": True, "reward": float(value)}
except BaseException as exc:
    if os.getpid() != main:
        os._exit(1)
    import traceback
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    res = {"ok": False, "error": last, "traceback": traceback.format_exc()[-4000:]}
if os.getpid() != main:
    os._exit(0)
finish(res)
"""


@dataclass
class Isolation:
    """What the sandbox's layers achieved on this OS: each of LAYERS, and Landlock's ABI (0: none)."""
    user_ns: bool = False
    net_ns: bool = False
    pid_ns: bool = False
    landlock: int = 0
    no_fork: bool = False
    nproc: bool = False

    @property
    def complete(self) -> bool:
        return all(getattr(self, k) for k in LAYERS)

    def missing(self) -> list[str]:
        names = {"user_ns": "unprivileged user namespaces", "net_ns": "network namespaces",
                 "pid_ns": "PID namespaces", "landlock": "Landlock (kernel >= 5.13, enabled in the LSM list)",
                 "no_fork": "a seccomp filter (x86_64 or aarch64)"}
        return [names[k] for k in LAYERS if not getattr(self, k)]

    def describe(self) -> str:
        if self.complete:
            return f"isolated (user, network and PID namespaces, Landlock ABI {self.landlock}, no new processes)"
        return "NOT fully isolated: this OS refuses " + ", ".join(self.missing())


@dataclass
class SandboxResult:
    ok: bool
    reward: float = 0.0
    error: str | None = None        # the last line of the traceback, or what went wrong
    kind: str = "runtime"           # runtime (the grader's fault) | server (the sandbox's)
    isolation: Isolation | None = None
    stderr: str = ""                # the end of the grader's output (prints, traceback)
    extra: dict = field(default_factory=dict)

    @property
    def network_isolated(self) -> bool | None:
        return None if self.isolation is None else self.isolation.net_ns


_probe: Isolation | None = None
_probe_lock = threading.Lock()


def isolation() -> Isolation:
    """The layers this OS grants, found by running one trivial grader (once per process; a probe that could not
    run at all, e.g. on a machine too busy to start it in 30 s, is tried again next time)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            out = _run("def grade(sample, item):\n    return 0.0\n", {}, {}, timeout_s=30, memory_mb=DEFAULT_MEMORY_MB,
                       processes=DEFAULT_PROCESSES, strict=False)
            if out.isolation is None:
                return Isolation()
            _probe = out.isolation
        return _probe


def allowed_unisolated(allow: bool | None = None) -> bool:
    return allow if allow is not None else os.environ.get(ALLOW_ENV, "").strip().lower() == "on"


def run_python_grader(source: str, sample: dict, item: dict, *, timeout_s: float | None = None,
                      memory_mb: int = DEFAULT_MEMORY_MB, processes: int = DEFAULT_PROCESSES,
                      allow_unisolated: bool | None = None) -> SandboxResult:
    """``grade(sample, item)`` from ``source``, in a sandbox (see the module doc), for at most ``timeout_s`` (default
    DEFAULT_TIMEOUT_S). Where this OS does not grant every layer, a server error unless ``allow_unisolated``
    (default: TUNEKIT_PYTHON_GRADERS=on)."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        return SandboxResult(False, error=f"source is larger than {MAX_SOURCE_BYTES // 1024} KB")
    strict = not allowed_unisolated(allow_unisolated)
    if strict and not (iso := isolation()).complete:
        return SandboxResult(False, kind="server", isolation=iso,
                             error=f"python graders are refused on this machine: {iso.describe()}; set "
                                   f"{ALLOW_ENV}=on (the fine-tuning API: python_graders: on) to run them with the "
                                   "remaining layers")
    return _run(source, sample, item, timeout_s=timeout_s, memory_mb=memory_mb, processes=processes, strict=strict)


def read_only_paths() -> list[str]:
    """What a grader may read: the interpreter's standard library and site-packages, the system's libraries."""
    paths = sysconfig.get_paths()
    found = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        found.append(libdir)
    return list(dict.fromkeys(p for p in (*found, *SYSTEM_LIBS) if os.path.exists(p)))


def _run(source: str, sample: dict, item: dict, *, timeout_s: float, memory_mb: int, processes: int,
         strict: bool) -> SandboxResult:
    try:
        payload = json.dumps({"source": source, "sample": _jsonable(sample), "item": item or {}})
    except (TypeError, ValueError) as exc:
        return SandboxResult(False, error=f"sample/item are not JSON: {exc}", kind="server")
    with tempfile.TemporaryDirectory(prefix="tunekit-grader-", ignore_cleanup_errors=True) as tmp:
        io_dir, work = Path(tmp) / "io", Path(tmp) / "work"
        io_dir.mkdir(mode=0o700)
        work.mkdir(mode=0o700)
        (io_dir / "request.json").write_text(payload)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-c", RUNNER, str(io_dir), str(work), str(int(memory_mb)),
                str(max(1, int(timeout_s) + 1)), str(int(processes)), "1" if strict else "0", *read_only_paths()]
        with open(io_dir / "log", "wb") as log:
            try:  # its own session: a timeout kills the runner's group (and so its PID namespace)
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=work, env=env,
                                        start_new_session=True, close_fds=True)
            except OSError as exc:
                return SandboxResult(False, error=f"could not start the grader process: {exc}", kind="server")
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        result = _read(io_dir / "result.json", MAX_RESULT_BYTES)
        stderr = _tail(io_dir / "log", 4000)
    if timed_out:
        return SandboxResult(False, error=f"TimeoutError: the grader ran longer than {timeout_s:g} s", stderr=stderr)
    try:
        res = json.loads(result.splitlines()[0]) if result.strip() else None
    except ValueError:
        res = None
    if not isinstance(res, dict):
        rc = proc.returncode
        why = f"killed by signal {-rc}" if rc and rc < 0 else f"exited with status {rc}"
        if rc in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult(False, error=f"TimeoutError: the grader process was {why} (CPU limit)", stderr=stderr)
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        return SandboxResult(False, error=f"the grader process {why} without a result" + (f": {tail}" if tail else ""),
                             stderr=stderr)
    iso = Isolation(**{k: v for k, v in (res.get("isolation") or {}).items() if k in (*LAYERS, "nproc")})
    if res.get("ok") is True and isinstance(res.get("reward"), (int, float)):
        return SandboxResult(True, reward=float(res["reward"]), isolation=iso, stderr=stderr)
    return SandboxResult(False, error=str(res.get("error"))[:2000], kind="server" if res.get("server") else "runtime",
                         isolation=iso, stderr=str(res.get("traceback", stderr)))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _jsonable(sample: dict) -> dict:
    return {k: (None if v is MISSING else v) for k, v in sample.items()}
