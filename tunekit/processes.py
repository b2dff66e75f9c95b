"""Child processes that never outlive the command that started them.

- ``die_with_parent`` (a ``preexec_fn``): Linux delivers SIGTERM to the child when its parent dies,
  even by SIGKILL, so a killed launcher leaves no server behind.
- ``signals_raise`` turns SIGTERM and SIGHUP (a closed terminal, a notebook's stop) into
  ``KeyboardInterrupt`` in the main thread, so ``with``/``finally`` blocks stop their children as
  Ctrl-C does.
- ``group_alive`` / ``stop_group`` work on the process group a child leads (``start_new_session``):
  psutil finds the group's live members by their process-group id, so a pid that the system has
  reused for an unrelated process is never signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import psutil

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this process when its parent exits (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def signals_raise(signals=(signal.SIGTERM, signal.SIGHUP), only_default: bool = False) -> list[int]:
    """Make the given signals raise KeyboardInterrupt in the main thread; returns those it installed.

    With ``only_default``, a signal whose handler someone already set (a web server's, a notebook
    kernel's) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        return []

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    installed = []
    for sig in signals:
        if only_default and signal.getsignal(sig) not in (signal.SIG_DFL, None):
            continue
        signal.signal(sig, handler)
        installed.append(sig)
    return installed


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def stop_group(pgid: int, grace: float = 30, on_wait=None) -> None:
    """SIGTERM every member of the group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        members = group_members(pgid)
        if not members:
            return
        for proc in members:
            try:
                proc.send_signal(sig)  # psutil checks the pid still names the same process (create time)
                if sig == signal.SIGTERM:
                    proc.resume()  # a stopped process (Ctrl-Z, SIGSTOP) takes its SIGTERM now, not never
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pgid):
            if on_wait:
                on_wait()
            time.sleep(0.2)
