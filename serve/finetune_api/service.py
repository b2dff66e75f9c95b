"""The logic between the routes and the store and worker: files, jobs, and the checks of every request.

Each mistake in a request is an ``APIError`` with OpenAI's status, message, ``param`` and ``code``
(``model_not_available``, ``invalid_file``, ``fine_tune_not_found``, ``invalid_state``, ``file_too_large``,
and the field checks of ``checks.py``); the app sends it in OpenAI's error envelope. A job names an
OpenAI model (``gpt-4o-mini-2024-07-18``) or the local base; ``config.profile_for`` picks the train/sft.py
profile it trains with, and the job shows the name it was asked for (an alias as the snapshot OpenAI
resolves it to). The service knows nothing of HTTP beyond an upload's ``read()``/``filename``: it
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
from .config import ALIASES, FinetuneAPIConfig, base_model_of, base_names, profile_for
from .errors import APIError
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

    def _model(self, body: dict) -> tuple[str, str]:
        """(the name the job shows, the train/sft.py profile it trains with)."""
        model = body.get("model")
        if model is None:
            raise checks.missing("model")
        profile = profile_for(self.cfg, model)
        if profile is None:
            raise APIError(400, f"model {model!r} is not available for fine-tuning or does not exist; this server "
                           f"fine-tunes {self.base_name} as: {', '.join(base_names(self.cfg))}", param="model",
                           code="model_not_available")
        return (self.base_name if model == self.base_path else ALIASES.get(model, model)), profile

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
        model, profile = self._model(body)
        train = self._training_file(body, "training_file")
        valid = self._training_file(body, "validation_file")
        suffix = checks.suffix(body.get("suffix"))
        hp = checks.hyperparameters(body)
        seed = checks.seed(body.get("seed"))
        if seed is None:
            seed = secrets.randbelow(2**31)
        integrations = checks.integrations(body.get("integrations"))
        metadata = checks.metadata(body.get("metadata"))
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": model,
               "created_at": int(time.time()), "finished_at": None, "fine_tuned_model": None,
               "organization_id": "org-local", "result_files": [], "status": "validating_files",
               "validation_file": valid, "training_file": train, "hyperparameters": hp, "trained_tokens": None,
               "error": None, "user_provided_suffix": suffix, "seed": seed, "estimated_finish": None,
               "integrations": integrations, "metadata": metadata,
               "method": {"type": "supervised", "supervised": {"hyperparameters": dict(hp)}}}
        FineTuningJob.model_validate(job)  # never store a job that its routes could not serve
        self.store.add_job(job, {"attempts": 0, "profile": profile})
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        log.info("job %s created: model %s (profile %s), training_file %s%s", job["id"], model, profile, train,
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
