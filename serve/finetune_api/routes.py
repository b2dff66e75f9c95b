"""The FastAPI app: OpenAI's /v1/files and /v1/fine_tuning/jobs routes (create, list, retrieve, cancel, pause,
resume, events, checkpoints), thin over ``service.Service``, /v1/fine_tuning/alpha/graders/run and /validate
(``serve.graders``), and /v1/models, /v1/chat/completions and
/v1/completions, forwarded to the vLLM server by ``proxy.Proxy``.

Each route reads its parameters, calls the service and returns what it gives; its ``response_model``
(``models.py``) checks the JSON on the way out. The key check, the request log and the error
envelope around them are in ``middleware.py``.

``/`` is the dashboard (``dashboard.py``: one page and its static files, built on these routes).

``create_app(cfg, api_key, run_worker=False)`` builds the app without starting the job worker: requests are
served from the store and jobs stay queued (the unit tests use it with FastAPI's TestClient).
``upstream`` (a ``proxy.Upstream``) is where chat goes; by default ``cfg.vllm_url``. The app starts no
vLLM server itself: ``cli.main`` does, around it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse

from .config import FinetuneAPIConfig
from .dashboard import add_dashboard
from .middleware import add_error_handlers, add_middleware
from .errors import APIError
from .models import (CheckpointList, ErrorResponse, EventList, FileDeleted, FileList, FileObject, FineTuningJob,
                     GraderRunResponse, GraderValidateResponse, Health, JobCreateRequest, JobList, Model, ModelList)
from .proxy import Models, Proxy, Upstream
from .service import PURPOSES, Service, check_python_graders
from .store import Store
from .worker import Worker

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500)}
JSON = {"response_model_exclude_unset": True}  # the keys the object has, no nulls for the SDK's absent fields
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": PURPOSES}}}}}}}
JOB_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": JobCreateRequest.model_json_schema()}}}}
CHAT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model"], "additionalProperties": True,
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}}}}}}}
CHAT_RESPONSES = {200: {"content": {"application/json": {}, "text/event-stream": {}}},
                  **{status: {"model": ErrorResponse} for status in (502, 503, 504)}}

router = APIRouter(prefix="/v1", responses=ERRORS)


def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]


def proxy(request: Request) -> Proxy:
    return request.app.state.proxy


Px = Annotated[Proxy, Depends(proxy)]


# ----------------------------------------------------------------------------- files


@router.post("/files", response_model=FileObject, openapi_extra=UPLOAD_BODY, **JSON)
async def upload_file(request: Request, svc: Svc):
    svc.check_upload_length(request.headers.get("content-length"))
    async with request.form() as form:
        return await svc.add_file(form.get("file"), form.get("purpose"))


@router.get("/files", response_model=FileList, **JSON)
def list_files(svc: Svc, purpose: str | None = None, limit: int = 10000, order: str = "desc",
               after: str | None = None):
    return svc.list_files(purpose, limit, order, after)


@router.get("/files/{file_id}", response_model=FileObject, **JSON)
def retrieve_file(file_id: str, svc: Svc):
    return svc.get_file(file_id)


@router.get("/files/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, svc: Svc):
    """The file's bytes, streamed from disk in chunks (Range requests work too)."""
    path, filename = svc.file_content(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.delete("/files/{file_id}", response_model=FileDeleted, **JSON)
def delete_file(file_id: str, svc: Svc):
    return svc.delete_file(file_id)


# ----------------------------------------------------------------------------- fine-tuning jobs


@router.post("/fine_tuning/jobs", response_model=FineTuningJob, openapi_extra=JOB_BODY, **JSON)
async def create_job(request: Request, svc: Svc):
    return svc.create_job(await request.body())


@router.get("/fine_tuning/jobs", response_model=JobList, **JSON)
def list_jobs(svc: Svc, after: str | None = None, limit: int = 20):
    return svc.list_jobs(after, limit)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob, **JSON)
def retrieve_job(job_id: str, svc: Svc):
    return svc.get_job(job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob, **JSON)
def cancel_job(job_id: str, svc: Svc):
    return svc.cancel_job(job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob, **JSON)
def pause_job(job_id: str, svc: Svc):
    return svc.pause_job(job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob, **JSON)
def resume_job(job_id: str, svc: Svc):
    return svc.resume_job(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=EventList, **JSON)
def list_events(job_id: str, svc: Svc, after: str | None = None, limit: int = 20):
    return svc.list_events(job_id, after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList, **JSON)
def list_checkpoints(job_id: str, svc: Svc, after: str | None = None, limit: int = 10):
    return svc.list_checkpoints(job_id, after, limit)


# ----------------------------------------------------------------------------- graders (serve/graders)

GRADER_RUN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["grader", "model_sample"],
    "properties": {"grader": {"type": "object"}, "model_sample": {"type": "string"}, "item": {"type": "object"}}}}}}}
GRADER_VALIDATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["grader"], "properties": {"grader": {"type": "object"}}}}}}}


async def _json_object(request: Request) -> dict:
    import json

    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                            "using your HTTP library correctly.)") from None
    if not isinstance(body, dict):
        raise APIError(400, "Invalid body: expected a JSON object.")
    return body


def _required(body: dict, key: str, kind: type, expected: str):
    if key not in body:
        raise APIError(400, f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
    if not isinstance(body[key], kind):
        raise APIError(400, f"Invalid type for '{key}': expected {expected}.", key, "invalid_type")
    return body[key]


def _grader_error(exc) -> APIError:
    return APIError(400, exc.message, exc.param, "invalid_value")


@router.post("/fine_tuning/alpha/graders/run", response_model=GraderRunResponse, openapi_extra=GRADER_RUN_BODY)
async def run_grader(request: Request):
    """Grade ``model_sample`` (its text; ``sample.output_json`` when it is JSON) for ``item`` with ``grader``."""
    from fastapi.concurrency import run_in_threadpool

    from serve import graders

    body = await _json_object(request)
    grader = _required(body, "grader", dict, "an object")
    sample = _required(body, "model_sample", str, "a string")
    item = body.get("item") or {}
    if not isinstance(item, dict):
        raise APIError(400, "Invalid type for 'item': expected an object.", "item", "invalid_type")
    try:
        graders.validate(grader)
    except graders.GraderInvalid as exc:
        raise _grader_error(exc) from None
    cfg = request.app.state.service.cfg
    check_python_graders(cfg, grader, "grader")  # python_graders: off, or not isolated enough here
    client = getattr(request.app.state, "grader_client", None)  # None: serve.client's backend, on first use
    result = await run_in_threadpool(graders.grade, grader, sample, item, client=client,
                                     allow_unisolated=cfg.python_graders == "on")
    return result.to_response()


@router.post("/fine_tuning/alpha/graders/validate", response_model=GraderValidateResponse,
             openapi_extra=GRADER_VALIDATE_BODY)
async def validate_grader(request: Request):
    from serve import graders

    grader = _required(await _json_object(request), "grader", dict, "an object")
    try:
        graders.validate(grader)
    except graders.GraderInvalid as exc:
        raise _grader_error(exc) from None
    check_python_graders(request.app.state.service.cfg, grader, "grader")
    return {"grader": grader}


# ----------------------------------------------------------------------------- models and chat (proxy.py)


@router.get("/models", response_model=ModelList, **JSON)
def list_models(px: Px):
    return {"object": "list", "data": px.models.listing()}


@router.get("/models/{model:path}", response_model=Model, **JSON)
def retrieve_model(model: str, px: Px):
    return px.models.get(model)


@router.post("/chat/completions", openapi_extra=CHAT_BODY, responses=CHAT_RESPONSES)
async def chat_completions(request: Request, px: Px):
    """Forwarded to the vLLM server; ``stream: true`` answers server-sent events, relayed as they come."""
    return await px.forward(request, "/chat/completions")


@router.post("/completions", openapi_extra=CHAT_BODY, responses=CHAT_RESPONSES)
async def completions(request: Request, px: Px):
    return await px.forward(request, "/completions")


def health() -> dict:
    return {"status": "ok"}


# ----------------------------------------------------------------------------- the app


def create_app(cfg: FinetuneAPIConfig, api_key: str | None = None, *, run_worker: bool = True,
               upstream: Upstream | None = None) -> FastAPI:
    """The app over ``cfg.data_dir``; its lifespan starts the job worker (unless ``run_worker`` is false)."""
    data_dir = Path(cfg.data_dir).resolve()
    store = Store(data_dir / "state.db")
    svc = Service(cfg, store)
    worker = Worker(store, cfg, data_dir)
    px = Proxy(cfg, Models(cfg, store), upstream or Upstream.of(cfg))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if run_worker:
            worker.start()
        try:
            yield
        finally:
            if run_worker:
                worker.shutdown()
            await px.aclose()

    app = FastAPI(title="tunekit fine-tuning API", lifespan=lifespan)
    app.state.store, app.state.worker, app.state.service, app.state.proxy = store, worker, svc, px
    app.state.grader_client = None  # score_model / label_model graders' client; None: serve.client's backend
    add_error_handlers(app)
    add_middleware(app, api_key)
    app.include_router(router)
    app.add_api_route("/health", health, methods=["GET"], response_model=Health)
    add_dashboard(app)
    return app
