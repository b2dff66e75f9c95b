"""Run a ``python`` grader's ``source`` in a separate, limited process.

What isolation it has (and what it does not):

- a fresh interpreter (``python -I``: no PYTHON* variables, no user site, not the caller's cwd on sys.path),
  started with an environment of only ``PATH`` and ``LANG``: no API keys or other secrets are inherited;
- cwd is a new temporary directory, removed afterwards;
- limits via ``resource.setrlimit`` (set in the child before the grader's code is compiled): address space (``memory_mb``, default 2048), CPU seconds, file size
  (16 MB), open files (64), no core dumps; and a wall-clock timeout (default 120 s), after which the
  process group is killed;
- no network where the kernel allows an unprivileged user + network namespace (``unshare``, tried through
  libc in the child before the grader's code runs): then only a downed loopback exists. Where it does not
  (some containers), the network is NOT cut off; ``network_isolated`` in the result says which it was;
- it is NOT a security boundary: the code runs as the same user and can read whatever files that user can
  (no filesystem jail, no seccomp). Run untrusted graders inside a container for that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .templates import MISSING

MAX_SOURCE_BYTES = 256 * 1024
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MEMORY_MB = 2048

# The child: cut the network if it can, read {source, sample, item} from stdin, run grade(sample, item) with
# stdout pointed at stderr (the grader may print), write one JSON line to the real stdout.
RUNNER = r"""
import ctypes, json, math, os, resource, sys, traceback
mem, cpu = int(sys.argv[1]) * 1024 * 1024, int(sys.argv[2])
for lim, val in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                 (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)), (resource.RLIMIT_NOFILE, (64, 64)),
                 (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(lim, val)
net = False
try:
    net = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0  # CLONE_NEWUSER|CLONE_NEWNET
except Exception:
    pass
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr
req = json.loads(sys.stdin.read())
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
    res = {"ok": True, "reward": float(value), "network_isolated": net}
except BaseException as exc:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    res = {"ok": False, "error": last, "traceback": traceback.format_exc()[-4000:], "network_isolated": net}
out.write(json.dumps(res) + "\n")
out.flush()
"""


@dataclass
class SandboxResult:
    ok: bool
    reward: float = 0.0
    error: str | None = None        # the last line of the traceback, or what went wrong
    kind: str = "runtime"           # runtime (the grader's fault) | server (ours)
    network_isolated: bool | None = None
    stderr: str = ""


def run_python_grader(source: str, sample: dict, item: dict, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      memory_mb: int = DEFAULT_MEMORY_MB) -> SandboxResult:
    """``grade(sample, item)`` from ``source``, in a child process under the limits above."""
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        return SandboxResult(False, error=f"source is larger than {MAX_SOURCE_BYTES // 1024} KB")
    try:
        payload = json.dumps({"source": source, "sample": _jsonable(sample), "item": item or {}})
    except (TypeError, ValueError) as exc:
        return SandboxResult(False, error=f"sample/item are not JSON: {exc}", kind="server")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="tunekit-grader-") as cwd:
        try:
            # The limits are set by the runner itself before the grader's code runs (no preexec_fn: the API
            # calls this from threads); its own session, so a timeout kills everything it started.
            argv = [sys.executable, "-I", "-c", RUNNER, str(int(memory_mb)), str(max(1, int(timeout_s) + 1))]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=env, start_new_session=True, text=True)
        except OSError as exc:
            return SandboxResult(False, error=f"could not start the grader process: {exc}", kind="server")
        try:
            out, err = proc.communicate(payload, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with _quiet():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(False, error=f"TimeoutError: the grader ran longer than {timeout_s:g} s")
    line = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        res = json.loads(line)
    except ValueError:
        why = f"killed by signal {-proc.returncode}" if proc.returncode and proc.returncode < 0 else \
            f"exited with status {proc.returncode}"
        tail = err.strip().splitlines()[-1] if err.strip() else ""
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult(False, error=f"TimeoutError: the grader process was {why} (CPU limit)", stderr=err)
        return SandboxResult(False, error=f"the grader process {why}" + (f": {tail}" if tail else ""), stderr=err)
    if res.get("ok"):
        return SandboxResult(True, reward=res["reward"], network_isolated=res.get("network_isolated"), stderr=err)
    return SandboxResult(False, error=res.get("error"), network_isolated=res.get("network_isolated"),
                         stderr=res.get("traceback", ""))


def _jsonable(sample: dict) -> dict:
    return {k: (None if v is MISSING else v) for k, v in sample.items()}


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)
