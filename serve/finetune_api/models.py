"""The API's request and response shapes, checked in code: FastAPI validates every JSON response against them.

Objects are the openai SDK's own pydantic types (``FileObject``, ``FineTuningJob``, ``FineTuningJobEvent``,
``FineTuningJobCheckpoint``, ``FileDeleted``, ``Model``), so a response that the SDK could not parse
cannot leave the server (``FineTuningJob`` adds one status to the SDK's: ``paused``, below); the list envelopes and the error envelope are OpenAI's, written here. The
service returns plain dicts (the JSON the store keeps); each route validates them into its
``response_model`` and serializes with ``exclude_unset``, so a key the object lacks
(``FileObject.expires_at``) is left out rather than sent as null. A response that does not fit its
model is an internal error: status 500 in the error envelope, its traceback logged. (Chat and
completion answers are the vLLM server's, passed on as they come: see proxy.py.)
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from openai.types import FileDeleted, FileObject, Model
from openai.types.fine_tuning import FineTuningJob as SDKFineTuningJob
from openai.types.fine_tuning import FineTuningJobEvent, FineTuningJobWandbIntegrationObject
from openai.types.fine_tuning import ReinforcementMethod as SDKReinforcementMethod
from openai.types.fine_tuning.fine_tuning_job import Method as SDKMethod
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel

__all__ = ["CheckpointList", "ErrorDetail", "ErrorResponse", "EventList", "FileDeleted", "FileList", "FileObject",
           "FineTuningJob", "FineTuningJobCheckpoint", "FineTuningJobEvent", "FineTuningJobWandbIntegrationObject",
           "GraderErrors", "GraderRunMetadata", "GraderRunResponse", "GraderValidateResponse", "Health",
           "JobCreateRequest", "JobList", "Model", "ModelList", "envelope"]


# ----------------------------------------------------------------------------- the job


class ReinforcementMethod(SDKReinforcementMethod):
    """A reinforcement job's method: its grader as given (serve.graders validated it at creation), since a multi
    grader's ``graders`` may be OpenAI's {name: grader} map (its RFT guide's), which the SDK's type (one grader)
    does not describe; ``response_format`` is kept as an extra key, as OpenAI's guide sends it."""
    grader: dict[str, Any]


class Method(SDKMethod):
    reinforcement: Optional[ReinforcementMethod] = None


class FineTuningJob(SDKFineTuningJob):
    """OpenAI's job object, ``paused`` among its statuses: what POST /fine_tuning/jobs/{id}/pause answers on
    OpenAI (its own example in openapi.yaml), though that file's status enum and openai 3.54's Literal stop at
    ``cancelled``. (The SDK parses answers without validating them, so its clients read ``"paused"`` as is.)"""
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    method: Optional[Method] = None


# ----------------------------------------------------------------------------- lists (cursor pages)


class FileList(BaseModel):
    """ListFilesResponse: first_id and last_id are strings even for an empty page."""
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str
    last_id: str


class JobList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class EventList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


class ModelList(BaseModel):
    """ListModelsResponse (not paginated)."""
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]


# ----------------------------------------------------------------------------- graders (serve/graders)


class GraderErrors(BaseModel):
    """RunGraderResponse's ``metadata.errors``: every flag OpenAI names, all required."""
    formula_parse_error: bool
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool
    invalid_variable_error: bool
    other_error: bool
    python_grader_server_error: bool
    python_grader_server_error_type: str | None
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None
    model_grader_server_error: bool
    model_grader_refusal_error: bool
    model_grader_parse_error: bool
    model_grader_server_error_details: str | None


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: GraderErrors
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None


class GraderRunResponse(BaseModel):
    """POST /v1/fine_tuning/alpha/graders/run (OpenAI's RunGraderResponse)."""
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


class GraderValidateResponse(BaseModel):
    """POST /v1/fine_tuning/alpha/graders/validate: the grader as sent (a dict: multi's ``graders`` may be
    OpenAI's {name: grader} map, which the SDK's single-grader type does not describe)."""
    grader: dict[str, Any]


# ----------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    error: ErrorDetail


def envelope(message: str, type_: str = "invalid_request_error", param: str | None = None,
             code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


# ----------------------------------------------------------------------------- requests


class JobCreateRequest(BaseModel):
    """The body of POST /v1/fine_tuning/jobs, as OpenAI documents it.

    It documents the route (/docs, /openapi.json); the service checks the raw body itself, so each
    mistake gets OpenAI's message, ``param`` and ``code`` (``model_not_available``, ``invalid_file``,
    ``integer_below_min_value``, ... see checks.py) rather than a generic validation error.
    """
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    method: dict[str, Any] | None = None  # {"type": "supervised" | "dpo" | "reinforcement", "<type>": {...}}
    hyperparameters: dict[str, Any] | None = None  # the deprecated spelling of method's hyperparameters
    integrations: list[dict[str, Any]] | None = None  # [{"type": "wandb", "wandb": {"project": ...}}]
    metadata: dict[str, str] | None = None
