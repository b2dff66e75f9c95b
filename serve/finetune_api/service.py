"""The logic between the routes and the store and worker: files, jobs, and the checks of every request.

Each mistake in a request is an ``APIError`` with OpenAI's status, message, ``param`` and ``code``
(``model_not_available``, ``invalid_file``, ``invalid_hyperparameters``, ``fine_tune_not_found``,
``invalid_state``, ``file_too_large``); the app sends it in OpenAI's error envelope. The service knows
nothing of HTTP beyond an upload's ``read()``/``filename``: it returns the plain dicts the store keeps,
and the routes' response models check them. Its log (logger ``serve.finetune_api.service``) records
what changed: uploads, deletions, new and cancelled jobs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from pathlib import Path

from pydantic import ValidationError

from .config import FinetuneAPIConfig, base_model_of
from .models import FineTuningJob, FineTuningJobWandbIntegrationObject
from .store import Store, new_id
from .worker import TERMINAL

PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
            "vision", "user_data")
HYPERPARAMETERS = (("n_epochs", int, 1, 50), ("batch_size", int, 1, 256), ("learning_rate_multiplier", float, 0, None))
log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the API refuses: sent as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


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


def check_limit(limit: int, top: int) -> int:
    if not 1 <= limit <= top:
        raise APIError(400, f"limit must be between 1 and {top}", param="limit")
    return limit


def hyperparameters(body: dict) -> dict:
    """n_epochs, batch_size and learning_rate_multiplier of a job request: each 'auto' or in range."""
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise APIError(400, "method.type: only 'supervised' fine-tuning is available here", param="method.type")
        hp = ((method.get("supervised") or {}).get("hyperparameters") or {})
    else:
        hp = body.get("hyperparameters") or {}  # deprecated form, still accepted
    if not isinstance(hp, dict):
        raise APIError(400, "hyperparameters must be an object", param="hyperparameters")
    out = {}
    for key, kind, low, high in HYPERPARAMETERS:
        value = hp.get(key, "auto")
        ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value) and (kind is float or float(value).is_integer())
                                 and (value > low if kind is float else value >= low)
                                 and (high is None or value <= high))
        if not ok:
            raise APIError(400, f"hyperparameters.{key}: {value!r} is not 'auto' or a "
                           + (f"number > {low}" if kind is float else f"whole number from {low} to {high}"),
                           param=f"hyperparameters.{key}", code="invalid_hyperparameters")
        out[key] = value if value == "auto" else kind(value)
    extra = sorted(set(hp) - set(out))
    if extra:
        raise APIError(400, f"hyperparameters: unknown key(s) {', '.join(extra)}", param="hyperparameters")
    return out


def integrations_of(body: dict) -> list[dict] | None:
    integrations = body.get("integrations")
    if isinstance(integrations, dict):
        integrations = [integrations]
    for item in integrations or []:
        ok = bool(isinstance(item, dict) and item.get("type") == "wandb" and isinstance(item.get("wandb"), dict)
                  and item["wandb"].get("project"))
        if ok:  # and the rest of it as OpenAI's job object types it (project, entity, name, tags)
            try:
                FineTuningJobWandbIntegrationObject.model_validate(item)
            except ValidationError:
                ok = False
        if not ok:
            raise APIError(400, "integrations: each must be {'type': 'wandb', 'wandb': {'project': ...}}",
                           param="integrations")
    return integrations or None


class Service:
    """Files and fine-tuning jobs over one store; the worker picks the jobs up from the store."""

    def __init__(self, cfg: FinetuneAPIConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.data_dir = Path(cfg.data_dir).resolve()
        self.base_name, self.base_path = base_model_of(cfg)
        self.limit_bytes = int(cfg.max_file_mb * 2**20)

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
        if file_id is None and param == "validation_file":
            return None
        found = self.store.get_file(file_id) if isinstance(file_id, str) else None
        if not found:
            raise APIError(400, f"invalid {param}: no file {file_id!r}; upload it with purpose 'fine-tune'",
                           param=param, code="invalid_file")
        if found[0]["purpose"] != "fine-tune":
            raise APIError(400, f"invalid {param}: file {file_id} was uploaded with purpose "
                           f"{found[0]['purpose']!r}, not 'fine-tune'", param=param, code="invalid_file")
        return file_id

    def create_job(self, raw: bytes) -> dict:
        """A new job from the JSON body of POST /v1/fine_tuning/jobs; the worker validates its files next."""
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (self.base_name, self.base_path):
            raise APIError(400, f"model {model!r} is not available for fine-tuning here; this server "
                           f"fine-tunes {self.base_name!r}", param="model", code="model_not_available")
        train = self._training_file(body, "training_file")
        valid = self._training_file(body, "validation_file")
        suffix = body.get("suffix")
        if suffix is not None and not (isinstance(suffix, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", suffix)):
            raise APIError(400, "suffix: 1 to 64 letters, digits, '-' or '_'", param="suffix")
        hp = hyperparameters(body)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise APIError(400, "seed must be an integer", param="seed")
        integrations = integrations_of(body)
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str)
                                                                             for v in metadata.values())):
            raise APIError(400, "metadata must be an object of strings", param="metadata")
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": self.base_name,
               "created_at": int(time.time()), "finished_at": None, "fine_tuned_model": None,
               "organization_id": "org-local", "result_files": [], "status": "validating_files",
               "validation_file": valid, "training_file": train, "hyperparameters": hp, "trained_tokens": None,
               "error": None, "user_provided_suffix": suffix, "seed": seed, "estimated_finish": None,
               "integrations": integrations, "metadata": metadata,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        FineTuningJob.model_validate(job)  # never store a job that its routes could not serve
        self.store.add_job(job, {"attempts": 0})
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        if integrations:
            self.store.add_event(job["id"], "Weights & Biases integration recorded; this server trains offline and "
                                 "sends no metrics to wandb", level="warn")
        log.info("job %s created: training_file %s%s", job["id"], train,
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
                raise APIError(400, f"Job {job_id} has already {'been ' if job['status'] == 'cancelled' else ''}"
                               f"{job['status']} and cannot be cancelled", param="fine_tuning_job_id",
                               code="invalid_state")
            job = self.store.update_job(job_id, status="cancelled", finished_at=int(time.time()),
                                        estimated_finish=None)
        self.store.add_event(job_id, "Fine-tuning job cancelled")
        log.info("job %s cancelled", job_id)
        return job

    def list_events(self, job_id: str, after: str | None, limit: int) -> dict:
        self.get_job(job_id)
        data, more = self.store.list_events(job_id, after, check_limit(limit, 1000))
        return listing(data, more)

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> dict:
        self.get_job(job_id)
        data, more = self.store.list_checkpoints(job_id, after, check_limit(limit, 100))
        return listing(data, more, ids=True)
