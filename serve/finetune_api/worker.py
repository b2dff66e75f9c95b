"""The job worker of the local fine-tuning API: a queue of jobs, each trained by train/<sft|dpo|grpo>.py.

A job goes validating_files -> queued -> running -> succeeded | failed | cancelled (and paused <-> queued on
request), with OpenAI's events on the way ("Validating training file: ...", "Files validated, moving job to
queued state", "Fine-tuning job started", "Step 1/90: training loss=2.03", "Checkpoint created at step 30
with Snapshot ID: ...", "New fine-tuned model created: ft:...", "The job has successfully completed").
Validation is data_prep's by the job's method, failures worded as OpenAI's (validation.py); then the
hyperparameters are resolved (hyperparameters.py) and the job shows numbers. Training is ``accelerate
launch train/<method>.py --config <job.yaml>`` (the YAML: jobconfig.py; ``tunekit.cli.accelerate_command``
picks the script from its ``method``) by the ``executor`` (executors.py: a process group here, or a Ray
job), as ``gpus_per_job`` processes (data parallel above 1).

Its metrics.jsonl becomes ``metrics`` events (and ``estimated_finish``), its checkpoint-N folders
checkpoints, its summary.json ``trained_tokens``. A job that was running when the server stopped is started
again (the script resumes from its last complete checkpoint), completed if its training finished while the
server was down (its summary.json is there), or failed with the reason after ``max_attempts`` starts; a Ray job is followed again instead (by its submission id), and one whose node is
lost is submitted again at once (up to ``max_attempts`` starts), resuming from its last complete checkpoint.

Pause (``service.pause_job`` marks a running job ``paused``): the worker creates ``<run_dir>/pause_requested``;
the training script saves a checkpoint at the end of its current step, writes ``<run_dir>/paused.json``
(``{"step": N, "checkpoint": "<path>"}``) and exits 0 without a summary.json. The job then reads "Fine-tuning
job paused at step N". A process still running ``pause_timeout_s`` after the request is killed, and the job
is paused at its last complete checkpoint. Resume puts it back in the queue; its next start deletes both
files and the script resumes from its last complete checkpoint, to the same final step. A paused job
stays paused across a server restart.

One thread validates jobs, one at a time, and starts queued ones: a job per device (``devices``: each
GPU, pinned with CUDA_VISIBLE_DEVICES, or the CPU; up to ``max_running``), the next by ``queue_order``
(slots.py), each watched by a thread of its own. A job is claimed under the store's lock (its private
record names this worker and the device), so no two slots ever start the same job.

Logging (logger ``serve.finetune_api.worker``): the devices at start, each job's transitions at INFO (its
start names its device), a failed job at WARNING, a training process that exits with an error at ERROR
with the last lines of its log (``<data_dir>/runs/<job id>.log``, where its traceback is), and an
internal error with its traceback.

(One file on purpose, past 450 lines: a job's whole life, from validation to the adapter's hand-off, reads in
one place. The rules it applies live in validation.py,
hyperparameters.py, jobconfig.py, metrics.py and slots.py, the processes in executors.py and
ray_executor.py.)
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from tunekit.cli import accelerate_command
from tunekit.errors import UserError

from . import hyperparameters, jobconfig
from .metrics import (last_checkpoint, metrics_data, metrics_message, model_name, results_csv, step_metrics,
                      trained_tokens)
from . import executors
from .executors import DDP_CONFIG, alive, job_env, make_executor, spread_batch  # noqa: F401 (alive: re-exported)
from .slots import CPU, RAY, Slots, check_order, job_devices, resolve_devices, running_limit
from .store import Store, new_id
from .validation import file_error

log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled")
PAUSE_REQUEST, PAUSED = executors.PAUSE_REQUEST, executors.PAUSED  # the pause files in a job's run folder


def started(attempts: int, resumed: bool, ckpt: Path | None) -> str:
    """The event of a training start: OpenAI's words, and which start this is."""
    if resumed:
        return "Fine-tuning job started again after its pause" + (f", from {ckpt.name}" if ckpt else "")
    return "Fine-tuning job started" + (f" (attempt {attempts})" if attempts > 1 else "")


class Worker:
    def __init__(self, store: Store, cfg, data_dir: Path):
        self.store, self.cfg, self.data_dir = store, cfg, data_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="finetune-worker", daemon=True)
        check_order(cfg.queue_order)  # a config mistake is a UserError at start-up, as the others are
        # where jobs train: a Ray cluster that does not answer is a UserError here, at start-up
        self.executor = make_executor(cfg)
        if self.executor.kind == "ray":
            self.slots = Slots([RAY], running_limit(cfg, [RAY], self.executor.capacity()), self.executor.describe())
        else:
            devices = job_devices(cfg, resolve_devices(cfg))
            self.slots = Slots(devices, running_limit(cfg, devices))
        self.processes = max(1, cfg.gpus_per_job)  # training processes per job
        self.runners: dict[str, threading.Thread] = {}  # job id -> the thread that trains it
        self.procs: dict = {}  # job id -> its training's handle (executors.py)
        self.steps_left: dict[str, int] = {}  # shortest_first's key, per queued job
        self.finish_lock = threading.Lock()  # one registry write at a time

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        log.info("job worker: %s, queue order %s", self.slots.describe(), self.cfg.queue_order)
        self.recover()
        self.thread.start()

    def shutdown(self) -> None:
        """Stop training for now; the jobs are started again (and resume) when the server is."""
        self.stop.set()
        deadline = time.monotonic() + 30
        self.thread.join(timeout=30)
        for runner in list(self.runners.values()):
            runner.join(timeout=max(0.1, deadline - time.monotonic()))

    def recover(self) -> None:
        """Jobs a stopped server left ``running``: kill what is left of them, then requeue or fail them. Paused
        jobs stay paused (a training process still stopping is killed: they resume from their last checkpoint)."""
        for job in self.store.jobs_with_status("paused"):
            if self.kill_left(job["id"]):
                ckpt = last_checkpoint(Path(self.store.get_private(job["id"]).get("run_dir", "")))
                self.store.add_event(job["id"], "The server restarted while this job was pausing; it is paused at "
                                     + (f"step {ckpt.name.split('-')[1]}" if ckpt else "step 0 (it starts over when "
                                                                                        "resumed)"))
        for job in self.store.jobs_with_status("running"):
            priv = self.store.get_private(job["id"])
            if (handle := self.executor.attach(priv)) is not None:  # a Ray job the cluster knows: follow it again
                self.store.add_event(job["id"], "The server restarted while this job was running; it follows its "
                                     f"{handle.where} again")
                with self.store.lock:
                    self.slots.take(job["id"], priv.get("device") or RAY)
                self.launch(job, priv.get("device") or RAY, handle)
                continue
            self.kill_left(job["id"])
            attempts = priv.get("attempts", 1)
            log.warning("job %s was running on %s when the server stopped (attempt %s of %s)", job["id"],
                        priv.get("device") or CPU, attempts, self.cfg.max_attempts)
            if attempts >= self.cfg.max_attempts:
                self.fail(job["id"], "server_restart", f"the server stopped {attempts} times while this job was "
                          "running; create the job again")
            elif (Path(priv.get("run_dir", "")) / "summary.json").exists():  # it finished while the server was down
                self.store.update_job(job["id"], status="queued", estimated_finish=None)
                self.store.add_event(job["id"], "The server restarted while this job was running; its training "
                                     "finished meanwhile and the job completes now")
            else:
                ckpt = last_checkpoint(Path(priv.get("run_dir", "")))
                self.store.update_job(job["id"], status="queued", estimated_finish=None)
                self.store.add_event(job["id"], "The server restarted while this job was running; it is queued again "
                                     + (f"and resumes from {ckpt.name}" if ckpt else "and starts over"))

    def kill_left(self, job_id: str) -> bool:
        """Stop the training a stopped server left running for this job (its process, if that pid is still it;
        its Ray job)."""
        return self.executor.kill_left(self.store.get_private(job_id))

    def loop(self) -> None:
        while not self.stop.is_set():
            job = None
            try:
                job = next(iter(self.store.jobs_with_status("validating_files")), None)
                if job:
                    self.validate(job)
                    continue
                while not self.stop.is_set() and (claimed := self.slots.claim(self.store, self.cfg.queue_order,
                                                                                 self.steps)):
                    job = claimed[0]
                    self.launch(*claimed)
            except Exception as e:  # a bug must not stop the queue: fail the job it happened in
                log.exception("internal error in the job worker%s", f" (job {job['id']})" if job else "")
                if job and self.store.get_job(job["id"])["status"] not in TERMINAL:
                    self.fail(job["id"], "server_error", f"internal error: {type(e).__name__}: {e}")
            self.stop.wait(0.3)

    def launch(self, job: dict, device: str, handle=None) -> None:
        runner = threading.Thread(target=self.train, args=(job, device, handle), name=f"finetune-job-{device}",
                                  daemon=True)
        with self.store.lock:
            self.runners[job["id"]] = runner
        runner.start()

    def train(self, job: dict, device: str, handle=None) -> None:
        """A slot's thread: ``run`` the job; an internal error fails it (its process stopped), as in ``loop``."""
        try:
            self.run(job, device, handle)
        except Exception as e:
            log.exception("internal error in the job worker (job %s)", job["id"])
            if self.store.get_job(job["id"])["status"] not in TERMINAL:
                self.fail(job["id"], "server_error", f"internal error: {type(e).__name__}: {e}")
        finally:
            handle = self.procs.pop(job["id"], None)
            if handle and handle.poll() is None:  # left by an error: it must not train on unwatched
                handle.stop()
            with self.store.lock:
                self.slots.release(job["id"])
                self.runners.pop(job["id"], None)
                self.steps_left.pop(job["id"], None)  # requeued later (a restart): its steps are counted again

    def steps(self, job: dict) -> int:
        """The training steps a queued job has left (its plan, less a resumed run's checkpoint): shortest_first."""
        if job["id"] not in self.steps_left:
            try:
                run_dir = self.store.get_private(job["id"]).get("run_dir")
                ckpt = last_checkpoint(Path(run_dir)) if run_dir else None
                done = int(ckpt.name.split("-")[1]) if ckpt else 0
                self.steps_left[job["id"]] = max(0, self.plan(job)[3]["max_steps"] - done)
            except Exception:  # noqa: BLE001 (its run fails it with the reason; here it goes first)
                log.debug("job %s: no plan to order the queue by", job["id"], exc_info=True)
                self.steps_left[job["id"]] = 0
        return self.steps_left[job["id"]]

    # ----------------------------------------------------------------------------- steps

    def fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        with self.store.lock:
            if self.store.get_job(job_id)["status"] in TERMINAL:
                return
            self._fail(job_id, code, message, param)

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.store.update_job(job_id, status="failed", finished_at=int(time.time()), estimated_finish=None,
                              error={"code": code, "message": message, "param": param})
        self.store.add_event(job_id, f"Job failed: {message}", level="error")
        log.warning("job %s failed (%s): %s", job_id, code, message)

    def validate(self, job: dict) -> None:
        """data_prep's checks of the job's files (by its method), then its hyperparameters resolved for the
        training file."""
        kind = job["method"]["type"]
        self.store.add_event(job["id"], "Validating training file: " + job["training_file"]
                             + (f" and validation file: {job['validation_file']}" if job["validation_file"] else ""))
        counts = {}
        for param in ("training_file", "validation_file"):
            file_id = job[param]
            if not file_id:
                continue
            found = self.store.get_file(file_id)
            counts[param], error = file_error(param, file_id, found[1] if found else None, job["method"])
            if error:
                with self.store.lock:  # unless paused or cancelled meanwhile
                    if self.store.get_job(job["id"])["status"] == "validating_files":
                        self._fail(job["id"], error["code"], error["message"], error["param"])
                return
        hp = hyperparameters.resolve(job["method"][kind]["hyperparameters"], counts["training_file"],
                                     self.base(job), kind)
        with self.store.lock:
            if self.store.get_job(job["id"])["status"] != "validating_files":  # cancelled or paused meanwhile
                return
            self.store.update_job(job["id"], status="queued", **hyperparameters.job_fields(job["method"], hp),
                                  private={"train_examples": counts["training_file"]})
        log.info("job %s: files validated (%d training examples, %s, %s); queued", job["id"], counts["training_file"],
                 kind, ", ".join(f"{k} {v}" for k, v in hp.items()))
        self.store.add_event(job["id"], "Files validated, moving job to queued state")

    def base(self, job: dict) -> str:
        return jobconfig.base_of(self.store, job)

    def plan(self, job: dict) -> tuple[str, dict, dict, dict]:
        return jobconfig.plan(self.store, self.cfg, job)

    def job_config(self, job: dict, run_dir: Path) -> tuple[Path, dict]:
        return jobconfig.write(self.store, self.cfg, job, run_dir)

    def run(self, job: dict, device: str | None = None, handle=None) -> None:
        """Train a queued job on ``device`` (a GPU's CUDA_VISIBLE_DEVICES value; None or "cpu": the server's
        environment; "ray": Ray's pick) until it ends, is cancelled or paused, or the worker stops; ``handle``:
        a running job's training followed again after a restart. A job whose machine is lost (a Ray node) is
        started again at once, up to ``max_attempts`` starts, from its last complete checkpoint."""
        job_id = job["id"]
        run_dir = (self.data_dir / "runs" / job_id).resolve()
        device = device or CPU
        if handle is None and (run_dir / "summary.json").exists():  # trained while the server was down (recover)
            self.collect(job_id, run_dir, self.store.get_private(job_id).get("total_steps") or 1, {"lines": 0})
            return self.succeed(job, run_dir)
        if handle is None:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            for name in (PAUSE_REQUEST, PAUSED):  # a resumed job's: this start trains on
                (run_dir / name).unlink(missing_ok=True)
            handle = self.begin(job, run_dir, device, "queued")
        while handle is not None and (lost := self.follow(job, handle, run_dir)):
            attempts, ckpt = self.store.get_private(job_id).get("attempts", 1), last_checkpoint(run_dir)
            if attempts >= self.cfg.max_attempts:
                return self.fail(job_id, "node_lost", f"{handle.where}: {lost}, {attempts} times; create the job "
                                 "again" + (f" (its last checkpoint: {ckpt.name})" if ckpt else ""))
            message = (f"{handle.where}: {lost}; submitted again (attempt {attempts + 1} of {self.cfg.max_attempts}), "
                       + (f"resuming from {ckpt.name}" if ckpt else "starting over"))
            log.warning("job %s: %s", job_id, message)
            self.store.add_event(job_id, message, level="warn")
            handle = self.begin(job, run_dir, device, "running")

    def begin(self, job: dict, run_dir: Path, device: str, expect: str):
        """Start the job's training (its status ``expect``: queued, or running for a start after a lost
        machine); None when a cancel or pause came meanwhile (then nothing trains)."""
        job_id = job["id"]
        config, info = self.job_config(job, run_dir)
        if note := spread_batch(config, info["hyperparameters"]["batch_size"], self.processes):
            info["events"].append(("info", note))
        priv = self.store.get_private(job_id)
        attempts, submission = priv.get("attempts", 0) + 1, priv.get("submissions", 0) + 1
        handle = self.procs[job_id] = self.start_process(job_id, run_dir, config, info["env"], device, submission)
        kind = job["method"]["type"]
        with self.store.lock:  # a cancel (or a pause) that came while the process started wins
            stopped = self.store.get_job(job_id)["status"] != expect
            if not stopped:
                self.store.update_job(job_id, status="running", estimated_finish=None,
                                      **hyperparameters.job_fields(job["method"], info["hyperparameters"]),
                                      private={**handle.ref, "run_dir": str(run_dir), "attempts": attempts,
                                               "submissions": submission, "device": device,
                                               "total_steps": info["total_steps"], "announced": True,
                                               "resumed": False})
        if stopped:  # stopped outside the lock: the other jobs and the requests need not wait for it
            handle.stop()
            self.procs.pop(job_id, None)
            return None
        log.info("job %s: training started on %s (%s, %s, %d steps, attempt %d, log %s)", job_id, "the CPU" if device
                 == CPU else "the Ray cluster" if device == RAY else f"GPU {device}", handle.where, kind,
                 info["total_steps"], attempts, run_dir.parent / f"{job_id}.log")
        self.store.add_event(job_id, started(attempts, priv.get("resumed"), last_checkpoint(run_dir)))
        for level, message in [] if priv.get("announced") else info["events"]:
            self.store.add_event(job_id, message, level=level)
        return handle

    def follow(self, job: dict, handle, run_dir: Path) -> str | None:
        """Watch the job's training to its end and act on it (succeed, fail, pause); returns why it must start
        again (its machine was lost) or None."""
        job_id = job["id"]
        rc, pause = self.watch(job_id, handle, run_dir, self.store.get_private(job_id).get("total_steps") or 1)
        self.procs.pop(job_id, None)
        if rc is None or self.store.get_job(job_id)["status"] == "cancelled":
            return None
        if pause and (pause["killed"] or (run_dir / PAUSED).exists() or handle.lost):
            return self.paused(job_id, run_dir, {**pause, "killed": pause["killed"] or bool(handle.lost)})
        if handle.lost:
            return handle.lost
        if rc != 0:
            return self.failed(job_id, run_dir, rc, handle)
        if pause:
            (run_dir / PAUSE_REQUEST).unlink(missing_ok=True)
            self.store.add_event(job_id, "The training finished before it could pause")
        self.succeed(job, run_dir)
        return None

    def start_process(self, job_id: str, run_dir: Path, config: Path, extra_env: dict, device: str,
                      submission: int = 1):
        """``accelerate launch`` of the job's config (``processes`` of them: data parallel), by the executor."""
        command = accelerate_command(config, accelerate_config=str(DDP_CONFIG), num_processes=self.processes) \
            if self.processes > 1 else accelerate_command(config)
        return self.executor.start(job_id, run_dir, command, job_env(self.cfg, run_dir, config, extra_env), device,
                                   submission)

    def watch(self, job_id: str, handle, run_dir: Path, total: int) -> tuple[int | None, dict | None]:
        """``executors.watch`` of the job's training, its output turned into events and checkpoints as it comes."""
        seen = {"lines": 0}
        rc, pause = executors.watch(job_id, handle, run_dir, lambda: self.store.get_job(job_id)["status"],
                                    lambda: self.collect(job_id, run_dir, total, seen), self.stop,
                                    float(self.cfg.pause_timeout_s))
        if rc is None and self.store.get_job(job_id)["status"] == "cancelled":
            self.store.add_event(job_id, "Training process stopped")
        return rc, pause

    def paused(self, job_id: str, run_dir: Path, pause: dict) -> None:
        """The training stopped for a pause: at the step its paused.json names, or (killed) at its last complete
        checkpoint. The job stays paused (or queued, if resumed meanwhile) and goes on from there."""
        try:
            step = int(json.loads((run_dir / PAUSED).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            ckpt = last_checkpoint(run_dir)
            step = int(ckpt.name.split("-")[1]) if ckpt else 0
        with self.store.lock:
            if self.store.get_job(job_id)["status"] in TERMINAL:
                return
            self.store.update_job(job_id, estimated_finish=None)
        how = (f" (its last complete checkpoint: the training had not stopped {self.cfg.pause_timeout_s:g} s after "
               "the request and was killed)" if pause["killed"] and not (run_dir / PAUSED).exists() else "")
        self.store.add_event(job_id, f"Fine-tuning job paused at step {step}{how}"
                             + ("; it starts over when resumed" if step == 0 else ""))
        log.info("job %s: paused at step %d%s", job_id, step, " (killed)" if how else "")

    def failed(self, job_id: str, run_dir: Path, rc: int, handle) -> None:
        """A training that exited with an error: the job fails with the reason its log (or Ray) gives."""
        reason, tail = executors.failure(handle, rc)
        log.error("job %s: training exited with status %s; the last lines of %s:\n%s", job_id, rc, handle.log_path,
                  "\n".join(tail) or "(empty)")
        self.fail(job_id, "training_failed", f"training exited with status {rc}: {reason}")

    def collect(self, job_id: str, run_dir: Path, total: int, seen: dict) -> None:
        """New metrics.jsonl lines -> metrics events (and ``estimated_finish`` from the steps per second so
        far); new complete checkpoints -> checkpoint objects and their events."""
        # The checkpoints before the metrics: train/sft.py logs a step (and evaluates) before it saves that
        # step's checkpoint, so every metrics line a checkpoint seen here follows is in the file read below.
        # (Listed after it, a checkpoint saved while this thread waited for the CPU came out before its step's
        # metrics events, not after them as OpenAI's do.)
        done = sorted((int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
                      if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").exists())
        path = run_dir / "metrics.jsonl"
        if path.exists():
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            if seen["lines"] > len(lines):  # the file was rewritten
                seen["lines"] = 0
            reported = self.store.get_private(job_id).get("reported", {})
            for line in lines[seen["lines"]:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # half-written last line: read it next time
                    break
                seen["lines"] += 1
                data = metrics_data(rec, total)
                kind = "valid" if "valid_loss" in (data or {}) else "train"
                # a resumed run logs again the steps after its checkpoint: report each step once
                if data and data["step"] > reported.get(kind, -1):
                    self.store.add_event(job_id, metrics_message(data), type_="metrics", data=data)
                    reported[kind] = data["step"]
                    self.store.update_job(job_id, private={"reported": reported})
                if data and kind == "train":
                    self.estimate(job_id, data["step"], total, seen)
        job = self.store.get_job(job_id)
        for step, _ckpt in done:
            name = f"{model_name(job, self.cfg.organization, self.base(job))}:ckpt-step-{step}"
            obj = {"object": "fine_tuning.job.checkpoint", "id": new_id("ftckpt_"), "created_at": int(time.time()),
                   "fine_tuned_model_checkpoint": name, "step_number": step,
                   "fine_tuning_job_id": job_id, "metrics": step_metrics(run_dir, step)}
            if self.store.add_checkpoint(job_id, step, obj):
                self.store.add_event(job_id, f"Checkpoint created at step {step} with Snapshot ID: {name}")

    def estimate(self, job_id: str, step: int, total: int, seen: dict) -> None:
        """``estimated_finish``: now + the steps left at the rate since the first step this process logged."""
        now = time.time()
        if "first" not in seen:
            seen["first"] = (now, step)
            return
        t0, s0 = seen["first"]
        if step > s0 and now > t0 and total > step:
            finish = now + (total - step) * (now - t0) / (step - s0)
            with self.store.lock:
                if self.store.get_job(job_id)["status"] == "running":
                    self.store.update_job(job_id, estimated_finish=int(finish))

    def succeed(self, job: dict, run_dir: Path) -> None:
        job_id = job["id"]
        name = model_name(job, self.cfg.organization, self.base(job))
        csv_bytes = results_csv(run_dir)
        content = base64.b64encode(csv_bytes) if self.cfg.result_base64 else csv_bytes
        file_id = new_id("file-")
        path = self.data_dir / "files" / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.store.add_file({"object": "file", "id": file_id, "purpose": "fine-tune-results",
                             "filename": "step_metrics.csv", "bytes": len(content), "created_at": int(time.time()),
                             "status": "processed"}, str(path))
        self.store.add_event(job_id, f"New fine-tuned model created: {name}")
        try:
            from ..registry import record_model

            with self.finish_lock:  # two jobs that finish together: each write reads the other's
                record_model("local", "finetuned", name, job_id=job_id, run_dir=str(run_dir),
                             suffix=job.get("user_provided_suffix"))
        except Exception as e:  # the registry is a convenience; the job has succeeded
            log.warning("job %s: could not record %s in the registry", job_id, name, exc_info=True)
            self.store.add_event(job_id, f"Could not record the model in the registry: {e}", level="warn")
        # Load the adapter before the job reads `succeeded`, so a client that sees the status can chat at once:
        # into every vLLM server (vllm_urls); chat loads it on demand into one that was down meanwhile.
        urls = getattr(self.cfg, "vllm_urls", None) or ([self.cfg.vllm_url] if self.cfg.vllm_url else [])
        if urls:
            from ..adapters import add_adapter

            loaded = []
            for url in urls:
                try:
                    add_adapter(url, name, run_dir, api_key=os.environ.get(self.cfg.vllm_api_key_env))
                except UserError as e:
                    if "already been loaded" not in str(e):
                        log.warning("job %s: the adapter was not loaded into vLLM at %s: %s", job_id, url, e)
                        self.store.add_event(job_id, f"The adapter was not loaded into vLLM at {url}: {e}",
                                             level="warn")
                        continue
                loaded.append(url)
            if loaded:
                where = f"server at {loaded[0]}" if len(loaded) == 1 else f"servers at {', '.join(loaded)}"
                self.store.add_event(job_id, f"Adapter loaded into the vLLM {where} as {name}")
                log.info("job %s: adapter loaded into vLLM at %s as %s", job_id, ", ".join(loaded), name)
        self.store.update_job(job_id, status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                              result_files=[file_id], trained_tokens=trained_tokens(run_dir),
                              estimated_finish=None)
        self.store.add_event(job_id, "The job has successfully completed")
        log.info("job %s succeeded: %s (adapter in %s)", job_id, name, run_dir)
