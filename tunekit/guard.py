"""Run a command whose whole process group ends with it, however its starter ends.

    python -m tunekit.guard [--grace 15] -- COMMAND [ARGS ...]

The vLLM launcher starts vLLM through this guard, in a new process group, and the kernel SIGTERMs
the guard when the launcher dies, even by SIGKILL (``die_with_parent``). vLLM alone is not enough:
SIGTERMed while it starts, its front end waits on an engine core that is still loading and can
stay up for minutes with its engine and worker, and a SIGKILLed launcher cannot follow up. The
guard does: on SIGTERM, SIGHUP or SIGINT it passes SIGTERM to the command, waits up to ``--grace``
seconds for the group to end, SIGKILLs whatever of the group is left, and exits 128 + the signal.
When the command ends by itself, what it left in the group is cleaned up the same way and the
guard exits with its code. The guard always leads its own process group (it makes one if started
without), so the group it ends is never its starter's. Standard library and psutil only: it starts
in well under a second.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from tunekit.processes import die_with_parent, group_members

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def others_in_group() -> list:
    me = os.getpid()
    return [p for p in group_members(os.getpgid(0)) if p.pid != me]


def end_group(grace: float) -> None:
    """Wait up to ``grace`` seconds for the rest of the group to exit, then SIGKILL what is left."""
    deadline = time.monotonic() + grace
    while (left := others_in_group()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        try:
            proc.kill()  # psutil checks the pid still names the same process
        except Exception:  # noqa: BLE001 - gone already, or not ours any more
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunekit.guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--grace", type=float, default=15.0,
                   help="seconds the command has to exit after SIGTERM before its group is SIGKILLed")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (python -m tunekit.guard -- COMMAND ...)")

    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # lead a group of its own: the group it ends is never its starter's
    received: list[int] = []
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    child = subprocess.Popen(command, preexec_fn=die_with_parent)
    while child.poll() is None and not received:
        time.sleep(0.2)
    if received:
        child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + args.grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        end_group(max(0.0, deadline - time.monotonic()))
        child.wait()
        return 128 + received[0]
    end_group(args.grace)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main())
