"""The logic between the routes and the store and worker: files, jobs, and the checks of every request.

Each mistake in a request is an ``APIError`` with OpenAI's status, message, ``param`` and ``code``
(``model_not_available``, ``invalid_file``, ``fine_tune_not_found``, ``invalid_state``, ``file_too_large``,
and the field checks of ``checks.py``); the app sends it in OpenAI's error envelope. A job names an
OpenAI model (``gpt-4o-mini-2024-07-18``, ``o4-mini-2025-04-16``) or the local base; ``config.profile_for`` picks
the train/sft.py profile a supervised job trains with (a DPO job's is ``dpo_config``, train/dpo.py's; a
reinforcement job's ``rl_config``, train/grpo.py's), and the job shows the name it was asked for (an alias as
the snapshot OpenAI resolves it to). Any of the names trains with any method here: OpenAI limits RFT to its
reasoning models and SFT/DPO to the others, but locally they all mean the one base model.

Python graders (a reinforcement job's grader, or one inside its multi grader; the graders API's too) run in
``serve/graders/sandbox.py``'s sandbox, and only where ``python_graders`` allows: ``auto`` when the server
listens on loopback and the OS grants every isolation layer, ``on`` always (then the training process gets
``TUNEKIT_PYTHON_GRADERS=on``), ``off`` never; a refusal is a 400 ``unsupported_value`` naming the grader's
``type`` and the fix (``python_graders_refusal``). It may also name an ``ft:`` model
this server made (a succeeded job's ``fine_tuned_model`` or one of its checkpoints), for either method, as
OpenAI allows DPO on a supervised fine-tune: the job trains on from that adapter (``init_adapter``) with
its base's profile, and its own model is named after the base snapshot.

Pause and resume (OpenAI's POST /fine_tuning/jobs/{id}/pause and /resume): a paused job keeps its place
and its checkpoints. Pausing a job not yet training (validating_files, queued) takes effect at once; a
running one reads ``paused`` at once too, while the worker has its training stop at a new checkpoint
(worker.py). Resuming puts it back in the queue (``queued``; ``validating_files`` if its files were not
validated yet), and its training goes on from its last complete checkpoint. Pausing a finished job or
resuming one that is not paused is ``invalid_state``, as cancelling a finished one is. The service knows nothing of HTTP beyond an upload's ``read()``/``filename``: it
returns the plain dicts the store keeps, and the routes' response models check them. Its log (logger
``serve.finetune_api.service``) records what changed: uploads, deletions, new and cancelled jobs.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path

from . import checks
from tunekit.net import is_loopback

from .config import (ALIASES, FinetuneAPIConfig, base_model_of, base_names, default_profile, dpo_refusal,
                     profile_for, rl_refusal)
from .errors import APIError
from .hyperparameters import job_fields
from .models import FineTuningJob
from .store import Store, new_id
from .worker import TERMINAL

__all__ = ["APIError", "PURPOSES", "Service", "listing", "safe_filename"]
PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
            "vision", "user_data")
REQUEST_KEYS = ("model", "training_file", "validation_file", "hyperparameters", "suffix", "seed", "method",
                "integrations", "metadata")
log = logging.getLogger(__name__)


def safe_filename(name: str | None) -> str:
    """The upload's base name with anything but letters, digits, dot, dash and underscore replaced."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:128]
    return base or "upload"


def listing(data: list[dict], has_more: bool, ids: bool = False, empty_id: str | None = None) -> dict:
    out = {"object": "list", "data": data, "has_more": has_more}
    if ids:  # ListFilesResponse wants strings even for an empty page; checkpoints allow null
        out.update(first_id=data[0]["id"] if data else empty_id, last_id=data[-1]["id"] if data else empty_id)
    return out


def python_graders_refusal(cfg: FinetuneAPIConfig) -> str | None:
    """Why this server does not run python graders (None: it does; see the module doc)."""
    if cfg.python_graders == "off":
        return "python graders are off on this server (python_graders: off in its config)"
    if cfg.python_graders == "on":
        return None
    if not is_loopback(cfg.host):
        return (f"this server listens on {cfg.host}, beyond loopback, where python graders run only when its config "
                "says so: set python_graders: on (each runs in a sandbox: no network, no files outside its folder)")
    from serve.graders.sandbox import isolation

    iso = isolation()
    if not iso.complete:
        return (f"the python grader sandbox here is {iso.describe()}; set python_graders: on in the server's config "
                "to run python graders with the layers that remain")
    return None


def check_python_graders(cfg: FinetuneAPIConfig, grader, param: str) -> None:
    """A 400 (``unsupported_value``, naming the python grader's ``type``) when ``grader`` has a python grader this
    server does not run."""
    from serve.graders import python_graders

    where = python_graders(grader, param)
    if where and (why := python_graders_refusal(cfg)):
        raise APIError(400, f"Unsupported value: '{where[0]}' is 'python' and {why}.", where[0], "unsupported_value")


def check_limit(limit: int, top: int) -> int:
    if not 1 <= limit <= top:
        raise APIError(400, f"limit must be between 1 and {top}", param="limit")
    return limit


class Service:
    """Files and fine-tuning jobs over one store; the worker picks the jobs up from the store."""

    def __init__(self, cfg: FinetuneAPIConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.data_dir = Path(cfg.data_dir).resolve()
        self.base_name, self.base_path = base_model_of(cfg)
        self.limit_bytes = int(cfg.max_file_mb * 2**20)
        if why := dpo_refusal(cfg):
            log.warning("DPO jobs will be refused: %s (set dpo_config to a train/dpo.py profile of %s)", why,
                        self.base_path)
        if why := rl_refusal(cfg):
            log.warning("reinforcement jobs will be refused: %s (set rl_config to a train/grpo.py profile of %s)", why,
                        self.base_path)

    # ----------------------------------------------------------------------------- files

    def too_large(self) -> APIError:
        return APIError(413, f"File is too large: the limit is {self.cfg.max_file_mb:g} MB", param="file",
                        code="file_too_large")

    def check_upload_length(self, content_length: str | None) -> None:
        """Refuse an upload whose Content-Length is over the limit before reading its body."""
        if content_length and content_length.isdigit() and int(content_length) > self.limit_bytes + 65536:
            raise self.too_large()

    async def add_file(self, upload, purpose) -> dict:
        """Store a multipart upload (an object with async ``read(n)`` and ``filename``) under data_dir/files."""
        if upload is None or isinstance(upload, str):
            raise APIError(400, "Missing the 'file' part of the multipart upload", param="file")
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}", param="purpose")
        file_id = new_id("file-")
        path = self.data_dir / "files" / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with path.open("wb") as f:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > self.limit_bytes:
                    f.close()
                    path.unlink()
                    raise self.too_large()
                f.write(chunk)
        if size == 0:
            path.unlink()
            raise APIError(400, "The uploaded file is empty", param="file")
        obj = {"object": "file", "id": file_id, "purpose": purpose, "filename": safe_filename(upload.filename),
               "bytes": size, "created_at": int(time.time()), "status": "processed"}
        self.store.add_file(obj, str(path))
        log.info("file %s uploaded: %s, %d bytes, purpose %s", file_id, obj["filename"], size, purpose)
        return obj

    def list_files(self, purpose: str | None, limit: int, order: str, after: str | None) -> dict:
        if order not in ("asc", "desc"):
            raise APIError(400, "order must be asc or desc", param="order")
        data, more = self.store.list_files(purpose, order, after, check_limit(limit, 10000))
        return listing(data, more, ids=True, empty_id="")

    def _file(self, file_id: str) -> tuple[dict, str]:
        found = self.store.get_file(file_id)
        if not found:
            raise APIError(404, f"No such File object: {file_id}", param="id")
        return found

    def get_file(self, file_id: str) -> dict:
        return self._file(file_id)[0]

    def file_content(self, file_id: str) -> tuple[Path, str]:
        """(path of the file's bytes, its filename): the route streams it."""
        obj, path = self._file(file_id)
        if not Path(path).is_file():
            log.error("file %s: its content %s is missing from the data folder", file_id, path)
            raise APIError(500, f"The content of {file_id} is missing on the server", type_="server_error")
        return Path(path), obj["filename"]

    def delete_file(self, file_id: str) -> dict:
        _, path = self._file(file_id)
        self.store.delete_file(file_id)
        Path(path).unlink(missing_ok=True)
        log.info("file %s deleted", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ----------------------------------------------------------------------------- fine-tuning jobs

    def _training_file(self, body: dict, param: str) -> str | None:
        file_id = body.get(param)
        if file_id is None:
            if param == "validation_file":
                return None
            raise checks.missing(param)
        found = self.store.get_file(file_id) if isinstance(file_id, str) else None
        if not found:
            raise APIError(400, f"invalid {param}: no file {file_id!r}; upload it with purpose 'fine-tune'",
                           param=param, code="invalid_file")
        if found[0]["purpose"] != "fine-tune":
            raise APIError(400, f"invalid {param}: file {file_id} was uploaded with purpose "
                           f"{found[0]['purpose']!r}, not 'fine-tune'", param=param, code="invalid_file")
        return file_id

    def _model(self, body: dict) -> dict:
        """The job's model: ``shown`` (the name the job shows), ``base`` (the base snapshot its fine-tuned model is
        named after), ``profile`` (the train/sft.py profile of that base) and ``init_adapter`` (the adapter folder
        an ``ft:`` model continues from, else None)."""
        model = body.get("model")
        if model is None:
            raise checks.missing("model")
        if isinstance(model, str) and model.startswith("ft:"):
            return self._fine_tuned(model)
        profile = profile_for(self.cfg, model)
        if profile is None:
            raise self._not_available(model)
        shown = self.base_name if model == self.base_path else ALIASES.get(model, model)
        return {"shown": shown, "base": shown, "profile": profile, "init_adapter": None}

    def _not_available(self, model, why: str = "") -> APIError:
        return APIError(400, f"model {model!r} is not available for fine-tuning or does not exist{why}; this server "
                        f"fine-tunes {self.base_name} as: {', '.join(base_names(self.cfg))}, and the ft: models its "
                        "jobs made", param="model", code="model_not_available")

    def _fine_tuned(self, model: str) -> dict:
        """An ``ft:`` model of this server: its job's adapter (run folder, or its checkpoint-N) to train on from."""
        found = self.store.model_owner(model)
        if not found:
            raise self._not_available(model, " (no job of this server made it)")
        parent, step = found
        priv = self.store.get_private(parent["id"])
        run_dir = Path(priv.get("run_dir") or "")
        folder = run_dir / f"checkpoint-{step}" if step is not None else run_dir
        if not priv.get("run_dir") or not (folder / "adapter_config.json").is_file():
            raise self._not_available(model, f" (its adapter, {folder}, is no longer on this server)")
        base = priv.get("base_model") or parent["model"]
        return {"shown": model, "base": base, "profile": profile_for(self.cfg, base) or default_profile(self.cfg),
                "init_adapter": str(folder)}

    def _profile(self, kind: str, model: dict) -> str:
        """The profile a job of method ``kind`` trains with: its model's, ``dpo_config`` for DPO, ``rl_config`` for
        reinforcement."""
        if kind == "reinforcement":
            if why := rl_refusal(self.cfg):
                raise APIError(400, "Unsupported value: 'method.type' 'reinforcement' needs a train/grpo.py profile of "
                               f"the base model on this server, and {why}; the server's rl_config key names one (such "
                               "as configs/banking77/grpo_cpu.yaml).", "method.type", "unsupported_value")
            return str(self.cfg.rl_config)
        if kind != "dpo":
            return model["profile"]
        why = dpo_refusal(self.cfg)
        if why:
            raise APIError(400, f"Unsupported value: 'method.type' 'dpo' needs a train/dpo.py profile of the base "
                           f"model on this server, and {why}; the server's dpo_config key names one (such as "
                           "configs/banking77/dpo_cpu.yaml), or use method.type 'supervised'.", "method.type",
                           "unsupported_value")
        return str(self.cfg.dpo_config)

    def create_job(self, raw: bytes) -> dict:
        """A new job from the JSON body of POST /v1/fine_tuning/jobs; the worker validates its files next."""
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        for key in body:
            if key not in REQUEST_KEYS:
                raise APIError(400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
        model = self._model(body)
        train = self._training_file(body, "training_file")
        valid = self._training_file(body, "validation_file")
        suffix = checks.suffix(body.get("suffix"))
        method = checks.method(body)
        kind = method["type"]
        profile = self._profile(kind, model)
        if kind == "reinforcement":
            check_python_graders(self.cfg, method[kind]["grader"], "method.reinforcement.grader")
        seed = checks.seed(body.get("seed"))
        if seed is None:
            seed = secrets.randbelow(2**31)
        integrations = checks.integrations(body.get("integrations"))
        metadata = checks.metadata(body.get("metadata"))
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": model["shown"],
               "created_at": int(time.time()), "finished_at": None, "fine_tuned_model": None,
               "organization_id": "org-local", "result_files": [], "status": "validating_files",
               "validation_file": valid, "training_file": train, "trained_tokens": None,
               "error": None, "user_provided_suffix": suffix, "seed": seed, "estimated_finish": None,
               "integrations": integrations, "metadata": metadata,
               **job_fields(method, method[kind]["hyperparameters"])}
        FineTuningJob.model_validate(job)  # never store a job that its routes could not serve
        self.store.add_job(job, {"attempts": 0, "profile": profile, "base_model": model["base"],
                                 "init_adapter": model["init_adapter"]})
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        log.info("job %s created: %s, model %s (profile %s%s), training_file %s%s", job["id"], kind, model["shown"],
                 profile, f", from the adapter in {model['init_adapter']}" if model["init_adapter"] else "", train,
                 f", validation_file {valid}" if valid else "")
        return job

    def list_jobs(self, after: str | None, limit: int) -> dict:
        data, more = self.store.list_jobs(after, check_limit(limit, 100))
        return listing(data, more)

    def get_job(self, job_id: str) -> dict:
        job = self.store.get_job(job_id)
        if not job:
            raise APIError(404, f"Fine-tuning job {job_id} not found", param="fine_tuning_job_id",
                           code="fine_tune_not_found")
        return job

    def cancel_job(self, job_id: str) -> dict:
        """Mark the job cancelled; the worker stops its training process when it sees that."""
        with self.store.lock:  # the check and the change in one step, as the worker's own changes are
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                raise self._finished(job, "cancelled")
            job = self.store.update_job(job_id, status="cancelled", finished_at=int(time.time()),
                                        estimated_finish=None)
        self.store.add_event(job_id, "Fine-tuning job cancelled")
        log.info("job %s cancelled", job_id)
        return job

    def _finished(self, job: dict, verb: str) -> APIError:
        return APIError(400, f"Job {job['id']} has already {'been ' if job['status'] == 'cancelled' else ''}"
                        f"{job['status']} and cannot be {verb}", param="fine_tuning_job_id", code="invalid_state")

    def pause_job(self, job_id: str) -> dict:
        """Mark the job paused: at once when it is not training yet; a running one's worker then has its training
        stop at a new checkpoint (and adds "Fine-tuning job paused at step N")."""
        with self.store.lock:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                raise self._finished(job, "paused")
            if job["status"] == "paused":
                raise APIError(400, f"Job {job_id} is already paused; resume it with POST "
                               f"/v1/fine_tuning/jobs/{job_id}/resume", param="fine_tuning_job_id", code="invalid_state")
            was = job["status"]
            job = self.store.update_job(job_id, status="paused", estimated_finish=None, private={"paused_from": was})
        if was == "running":
            self.store.add_event(job_id, "Pausing fine-tuning job: training stops at a checkpoint after its current "
                                 "step")
        else:
            self.store.add_event(job_id, "Fine-tuning job paused before training started")
        log.info("job %s paused (it was %s)", job_id, was)
        return job

    def resume_job(self, job_id: str) -> dict:
        """Put a paused job back in the queue (or back to validation, if its files were not validated yet); its
        training goes on from its last complete checkpoint."""
        with self.store.lock:
            job = self.get_job(job_id)
            if job["status"] != "paused":
                raise APIError(400, f"Job {job_id} is {job['status']}, not paused, and cannot be resumed (pause it "
                               "first with POST .../pause)", param="fine_tuning_job_id", code="invalid_state")
            back = "validating_files" if self.store.get_private(job_id).get("paused_from") == "validating_files" \
                else "queued"
            # a new claim (the worker's slot, if its process is still stopping, keeps it until then); the starts
            # counted toward max_attempts begin again
            job = self.store.update_job(job_id, status=back, private={"paused_from": None, "claimed_by": None,
                                                                     "attempts": 0, "resumed": True})
        self.store.add_event(job_id, "Fine-tuning job resumed")
        log.info("job %s resumed: %s", job_id, back)
        return job

    def list_events(self, job_id: str, after: str | None, limit: int) -> dict:
        self.get_job(job_id)
        data, more = self.store.list_events(job_id, after, check_limit(limit, 1000))
        return listing(data, more)

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> dict:
        self.get_job(job_id)
        data, more = self.store.list_checkpoints(job_id, after, check_limit(limit, 100))
        return listing(data, more, ids=True)
