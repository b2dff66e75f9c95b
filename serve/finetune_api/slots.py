"""Where the fine-tuning API's jobs train: the devices, how many jobs train at once, which queued job is next.

``devices`` (config key): unset (auto), every GPU this machine shows (``nvidia-smi -L``; the entries of
CUDA_VISIBLE_DEVICES when the server's environment sets it), or one CPU slot (``cpu``) when it shows none.
The vLLM server that the API starts itself (``start_vllm`` without ``vllm_url``) takes most of a GPU's
memory: on the first visible GPU (the first ``tensor_parallel_size`` of them with a ``serve_config`` that
says so), so with more GPUs than that, auto leaves those out; with one GPU, jobs share it with vLLM as
before (size gpu_memory_utilization for both). A list pins GPUs (CUDA_VISIBLE_DEVICES values: "0", "1" or
UUIDs); ``["cpu"]`` forces one CPU slot. A job on a GPU trains with ``CUDA_VISIBLE_DEVICES=<that GPU>`` (it
sees it as cuda:0); on the CPU its environment is the server's, as it always was.

``max_running`` caps the jobs training at once (default: one per device); above the number of devices,
jobs share them, the least busy device first. ``queue_order``: ``fifo`` (the order jobs were created) or
``shortest_first`` (the fewest training steps left first, ties in creation order; a long job waits as long
as shorter ones keep coming). Validation is not a slot's: the worker validates one job at a time, always.

``gpus_per_job`` N above 1: each slot is N of those GPUs (``0,1``, ``2,3``, ...; a job trains on them as N
processes, data parallel); GPUs left over are named in the log. On the CPU slot, N processes share the CPU.

``executor: ray``: ``devices`` does not apply: there is one slot device, ``ray``, and Ray places each job on
a node with its resources (``gpus_per_job``, ``cpus_per_job``, ``accelerator_type``). ``max_running`` caps
the jobs submitted to the cluster at once (unset: as many as its live nodes hold at start-up, at least 1);
the rest wait here, in ``queue_order``, rather than in Ray's own queue (where a job pending 15 minutes fails).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from tunekit.config import read_yaml
from tunekit.errors import UserError

from .store import new_id

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".worker")  # the worker's logger: one log for the queue
CPU = "cpu"
RAY = "ray"  # the one slot device of executor ray
ORDERS = ("fifo", "shortest_first")


def nvidia_gpus() -> list[str]:
    """The indices of the GPUs ``nvidia-smi -L`` lists (MIG instances are not counted apart); [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^GPU (\d+):", out.stdout, re.M) if out.returncode == 0 else []


def visible_gpus(env=None, found: list[str] | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES values: the driver's, or the entries of the
    environment's CUDA_VISIBLE_DEVICES up to the first hidden one (CUDA stops there; "" or -1 hides all)."""
    env = os.environ if env is None else env
    found = nvidia_gpus() if found is None else found
    if not found or "CUDA_VISIBLE_DEVICES" not in env:
        return list(found)
    out = []
    for entry in (e.strip() for e in env["CUDA_VISIBLE_DEVICES"].split(",")):
        if not entry or entry.startswith("-"):
            break
        out.append(entry)
    return out


def vllm_gpus(cfg, gpus: list[str]) -> list[str]:
    """The GPUs of ``gpus`` the vLLM server that the API starts itself uses ([] when it starts none, or on the CPU)."""
    if not cfg.start_vllm or cfg.vllm_url or getattr(cfg, "vllm_urls", None) or not gpus:
        return []
    server = {}
    if cfg.serve_config and Path(cfg.serve_config).is_file():
        server = read_yaml(cfg.serve_config).get("server") or {}
    if str(server.get("device") or "auto") == CPU:
        return []
    return gpus[:max(1, int(server.get("tensor_parallel_size") or 1))]


def resolve_devices(cfg, gpus: list[str] | None = None) -> list[str]:
    """The slots' devices for ``cfg.devices`` (see the module doc); ``gpus``: the visible GPUs (default: asked)."""
    if cfg.devices is None:
        gpus = visible_gpus() if gpus is None else gpus
        if not gpus:
            return [CPU]
        rest = [g for g in gpus if g not in vllm_gpus(cfg, gpus)]
        return rest or list(gpus)  # one GPU: shared with vLLM, as it always was
    devices = [str(d).strip() for d in cfg.devices]
    if not devices or not all(devices):
        raise UserError(f"devices: {cfg.devices!r}; list GPUs as CUDA_VISIBLE_DEVICES names them, e.g. [\"0\", "
                        "\"1\"], or [\"cpu\"]; remove the key for every GPU found (or the CPU)")
    if CPU in (d.lower() for d in devices):
        if len(devices) > 1:
            raise UserError(f"devices: {cfg.devices!r}; \"cpu\" is a slot of its own: give [\"cpu\"] or GPUs only")
        return [CPU]
    if len(set(devices)) < len(devices):
        raise UserError(f"devices: {cfg.devices!r} names a GPU twice; set max_running to run more jobs per GPU")
    shared = set(devices) & set(vllm_gpus(cfg, gpus if gpus is not None else visible_gpus()))
    if shared and len(devices) > 1:
        log.warning("devices: jobs train on GPU %s, which the vLLM server started for chat uses too",
                    ", ".join(sorted(shared)))
    return devices


def job_devices(cfg, devices: list[str]) -> list[str]:
    """The slots' devices with ``gpus_per_job`` N: groups of N GPUs (CUDA_VISIBLE_DEVICES values "0,1", ...)."""
    n = cfg.gpus_per_job
    if n <= 1 or devices == [CPU]:
        return devices
    if len(devices) < n:
        raise UserError(f"gpus_per_job: {n}, but jobs may train on {len(devices)} GPU{'s' if len(devices) > 1 else ''} "
                        f"here ({', '.join(devices)}); lower gpus_per_job or list more devices")
    groups = [",".join(devices[i:i + n]) for i in range(0, len(devices) - n + 1, n)]
    if len(groups) * n < len(devices):
        log.warning("devices: GPU %s left unused (gpus_per_job %d takes them %d at a time)",
                    ", ".join(devices[len(groups) * n:]), n, n)
    return groups


def running_limit(cfg, devices: list[str], capacity: int | None = None) -> int:
    """``max_running``, or unset: one job per device (``capacity``: the jobs a Ray cluster holds, at least 1)."""
    if cfg.max_running is None:
        return len(devices) if devices != [RAY] else max(1, capacity or 0)
    if isinstance(cfg.max_running, bool) or not isinstance(cfg.max_running, int) or cfg.max_running < 1:
        raise UserError(f"max_running: {cfg.max_running!r}; it must be 1 or more (unset: one job per device)")
    return cfg.max_running


def check_order(order) -> str:
    if order not in ORDERS:
        raise UserError(f"queue_order: {order!r}; use one of {', '.join(ORDERS)}")
    return order


def next_job(queued: list[dict], order: str, steps) -> dict | None:
    """The job to start next of ``queued`` (in creation order); ``steps(job)``: its training steps left."""
    if not queued:
        return None
    return min(queued, key=steps) if order == "shortest_first" else queued[0]  # min: the first of equals


class Slots:
    """The jobs training now and their devices (changed under the store's lock)."""

    def __init__(self, devices: list[str], limit: int, where: str | None = None):
        self.devices, self.limit, self.where = list(devices), limit, where
        self.jobs: dict[str, str] = {}  # job id -> device
        self.token = new_id("worker-")  # whose claim: an earlier server's (a requeued job's) is not this one's

    def claim(self, store, order: str, steps) -> tuple[dict, str] | None:
        """The next queued job and its device, if a slot is free: marked this worker's (its private ``claimed_by``
        and ``device``) in one step under the store's lock, so no other slot takes it; it stays ``queued`` until
        its process starts (a cancel meanwhile wins). ``steps(job)``: shortest_first's key."""
        with store.lock:
            device = self.free()
            if device is None:
                return None
            queued = [j for j in store.jobs_with_status("queued")  # a job resumed while its last process stops:
                      if j["id"] not in self.jobs  # its slot is still taken, until that process is gone
                      and store.get_private(j["id"]).get("claimed_by") != self.token]
            job = next_job(queued, order, steps)
            if job is None:
                return None
            store.update_job(job["id"], private={"claimed_by": self.token, "device": device})
            self.take(job["id"], device)
            return job, device

    def free(self) -> str | None:
        """The device the next job trains on (the least busy, in list order), or None: ``limit`` jobs train."""
        if len(self.jobs) >= self.limit:
            return None
        busy = Counter(self.jobs.values())
        return min(self.devices, key=lambda d: busy[d])

    def take(self, job_id: str, device: str) -> None:
        self.jobs[job_id] = device

    def release(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def describe(self) -> str:
        where = self.where or ("the CPU" if self.devices == [CPU] else "GPU " + ", ".join(self.devices)
                               if all("," not in d for d in self.devices) else "GPUs " + "; ".join(self.devices))
        return f"up to {self.limit} job{'s' if self.limit > 1 else ''} at once on {where}"
