"""The job worker of the local fine-tuning API: one job at a time, train/sft.py as a subprocess.

A job goes validating_files -> queued -> running -> succeeded | failed | cancelled. Validation uses
data_prep's rules (the same ones ``python -m data_prep validate`` prints). Training is
``accelerate launch train/sft.py --config <job.yaml>`` in its own process group; its metrics.jsonl
becomes ``metrics`` events and its checkpoint-N folders become checkpoints. A job that was running
when the server stopped is started again (train/sft.py resumes from its last complete checkpoint),
or failed with the reason after ``max_attempts`` starts.

Logging (logger ``serve.finetune_api.worker``): each job's transitions at INFO, a failed job at
WARNING, a training process that exits with an error at ERROR with the last lines of its log
(``<data_dir>/runs/<job id>.log``, where its traceback is), and an internal error with its traceback.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import psutil
import yaml

from tunekit.cli import accelerate_command
from tunekit.processes import stop_group
from tunekit.errors import UserError

from .metrics import last_checkpoint, metrics_data, metrics_message, model_name, results_csv, step_metrics
from .store import Store, new_id

ROOT = Path(__file__).resolve().parents[2]  # the checkout: train/sft.py and its imports
log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled")


def whole(n) -> int | None:
    """A count as an int (TRL logs token counts as floats: 1234.0); None when there is none."""
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) else None


def alive(pid: int | None) -> bool:
    """A live process (a zombie child of ours is not alive)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_group(pgid: int | None, grace: float = 5.0) -> None:
    """SIGTERM the training process group, SIGKILL what is left after ``grace`` seconds."""
    if pgid:
        stop_group(pgid, grace)


def ours(pid: int, run_dir: str) -> bool:
    """Is ``pid`` still the training process this job started (and not a reused pid)?"""
    try:
        return run_dir in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") or \
            any(run_dir in p.read_bytes().decode(errors="replace")
                for p in [Path(f"/proc/{pid}/environ")] if p.exists())
    except OSError:
        return False


class Worker:
    def __init__(self, store: Store, cfg, data_dir: Path):
        self.store, self.cfg, self.data_dir = store, cfg, data_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="finetune-worker", daemon=True)
        self.proc: subprocess.Popen | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.recover()
        self.thread.start()

    def shutdown(self) -> None:
        """Stop training for now; the job is started again (and resumes) when the server is."""
        self.stop.set()
        self.thread.join(timeout=30)

    def recover(self) -> None:
        """Jobs a stopped server left ``running``: kill what is left of them, then requeue or fail them."""
        for job in self.store.jobs_with_status("running"):
            priv = self.store.get_private(job["id"])
            pid = priv.get("pid")
            if pid and alive(pid) and ours(pid, priv.get("run_dir", "")):
                kill_group(pid)
            attempts = priv.get("attempts", 1)
            log.warning("job %s was running when the server stopped (attempt %s of %s)", job["id"], attempts,
                        self.cfg.max_attempts)
            if attempts >= self.cfg.max_attempts:
                self.fail(job["id"], "server_restart", f"the server stopped {attempts} times while this job was "
                          "running; create the job again")
            else:
                ckpt = last_checkpoint(Path(priv.get("run_dir", "")))
                self.store.update_job(job["id"], status="queued", estimated_finish=None)
                self.store.add_event(job["id"], "The server restarted while this job was running; it is queued again "
                                     + (f"and resumes from {ckpt.name}" if ckpt else "and starts over"))

    def loop(self) -> None:
        while not self.stop.is_set():
            job = None
            try:
                job = next(iter(self.store.jobs_with_status("validating_files")), None)
                if job:
                    self.validate(job)
                    continue
                job = next(iter(self.store.jobs_with_status("queued")), None)
                if job:
                    self.run(job)
                    continue
            except Exception as e:  # a bug must not stop the queue: fail the job it happened in
                log.exception("internal error in the job worker%s", f" (job {job['id']})" if job else "")
                if job and self.store.get_job(job["id"])["status"] not in TERMINAL:
                    self.fail(job["id"], "server_error", f"internal error: {type(e).__name__}: {e}")
            self.stop.wait(0.3)

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
        from data_prep.validate import validate_file

        self.store.add_event(job["id"], "Validating training file: " + job["training_file"]
                             + (f" and validation file: {job['validation_file']}" if job["validation_file"] else ""))
        counts = {}
        for param in ("training_file", "validation_file"):
            file_id = job[param]
            if not file_id:
                continue
            found = self.store.get_file(file_id)
            if not found:
                return self.fail(job["id"], "invalid_file", f"{param} {file_id} was deleted", param)
            obj, path = found
            n, problems = validate_file(path)
            if problems:
                shown = "; ".join(f"line {p.line}: {p.code}: {p.message}" for p in problems[:5])
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                return self.fail(job["id"], "invalid_training_file" if param == "training_file" else "invalid_validation_file",
                                 f"{param} {file_id} ({obj['filename']}) is not valid chat JSONL: {shown}{more}", param)
            counts[param] = n
        with self.store.lock:
            if self.store.get_job(job["id"])["status"] != "validating_files":  # cancelled meanwhile
                return
            self.store.update_job(job["id"], status="queued", private={"train_examples": counts["training_file"]})
        log.info("job %s: files validated (%d training examples); queued", job["id"], counts["training_file"])
        self.store.add_event(job["id"], f"Files validated ({counts['training_file']} training examples); job queued")

    def job_config(self, job: dict, run_dir: Path) -> tuple[Path, dict]:
        """The sft config of this job: the base config, the server's overrides, the job's hyperparameters."""
        from tunekit.config import read_yaml
        from data_prep.stats import default_epochs

        sft = read_yaml(self.cfg.sft_config)
        sft.update(self.cfg.sft_overrides or {})
        priv = self.store.get_private(job["id"])
        hp = job["method"]["supervised"]["hyperparameters"]
        n = priv.get("train_examples") or 1
        epochs = hp.get("n_epochs", "auto")
        epochs = default_epochs(n) if epochs in (None, "auto") else int(epochs)
        batch = hp.get("batch_size", "auto")
        batch = int(sft.get("per_device_train_batch_size", 8)) if batch in (None, "auto") else int(batch)
        lrm = hp.get("learning_rate_multiplier", "auto")
        lrm = 1.0 if lrm in (None, "auto") else float(lrm)
        steps = math.ceil(n / batch / int(sft.get("gradient_accumulation_steps", 1))) * epochs
        if self.cfg.max_steps:
            steps = min(steps, self.cfg.max_steps)
        sft.update(train_file=self.store.get_file(job["training_file"])[1],
                   valid_file=self.store.get_file(job["validation_file"])[1] if job["validation_file"] else None,
                   output_dir=str(run_dir), max_steps=steps, num_train_epochs=epochs,
                   per_device_train_batch_size=batch, learning_rate=float(sft.get("learning_rate", 1e-4)) * lrm,
                   seed=job["seed"], report_to="none")
        if sft.get("valid_file") is None:
            sft.pop("valid_file")
            sft["eval_strategy"] = "no"
        elif sft.get("eval_strategy", "no") != "no":
            sft["eval_steps"] = min(int(sft.get("eval_steps") or steps), steps)
        path = run_dir.parent / f"{job['id']}.yaml"
        path.write_text(yaml.safe_dump(sft, sort_keys=False))
        resolved = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": lrm}
        return path, {"total_steps": steps, "hyperparameters": resolved}

    def run(self, job: dict) -> None:
        job_id = job["id"]
        run_dir = (self.data_dir / "runs" / job_id).resolve()
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config, info = self.job_config(job, run_dir)
        attempts = self.store.get_private(job_id).get("attempts", 0) + 1
        log_file = open(run_dir.parent / f"{job_id}.log", "ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
               "TUNEKIT_RUN_DIR": str(run_dir)}
        if Path(str(yaml.safe_load(config.read_text()).get("model_name_or_path", ""))).exists():
            env.setdefault("HF_HUB_OFFLINE", "1")  # a local base never needs the hub; a hub id downloads
        env.pop(self.cfg.api_key_env, None)
        if self.cfg.omp_num_threads:
            env["OMP_NUM_THREADS"] = str(self.cfg.omp_num_threads)
        self.proc = subprocess.Popen(accelerate_command(config), cwd=ROOT, env=env, stdout=log_file, stderr=log_file,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        hp = {**job["method"]["supervised"]["hyperparameters"], **info["hyperparameters"]}
        method = {"type": "supervised", "supervised": {"hyperparameters": hp}}
        with self.store.lock:  # a cancel that came while the process started wins
            if self.store.get_job(job_id)["status"] != "queued":
                kill_group(self.proc.pid)
                self.proc.wait()
                return
            self.store.update_job(job_id, status="running", hyperparameters=hp, method=method,
                                  private={"pid": self.proc.pid, "run_dir": str(run_dir), "attempts": attempts,
                                           "total_steps": info["total_steps"]})
        log.info("job %s: training started (pid %d, %d steps, attempt %d, log %s)", job_id, self.proc.pid,
                 info["total_steps"], attempts, run_dir.parent / f"{job_id}.log")
        self.store.add_event(job_id, f"Fine-tuning job started ({info['total_steps']} steps"
                             + (f", attempt {attempts}" if attempts > 1 else "") + ")")
        seen = {"lines": 0}
        while True:
            rc = self.proc.poll()
            self.collect(job_id, run_dir, info["total_steps"], seen)
            if rc is not None:
                break
            status = self.store.get_job(job_id)["status"]
            if status == "cancelled" or self.stop.is_set():
                kill_group(self.proc.pid)
                self.proc.wait()
                if status == "cancelled":
                    log.info("job %s: cancelled; training process stopped", job_id)
                    self.store.add_event(job_id, "Training process stopped")
                return  # on shutdown the job stays running; recover() requeues it at the next start
            time.sleep(0.5)
        self.proc = None
        if self.store.get_job(job_id)["status"] == "cancelled":
            return
        if rc != 0:
            log_path = run_dir.parent / f"{job_id}.log"
            tail = log_path.read_text(errors="replace").strip().splitlines()[-20:]
            errors = [l for l in tail if l.startswith("error:")]
            reason = errors[-1][len("error: "):] if errors else (tail[-1] if tail else f"exit status {rc}")
            log.error("job %s: training exited with status %s; the last lines of %s:\n%s", job_id, rc, log_path,
                      "\n".join(tail) or "(empty)")
            return self.fail(job_id, "training_failed", f"training exited with status {rc}: {reason}")
        self.succeed(job, run_dir)

    def collect(self, job_id: str, run_dir: Path, total: int, seen: dict) -> None:
        """New metrics.jsonl lines -> metrics events; new complete checkpoints -> checkpoint objects."""
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
        job = self.store.get_job(job_id)
        for ckpt in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                           if re.fullmatch(r"checkpoint-\d+", p.name) else -1):
            if not (ckpt / "trainer_state.json").exists() or not re.fullmatch(r"checkpoint-\d+", ckpt.name):
                continue
            step = int(ckpt.name.split("-")[1])
            obj = {"object": "fine_tuning.job.checkpoint", "id": new_id("ftckpt-"), "created_at": int(time.time()),
                   "fine_tuned_model_checkpoint": f"{model_name(job)}:ckpt-step-{step}", "step_number": step,
                   "fine_tuning_job_id": job_id, "metrics": step_metrics(run_dir, step)}
            self.store.add_checkpoint(job_id, step, obj)

    def succeed(self, job: dict, run_dir: Path) -> None:
        job_id = job["id"]
        name = model_name(job)
        csv_bytes = results_csv(run_dir)
        content = base64.b64encode(csv_bytes) if self.cfg.result_base64 else csv_bytes
        file_id = new_id("file-")
        path = self.data_dir / "files" / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.store.add_file({"object": "file", "id": file_id, "purpose": "fine-tune-results",
                             "filename": "step_metrics.csv", "bytes": len(content), "created_at": int(time.time()),
                             "status": "processed"}, str(path))
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        self.store.add_event(job_id, f"New fine-tuned model created: {name} (adapter in {run_dir})")
        try:
            from ..registry import record_model

            record_model("local", "finetuned", name, job_id=job_id, run_dir=str(run_dir),
                         suffix=job.get("user_provided_suffix"))
        except Exception as e:  # the registry is a convenience; the job has succeeded
            log.warning("job %s: could not record %s in the registry", job_id, name, exc_info=True)
            self.store.add_event(job_id, f"Could not record the model in the registry: {e}", level="warn")
        # Load the adapter before the job reads `succeeded`, so a client that sees the status can chat at once.
        if self.cfg.vllm_url:
            from ..adapters import add_adapter

            try:
                add_adapter(self.cfg.vllm_url, name, run_dir, api_key=os.environ.get(self.cfg.vllm_api_key_env))
                self.store.add_event(job_id, f"Adapter loaded into the vLLM server at {self.cfg.vllm_url} as {name}")
                log.info("job %s: adapter loaded into vLLM at %s as %s", job_id, self.cfg.vllm_url, name)
            except UserError as e:
                log.warning("job %s: the adapter was not loaded into vLLM at %s: %s", job_id, self.cfg.vllm_url, e)
                self.store.add_event(job_id, f"The adapter was not loaded into vLLM: {e}", level="warn")
        self.store.update_job(job_id, status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                              result_files=[file_id], trained_tokens=whole(summary.get("train_tokens")),
                              estimated_finish=None)
        self.store.add_event(job_id, "The job has successfully completed")
        log.info("job %s succeeded: %s", job_id, name)
