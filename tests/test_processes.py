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


# ----------------------------------------------------------------------------- the real vLLM launcher


def start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"model": str(SMOL), "served_model_name": "smol", "port": port,
                                                 "max_model_len": 256, "startup_timeout_s": 600}}))
    out = tmp_path / "cli.out"
    proc = subprocess.Popen([sys.executable, "-m", "serve.vllm_server", "--config", str(config), "--quiet",
                             "--log", str(tmp_path / "vllm.log")], cwd=ROOT, stdout=out.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 660
    while "ready in" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(1)
    return proc, port, out


def vllm_pids(port: int) -> list[int]:
    """The processes serving this port: vLLM's front end and its engine (children of the front end)."""
    front = [p for p in psutil.process_iter(["cmdline"]) if f"{port}" in (p.info["cmdline"] or [])
             and "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])]
    return [q.pid for p in front for q in [p, *p.children(recursive=True)]]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_no_vllm_is_left_when_the_launcher_is_hung_up_or_killed(how, tmp_path):
    proc, port, out = start_launcher(tmp_path)
    served = vllm_pids(port)
    assert served, "no vLLM process found for the port"
    proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=120)
    assert wait_gone(served, timeout=90) == [], f"vLLM left running after {how} to the launcher"
    if how == "SIGHUP":
        assert rc == 0 and "stopped" in out.read_text(), out.read_text()[-2000:]
