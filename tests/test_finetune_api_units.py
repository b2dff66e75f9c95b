"""serve.finetune_api without a server: the store, the request checks, streaming, logging, the worker's failures.

The app is built with ``create_app(..., run_worker=False)`` and driven by FastAPI's TestClient (no
lifespan, so no worker thread and no training); the worker is driven step by step, with a stand-in
for ``accelerate launch`` where a training process has to fail. Responses are checked against
OpenAI's vendored schemas as in tests/test_finetune_api.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

from test_finetune_api import check_schema, openapi_schemas  # noqa: F401 (the fixture `schemas` uses)

KEY = "unit-key-9f3b2a71"
ROW = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}]}
TRAIN = ("".join(json.dumps(ROW) + "\n" for _ in range(12))).encode()


@pytest.fixture(scope="session")
def schemas(request) -> dict:
    """OpenAI's vendored component schemas (tests/data/openai-openapi/schemas.yaml)."""
    return request.getfixturevalue("openapi_schemas")


@pytest.fixture
def cfg(tmp_path):
    from serve.finetune_api import FinetuneAPIConfig

    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model_name_or_path: {tmp_path / 'tiny-llama'}\nper_device_train_batch_size: 4\n"
                   "learning_rate: 0.001\n")
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(f"method: dpo\nmodel_name_or_path: {tmp_path / 'tiny-llama'}\nper_device_train_batch_size: 2\n"
                   "learning_rate: 0.0005\nbeta: 0.1\n")
    return FinetuneAPIConfig(data_dir=str(tmp_path / "data"), sft_config=str(sft), dpo_config=str(dpo),
                             max_file_mb=0.05, omp_num_threads=1)


@pytest.fixture
def app(cfg):
    from serve.finetune_api import create_app

    app = create_app(cfg, KEY, run_worker=False)
    yield app
    app.state.store.close()


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)


def upload(client, content: bytes = TRAIN, purpose: str = "fine-tune", name: str = "train.jsonl"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


def assert_error(resp, status: int, param=None, code=None, message: str = "", type_="invalid_request_error"):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert (err["type"], err["param"], err["code"]) == (type_, param, code), err
    assert message in err["message"], err


# ----------------------------------------------------------------------------- store


def test_store_round_trips_and_persists(tmp_path):
    from serve.finetune_api.store import Store, new_id, page

    db = tmp_path / "s" / "state.db"
    s = Store(db)
    files = [{"object": "file", "id": new_id("file-"), "purpose": p, "filename": f"{i}.jsonl", "bytes": i,
              "created_at": i, "status": "processed"} for i, p in enumerate(["fine-tune", "batch", "fine-tune"])]
    for i, f in enumerate(files):
        s.add_file(f, f"/files/{i}")
    assert s.get_file(files[1]["id"]) == (files[1], "/files/1")
    assert [f["id"] for f in s.list_files(None, "desc", None, 10)[0]] == [f["id"] for f in reversed(files)]
    assert s.list_files("fine-tune", "asc", None, 1) == ([files[0]], True)
    assert s.list_files("fine-tune", "asc", files[0]["id"], 1) == ([files[2]], False)
    s.delete_file(files[0]["id"])
    assert s.get_file(files[0]["id"]) is None and len(s.list_files(None, "asc", None, 10)[0]) == 2

    job = {"object": "fine_tuning.job", "id": "ftjob-a", "status": "queued", "seed": 1}
    s.add_job(job, {"attempts": 0})
    s.add_job({**job, "id": "ftjob-b"}, {})
    assert s.update_job("ftjob-a", private={"pid": 7}, status="running")["status"] == "running"
    s.update_job("ftjob-a", private={"attempts": 2})
    assert s.get_private("ftjob-a") == {"attempts": 2, "pid": 7} and s.get_private("ftjob-nope") == {}
    assert [j["id"] for j in s.jobs_with_status("running", "queued")] == ["ftjob-a", "ftjob-b"]
    assert [j["id"] for j in s.list_jobs(None, 10)[0]] == ["ftjob-b", "ftjob-a"]  # newest first

    events = [s.add_event("ftjob-a", f"e{i}", level="warn" if i else "info") for i in range(5)]
    first, more = s.list_events("ftjob-a", None, 2)
    assert [e["message"] for e in first] == ["e4", "e3"] and more
    assert [e["message"] for e in s.list_events("ftjob-a", first[-1]["id"], 10)[0]] == ["e2", "e1", "e0"]
    assert events[1]["level"] == "warn" and events[0]["data"] == {} and s.list_events("ftjob-b", None, 5) == ([], False)

    ckpt = {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-4", "step_number": 4}
    assert s.add_checkpoint("ftjob-a", 4, ckpt) and not s.add_checkpoint("ftjob-a", 4, {**ckpt, "id": "ftckpt-x"})
    s.add_checkpoint("ftjob-a", 8, {**ckpt, "id": "ftckpt-8", "step_number": 8})
    assert [c["id"] for c in s.list_checkpoints("ftjob-a", None, 10)[0]] == ["ftckpt-8", "ftckpt-4"]
    s.close()

    again = Store(db)  # a restart reads everything back
    assert again.get_job("ftjob-a")["status"] == "running" and again.get_private("ftjob-a")["pid"] == 7
    assert again.get_file(files[1]["id"])[0] == files[1] and len(again.list_events("ftjob-a", None, 10)[0]) == 5
    again.close()
    assert page([{"id": "a"}, {"id": "b"}], "nope", 5) == ([], False)
    assert new_id("file-").startswith("file-") and len(new_id("file-")) == 29


# ----------------------------------------------------------------------------- request checks


def test_upload_checks(client, app):
    assert_error(upload(client, purpose="nope"), 400, "purpose", message="purpose 'nope' is not one of")
    assert_error(upload(client, content=b""), 400, "file", message="empty")
    assert_error(client.post("/v1/files", data={"purpose": "fine-tune"}), 400, "file", message="Missing the 'file'")
    assert_error(upload(client, content=b"x" * 60_000), 413, "file", "file_too_large", "limit is 0.05 MB")
    assert_error(upload(client, content=b"x" * 200_000), 413, "file", "file_too_large")  # refused by its length
    files = Path(app.state.service.data_dir) / "files"
    assert not files.exists() or not list(files.iterdir())  # nothing refused is left on disk
    ok = upload(client, name="../../etc/pass wd;rm.jsonl")
    assert ok.status_code == 200 and ok.json()["filename"] == "pass_wd_rm.jsonl" and ok.json()["bytes"] == len(TRAIN)


@pytest.fixture
def file_id(client) -> str:
    return upload(client).json()["id"]


HP = "method.supervised.hyperparameters"
JOB_ERRORS = [  # (body changes, status, param, code, part of the message): OpenAI's codes and wording
    ({"model": "gpt-9"}, 400, "model", "model_not_available",
     "model 'gpt-9' is not available for fine-tuning or does not exist; this server fine-tunes tiny-llama as: "
     "gpt-4o-mini-2024-07-18, "),
    ({"model": "davinci-002"}, 400, "model", "model_not_available", "tiny-llama"),  # completion files: not here
    ({"model": None}, 400, "model", "missing_required_parameter", "Missing required parameter: 'model'."),
    ({"training_file": None}, 400, "training_file", "missing_required_parameter", "'training_file'"),
    ({"training_file": "file-nope"}, 400, "training_file", "invalid_file", "invalid training_file"),
    ({"training_file": 7}, 400, "training_file", "invalid_file", "no file 7"),
    ({"validation_file": "file-nope"}, 400, "validation_file", "invalid_file", "invalid validation_file"),
    ({"n_epochs": 3}, 400, "n_epochs", "unknown_parameter", "Unknown parameter: 'n_epochs'."),
    ({"suffix": "has space"}, 400, "suffix", "invalid_value", "use letters, digits"),
    ({"suffix": "a:b"}, 400, "suffix", "invalid_value", "ft:<model>:<organization>:<suffix>:<id>"),
    ({"suffix": ""}, 400, "suffix", "string_below_min_length", "minimum length 1"),
    ({"suffix": "x" * 65}, 400, "suffix", "string_above_max_length",
     "Invalid 'suffix': string too long. Expected a string with maximum length 64, but got a string with length 65"),
    ({"suffix": 5}, 400, "suffix", "invalid_type", "Invalid type for 'suffix': expected a string, but got an integer"),
    ({"seed": "7"}, 400, "seed", "invalid_type", "expected an integer, but got a string instead."),
    ({"seed": True}, 400, "seed", "invalid_type", "but got a boolean instead"),
    ({"seed": -1}, 400, "seed", "integer_below_min_value",
     "Invalid 'seed': integer below minimum value. Expected a value >= 0, but got -1 instead."),
    ({"seed": 2**31}, 400, "seed", "integer_above_max_value",
     "Expected a value <= 2147483647, but got 2147483648 instead."),
    ({"method": {"type": "reinforcement"}}, 400, "method.reinforcement.grader", "missing_required_parameter",
     "Missing required parameter: 'method.reinforcement.grader'."),
    ({"method": {"type": "magic"}}, 400, "method.type", "invalid_value", "Supported values are: 'supervised'"),
    ({"method": {"supervised": {}}}, 400, "method.type", "missing_required_parameter", "'method.type'"),
    ({"method": "supervised"}, 400, "method", "invalid_type", "expected an object"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, 400,
     f"{HP}.n_epochs", "integer_below_min_value", f"Invalid '{HP}.n_epochs': integer below minimum value. "
     "Expected a value >= 1, but got 0 instead."),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}}, 400,
     f"{HP}.batch_size", "integer_below_min_value", ">= 1, but got 0"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -0.5}}}},
     400, f"{HP}.learning_rate_multiplier", "decimal_below_min_value", "Expected a value > 0, but got -0.5"),
    ({"hyperparameters": {"n_epochs": 51}}, 400, "hyperparameters.n_epochs", "integer_above_max_value", "<= 50"),
    ({"hyperparameters": {"batch_size": 257}}, 400, "hyperparameters.batch_size", "integer_above_max_value", "<= 256"),
    ({"hyperparameters": {"batch_size": 2.5}}, 400, "hyperparameters.batch_size", "invalid_type",
     "expected one of 'auto' or an integer, but got a decimal"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, 400, "hyperparameters.learning_rate_multiplier",
     "decimal_below_min_value", "> 0"),
    ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, 400, "hyperparameters.learning_rate_multiplier",
     "invalid_type", "but got a string"),
    ({"hyperparameters": {"n_epochs": True}}, 400, "hyperparameters.n_epochs", "invalid_type", "a boolean"),
    ({"hyperparameters": {"warmup": 3}}, 400, "hyperparameters.warmup", "unknown_parameter",
     "Unknown parameter: 'hyperparameters.warmup'."),
    ({"hyperparameters": [1]}, 400, "hyperparameters", "invalid_type", "expected an object, but got an array"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3}}}}, 400, "hyperparameters", "invalid_value", "disagrees"),
    ({"integrations": [{"type": "mlflow", "wandb": {}}]}, 400, "integrations[0].type", "invalid_value",
     "Supported values are: 'wandb'."),
    ({"integrations": [{"type": "wandb"}]}, 400, "integrations[0].wandb", "missing_required_parameter", ""),
    ({"integrations": [{"type": "wandb", "wandb": {"name": "n"}}]}, 400, "integrations[0].wandb.project",
     "missing_required_parameter", "Missing required parameter: 'integrations[0].wandb.project'."),
    ({"integrations": {"type": "wandb", "wandb": {"project": "p", "tags": "not-a-list"}}}, 400,
     "integrations[0].wandb.tags", "invalid_type", "an array of strings"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}] * 6}, 400, "integrations",
     "array_above_max_length", "Expected an array with maximum length 5, but got an array with length 6"),
    ({"integrations": "wandb"}, 400, "integrations", "invalid_type", "expected an array"),
    ({"metadata": ["a"]}, 400, "metadata", "invalid_type", "expected an object"),
    ({"metadata": {"a": 1}}, 400, "metadata.a", "invalid_type", "expected a string, but got an integer"),
    ({"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata", "object_above_max_properties",
     "at most 16 properties, but got an object with 17"),
    ({"metadata": {"k" * 65: "v"}}, 400, "metadata", "string_above_max_length", "maximum length 64"),
    ({"metadata": {"k": "v" * 513}}, 400, "metadata.k", "string_above_max_length", "maximum length 512"),
]


@pytest.mark.parametrize("change,status,param,code,message", JOB_ERRORS, ids=[str(e[0])[:40] for e in JOB_ERRORS])
def test_job_request_errors_are_openai_400s(client, file_id, schemas, change, status, param, code, message):
    resp = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **change})
    assert_error(resp, status, param, code, message)
    check_schema(schemas, "ErrorResponse", resp.json())
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created


def test_other_request_errors(client, file_id, schemas):
    assert_error(client.post("/v1/fine_tuning/jobs", content=b"{not json"), 400, message="not JSON")
    assert_error(client.post("/v1/fine_tuning/jobs", json=[1]), 400, message="must be a JSON object")
    other = upload(client, purpose="batch").json()["id"]
    assert_error(client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": other}), 400,
                 "training_file", "invalid_file", "purpose 'batch', not 'fine-tune'")
    assert_error(client.get("/v1/files", params={"limit": 0}), 400, "limit", message="between 1 and 10000")
    assert_error(client.get("/v1/files", params={"limit": "abc"}), 400, "limit", message="limit: ")
    assert_error(client.get("/v1/files", params={"order": "sideways"}), 400, "order")
    assert_error(client.get("/v1/fine_tuning/jobs/x/events", params={"limit": 5}), 404, "fine_tuning_job_id",
                 "fine_tune_not_found")
    assert_error(client.get("/v1/fine_tuning/jobs", params={"limit": 101}), 400, "limit")
    assert_error(client.get("/v1/files/file-nope"), 404, "id", message="No such File object: file-nope")
    assert_error(client.get("/v1/files/file-nope/content"), 404, "id")
    assert_error(client.delete("/v1/files/file-nope"), 404, "id")
    assert_error(client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404, "fine_tuning_job_id", "fine_tune_not_found")
    for resp in (client.get("/v1/fine_tuning/jobs/ftjob-nope/checkpoints"),
                 client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel")):
        assert_error(resp, 404, "fine_tuning_job_id", "fine_tune_not_found")
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert_error(again, 400, "fine_tuning_job_id", "invalid_state", "has already been cancelled")
    assert_error(client.get("/v1/nothing-here"), 404, message="Not Found")
    assert_error(client.put("/v1/files"), 405, message="Method Not Allowed")
    no_key = client.get("/v1/files", headers={"Authorization": ""})
    assert_error(no_key, 401, code="invalid_api_key", message="Missing API key")
    assert_error(client.get("/v1/files", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key",
                 message="Incorrect API key provided.")
    assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
    for resp in (no_key, again):
        check_schema(schemas, "ErrorResponse", resp.json())


def test_responses_match_openai_schemas(client, file_id, app, schemas):
    check = lambda name, resp: (resp.status_code == 200 or pytest.fail(resp.text),  # noqa: E731
                                check_schema(schemas, name, resp.json()))
    check("OpenAIFile", client.get(f"/v1/files/{file_id}"))
    check("ListFilesResponse", client.get("/v1/files"))
    check("ListFilesResponse", client.get("/v1/files", params={"purpose": "vision"}))  # empty: "" ids
    body = {"model": "tiny-llama", "training_file": file_id, "validation_file": file_id, "suffix": "s-1", "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2,
                                                                                 "learning_rate_multiplier": 2}}},
            "integrations": [{"type": "wandb", "wandb": {"project": "p", "tags": ["a"]}}], "metadata": {"k": "v"}}
    job = client.post("/v1/fine_tuning/jobs", json=body)
    check("FineTuningJob", job)
    job = job.json()
    assert job["status"] == "validating_files" and job["seed"] == 3 and job["hyperparameters"] == {
        "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2.0}
    assert "expires_at" not in client.get(f"/v1/files/{file_id}").json()  # exclude_unset: no SDK-only nulls
    check("FineTuningJob", client.get(f"/v1/fine_tuning/jobs/{job['id']}"))
    check("ListPaginatedFineTuningJobsResponse", client.get("/v1/fine_tuning/jobs"))
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events")
    check("ListFineTuningJobEventsResponse", events)
    assert [(e["level"], e["message"]) for e in events.json()["data"]] == [
        ("info", f"Created fine-tuning job: {job['id']}")]  # the wandb integration is decided when training starts
    app.state.store.add_checkpoint(job["id"], 4, {
        "object": "fine_tuning.job.checkpoint", "id": "ftckpt-1", "created_at": 1, "step_number": 4,
        "fine_tuned_model_checkpoint": "ft:x:ckpt-step-4", "fine_tuning_job_id": job["id"],
        "metrics": {"step": 4, "train_loss": 1.5, "train_mean_token_accuracy": 0.5}})
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
    check("ListFineTuningJobCheckpointsResponse", ckpts)
    assert ckpts.json()["first_id"] == "ftckpt-1" and ckpts.json()["data"][0]["metrics"]["train_loss"] == 1.5
    check("FineTuningJob", client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    check("DeleteFileResponse", client.delete(f"/v1/files/{file_id}"))
    assert set(app.openapi()["paths"]) >= {"/v1/files", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs"}


def test_a_response_that_breaks_its_model_is_a_500(client, file_id, app, monkeypatch, caplog):
    monkeypatch.setattr(app.state.service, "get_file", lambda fid: {"id": fid, "object": "not-a-file"})
    with caplog.at_level(logging.ERROR, logger="serve.finetune_api"):
        resp = client.get(f"/v1/files/{file_id}")
    assert_error(resp, 500, type_="server_error", message="The server had an error")
    assert any(r.exc_info and "ResponseValidationError" in type(r.exc_info[1]).__name__ for r in caplog.records)


# ----------------------------------------------------------------------------- file content


def test_file_content_is_streamed_from_disk(cfg, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.finetune_api import create_app

    cfg.max_file_mb = 4
    app = create_app(cfg, None, run_worker=False)
    sent = []

    async def recording(scope, receive, send):  # the ASGI messages the app sends, as the server sees them
        async def spy(message):
            sent.append(message)
            await send(message)
        await app(scope, receive, spy)

    client = TestClient(recording)
    content = bytes(range(256)) * 4096  # 1 MiB
    fid = upload(client, content, name="big.bin").json()["id"]
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the content was read whole") if self.name == fid
                        else read_bytes(self))
    sent.clear()
    resp = client.get(f"/v1/files/{fid}/content")
    assert resp.status_code == 200 and resp.content == content
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["content-disposition"] == 'attachment; filename="big.bin"'
    assert int(resp.headers["content-length"]) == len(content)
    chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(chunks) >= 8 and max(len(m["body"]) for m in chunks) <= 256 * 1024  # in chunks, not at once
    part = client.get(f"/v1/files/{fid}/content", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == content[10:20]

    (Path(cfg.data_dir) / "files" / fid).unlink()  # the record is there, its bytes are gone
    assert_error(client.get(f"/v1/files/{fid}/content"), 500, type_="server_error", message="missing on the server")
    app.state.store.close()


# ----------------------------------------------------------------------------- logging


def all_text(record: logging.LogRecord) -> str:
    return logging.Formatter().format(record) + repr(record.args) + repr(record.__dict__)


def test_request_log_records_requests_but_never_the_key(client, file_id, caplog):
    with caplog.at_level(logging.DEBUG):
        assert client.get("/v1/files").status_code == 200
        assert client.get("/v1/files", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).status_code \
            == 200
        assert client.get("/health").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "serve.finetune_api.middleware"]
    assert any(line.endswith(" ms") and " GET /v1/files 200 " in line for line in lines), lines
    assert any(" GET /v1/files 401 " in line for line in lines) and any(" POST /v1/fine_tuning/jobs 200 " in line
                                                                      for line in lines)
    assert any(r.name == "serve.finetune_api.service" and "created" in r.getMessage() for r in caplog.records)
    health = [r for r in caplog.records if r.name == "serve.finetune_api.middleware" and "/health" in r.getMessage()]
    assert health and all(r.levelno == logging.DEBUG for r in health)
    for record in caplog.records:
        assert KEY not in all_text(record), record


def test_an_exception_in_a_route_is_a_500_envelope_with_its_traceback_logged(client, app, monkeypatch, caplog):
    def boom(*a):
        raise RuntimeError(f"boom with {KEY} in it")

    monkeypatch.setattr(app.state.service, "list_jobs", boom)
    with caplog.at_level(logging.INFO, logger="serve.finetune_api"):
        resp = client.get("/v1/fine_tuning/jobs")
    assert_error(resp, 500, type_="server_error", message="The server had an error while processing your request.")
    assert KEY not in resp.text and "boom" not in resp.text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and isinstance(errors[0].exc_info[1], RuntimeError)
    assert "GET /v1/fine_tuning/jobs: internal error" in errors[0].getMessage()
    assert "Traceback" in logging.Formatter().format(errors[0])
    assert any(" GET /v1/fine_tuning/jobs 500 " in r.getMessage() for r in caplog.records)

    # the server's own formatter masks a key that a message or a traceback quotes
    from tunekit.logs import RedactingFormatter

    text = RedactingFormatter("%(levelname)s %(message)s", [KEY, None, "ab"]).format(errors[0])
    assert KEY not in text and "boom with [redacted] in it" in text and "Traceback" in text


def test_setup_logging_levels_and_masking(capsys):
    from serve.finetune_api.cli import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("serve.finetune_api").level
    try:
        setup_logging("debug", [KEY])
        logging.getLogger("serve.finetune_api.worker").debug("job with %s", KEY)
        logging.getLogger("some.library").info("not shown")
        logging.getLogger("some.library").warning("shown")
        err = capsys.readouterr().err
        assert "DEBUG serve.finetune_api.worker: job with [redacted]" in err and KEY not in err
        assert "not shown" not in err and "WARNING some.library: shown" in err
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("serve.finetune_api").setLevel(saved[2])


# ----------------------------------------------------------------------------- the worker


def test_metrics_of_a_run_in_openai_shapes(tmp_path):
    from serve.finetune_api.metrics import (last_checkpoint, metrics_data, metrics_message, model_name,
                                            results_csv, step_metrics)

    records = [{"step": 2, "loss": 2.5, "mean_token_accuracy": 0.25}, {"step": 4, "loss": 2.0},
               {"step": 4, "eval_loss": 1.5, "eval_mean_token_accuracy": 0.5}, {"step": 5, "epoch": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    assert metrics_data(records[0], 8) == {"step": 2, "total_steps": 8, "train_loss": 2.5,
                                           "train_mean_token_accuracy": 0.25}
    assert metrics_data(records[3], 8) is None
    assert metrics_message(metrics_data(records[2], 8)) == "Step 4/8: validation loss=1.50"  # OpenAI's wording
    assert metrics_message({"step": 1, "total_steps": 90, "train_loss": 2.0312, "valid_loss": 2.5}) == \
        "Step 1/90: training loss=2.03, validation loss=2.50"
    assert step_metrics(tmp_path, 4) == {"step": 4, "train_loss": 2.0, "train_mean_token_accuracy": 0.25,
                                         "valid_loss": 1.5, "valid_mean_token_accuracy": 0.5}
    assert results_csv(tmp_path).decode() == ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                                              "2,2.5,0.25,,\n4,2.0,,1.5,0.5\n5,,,,\n")
    for step, done in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if done:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path).name == "checkpoint-8"
    # OpenAI's ft:<model>:<organization>:<suffix>:<id>, the suffix part empty without one
    assert model_name({"model": "m", "id": "ftjob-1", "user_provided_suffix": None}) == "ft:m:personal::1"
    assert model_name({"model": "gpt-4o-mini-2024-07-18", "id": "ftjob-Ab9", "user_provided_suffix": "s-1"},
                      "acme") == "ft:gpt-4o-mini-2024-07-18:acme:s-1:Ab9"


def new_job(app, client, file_id) -> dict:
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                     "hyperparameters": {"n_epochs": 1}}).json()


def test_a_failed_training_is_logged_with_its_traceback(app, client, file_id, monkeypatch, caplog):
    import serve.finetune_api.worker as worker_module

    script = "import sys; print('loading'); raise RuntimeError('training exploded')"
    monkeypatch.setattr(worker_module, "accelerate_command", lambda config: [sys.executable, "-c", script])
    store, worker = app.state.store, app.state.worker
    job = new_job(app, client, file_id)
    with caplog.at_level(logging.INFO, logger="serve.finetune_api"):
        worker.validate(store.get_job(job["id"]))
        assert store.get_job(job["id"])["status"] == "queued"
        worker.run(store.get_job(job["id"]))
    done = store.get_job(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "training_failed"
    assert "RuntimeError: training exploded" in done["error"]["message"]
    # resolved for 12 examples as OpenAI would: batch_size 0.2% of 12 -> 1, gpt-4o-mini's multiplier 1.8
    assert done["hyperparameters"] == {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.8}
    assert done["method"]["supervised"]["hyperparameters"] == done["hyperparameters"]
    logged = [r for r in caplog.records if r.name == "serve.finetune_api.worker"]
    tail = [r for r in logged if r.levelno == logging.ERROR]
    assert len(tail) == 1 and "exited with status 1" in tail[0].getMessage()
    assert "Traceback (most recent call last)" in tail[0].getMessage() and "training exploded" in tail[0].getMessage()
    assert any("training started" in r.getMessage() for r in logged)
    assert any(r.levelno == logging.WARNING and "failed (training_failed)" in r.getMessage() for r in logged)
    for record in caplog.records:
        assert KEY not in all_text(record)


def test_an_internal_error_in_the_worker_fails_the_job_and_is_logged(app, client, file_id, monkeypatch, caplog):
    store, worker = app.state.store, app.state.worker
    monkeypatch.setattr(worker, "validate", lambda job: 1 / 0)
    job = new_job(app, client, file_id)
    with caplog.at_level(logging.INFO, logger="serve.finetune_api"):
        worker.start()
        try:
            deadline = time.time() + 20
            while store.get_job(job["id"])["status"] != "failed":
                assert time.time() < deadline
                time.sleep(0.05)
        finally:
            worker.shutdown()
    assert store.get_job(job["id"])["error"]["code"] == "server_error"
    errors = [r for r in caplog.records if r.name == "serve.finetune_api.worker" and r.exc_info]
    assert errors and isinstance(errors[0].exc_info[1], ZeroDivisionError) and job["id"] in errors[0].getMessage()


def test_invalid_training_file_fails_validation_without_training(app, client, monkeypatch):
    bad = upload(client, content=TRAIN + b"not json\n").json()["id"]
    job = new_job(app, client, bad)
    app.state.worker.validate(app.state.store.get_job(job["id"]))
    done = app.state.store.get_job(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_training_file"
    assert "line 13: invalid_json" in done["error"]["message"]


def test_the_app_without_its_worker_leaves_jobs_queued(app, client, file_id):
    from fastapi.testclient import TestClient

    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:  # runs the lifespan
        job = new_job(app, c, file_id)
        time.sleep(0.5)
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "validating_files"
    assert not app.state.worker.thread.is_alive()


# ----------------------------------------------------------------------------- the command line


def test_command_line(tmp_path, monkeypatch, capsys):
    import importlib

    import serve.finetune_api as api
    from tunekit.cli import COMMANDS
    from tunekit.config import load_config
    from tunekit.errors import UserError

    module = COMMANDS["api"][0]
    assert module == "serve.finetune_api" and importlib.import_module(module).main is api.main
    assert api.parser().parse_args(["--log-level", "DEBUG"]).log_level == "debug"
    with pytest.raises(SystemExit) as e:
        api.parser().parse_args(["--log-level", "loud"])
    assert e.value.code == 2
    bad = tmp_path / "api.yaml"
    bad.write_text("log_level: loud\n")
    with pytest.raises(UserError, match="log_level is 'loud'; use one of 'debug'"):
        load_config(api.FinetuneAPIConfig, bad)
    monkeypatch.delenv("TUNEKIT_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(UserError, match="needs an API key"):
        api.main(["--host", "0.0.0.0", "--port", "1"])
    with pytest.raises(UserError, match="sft_config: nope.yaml not found"):
        api.main(["--sft-config", "nope.yaml"])
    monkeypatch.setitem(sys.modules, "fastapi", None)  # a base install: `tunekit api` names the extra
    from tunekit.cli import main as tunekit_main

    assert tunekit_main(["api", "--help"]) == 2 and 'pip install "tunekit-ft[serve]"' in capsys.readouterr().err


def test_api_flags_are_generated_from_the_config_fields(tmp_path):
    """Every key of the API's config is a flag (but the mappings sft_overrides and models); flags beat the YAML."""
    import dataclasses

    from serve.finetune_api.cli import parser
    from serve.finetune_api.config import FinetuneAPIConfig
    from tunekit.config import flag_overrides, load_config

    args = parser().parse_args(["--max-steps", "7", "--no-result-base64", "--log-level", "WARNING",
                                "--data_dir", "d", "--config", str(tmp_path / "api.yaml")])
    assert set(args.config_flags) == {f.name for f in dataclasses.fields(FinetuneAPIConfig)} - {"sft_overrides",
                                                                                               "models"}
    (tmp_path / "api.yaml").write_text("max_steps: 3\nport: 8111\nsft_overrides: {max_length: 64}\n")
    cfg = load_config(FinetuneAPIConfig, args.config, flag_overrides(args, args.config_flags))
    assert (cfg.max_steps, cfg.port, cfg.result_base64, cfg.log_level, cfg.data_dir) == (7, 8111, False, "warning", "d")
    assert cfg.sft_overrides == {"max_length": 64}


# ----------------------------------------------------------------------------- OpenAI's model names


def profiles(tmp_path, **models) -> dict:
    """Profiles named after their base: {name: path of a train/sft.py YAML}."""
    out = {}
    for name, base in models.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"model_name_or_path: {base}\nper_device_train_batch_size: 4\nlearning_rate: 0.001\n")
        out[name] = str(path)
    return out


def test_the_models_map_names_the_base_and_its_profiles(cfg, tmp_path):
    from serve.finetune_api.config import OPENAI_MODELS, base_names, profile_for
    from tunekit.errors import UserError

    # no models: every OpenAI name and the local base's own names train with sft_config
    names = base_names(cfg)
    assert names[:len(OPENAI_MODELS)] == list(OPENAI_MODELS) and names[-2:] == ["tiny-llama", str(tmp_path / "tiny-llama")]
    assert {profile_for(cfg, n) for n in names} == {cfg.sft_config}
    assert profile_for(cfg, "davinci-002") is profile_for(cfg, "gpt-9") is profile_for(cfg, "default") is None
    p = profiles(tmp_path, a=tmp_path / "tiny-llama", b=f"{tmp_path / 'tiny-llama'}/", other="Qwen/Qwen2.5-1.5B-Instruct")
    cfg.models = {"gpt-4o-mini-2024-07-18": p["a"], "my-name": p["b"], "default": p["b"]}
    assert profile_for(cfg, "gpt-4o-mini-2024-07-18") == profile_for(cfg, "gpt-4o-mini") == p["a"]  # the alias too
    assert profile_for(cfg, "gpt-3.5-turbo-0125") == profile_for(cfg, "tiny-llama") == p["b"]  # the default
    assert base_names(cfg)[:3] == ["gpt-4o-mini-2024-07-18", "my-name", "gpt-4o-2024-08-06"]
    cfg.models = {"gpt-4o-mini-2024-07-18": p["a"]}  # no default: only the listed names and the base's own
    assert profile_for(cfg, "gpt-4.1-2025-04-14") is None and profile_for(cfg, "tiny-llama") == cfg.sft_config
    assert base_names(cfg) == ["gpt-4o-mini-2024-07-18", "tiny-llama", str(tmp_path / "tiny-llama")]
    cfg.models = {"gpt-4o-mini-2024-07-18": p["a"], "gpt-4.1-2025-04-14": p["other"]}
    with pytest.raises(UserError) as e:  # one server, one base model (one vLLM server)
        base_names(cfg)
    assert str(e.value).startswith(f"models.gpt-4.1-2025-04-14: {p['other']} trains Qwen/Qwen2.5-1.5B-Instruct but "
                                   f"sft_config ({cfg.sft_config}) trains {tmp_path / 'tiny-llama'}; one server")
    assert "\n" not in str(e.value)
    cfg.sft_overrides = {"model_name_or_path": "/m"}  # the overrides apply to every profile: they agree
    assert base_names(cfg)[-2:] == ["m", "/m"]
    cfg.models, cfg.sft_overrides = {"gpt-4o": str(tmp_path / "nope.yaml")}, {}
    with pytest.raises(UserError, match=r"^models.gpt-4o: .*nope.yaml not found"):
        base_names(cfg)
    cfg.models, cfg.organization = {}, "my org"
    with pytest.raises(UserError, match="^organization: 'my org'; use letters"):
        base_names(cfg)


def test_a_map_whose_profiles_disagree_refuses_to_start(cfg, tmp_path):
    from serve.finetune_api import create_app
    from tunekit.errors import UserError

    p = profiles(tmp_path, other="Qwen/Qwen2.5-1.5B-Instruct")
    cfg.models = {"default": p["other"], "gpt-4o-mini-2024-07-18": cfg.sft_config}
    with pytest.raises(UserError, match=r"^models.gpt-4o-mini-2024-07-18: .* trains .*tiny-llama but models.default"):
        create_app(cfg, KEY, run_worker=False)


def test_jobs_show_the_openai_model_asked_for_and_train_its_profile(cfg, tmp_path):
    from fastapi.testclient import TestClient

    from serve.finetune_api import create_app

    p = profiles(tmp_path, a=tmp_path / "tiny-llama")
    cfg.models = {"gpt-4o-mini-2024-07-18": p["a"], "default": cfg.sft_config}
    app = create_app(cfg, KEY, run_worker=False)
    client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    fid = upload(client).json()["id"]
    shown = {}
    for asked in ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "gpt-3.5-turbo", "gpt-4.1-nano-2025-04-14", "tiny-llama",
                  str(tmp_path / "tiny-llama")):
        job = client.post("/v1/fine_tuning/jobs", json={"model": asked, "training_file": fid}).json()
        shown[asked] = (job["model"], app.state.store.get_private(job["id"])["profile"])
    assert shown == {"gpt-4o-mini-2024-07-18": ("gpt-4o-mini-2024-07-18", p["a"]),
                     "gpt-4o-mini": ("gpt-4o-mini-2024-07-18", p["a"]),  # an alias reads as its snapshot
                     "gpt-3.5-turbo": ("gpt-3.5-turbo-0125", cfg.sft_config),
                     "gpt-4.1-nano-2025-04-14": ("gpt-4.1-nano-2025-04-14", cfg.sft_config),
                     "tiny-llama": ("tiny-llama", cfg.sft_config), str(tmp_path / "tiny-llama"): ("tiny-llama", cfg.sft_config)}
    app.state.store.close()


# ----------------------------------------------------------------------------- OpenAI's hyperparameters


def test_auto_hyperparameters_resolve_with_openai_defaults():
    from serve.finetune_api.hyperparameters import auto_batch_size, resolve

    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert resolve(auto, 10, "gpt-4o-mini-2024-07-18") == {"n_epochs": 10, "batch_size": 1,
                                                           "learning_rate_multiplier": 1.8}
    assert resolve(auto, 10_003, "gpt-3.5-turbo-0125") == {"n_epochs": 2, "batch_size": 20,
                                                           "learning_rate_multiplier": 2.0}
    assert resolve({}, 500, "tiny-llama") == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
    assert resolve({"n_epochs": 4, "batch_size": 3, "learning_rate_multiplier": 0.5}, 10, "m") == {
        "n_epochs": 4, "batch_size": 3, "learning_rate_multiplier": 0.5}
    assert [auto_batch_size(n) for n in (0, 249, 250, 749, 750, 10_000, 127_999, 10**6)] == [1, 1, 1, 1, 2, 20, 256, 256]
    assert resolve(auto, 200_000, "m")["n_epochs"] == 1


def test_hyperparameters_map_onto_the_profile():
    from serve.finetune_api.hyperparameters import describe, plan, split_batch

    assert [split_batch(b, 16) for b in (1, 8, 16, 20, 32, 48, 17, 256)] == [
        (1, 1), (8, 1), (16, 1), (10, 2), (16, 2), (16, 3), (1, 17), (16, 16)]
    sft = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}
    hp = {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 1.8}
    assert plan(sft, hp, 100, "gpt-4o-mini-2024-07-18") == {
        "num_train_epochs": 3, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3, "max_steps": 21, "steps_for_epochs": 21, "profile_learning_rate": 1e-3,
        "batch_scale": 1.0}  # "auto" at the profile's own batch: the profile's learning rate
    small = plan(sft, {**hp, "batch_size": 1, "learning_rate_multiplier": 0.9}, 100, "m", max_steps=60)
    assert (small["learning_rate"], small["max_steps"], small["steps_for_epochs"]) == (0.00025, 60, 300)
    big = plan({**sft, "gradient_accumulation_steps": 2}, {**hp, "batch_size": 256, "learning_rate_multiplier": 2},
               1000, "gpt-3.5-turbo-0125")
    assert (big["per_device_train_batch_size"], big["gradient_accumulation_steps"], big["learning_rate"],
            big["max_steps"]) == (16, 16, 0.002, 12)  # x 2 at most for the batch
    line = describe(small, {**hp, "batch_size": 1, "learning_rate_multiplier": 0.9}, "m")
    assert line.startswith("n_epochs 3, batch_size 1 (1 per step x 1 accumulated), learning_rate_multiplier 0.9 -> "
                           "learning rate 0.00025 (the profile's 0.001 x 0.9 / 1.8, OpenAI's default, x 0.5 for the "
                           "batch size); 60 steps (the server caps jobs at max_steps; the epochs would take 300)")


def test_both_spellings_of_hyperparameters_are_accepted(client, file_id):
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    for body in ({"hyperparameters": hp}, {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}},
                 {"hyperparameters": hp, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}},
                 {"hyperparameters": {}, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}):
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **body})
        assert job.status_code == 200, job.text
        assert job.json()["hyperparameters"] == job.json()["method"]["supervised"]["hyperparameters"] == hp
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "seed": 0,
                                                    "method": {"type": "supervised"},
                                                    "hyperparameters": {"n_epochs": None}}).json()
    assert job["seed"] == 0 and job["hyperparameters"] == {k: "auto" for k in hp}


def test_validation_resolves_the_hyperparameters_and_the_job_config_uses_them(app, client, file_id, schemas):
    store, worker = app.state.store, app.state.worker
    job = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini-2024-07-18", "training_file": file_id,
                                                    "validation_file": file_id, "seed": 42, "suffix": "s",
                                                    "hyperparameters": {"batch_size": 8}}).json()
    worker.validate(store.get_job(job["id"]))
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    check_schema(schemas, "FineTuningJob", done)
    resolved = {"n_epochs": 8, "batch_size": 8, "learning_rate_multiplier": 1.8}  # 12 examples: 100 // 12 epochs
    assert done["status"] == "queued" and done["hyperparameters"] == resolved
    assert done["method"] == {"type": "supervised", "supervised": {"hyperparameters": resolved}}
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages == ["Files validated, moving job to queued state",
                        f"Validating training file: {file_id} and validation file: {file_id}",
                        f"Created fine-tuning job: {job['id']}"]
    run_dir = Path(app.state.service.data_dir) / "runs" / job["id"]
    run_dir.parent.mkdir(parents=True)
    path, info = worker.job_config(store.get_job(job["id"]), run_dir)
    import yaml

    sft = yaml.safe_load(path.read_text())
    # the profile: per-device 4, learning rate 0.001; batch 8 -> 4 x 2, the rate x sqrt(8 / 4)
    assert {k: sft[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                                "num_train_epochs", "max_steps", "seed", "report_to")} == {
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 0.00141421,
        "num_train_epochs": 8, "max_steps": 16, "seed": 42, "report_to": "none"}
    assert info["total_steps"] == 16 and info["hyperparameters"] == resolved and info["env"] == {}
    assert info["events"] == [("info", f"Training tiny-llama with {app.state.service.cfg.sft_config}: n_epochs 8, "
                               "batch_size 8 (4 per step x 2 accumulated), learning_rate_multiplier 1.8 -> learning "
                               "rate 0.00141421 (the profile's 0.001 x 1.8 / 1.8, OpenAI's default, x 1.4142 for the "
                               "batch size); 16 steps")]


def test_a_wandb_integration_logs_when_it_can_and_says_why_not(app, client, file_id, monkeypatch):
    import yaml

    import serve.finetune_api.integrations as integrations

    store, worker = app.state.store, app.state.worker
    wandb = {"project": "gpt-pricer", "name": "run-1", "entity": "team", "tags": ["a,b"]}
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "integrations": [
        {"type": "wandb", "wandb": wandb}, {"type": "wandb", "wandb": {"project": "second"}}]}).json()
    assert job["integrations"][0] == {"type": "wandb", "wandb": wandb}
    worker.validate(store.get_job(job["id"]))
    run_dir = Path(app.state.service.data_dir) / "runs" / job["id"]
    run_dir.parent.mkdir(parents=True)
    monkeypatch.setattr(integrations.importlib.util, "find_spec", lambda name: None)
    _, info = worker.job_config(store.get_job(job["id"]), run_dir)
    assert info["env"] == {} and info["events"][1:] == [
        ("warn", "2 Weights & Biases integrations given; this job logs to the first (project gpt-pricer)"),
        ("warn", "Weights & Biases integration skipped: the wandb package is not installed on this server (pip "
                 "install wandb); the job trains without it")]
    monkeypatch.setattr(integrations.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("NETRC", str(run_dir / "no-netrc"))
    assert integrations.wandb_ready() == (False, "this server has no wandb login (set WANDB_API_KEY or run "
                                                 "`wandb login`)")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    path, info = worker.job_config(store.get_job(job["id"]), run_dir)
    sft = yaml.safe_load(path.read_text())
    assert (sft["report_to"], sft["run_name"]) == (["wandb"], "run-1")
    assert info["env"] == {"WANDB_PROJECT": "gpt-pricer", "WANDB_ENTITY": "team", "WANDB_DIR": str(run_dir),
                           "WANDB_TAGS": f"a b,openai/finetune,openai/tiny-llama,openai/{job['id']}"}
    assert info["events"][-1] == ("info", "Weights & Biases: logging to project gpt-pricer of team as run run-1, online")


# ----------------------------------------------------------------------------- OpenAI's outputs


def test_file_validation_failures_read_like_openai(app, client):
    store, worker = app.state.store, app.state.worker
    few = upload(client, content=TRAIN[:len(TRAIN) // 2]).json()["id"]  # 6 examples
    bad = upload(client, content=TRAIN + b'{"messages": [{"role": "user", "content": "q"}]}\n').json()["id"]
    good = upload(client).json()["id"]
    cases = [({"training_file": few}, ("invalid_n_examples", "training_file",
                                      "Training file has 6 example(s), but must have at least 10 examples")),
             ({"training_file": good, "validation_file": bad},
              ("invalid_validation_file", "validation_file", "The job failed due to an invalid validation file. "
               "Invalid file format: line 13: example_missing_assistant_message: no assistant message to learn from")),
             ({"training_file": good, "validation_file": few}, None)]  # a validation file needs no 10 examples
    for body, error in cases:
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **body}).json()
        worker.validate(store.get_job(job["id"]))
        done = store.get_job(job["id"])
        if error is None:
            assert done["status"] == "queued" and done["error"] is None
            continue
        assert done["status"] == "failed" and (done["error"]["code"], done["error"]["param"]) == error[:2]
        assert done["error"]["message"] == error[2]
        assert store.list_events(job["id"], None, 1)[0][0]["message"] == f"Job failed: {error[2]}"


def test_a_run_becomes_openai_events_checkpoints_and_results(app, client, file_id, monkeypatch, tmp_path, schemas):
    import base64

    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    store, worker = app.state.store, app.state.worker
    job = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini-2024-07-18", "training_file": file_id,
                                                    "suffix": "custom_suffix"}).json()
    worker.validate(store.get_job(job["id"]))
    store.update_job(job["id"], status="running")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    name = f"ft:gpt-4o-mini-2024-07-18:personal:custom_suffix:{job['id'].removeprefix('ftjob-')}"
    records = [{"step": 2, "loss": 2.0312, "mean_token_accuracy": 0.5, "num_tokens": 100},
               {"step": 4, "loss": 1.5, "mean_token_accuracy": 0.6, "num_tokens": 200},
               {"step": 4, "eval_loss": 1.25, "eval_mean_token_accuracy": 0.7}]
    import types

    import serve.finetune_api.worker as worker_module

    seen, clock = {"lines": 0}, iter([1000.0, 1010.0])
    monkeypatch.setattr(worker_module, "time", types.SimpleNamespace(time=lambda: next(clock, 1010.0)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "checkpoint-4").mkdir()
    (run_dir / "checkpoint-4" / "trainer_state.json").write_text("{}")
    worker.collect(job["id"], run_dir, 12, seen)
    worker.collect(job["id"], run_dir, 12, seen)  # nothing new: nothing twice
    running = store.get_job(job["id"])
    assert running["estimated_finish"] == 1010 + 8 * 10 // 2  # 2 steps in 10 s, 8 to go
    check_schema(schemas, "FineTuningJob", running)
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    check_schema(schemas, "ListFineTuningJobCheckpointsResponse", ckpts)
    assert [(c["fine_tuned_model_checkpoint"], c["metrics"]) for c in ckpts["data"]] == [
        (f"{name}:ckpt-step-4", {"step": 4, "train_loss": 1.5, "train_mean_token_accuracy": 0.6, "valid_loss": 1.25,
                                 "valid_mean_token_accuracy": 0.7})]
    assert ckpts["data"][0]["id"].startswith("ftckpt_")
    (run_dir / "summary.json").write_text(json.dumps({"train_tokens": 4480.0}))
    worker.succeed(store.get_job(job["id"]), run_dir)
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    check_schema(schemas, "FineTuningJob", done)
    assert (done["status"], done["fine_tuned_model"], done["trained_tokens"], done["estimated_finish"]) == (
        "succeeded", name, 4480, None)
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert [e["message"] for e in reversed(events)][3:] == [
        "Step 2/12: training loss=2.03", "Step 4/12: training loss=1.50", "Step 4/12: validation loss=1.25",
        f"Checkpoint created at step 4 with Snapshot ID: {name}:ckpt-step-4", f"New fine-tuned model created: {name}",
        "The job has successfully completed"]
    result = client.get(f"/v1/files/{done['result_files'][0]}/content").content
    assert base64.b64decode(result).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy", "2,2.0312,0.5,,", "4,1.5,0.6,1.25,0.7"]
    assert json.loads((tmp_path / "registry.json").read_text())["local"]["finetuned"]["model"] == name


def test_a_checkpoint_saved_while_the_metrics_are_read_comes_after_its_steps_metrics(app, client, file_id,
                                                                                     monkeypatch, tmp_path):
    """train/sft.py logs step 4, then saves checkpoint-4, while the worker's thread waits for the CPU between
    reading metrics.jsonl and listing the checkpoints: the events keep OpenAI's order all the same."""
    store, worker = app.state.store, app.state.worker
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()
    worker.validate(store.get_job(job["id"]))
    store.update_job(job["id"], status="running")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 2, "loss": 2.0, "mean_token_accuracy": 0.5, "num_tokens": 100}) + "\n")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        text = real(self, *args, **kwargs)
        if self == metrics and not (run_dir / "checkpoint-4").exists():  # the run goes on meanwhile
            with metrics.open("a") as f:
                f.write(json.dumps({"step": 4, "loss": 1.5, "mean_token_accuracy": 0.6, "num_tokens": 200}) + "\n")
            (run_dir / "checkpoint-4").mkdir()
            (run_dir / "checkpoint-4" / "trainer_state.json").write_text("{}")
        return text

    monkeypatch.setattr(Path, "read_text", read_text)
    seen = {"lines": 0}
    worker.collect(job["id"], run_dir, 12, seen)  # reads step 2; checkpoint-4 (and step 4) come meanwhile
    worker.collect(job["id"], run_dir, 12, seen)
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert [e["message"].split(" with ")[0] for e in reversed(events) if e["message"].startswith(("Step", "Check"))] \
        == ["Step 2/12: training loss=2.00", "Step 4/12: training loss=1.50", "Checkpoint created at step 4"]


# ----------------------------------------------------------------------------- devices, slots, queue order


def test_devices_resolve_from_the_gpus_found_the_config_and_vllm(cfg, tmp_path, monkeypatch, caplog):
    import dataclasses
    import subprocess
    import types

    import serve.finetune_api.slots as slots
    from tunekit.errors import UserError

    def devices(gpus=None, **changes):
        return slots.resolve_devices(dataclasses.replace(cfg, **changes), gpus)

    # auto: the CPU without a GPU; with GPUs, all but vLLM's (the first) when the API starts vLLM itself
    assert devices([]) == ["cpu"] and devices([], start_vllm=False) == ["cpu"]
    assert devices(["0", "1", "2"]) == ["1", "2"] and devices(["0"]) == ["0"]  # one GPU: shared, as before
    assert devices(["0", "1"], start_vllm=False) == ["0", "1"]
    assert devices(["0", "1"], vllm_url="http://127.0.0.1:8000/v1") == ["0", "1"]  # a vLLM elsewhere
    serve = tmp_path / "serve.yaml"
    serve.write_text("server:\n  tensor_parallel_size: 2\n")
    assert devices(["0", "1", "2", "3"], serve_config=str(serve)) == ["2", "3"]
    serve.write_text("server:\n  device: cpu\n")
    assert devices(["0", "1"], serve_config=str(serve)) == ["0", "1"]
    # the GPUs found: nvidia-smi -L, narrowed by the server's CUDA_VISIBLE_DEVICES (up to a hidden entry)
    assert slots.visible_gpus({}, ["0", "1"]) == ["0", "1"] and slots.visible_gpus({}, []) == []
    for visible, want in [("3,5", ["3", "5"]), ("", []), ("-1", []), ("1,-1,2", ["1"]), ("GPU-ab12", ["GPU-ab12"])]:
        assert slots.visible_gpus({"CUDA_VISIBLE_DEVICES": visible}, ["0", "1", "2", "3", "4", "5"]) == want
    assert devices(slots.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}, ["0", "1"])) == ["5"]  # vLLM gets 3
    smi = "GPU 0: NVIDIA H200 (UUID: GPU-1)\n  MIG 1g.18gb Device 0: (UUID: MIG-2)\nGPU 1: NVIDIA H200 (UUID: GPU-3)\n"
    monkeypatch.setattr(slots.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(slots.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=smi))
    assert slots.nvidia_gpus() == ["0", "1"]
    monkeypatch.setattr(slots.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(subprocess.TimeoutExpired("x", 1)))
    assert slots.nvidia_gpus() == []
    monkeypatch.setattr(slots.shutil, "which", lambda name: None)
    assert slots.nvidia_gpus() == []
    # an explicit list pins those GPUs (vLLM's too, with a warning); cpu is one slot of its own
    with caplog.at_level(logging.WARNING, logger="serve.finetune_api.worker"):
        assert devices(["0", "1"], devices=["0", "1"]) == ["0", "1"]
    assert any("GPU 0, which the vLLM server" in r.getMessage() for r in caplog.records)
    assert devices(["0", "1"], devices=[" 1 "]) == ["1"] and devices(["0"], devices=["CPU"]) == ["cpu"]
    for bad, why in [([], "list GPUs"), ([""], "list GPUs"), (["cpu", "0"], "a slot of its own"),
                     (["0", "0"], "names a GPU twice")]:
        with pytest.raises(UserError, match=why):
            devices([], devices=bad)
    assert slots.running_limit(cfg, ["0", "1"]) == 2 and slots.running_limit(dataclasses.replace(cfg, max_running=3),
                                                                            ["cpu"]) == 3
    for bad in (0, -1, True):
        with pytest.raises(UserError, match="max_running"):
            slots.running_limit(dataclasses.replace(cfg, max_running=bad), ["0"])
    with pytest.raises(UserError, match="queue_order: 'lifo'; use one of fifo, shortest_first"):
        slots.check_order("lifo")
    from serve.finetune_api import create_app

    with pytest.raises(UserError, match="names a GPU twice"):  # at start-up, as the other config mistakes
        create_app(dataclasses.replace(cfg, devices=["1", "1"]), KEY, run_worker=False)
    assert create_app(cfg, KEY, run_worker=False).state.worker.slots.devices == ["cpu"]  # no GPU on this machine


def queued_jobs(store, n: int) -> list[str]:
    from serve.finetune_api.store import new_id

    ids = []
    for _ in range(n):
        ids.append(new_id("ftjob-"))
        store.add_job({"id": ids[-1], "status": "queued"}, {})
    return ids


def test_claims_are_atomic_balanced_and_capped(tmp_path):
    import threading

    from serve.finetune_api.slots import Slots
    from serve.finetune_api.store import Store

    store = Store(tmp_path / "state.db")
    ids = queued_jobs(store, 20)
    slots = Slots(["0", "1"], 100)
    claimed, start = [], threading.Barrier(8)

    def claimer():
        start.wait()
        while (got := slots.claim(store, "fifo", lambda job: 0)):
            claimed.append(got)

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j["id"] for j, _ in claimed) == sorted(ids)  # every job once, none twice
    assert [d for _, d in claimed].count("0") == 10 and slots.jobs == {j["id"]: d for j, d in claimed}
    for job, device in claimed:
        assert store.get_private(job["id"]) == {"claimed_by": slots.token, "device": device}
        assert store.get_job(job["id"])["status"] == "queued"  # until its process starts
    # an earlier server's claim (a job requeued after a restart) is not this worker's: it is claimed again
    again = Slots(["0"], 1)
    assert again.claim(store, "fifo", lambda job: 0)[0]["id"] == ids[0] and again.free() is None

    # max_running: at most that many at once; above the number of devices they share, the least busy first
    store2 = Store(tmp_path / "two.db")
    ids = queued_jobs(store2, 4)
    one = Slots(["0", "1"], 1)
    assert one.claim(store2, "fifo", lambda job: 0) == (store2.get_job(ids[0]), "0")
    assert one.claim(store2, "fifo", lambda job: 0) is None
    one.release(ids[0])
    assert one.claim(store2, "fifo", lambda job: 0)[1] == "0"
    store3 = Store(tmp_path / "three.db")
    ids = queued_jobs(store3, 5)
    three = Slots(["0", "1"], 3)
    assert [three.claim(store3, "fifo", lambda job: 0)[1] for _ in range(3)] == ["0", "1", "0"]
    assert three.claim(store3, "fifo", lambda job: 0) is None
    three.release(ids[1])  # GPU 1's job ended: the next goes there
    assert three.claim(store3, "fifo", lambda job: 0) == (store3.get_job(ids[3]), "1")


def test_queue_order_fifo_or_shortest_first(app, client, file_id):
    from serve.finetune_api.slots import next_job

    jobs = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    steps = {"a": 9, "b": 3, "c": 3}
    assert next_job(jobs, "fifo", lambda j: steps[j["id"]])["id"] == "a"
    assert next_job(jobs, "shortest_first", lambda j: steps[j["id"]])["id"] == "b"  # ties: the older first
    assert next_job([], "fifo", lambda j: 0) is None
    # the worker's key: the steps its plan trains (12 examples, batch 1: 12 per epoch), less a checkpoint's
    store, worker = app.state.store, app.state.worker
    long_ = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 3, "batch_size": 1}}).json()
    short = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 1, "batch_size": 1}}).json()
    for job in (long_, short):
        worker.validate(store.get_job(job["id"]))
    assert [worker.steps(store.get_job(j["id"])) for j in (long_, short)] == [36, 12]
    assert worker.slots.claim(store, "shortest_first", worker.steps)[0]["id"] == short["id"]
    worker.slots.release(short["id"])
    store.update_job(short["id"], private={"claimed_by": None})
    assert worker.slots.claim(store, "fifo", worker.steps)[0]["id"] == long_["id"]
    worker.slots.release(long_["id"])
    store.update_job(long_["id"], private={"claimed_by": None})
    run_dir = Path(app.state.service.data_dir) / "runs" / long_["id"]  # a resumed run: 30 of its 36 steps done
    (run_dir / "checkpoint-30").mkdir(parents=True)
    (run_dir / "checkpoint-30" / "trainer_state.json").write_text("{}")
    store.update_job(long_["id"], private={"run_dir": str(run_dir)})
    worker.steps_left.clear()
    assert worker.steps(store.get_job(long_["id"])) == 6
    assert worker.slots.claim(store, "shortest_first", worker.steps)[0]["id"] == long_["id"]


# A stand-in for `accelerate launch train/sft.py`: records its environment, trains until runs/go exists.
STAND_IN = """
import json, os, pathlib, time
run = pathlib.Path(os.environ["TUNEKIT_RUN_DIR"]); run.mkdir(parents=True, exist_ok=True)
(run / "env.json").write_text(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}))
while not (run.parent / "go").exists():
    time.sleep(0.05)
"""


def wait_for(predicate, timeout: float = 30):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def stand_in_worker(cfg, monkeypatch, tmp_path, **changes):
    import dataclasses

    from fastapi.testclient import TestClient

    import serve.finetune_api.worker as worker_module
    from serve.finetune_api import create_app

    monkeypatch.setattr(worker_module, "accelerate_command", lambda config: [sys.executable, "-c", STAND_IN])
    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    app = create_app(dataclasses.replace(cfg, **changes), KEY, run_worker=False)
    client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    file_id = upload(client).json()["id"]
    return app, client, [new_job(app, client, file_id)["id"] for _ in range(3)]


def test_a_job_per_gpu_at_once_each_pinned_to_its_own(cfg, monkeypatch, tmp_path, caplog):
    from serve.finetune_api.worker import alive

    app, client, ids = stand_in_worker(cfg, monkeypatch, tmp_path, devices=["0", "1"])
    store, worker = app.state.store, app.state.worker
    runs = Path(app.state.service.data_dir) / "runs"
    status = lambda: [store.get_job(i)["status"] for i in ids]  # noqa: E731
    env = lambda i: json.loads((runs / i / "env.json").read_text())  # noqa: E731
    with caplog.at_level(logging.INFO, logger="serve.finetune_api.worker"):
        worker.start()
        try:
            wait_for(lambda: status()[:2] == ["running", "running"] and all((runs / i / "env.json").exists()
                                                                          for i in ids[:2]))
            time.sleep(0.5)
            assert status()[2] == "queued"  # two GPUs: two at once
            assert {env(i)["cuda"] for i in ids[:2]} == {"0", "1"}
            for i in ids[:2]:
                assert store.get_private(i)["device"] == env(i)["cuda"]
            freed = env(ids[0])["cuda"]
            assert client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
            wait_for(lambda: status()[2] == "running" and (runs / ids[2] / "env.json").exists())
            assert env(ids[2])["cuda"] == freed and not alive(env(ids[0])["pid"])  # the cancelled GPU's turn
            assert status()[1] == "running"
            (runs / "go").touch()
            wait_for(lambda: status() == ["cancelled", "succeeded", "succeeded"])
        finally:
            (runs / "go").touch()
            worker.shutdown()
    started = [r.getMessage() for r in caplog.records if "training started" in r.getMessage()]
    assert sorted(m.split(" on ")[1].split(" (")[0] for m in started) == sorted(
        f"GPU {env(i)['cuda']}" for i in ids)
    assert any("up to 2 jobs at once on GPU 0, 1, queue order fifo" in r.getMessage() for r in caplog.records)
    assert not worker.runners and not worker.procs and not worker.slots.jobs


def test_max_running_on_the_cpu_and_shutdown_leaves_each_job_to_resume(cfg, monkeypatch, tmp_path):
    import os

    from serve.finetune_api.worker import Worker, alive

    app, client, ids = stand_in_worker(cfg, monkeypatch, tmp_path, max_running=2)
    store, worker = app.state.store, app.state.worker
    runs = Path(app.state.service.data_dir) / "runs"
    assert worker.slots.devices == ["cpu"]  # no GPU here
    worker.start()
    try:
        wait_for(lambda: all((runs / i / "env.json").exists() for i in ids[:2]))
        envs = [json.loads((runs / i / "env.json").read_text()) for i in ids[:2]]
        assert [e["cuda"] for e in envs] == [os.environ.get("CUDA_VISIBLE_DEVICES")] * 2  # the server's, as before
        assert [store.get_job(i)["status"] for i in ids] == ["running", "running", "queued"]
    finally:
        worker.shutdown()
    assert not any(alive(e["pid"]) for e in envs)  # each stopped; each stays running, to resume
    assert [store.get_job(i)["status"] for i in ids] == ["running", "running", "queued"]
    Worker(store, worker.cfg, worker.data_dir).recover()
    assert [store.get_job(i)["status"] for i in ids] == ["queued"] * 3
    assert "queued again" in store.list_events(ids[1], None, 1)[0][0]["message"]
