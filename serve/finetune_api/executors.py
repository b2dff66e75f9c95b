"""Where a job's training runs: a process group on this machine (``executor: local``) or a job on a Ray cluster,
through Ray's Jobs API (``executor: ray``). The worker sees one small interface:

- ``executor.start(job_id, run_dir, command, env, device, submission) -> handle``: ``command`` is ``accelerate
  launch train/<method>.py --config <data_dir>/runs/<job>.yaml``, ``env`` the job's own variables (``job_env``),
  ``device`` the slot's CUDA_VISIBLE_DEVICES value (local), ``submission`` which start of the job this is;
- ``handle.poll()``: the exit status, None while it trains; ``handle.lost`` when its machine was lost (a Ray
  node died, the Ray job vanished: the worker submits it again), ``handle.reason`` the cluster's word for a job
  that never ran; ``handle.stop(grace)``: SIGTERM, SIGKILL after ``grace`` s, and wait; ``handle.log_tail(n)``;
- ``handle.ref``, kept in the job's private record (``{"pid": N}``, ``{"submission_id": ..., "ray_address": ...}``),
  and ``executor.attach(private)``: the handle again after an API restart (a Ray job outlives the API:
  ``detached``; a local process is killed by ``kill_left`` and its job requeued, as it always was).

**Local**: a process group of its own, its output in the job's log, the server's environment (less the API key)
with the job's variables, CUDA_VISIBLE_DEVICES = the slot's GPU(s).

**Ray** (ray_executor.py): ``submit_job(entrypoint="cd <checkout> && exec python -m serve.finetune_api.executors -- <command>",
submission_id=<job id> (then "<job id>-attempt-N"), runtime_env={"env_vars": <the job's variables only>},
entrypoint_num_gpus=gpus_per_job, entrypoint_num_cpus=cpus_per_job (1), entrypoint_resources=
{"accelerator_type:<type>": 0.001}, metadata)``, then ``get_job_status``/``get_job_info``, ``stop_job``, and
``get_job_logs`` copied into the job's log. Storage is a shared filesystem: the checkout (with its Python
environment) and ``data_dir`` at the same paths on every node, so the job's YAML, files, metrics.jsonl,
checkpoints and pause files are where the API reads them, as locally. A Ray job that FAILED because its
supervisor actor died (its node), that the cluster no longer knows, or that it has said nothing about for
``UNREACHABLE_S`` is lost. ``entrypoint`` (this module run as a script) makes the training die with its node.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from tunekit.errors import UserError
from tunekit.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]  # the checkout: train/sft.py and its imports
# accelerate's config of a job on several GPUs: the checkout's, or an installed package's (tunekit.examples)
DDP_CONFIG = next((p for p in (ROOT / "configs", ROOT / "tunekit" / "examples") if p.is_dir()),
                  ROOT / "configs") / "accelerate" / "ddp_jobs.yaml"
CPU = "cpu"
PAUSE_REQUEST, PAUSED = "pause_requested", "paused.json"  # the pause files in a job's run folder
UNREACHABLE_S = 120.0  # a Ray cluster silent this long about a running job: the job is lost
log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".worker")  # the worker's logger


def alive(pid: int | None) -> bool:
    """A live process (a zombie child of ours is not alive)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ours(pid: int, run_dir: str) -> bool:
    """Is ``pid`` still the training process this job started (and not a reused pid)?"""
    try:
        return any(run_dir in Path(f"/proc/{pid}/{f}").read_bytes().decode(errors="replace") for f in ("cmdline",
                                                                                                       "environ"))
    except OSError:
        return False


def tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return []


def job_env(cfg, run_dir: Path, config: Path, extra: dict) -> dict[str, str]:
    """The variables a job's training needs on top of its machine's environment (the checkout on PYTHONPATH,
    its run folder, offline hub for a local base model, OMP_NUM_THREADS) and the job's own (wandb's)."""
    env = {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "TUNEKIT_RUN_DIR": str(run_dir)}
    if Path(str(yaml.safe_load(config.read_text()).get("model_name_or_path", ""))).exists():
        env["HF_HUB_OFFLINE"] = "1"  # a local base never needs the hub; a hub id downloads
    if cfg.omp_num_threads:
        env["OMP_NUM_THREADS"] = str(cfg.omp_num_threads)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def spread_batch(config: Path, batch_size: int, processes: int) -> str | None:
    """A job on ``processes`` processes: each step's batch (``batch_size``, the job's hyperparameter) split
    between them, so that per-process batch x accumulation x processes is still batch_size and the planned
    steps still make the job's epochs. Rewrites the job's YAML; returns the line for its events."""
    if processes < 2:
        return None
    from .hyperparameters import split_batch

    data = yaml.safe_load(config.read_text())
    per_process = -(-batch_size // processes)  # rounded up: every process takes at least one example a step
    device, accum = split_batch(per_process, int(data.get("per_device_train_batch_size") or per_process))
    data.update(per_device_train_batch_size=device, gradient_accumulation_steps=accum)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    note = (f"Training on {processes} processes (gpus_per_job {processes}, data parallel): {device} examples per "
            f"process x {accum} accumulated x {processes} processes a step")
    if per_process * processes != batch_size:
        return note + f" = {per_process * processes}, batch_size {batch_size} rounded up to a multiple of {processes}"
    return note + f" = batch_size {batch_size}"


# ----------------------------------------------------------------------------- local


class LocalHandle:
    """A training process group on this machine."""

    detached = False

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc, self.log_path, self.lost, self.reason = proc, log_path, None, None
        self.ref, self.where = {"pid": proc.pid}, f"pid {proc.pid}"

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 5.0) -> None:
        stop_group(self.proc.pid, grace)
        self.proc.wait()

    def log_tail(self, n: int = 20) -> list[str]:
        return tail(self.log_path, n)


class LocalExecutor:
    """``accelerate launch`` in a process group of its own on this machine (the API's), as it always was."""

    kind, detached = "local", False

    def __init__(self, cfg):
        self.cfg = cfg
        if cfg.gpus_per_job < 1:
            raise UserError(f"gpus_per_job: {cfg.gpus_per_job}; with executor local a job trains on 1 or more of "
                            "the devices (devices: [cpu] for the CPU); 0 is for executor ray (train on CPUs)")
        ignored = [k for k in ("cpus_per_job", "accelerator_type", "ray_address") if getattr(cfg, k) is not None]
        if ignored:
            log.warning("%s: for executor ray; ignored with executor local", ", ".join(ignored))

    def start(self, job_id: str, run_dir: Path, command: list[str], env: dict, device: str,
              submission: int = 1) -> LocalHandle:
        """The server's environment (less the API key) with the job's variables, on the slot's GPU(s)."""
        full = {k: v for k, v in os.environ.items() if k != self.cfg.api_key_env}
        for key, value in env.items():
            if key == "HF_HUB_OFFLINE":
                full.setdefault(key, value)  # the server's own setting wins
            else:
                full[key] = value
        if device != CPU:
            full["CUDA_VISIBLE_DEVICES"] = device  # these GPUs only, as cuda:0 (and up)
        log_path = run_dir.parent / f"{job_id}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(command, cwd=ROOT, env=full, stdout=log_file, stderr=log_file,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return LocalHandle(proc, log_path)

    def attach(self, private: dict) -> None:
        """Local processes are not followed across a restart: ``kill_left`` stops them, the job is requeued."""
        return None

    def kill_left(self, private: dict) -> bool:
        """Kill the training process a stopped server left running for this job (if that pid is still it)."""
        if sid := private.get("submission_id"):
            log.warning("Ray job %s at %s (executor ray before): `ray job stop %s` if it runs", sid,
                        private.get("ray_address"), sid)
        return kill_process(private)


def kill_process(private: dict) -> bool:
    """Kill the local training process group a job's record names, if that pid is still its training."""
    pid = private.get("pid")
    if pid and alive(pid) and ours(pid, private.get("run_dir", "")):
        stop_group(pid, 5.0)
        return True
    return False


def make_executor(cfg):
    """The executor of ``cfg.executor``; a config mistake, or a Ray cluster that does not answer, is a UserError."""
    if cfg.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(cfg)
    if cfg.executor != "local":
        raise UserError(f"executor: {cfg.executor!r}; use local or ray")
    return LocalExecutor(cfg)


def watch(job_id: str, handle, run_dir: Path, status, collect, stopping, pause_timeout_s: float):
    """Follow a training to its end: (exit status, the pause asked of it or None), ``collect()`` after each look.
    Cancelled (``status()``) or the worker stopping (``stopping``): stopped, status None (a Ray job trains on
    through the worker's stop). Paused: asked to stop at a checkpoint (``pause_requested``), stopped after
    ``pause_timeout_s``."""
    pause = None
    while True:
        rc = handle.poll()
        collect()
        if rc is not None:
            return rc, pause
        now = status()
        if now == "cancelled" or stopping.is_set():
            if now == "cancelled" or not handle.detached:
                handle.stop()
            if now == "cancelled":
                log.info("job %s: cancelled; training process stopped", job_id)
            return None, pause  # on shutdown a running job stays running; recover() requeues or follows it
        if now != "running" and pause is None:  # paused (and maybe resumed since): stop at a checkpoint
            (run_dir / PAUSE_REQUEST).touch()
            log.info("job %s: pause requested; its training stops at a checkpoint after its current step (at most %g "
                     "s)", job_id, pause_timeout_s)
            pause = {"deadline": time.monotonic() + pause_timeout_s, "killed": False}
        if pause and time.monotonic() > pause["deadline"]:
            log.warning("job %s: its training did not stop within pause_timeout_s (%g s) of the pause; killing it (it "
                        "pauses at its last complete checkpoint)", job_id, pause_timeout_s)
            handle.stop()
            collect()
            return handle.poll(), {**pause, "killed": True}
        time.sleep(0.5)


def failure(handle, rc: int) -> tuple[str, list[str]]:
    """(why a training failed: the cluster's reason, or its log's last ``error:`` line or last line; the log's tail)."""
    lines = handle.log_tail(20)
    errors = [line for line in lines if line.startswith("error:")]
    return handle.reason or (errors[-1][len("error: "):] if errors else lines[-1] if lines else
                             f"exit status {rc}"), lines


# ----------------------------------------------------------------------------- a Ray job's entrypoint


def entrypoint(command: list[str]) -> int:
    """``python -m serve.finetune_api.executors -- COMMAND``, a Ray job's entrypoint: COMMAND in this process group,
    and a guard outside it that stops the group when Ray's supervisor (the parent) dies. Ray kills the
    supervisor's children with it, not theirs, and a training that outlived its lost node would write into the
    run folder beside the job's next attempt. ``ray job stop`` reaches the whole group."""
    import signal

    group = os.getpgrp()
    subprocess.Popen([sys.executable, "-m", "serve.finetune_api.executors", "--guard", str(os.getppid()),
                      str(group)], cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda *_: None)  # a stop: the training gets it too; its exit is the status
    rc = proc.wait()
    return rc if rc >= 0 else 128 - rc


def guard(parent: int, group: int) -> int:
    """Stop process group ``group`` when ``parent`` has died; return when the group is gone."""
    from tunekit.processes import group_alive

    while group_alive(group):
        if not alive(parent):
            stop_group(group, 10.0)
            return 0
        time.sleep(1.0)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guard"]:
        sys.exit(guard(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(entrypoint(sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]))
