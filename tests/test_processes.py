"""No orphans: servers started by tunekit stop with the command that started them, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ROOT, SMOL, free_port

CHILD = """
import subprocess, sys, time
from tunekit.processes import die_with_parent
child = subprocess.Popen(["sleep", "300"], start_new_session=True, preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(300)
"""


def wait_gone(pids, timeout=30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_a_child_dies_with_its_parent_even_on_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(parent.stdout.readline())
    assert psutil.pid_exists(child)
    parent.kill()
    parent.wait()
    assert wait_gone([child]) == [], "the child outlived its SIGKILLed parent"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_run_cleanup_like_ctrl_c(sig):
    code = ("import time\nfrom tunekit.processes import signals_raise\nsignals_raise()\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('cleaned up', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert "cleaned up" in out and proc.returncode == 0


def test_stop_group_ends_every_member_and_nothing_else():
    from tunekit.processes import group_alive, stop_group

    group = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"])
    time.sleep(0.5)
    members = [p.pid for p in psutil.Process(group.pid).children(recursive=True)] + [group.pid]
    assert len(members) == 3 and group_alive(group.pid)
    stop_group(group.pid, grace=10, on_wait=lambda: group.poll())
    group.wait(timeout=10)
    assert wait_gone(members) == [] and not group_alive(group.pid)
    assert bystander.poll() is None
    bystander.kill()


STUBBORN = "trap '' TERM; sleep 300 & sleep 300 & echo started; wait"  # ignores SIGTERM, has children

GUARDED_PARENT = """
import subprocess, sys, time
from tunekit.processes import die_with_parent
guard = subprocess.Popen([sys.executable, "-m", "tunekit.guard", "--grace", "2", "--", "bash", "-c", sys.argv[1]],
                         start_new_session=True, preexec_fn=die_with_parent, stdout=subprocess.PIPE, text=True)
assert guard.stdout.readline().strip() == "started"
print(guard.pid, flush=True)
time.sleep(300)
"""


def test_the_guard_ends_a_group_that_ignores_sigterm_when_its_starter_is_sigkilled():
    """What the vLLM launcher relies on: SIGKILL the launcher, and the guard (SIGTERMed by the kernel)
    SIGKILLs its whole group after the grace period, children that ignore SIGTERM included."""
    parent = subprocess.Popen([sys.executable, "-c", GUARDED_PARENT, STUBBORN], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    guard = int(parent.stdout.readline())
    group = [p.pid for p in psutil.Process(guard).children(recursive=True)] + [guard]
    assert len(group) == 4  # guard, bash, two sleeps
    parent.kill()
    parent.wait()
    assert wait_gone(group, timeout=20) == [], "the guard's group outlived its SIGKILLed starter"


def test_the_guard_passes_the_exit_code_and_cleans_up_after_the_command():
    proc = subprocess.run([sys.executable, "-m", "tunekit.guard", "--", "bash", "-c", "exit 3"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 3
    guard = subprocess.Popen([sys.executable, "-m", "tunekit.guard", "--grace", "1", "--", "bash", "-c", STUBBORN],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    assert guard.stdout.readline().strip() == "started"
    members = [p.pid for p in psutil.Process(guard.pid).children(recursive=True)]
    guard.send_signal(signal.SIGHUP)
    assert guard.wait(timeout=20) == 128 + signal.SIGHUP
    assert wait_gone(members, timeout=10) == []


# ----------------------------------------------------------------------------- the real vLLM launcher


def start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, int, Path, list[int]]:
    """The launcher, returned once vLLM's engine process exists (mid start-up, ~40 s before "ready":
    the moment a user is most likely to give up on it), with the pids serving its port."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"model": str(SMOL), "served_model_name": "smol", "port": port,
                                                 "max_model_len": 256, "startup_timeout_s": 600}}))
    out = tmp_path / "cli.out"
    proc = subprocess.Popen([sys.executable, "-m", "serve.vllm_server", "--config", str(config), "--quiet",
                             "--log", str(tmp_path / "vllm.log")], cwd=ROOT, stdout=out.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 660
    while len(served := vllm_pids(port)) < 2:  # the front end and its engine core
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.5)
    return proc, port, out, served


def vllm_pids(port: int) -> list[int]:
    """The processes serving this port: vLLM's front end and its engine (children of the front end),
    not the guard that started them."""
    front = [p for p in psutil.process_iter(["cmdline"]) if f"{port}" in (p.info["cmdline"] or [])
             and "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])
             and "tunekit.guard" not in (p.info["cmdline"] or [])]
    try:
        return [q.pid for p in front for q in [p, *p.children(recursive=True)]]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_no_vllm_is_left_when_the_launcher_is_hung_up_or_killed(how, tmp_path):
    proc, port, out, served = start_launcher(tmp_path)
    proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=120)
    assert wait_gone(served, timeout=90) == [], f"vLLM left running after {how} to the launcher"
    if how == "SIGHUP":
        assert rc == 0 and "stopped" in out.read_text(), out.read_text()[-2000:]
