"""OpenAI's fine-tuning API, served locally: files and fine-tuning jobs that train with train/sft.py.

    python -m serve.finetune_api --config configs/banking77/finetune_api.yaml
    python -m serve.finetune_api --port 8100 --data-dir runs/finetune_api --sft-config configs/banking77/sft_cpu.yaml

Any OpenAI client works against it with ``base_url="http://127.0.0.1:8100/v1"``:

    client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    client.fine_tuning.jobs.create(training_file=..., validation_file=..., model="SmolLM2-135M-Instruct",
                                   method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}})
    client.fine_tuning.jobs.retrieve(job_id); client.fine_tuning.jobs.list_events(job_id)

Endpoints: /v1/files (upload, list, retrieve, content, delete) and /v1/fine_tuning/jobs (create, list,
retrieve, cancel, events, checkpoints). Jobs run one at a time: validating_files -> queued -> running
-> succeeded | failed | cancelled, each as ``accelerate launch train/sft.py`` on a config derived from
``sft_config`` and the job's hyperparameters (see serve/ftapi_worker.py). A succeeded job's
``fine_tuned_model`` is ``ft:<base>:<suffix>:<job id>``: the adapter is recorded in runs/registry.json
(the client's ``finetuned`` alias) and, when ``vllm_url`` is set, loaded into that vLLM server.
State lives in SQLite under ``data_dir``: a restart loses no file or job, and a job that was running
resumes from its last checkpoint.

The API key is ``--api-key`` or the environment variable TUNEKIT_API_KEY (or a .env file); it is
required to listen on any address other than loopback, and never logged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tunekit.config import load_config, read_yaml
from tunekit.errors import UserError
from tunekit.net import is_loopback

PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
            "vision", "user_data")


@dataclass
class FinetuneAPIConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    data_dir: str = "runs/finetune_api"  # SQLite state, uploaded files, one run directory per job
    sft_config: str = "configs/banking77/sft_cpu.yaml"  # the training config jobs start from
    sft_overrides: dict = field(default_factory=dict)  # sft keys set for every job (model, max_length, ...)
    base_model: str | None = None  # the `model` jobs name (default: folder name of model_name_or_path)
    max_steps: int | None = None  # cap on a job's steps (CPU demos); null: the job's n_epochs decide
    max_attempts: int = 3  # starts of a job (server restarts included) before it fails
    max_file_mb: float = 512.0  # upload size limit (413 above it)
    result_base64: bool = True  # result files base64-encoded, as OpenAI serves them
    omp_num_threads: int | None = 1  # OMP_NUM_THREADS of the training process
    api_key_env: str = "TUNEKIT_API_KEY"
    vllm_url: str | None = None  # e.g. http://127.0.0.1:8000/v1: load finished adapters there
    vllm_api_key_env: str = "TUNEKIT_API_KEY"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def envelope(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def load_dotenv(path: Path = Path(".env")) -> None:
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.removeprefix("export ").split("=", 1)
                os.environ.setdefault(key.strip(), value.strip().strip("'\""))


def safe_filename(name: str | None) -> str:
    """The upload's base name with anything but letters, digits, dot, dash and underscore replaced."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:128]
    return base or "upload"


def base_model_of(cfg: FinetuneAPIConfig) -> tuple[str, str]:
    """(name jobs use, model_name_or_path of training)."""
    sft = read_yaml(cfg.sft_config)
    path = str((cfg.sft_overrides or {}).get("model_name_or_path") or sft.get("model_name_or_path") or "")
    if not path:
        raise UserError(f"{cfg.sft_config}: model_name_or_path is missing")
    return cfg.base_model or Path(path.rstrip("/")).name, path


# ----------------------------------------------------------------------------- the app


def create_app(cfg: FinetuneAPIConfig, api_key: str | None):
    from .ftapi_store import Store, new_id
    from .ftapi_worker import TERMINAL, Worker

    data_dir = Path(cfg.data_dir).resolve()
    base_name, base_path = base_model_of(cfg)
    store = Store(data_dir / "state.db")
    worker = Worker(store, cfg, data_dir)
    limit_bytes = int(cfg.max_file_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.shutdown()

    app = FastAPI(title="tunekit fine-tuning API", lifespan=lifespan)
    app.state.store, app.state.worker = store, worker

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(envelope(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(envelope(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", [])[1:]) or None
        return JSONResponse(envelope(f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where),
                            status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                msg = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer KEY'."
                return JSONResponse(envelope(msg, param=None, code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def listing(data: list[dict], has_more: bool, ids: bool = False, empty_id: str | None = None) -> dict:
        out = {"object": "list", "data": data, "has_more": has_more}
        if ids:  # ListFilesResponse wants strings even for an empty page; checkpoints allow null
            out.update(first_id=data[0]["id"] if data else empty_id, last_id=data[-1]["id"] if data else empty_id)
        return out

    def get_file(file_id: str) -> tuple[dict, str]:
        found = store.get_file(file_id)
        if not found:
            raise APIError(404, f"No such File object: {file_id}", param="id")
        return found

    def get_job(job_id: str) -> dict:
        job = store.get_job(job_id)
        if not job:
            raise APIError(404, f"Fine-tuning job {job_id} not found", param="fine_tuning_job_id",
                           code="fine_tune_not_found")
        return job

    def check_limit(limit: int, top: int) -> int:
        if not 1 <= limit <= top:
            raise APIError(400, f"limit must be between 1 and {top}", param="limit")
        return limit

    # ------------------------------------------------------------------------- files

    @app.post("/v1/files")
    async def upload(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit_bytes + 65536:
            raise APIError(413, f"File is too large: the limit is {cfg.max_file_mb:g} MB", param="file",
                           code="file_too_large")
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "Missing the 'file' part of the multipart upload", param="file")
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}", param="purpose")
        file_id = new_id("file-")
        path = data_dir / "files" / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with path.open("wb") as f:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > limit_bytes:
                    f.close()
                    path.unlink()
                    raise APIError(413, f"File is too large: the limit is {cfg.max_file_mb:g} MB", param="file",
                                   code="file_too_large")
                f.write(chunk)
        if size == 0:
            path.unlink()
            raise APIError(400, "The uploaded file is empty", param="file")
        obj = {"object": "file", "id": file_id, "purpose": purpose, "filename": safe_filename(upload.filename),
               "bytes": size, "created_at": int(time.time()), "status": "processed"}
        store.add_file(obj, str(path))
        return obj

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, limit: int = 10000, order: str = "desc", after: str | None = None):
        if order not in ("asc", "desc"):
            raise APIError(400, "order must be asc or desc", param="order")
        data, more = store.list_files(purpose, order, after, check_limit(limit, 10000))
        return listing(data, more, ids=True, empty_id="")

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str):
        return get_file(file_id)[0]

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        obj, path = get_file(file_id)
        return Response(Path(path).read_bytes(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{obj["filename"]}"'})

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        _, path = get_file(file_id)
        store.delete_file(file_id)
        Path(path).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------------- fine-tuning jobs

    def hyperparameters(body: dict) -> dict:
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
        for key, kind, low, high in (("n_epochs", int, 1, 50), ("batch_size", int, 1, 256),
                                     ("learning_rate_multiplier", float, 0, None)):
            value = hp.get(key, "auto")
            ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                     and (kind is float or float(value).is_integer())
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

    def training_file(body: dict, param: str) -> str | None:
        file_id = body.get(param)
        if file_id is None and param == "validation_file":
            return None
        if not isinstance(file_id, str) or not store.get_file(file_id):
            raise APIError(400, f"invalid {param}: no file {file_id!r}; upload it with purpose 'fine-tune'",
                           param=param, code="invalid_file")
        if store.get_file(file_id)[0]["purpose"] != "fine-tune":
            raise APIError(400, f"invalid {param}: file {file_id} was uploaded with purpose "
                           f"{store.get_file(file_id)[0]['purpose']!r}, not 'fine-tune'", param=param,
                           code="invalid_file")
        return file_id

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (base_name, base_path):
            raise APIError(400, f"model {model!r} is not available for fine-tuning here; this server "
                           f"fine-tunes {base_name!r}", param="model", code="model_not_available")
        train = training_file(body, "training_file")
        valid = training_file(body, "validation_file")
        suffix = body.get("suffix")
        if suffix is not None and not (isinstance(suffix, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", suffix)):
            raise APIError(400, "suffix: 1 to 64 letters, digits, '-' or '_'", param="suffix")
        hp = hyperparameters(body)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise APIError(400, "seed must be an integer", param="seed")
        integrations = body.get("integrations")
        if isinstance(integrations, dict):
            integrations = [integrations]
        for item in integrations or []:
            if not (isinstance(item, dict) and item.get("type") == "wandb"
                    and isinstance(item.get("wandb"), dict) and item["wandb"].get("project")):
                raise APIError(400, "integrations: each must be {'type': 'wandb', 'wandb': {'project': ...}}",
                               param="integrations")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise APIError(400, "metadata must be an object of strings", param="metadata")
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": base_name, "created_at": int(time.time()),
               "finished_at": None, "fine_tuned_model": None, "organization_id": "org-local", "result_files": [],
               "status": "validating_files", "validation_file": valid, "training_file": train,
               "hyperparameters": hp, "trained_tokens": None, "error": None, "user_provided_suffix": suffix,
               "seed": seed, "estimated_finish": None, "integrations": integrations or None, "metadata": metadata,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        store.add_job(job, {"attempts": 0})
        store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        if integrations:
            store.add_event(job["id"], "Weights & Biases integration recorded; this server trains offline and "
                            "sends no metrics to wandb", level="warn")
        return job

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20):
        data, more = store.list_jobs(after, check_limit(limit, 100))
        return listing(data, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str):
        return get_job(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        job = get_job(job_id)
        if job["status"] in TERMINAL:
            raise APIError(400, f"Job {job_id} has already {'been ' if job['status'] == 'cancelled' else ''}"
                           f"{job['status']} and cannot be cancelled", param="fine_tuning_job_id",
                           code="invalid_state")
        job = store.update_job(job_id, status="cancelled", finished_at=int(time.time()), estimated_finish=None)
        store.add_event(job_id, "Fine-tuning job cancelled")
        return job

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = 20):
        get_job(job_id)
        data, more = store.list_events(job_id, after, check_limit(limit, 1000))
        return listing(data, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        get_job(job_id)
        data, more = store.list_checkpoints(job_id, after, check_limit(limit, 100))
        return listing(data, more, ids=True)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


# ----------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.finetune_api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML whose keys are the long flags' names (data_dir for --data-dir)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, help="default 8100")
    p.add_argument("--data-dir", dest="data_dir", help="state, files and runs (default runs/finetune_api)")
    p.add_argument("--sft-config", dest="sft_config", help="train/sft.py config jobs start from")
    p.add_argument("--base-model", dest="base_model", help="the model name jobs give (default: the sft config's "
                                                           "model folder name)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="cap on every job's training steps")
    p.add_argument("--max-file-mb", dest="max_file_mb", type=float, help="upload size limit (default 512)")
    p.add_argument("--vllm-url", dest="vllm_url", help="load finished adapters into this vLLM server")
    p.add_argument("--api-key", dest="api_key", help="key clients must send (default: env TUNEKIT_API_KEY)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "api_key")}
    cfg = load_config(FinetuneAPIConfig, args.config, overrides)
    load_dotenv()
    api_key = args.api_key or os.environ.get(cfg.api_key_env) or None
    if not is_loopback(cfg.host) and not api_key:
        raise UserError(f"--host {cfg.host}: listening beyond this machine needs an API key; set "
                        f"{cfg.api_key_env} (environment or .env) or pass --api-key")
    if not Path(cfg.sft_config).is_file():
        raise UserError(f"sft_config: {cfg.sft_config} not found (a train/sft.py YAML such as "
                        "configs/banking77/sft_cpu.yaml)")
    base_name, base_path = base_model_of(cfg)
    if not Path(base_path).exists():
        print(f"warning: model {base_path} not found; jobs will fail until it exists (`make model`)",
              file=sys.stderr)
    import uvicorn

    app = create_app(cfg, api_key)
    print(f"fine-tuning API on http://{cfg.host}:{cfg.port}/v1: base model {base_name} ({base_path}), "
          f"data in {cfg.data_dir}, {'API key required' if api_key else 'no API key'}"
          + (f", adapters to {cfg.vllm_url}" if cfg.vllm_url else ""), flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
