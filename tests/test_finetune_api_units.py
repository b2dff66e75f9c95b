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
    return FinetuneAPIConfig(data_dir=str(tmp_path / "data"), sft_config=str(sft), max_file_mb=0.05,
                             omp_num_threads=1)


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


JOB_ERRORS = [  # (body changes, status, param, code, part of the message)
    ({"model": "gpt-4o-mini"}, 400, "model", "model_not_available", "is not available for fine-tuning"),
    ({"training_file": "file-nope"}, 400, "training_file", "invalid_file", "invalid training_file"),
    ({"training_file": 7}, 400, "training_file", "invalid_file", "no file 7"),
    ({"validation_file": "file-nope"}, 400, "validation_file", "invalid_file", "invalid validation_file"),
    ({"suffix": "has space"}, 400, "suffix", None, "1 to 64 letters"),
    ({"suffix": "x" * 65}, 400, "suffix", None, "1 to 64 letters"),
    ({"seed": "7"}, 400, "seed", None, "seed must be an integer"),
    ({"seed": True}, 400, "seed", None, "seed must be an integer"),
    ({"method": {"type": "dpo"}}, 400, "method.type", None, "only 'supervised'"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, 400,
     "hyperparameters.n_epochs", "invalid_hyperparameters", "whole number from 1 to 50"),
    ({"hyperparameters": {"batch_size": 2.5}}, 400, "hyperparameters.batch_size", "invalid_hyperparameters", ""),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, 400, "hyperparameters.learning_rate_multiplier",
     "invalid_hyperparameters", "number > 0"),
    ({"hyperparameters": {"n_epochs": True}}, 400, "hyperparameters.n_epochs", "invalid_hyperparameters", ""),
    ({"hyperparameters": {"warmup": 3}}, 400, "hyperparameters", None, "unknown key(s) warmup"),
    ({"hyperparameters": [1]}, 400, "hyperparameters", None, "must be an object"),
    ({"integrations": [{"type": "mlflow"}]}, 400, "integrations", None, "'type': 'wandb'"),
    ({"integrations": {"type": "wandb", "wandb": {"project": "p", "tags": "not-a-list"}}}, 400, "integrations",
     None, ""),
    ({"metadata": ["a"]}, 400, "metadata", None, "object of strings"),
    ({"metadata": {"a": 1}}, 400, "metadata", None, "object of strings"),
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
    assert [e["level"] for e in events.json()["data"]] == ["warn", "info"]  # the wandb note, then "Created"
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
    assert metrics_message(metrics_data(records[2], 8)) == "Step 4/8: validation loss=1.5000"
    assert step_metrics(tmp_path, 4) == {"step": 4, "train_loss": 2.0, "train_mean_token_accuracy": 0.25,
                                         "valid_loss": 1.5, "valid_mean_token_accuracy": 0.5}
    assert results_csv(tmp_path).decode() == ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                                              "2,2.5,0.25,,\n4,2.0,,1.5,0.5\n5,,,,\n")
    for step, done in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if done:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path).name == "checkpoint-8"
    assert model_name({"model": "m", "id": "ftjob-1", "user_provided_suffix": None}) == "ft:m:local:ftjob-1"


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
    assert done["hyperparameters"] == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
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
    """Every key of the API's config is a flag (but the nested sft_overrides); flags beat the YAML."""
    import dataclasses

    from serve.finetune_api.cli import parser
    from serve.finetune_api.config import FinetuneAPIConfig
    from tunekit.config import flag_overrides, load_config

    args = parser().parse_args(["--max-steps", "7", "--no-result-base64", "--log-level", "WARNING",
                                "--data_dir", "d", "--config", str(tmp_path / "api.yaml")])
    assert set(args.config_flags) == {f.name for f in dataclasses.fields(FinetuneAPIConfig)} - {"sft_overrides"}
    (tmp_path / "api.yaml").write_text("max_steps: 3\nport: 8111\nsft_overrides: {max_length: 64}\n")
    cfg = load_config(FinetuneAPIConfig, args.config, flag_overrides(args, args.config_flags))
    assert (cfg.max_steps, cfg.port, cfg.result_base64, cfg.log_level, cfg.data_dir) == (7, 8111, False, "warning", "d")
    assert cfg.sft_overrides == {"max_length": 64}
