"""A fine-tuning job as a Ray job, through the Jobs API of the cluster's dashboard (``executor: ray``):
``RayExecutor`` submits, follows, stops and re-attaches; ``RayHandle`` is one submission. The interface both
executors share, the Ray entrypoint that makes a training die with its node, and why storage is a shared
filesystem are in executors.py's docstring.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from tunekit.errors import UserError

from .executors import ROOT, UNREACHABLE_S, LocalHandle, kill_process, log


RAY_FIX = "start one with `ray start --head --dashboard-host 0.0.0.0` (its dashboard, port 8265, is the Jobs API)"
LOST_TYPES = ("JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE")  # the node, not the training


class RayHandle:
    """One Ray job (a submission id) followed through the dashboard's Jobs API."""

    detached = True
    POLL_S = 1.0  # at most one status request a second per job

    def __init__(self, client, sid: str, address: str, log_path: Path, attached: bool = False):
        self.client, self.sid, self.address, self.log_path = client, sid, address, log_path
        self.ref, self.where = {"submission_id": sid, "ray_address": address}, f"Ray job {sid}"
        self.lost = self.reason = self.rc = self.silent_since = None
        self.checked = self.synced = 0.0
        self.header = f"--- {self.where} (its driver log, copied from the Ray cluster at {address}) ---\n"
        self.copied = 0  # characters of its Ray log already in log_path
        if attached:  # copied before the API restarted: the part after its header
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            if self.header in text:
                self.copied = len(text.rsplit(self.header, 1)[1])

    def poll(self) -> int | None:
        if self.rc is not None or time.monotonic() - self.checked < self.POLL_S:
            return self.rc
        self.checked = time.monotonic()
        try:
            status = str(self.client.get_job_status(self.sid).value)
        except Exception as e:  # noqa: BLE001 (requests' and Ray's errors: unreachable, or the job is gone)
            return self._no_answer(e)
        self.silent_since = None
        if status in ("PENDING", "RUNNING"):
            if time.monotonic() - self.synced > max(5.0, self.copied / 200_000):  # a long log: less often
                self.sync_log()
            return None
        try:
            info = self.client.get_job_info(self.sid)
        except Exception as e:  # noqa: BLE001
            return self._no_answer(e)
        self.sync_log()
        message = str(info.message or "").strip()
        error = str(getattr(info.error_type, "value", info.error_type) or "")
        if status == "SUCCEEDED":
            self.rc = 0
        elif status == "STOPPED":
            self.rc, self.reason = -15, "stopped on the Ray cluster (ray job stop)"
        elif error in LOST_TYPES:
            self.rc, self.lost = -1, "node lost"
            log.warning("%s failed with its node: %s", self.where, message)
        elif info.driver_exit_code is not None:
            self.rc = int(info.driver_exit_code)
        else:  # it never ran: no node could take it, its environment failed, ...
            self.rc, self.reason = -1, f"the Ray cluster did not run it: {message or error or status}"
        return self.rc

    def _no_answer(self, e: Exception) -> int | None:
        """Lost: a job the cluster no longer knows (its head restarted), at once; one it does not answer about,
        after UNREACHABLE_S seconds."""
        if "404" in str(e) or "does not exist" in str(e):
            self.rc, self.lost = -1, "vanished from the Ray cluster"
            return self.rc
        now = time.monotonic()
        if self.silent_since is None:
            self.silent_since = now
            log.warning("%s: the Ray cluster at %s does not answer (%s); retrying for %g s", self.where, self.address,
                        e, UNREACHABLE_S)
        elif now - self.silent_since > UNREACHABLE_S:
            self.rc, self.lost = -1, f"the Ray cluster did not answer for {UNREACHABLE_S:g} s"
        return self.rc

    def sync_log(self) -> None:
        """Append what is new in the Ray job's driver log to the job's log file."""
        self.synced = time.monotonic()
        try:
            text = self.client.get_job_logs(self.sid)
        except Exception:  # noqa: BLE001 (its node is gone: the copy so far is what there is)
            return
        if len(text) > self.copied:
            with open(self.log_path, "a+", encoding="utf-8", errors="replace") as f:
                if self.copied == 0:  # on a line of its own: the log may end in a progress bar's
                    f.write(self.header if f.tell() == 0 else "\n" + self.header)
                f.write(text[self.copied:])
            self.copied = len(text)

    def stop(self, grace: float = 5.0) -> None:
        """``stop_job`` (SIGTERM to the job's processes, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S), and wait for it."""
        try:
            self.client.stop_job(self.sid)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: stop_job failed: %s", self.where, e)
        deadline = time.monotonic() + grace + 30
        while time.monotonic() < deadline:
            self.checked = 0.0
            if self.poll() is not None:
                return
            time.sleep(0.5)
        log.warning("%s: still not stopped %g s after stop_job", self.where, grace + 30)

    log_tail = LocalHandle.log_tail


class RayExecutor:
    """Jobs on the Ray cluster whose dashboard is ``ray_address``, through Ray's Jobs API."""

    kind, detached = "ray", True

    def __init__(self, cfg):
        self.cfg = cfg
        address = (cfg.ray_address or "").rstrip("/")
        if not address:
            raise UserError("ray_address: unset; executor: ray needs the Ray dashboard's address, e.g. --ray-address "
                            "http://HEAD:8265")
        if not address.startswith(("http://", "https://")):
            raise UserError(f"ray_address: {address!r}; give the dashboard's HTTP address, e.g. http://HEAD:8265 "
                            "(not the GCS port 6379)")
        if cfg.gpus_per_job < 0 or (cfg.cpus_per_job is not None and cfg.cpus_per_job < 0):
            raise UserError(f"gpus_per_job: {cfg.gpus_per_job}, cpus_per_job: {cfg.cpus_per_job}; give 0 or more")
        if cfg.devices is not None:
            log.warning("devices: %s ignored with executor ray (Ray picks each job's node and GPUs)", cfg.devices)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise UserError("executor: ray needs Ray's Jobs API client: pip install \"tunekit-ft[ray]\" (from a "
                            "checkout: pip install -e \".[ray]\")") from None
        try:
            self.client = JobSubmissionClient(address)
        except Exception as e:  # noqa: BLE001 (ConnectionError, or a RuntimeError from the version check)
            raise UserError(f"ray_address: no Ray cluster answers at {address} ({type(e).__name__}: {e}); {RAY_FIX}, "
                            "or fix the address") from None
        self.address = address
        self.gpus, self.cpus = cfg.gpus_per_job, 1.0 if cfg.cpus_per_job is None else float(cfg.cpus_per_job)
        self.resources = {f"accelerator_type:{cfg.accelerator_type}": 0.001} if cfg.accelerator_type else {}

        self.per_job = (f"{self.gpus} GPU{'s' * (self.gpus != 1)} and {self.cpus:g} CPU{'s' * (self.cpus != 1)} a job"
                        + (f" on {cfg.accelerator_type} nodes" if cfg.accelerator_type else ""))

    def describe(self) -> str:
        return f"the Ray cluster at {self.address} ({self.per_job})"

    def capacity(self) -> int | None:
        """How many jobs the cluster's live nodes hold at once (None: not known), warning when none fits."""
        try:
            from ray.util.state import list_nodes

            nodes = [n.resources_total for n in list_nodes(address=self.address, detail=True) if n.state == "ALIVE"]
        except Exception as e:  # noqa: BLE001
            log.warning("could not list the Ray cluster's nodes (%s); max_running unset: 1 job at once", e)
            return None
        total = 0
        for res in nodes:
            if self.resources and not all(res.get(k, 0) >= v for k, v in self.resources.items()):
                continue
            fits = [int(res.get("GPU", 0) // self.gpus)] if self.gpus else []
            fits += [int(res.get("CPU", 0) // self.cpus)] if self.cpus else []
            total += min(fits) if fits else 1
        if total == 0:
            log.warning("no node of the Ray cluster at %s has %s now: jobs wait for one (an autoscaler's, or `ray "
                        "start --address HEAD:6379` on a machine that has them); gpus_per_job: 0 trains on CPUs",
                        self.address, self.per_job)
        return total

    def start(self, job_id: str, run_dir: Path, command: list[str], env: dict, device: str,
              submission: int = 1) -> RayHandle:
        """Submit the job's command as a Ray job (see the module doc); ``device`` is Ray's to pick."""
        log_path = run_dir.parent / f"{job_id}.log"
        entrypoint = (f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} -m "
                      f"serve.finetune_api.executors -- {shlex.join(command)}")
        for n in range(submission, submission + 5):  # an id a earlier start already used: the next one
            sid = job_id if n <= 1 else f"{job_id}-attempt-{n}"  # unique per start: Ray keeps every id
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env={"env_vars": env},
                                       entrypoint_num_gpus=self.gpus or None, entrypoint_num_cpus=self.cpus or None,
                                       entrypoint_resources=self.resources or None,
                                       metadata={"tunekit_job": job_id, "run_dir": str(run_dir), "submission": str(n)})
                return RayHandle(self.client, sid, self.address, log_path)
            except Exception as e:  # noqa: BLE001
                if "already exists" not in str(e):
                    raise UserError(f"could not submit the job to the Ray cluster at {self.address}: {e}") from None
        raise UserError(f"could not submit the job to the Ray cluster at {self.address}: ids {job_id}-attempt-"
                        f"{submission}..{submission + 4} are taken")

    def attach(self, private: dict) -> RayHandle | None:
        """The Ray job a job's record names, if this cluster still knows it (in any state)."""
        sid = private.get("submission_id")
        if not sid or private.get("ray_address", self.address).rstrip("/") != self.address:
            return None
        try:
            self.client.get_job_status(sid)
        except Exception as e:  # noqa: BLE001
            log.warning("Ray job %s is not on the cluster at %s any more (%s)", sid, self.address, e)
            return None
        run_dir = Path(private.get("run_dir", ""))
        return RayHandle(self.client, sid, self.address, run_dir.parent / f"{run_dir.name}.log", attached=True)

    def kill_left(self, private: dict) -> bool:
        """Stop the Ray job a job's record names, if it still runs."""
        handle = self.attach(private)
        if handle is None or handle.poll() is not None:
            return kill_process(private)  # a job this server once ran locally
        handle.stop()
        return True
