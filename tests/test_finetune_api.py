"""serve.finetune_api as a real server process on localhost, driven by the openai SDK and httpx.

Jobs train a tiny random Llama on CPU with train/sft.py (a few steps each). Faults are real: a
malformed upload, a server killed with SIGKILL mid-job, a cancel mid-run, a proxy returning 500/429.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, free_port

KEY = "test-key-7c1d"
TOY = [("w1 w2", "yes"), ("w3 w4", "no"), ("w5 w6", "yes"), ("w7 w8", "no"), ("w9 w10", "yes"),
       ("w11 w12", "no"), ("w13 w14", "yes"), ("w15 w16", "no")]
# The schemas the tests use, vendored from OpenAI's openapi.yaml (tests/data/openai-openapi/extract.py).
OPENAPI = Path(__file__).resolve().parent / "data" / "openai-openapi" / "schemas.yaml"


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def ft_model_dir(tiny_model_dir) -> Path:
    """conftest's randomly initialised 2-layer Llama, in a folder named tiny-llama (the base model's name)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft_toy")
    rows = [{"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in TOY]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    bad = rows * 2 + [{"messages": [{"role": "user", "content": "w1"}]}]
    (d / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad) + "not json\n")
    return d


class Server:
    """python -m serve.finetune_api in its own process group; start, kill and restart it."""

    def __init__(self, root: Path, model: Path, max_steps: int = 400, max_file_mb: float = 0.05,
                 base_model: str = "tiny-llama", sft: dict | None = None, **extra):
        self.root, self.port, self.proc = root, free_port(), None
        self.data_dir = root / "data"
        self.config = root / "finetune_api.yaml"
        self.config.write_text(yaml.safe_dump({
            "port": self.port, "data_dir": str(self.data_dir), "sft_config": "configs/banking77/sft_cpu.yaml",
            "base_model": base_model, "max_steps": max_steps, "max_file_mb": max_file_mb, "max_attempts": 3,
            "start_vllm": False,  # fine-tuning only: chat through the API has its own tests (test_finetune_api_chat)
            "sft_overrides": {"model_name_or_path": str(model), "max_length": 64, "num_threads": 1,
                              "logging_steps": 2, "save_steps": 4, "eval_steps": 4, "bf16": False,
                              "warmup_steps": 0, "learning_rate": 0.01, "lr_scheduler_type": "constant",
                              "per_device_eval_batch_size": 8, "plots": False, **(sft or {})}, **extra}))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
                    "TUNEKIT_REGISTRY": str(root / "registry.json")}
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "Server":
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.finetune_api", "--config", str(self.config)],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the fine-tuning API did not start in 60 s")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        for pid in training_pids(self.data_dir):  # a SIGKILLed server leaves its training running
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=KEY, **kw)

    def http(self, method: str, path: str, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=30, **kw)


def training_pids(data_dir: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(data_dir) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def wait_status(client, job_id: str, statuses, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory, ft_model_dir):
    s = Server(tmp_path_factory.mktemp("ftapi"), ft_model_dir).start()
    yield s
    s.stop()


# The seed write-up's script (shared/seeds/000_*: the module-level client, gpt-4o-mini-2024-07-18, the
# deprecated top-level hyperparameters, a wandb integration as one object, a suffix), then what OpenAI's
# guide does next: list, poll, events, checkpoints, the result file. Only OPENAI_BASE_URL and
# OPENAI_API_KEY point it here; TRAIN and VALID are its data paths.
SEED_SCRIPT = """
import base64
import openai
import time

train_file_path, valid_file_path = TRAIN, VALID
with open(train_file_path, "rb") as f:
   train_file = openai.files.create(file=f, purpose="fine-tune")
with open(valid_file_path, "rb") as f:
   valid_file = openai.files.create(file=f, purpose="fine-tune")
print(train_file)

modelFINETUNING = 'gpt-4o-mini-2024-07-18'
response = openai.fine_tuning.jobs.create(
    training_file=train_file.id,
    validation_file=valid_file.id,
    model=modelFINETUNING,
    seed=42,
    hyperparameters={"n_epochs": 5, "batch_size": 8}, # using gpu (cuda)
    integrations = {"type": "wandb", "wandb": {"project": "gpt-pricer"}},
    suffix="spotify-chatbot-reviewer"
)
job_id = response.id
print(response)

job_response = openai.fine_tuning.jobs.list(limit=10)
print(job_response)

while True:
    our_job_response = openai.fine_tuning.jobs.retrieve(job_id)
    if our_job_response.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(1)
print(our_job_response)
print(our_job_response.status)
print(our_job_response.fine_tuned_model)

events = openai.fine_tuning.jobs.list_events(fine_tuning_job_id=job_id, limit=50)
for event in reversed(events.data):
    print(event.message)

checkpoints = openai.fine_tuning.jobs.checkpoints.list(fine_tuning_job_id=job_id)
for checkpoint in checkpoints.data:
    print(checkpoint.fine_tuned_model_checkpoint, checkpoint.step_number, checkpoint.metrics.train_loss)

result_file = our_job_response.result_files[0]
content = openai.files.content(result_file)
print(base64.b64decode(content.text).decode())
"""
RESULT_HEADER = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"  # OpenAI's result file


@pytest.fixture(scope="module")
def seed_job(server, toy_files, tmp_path_factory) -> str:
    """The seed write-up's script, unchanged but for OPENAI_BASE_URL and OPENAI_API_KEY; returns its job id."""
    script = tmp_path_factory.mktemp("seed") / "seed.py"
    script.write_text(f"TRAIN = {str(toy_files / 'train.jsonl')!r}\nVALID = {str(toy_files / 'valid.jsonl')!r}\n"
                      + textwrap.dedent(SEED_SCRIPT))
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": KEY}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "succeeded" in lines, proc.stdout[-3000:]
    name = next(l for l in lines if l.startswith("ft:"))
    job_id = "ftjob-" + name.rsplit(":", 1)[1]
    assert name == f"ft:gpt-4o-mini-2024-07-18:personal:spotify-chatbot-reviewer:{job_id.removeprefix('ftjob-')}"
    # 32 examples, batch_size 8, n_epochs 5: 20 steps; the events in OpenAI's words and order
    messages = lines[lines.index(name) + 1:]
    expected = [f"Created fine-tuning job: {job_id}", "Validating training file: ", "Files validated, moving job to "
                "queued state", "Fine-tuning job started", "Training tiny-llama with configs/banking77/sft_cpu.yaml: "
                "n_epochs 5, batch_size 8 (8 per step x 1 accumulated), learning_rate_multiplier 1.8 ->",
                "Weights & Biases ", "Step 2/20: training loss=", "Step 20/20: training loss=",
                "Step 20/20: validation loss=", f"Checkpoint created at step 20 with Snapshot ID: {name}:ckpt-step-20",
                f"New fine-tuned model created: {name}", "The job has successfully completed"]
    found = iter(messages)
    for want in expected:
        assert any(m.startswith(want) for m in found), f"{want!r} missing or out of order in:\n" + "\n".join(messages)
    assert f"{name}:ckpt-step-20 20 " in proc.stdout
    assert RESULT_HEADER in lines and any(l.startswith("20,") for l in lines[lines.index(RESULT_HEADER):])

    job = server.client().fine_tuning.jobs.retrieve(job_id)
    resolved = {"n_epochs": 5, "batch_size": 8, "learning_rate_multiplier": 1.8}  # the multiplier as OpenAI's "auto"
    assert job.model == "gpt-4o-mini-2024-07-18" and job.seed == 42 and job.user_provided_suffix == \
        "spotify-chatbot-reviewer"
    assert job.hyperparameters.model_dump() == job.method.supervised.hyperparameters.model_dump() == resolved
    assert job.trained_tokens and job.trained_tokens > 0 and job.estimated_finish is None and job.finished_at
    assert [i.model_dump(exclude_none=True) for i in job.integrations] == [
        {"type": "wandb", "wandb": {"project": "gpt-pricer"}}]
    return job_id


# ----------------------------------------------------------------------------- schema validation


@pytest.fixture(scope="session")
def openapi_schemas() -> dict:
    assert OPENAPI.is_file(), f"{OPENAPI} missing (regenerate with tests/data/openai-openapi/extract.py)"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = yaml.load(OPENAPI.read_text(encoding="utf-8"), Loader=loader)["components"]["schemas"]

    def fix(node):  # OpenAPI 3.0 leftovers in JSON Schema 2020-12 terms
        if isinstance(node, dict):
            if node.get("nullable") is True and isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if isinstance(node.get("exclusiveMinimum"), bool):  # 3.0: a flag on `minimum`
                if node.pop("exclusiveMinimum") and "minimum" in node:
                    node["exclusiveMinimum"] = node.pop("minimum")
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)
    fix(schemas)
    # OpenAI's POST /fine_tuning/jobs/{id}/pause answers "status": "paused" (openapi.yaml's own example for it),
    # but the FineTuningJob enum there stops at "cancelled": the vendored schema is taken as the API behaves
    status = schemas["FineTuningJob"]["properties"]["status"]
    status["enum"] = [*status["enum"], *(["paused"] if "paused" not in status["enum"] else [])]
    return schemas


def check_schema(schemas: dict, name: str, obj) -> None:
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
    assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_every_response_matches_openai_schemas(server, seed_job, toy_files, openapi_schemas):
    s, check = server, lambda name, resp, code=200: (
        (resp.status_code == code) or pytest.fail(f"{resp.request.url}: {resp.status_code} {resp.text[:300]}"),
        check_schema(openapi_schemas, name, resp.json()))
    up = s.http("POST", "/files", files={"file": ("x.jsonl", (toy_files / "valid.jsonl").read_bytes())},
                data={"purpose": "fine-tune"})
    check("OpenAIFile", up)
    fid = up.json()["id"]
    check("ListFilesResponse", s.http("GET", "/files"))
    check("ListFilesResponse", s.http("GET", "/files", params={"purpose": "nothing-has-this"}))
    check("OpenAIFile", s.http("GET", f"/files/{fid}"))
    assert s.http("GET", f"/files/{fid}/content").content == (toy_files / "valid.jsonl").read_bytes()

    job = s.http("GET", f"/fine_tuning/jobs/{seed_job}")
    check("FineTuningJob", job)
    assert job.json()["status"] == "succeeded" and job.json()["result_files"]
    check("ListPaginatedFineTuningJobsResponse", s.http("GET", "/fine_tuning/jobs", params={"limit": 5}))
    events = s.http("GET", f"/fine_tuning/jobs/{seed_job}/events", params={"limit": 100})
    check("ListFineTuningJobEventsResponse", events)
    metrics = [e for e in events.json()["data"] if e["type"] == "metrics"]
    assert metrics and {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics[-1]["data"])
    ckpts = s.http("GET", f"/fine_tuning/jobs/{seed_job}/checkpoints")
    check("ListFineTuningJobCheckpointsResponse", ckpts)
    assert [c["step_number"] for c in ckpts.json()["data"]][:2] == [20, 16]
    assert ckpts.json()["data"][0]["fine_tuned_model_checkpoint"] == job.json()["fine_tuned_model"] + ":ckpt-step-20"

    fresh = s.http("POST", "/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid, "suffix": "x"})
    check("FineTuningJob", fresh)
    cancelled = s.http("POST", f"/fine_tuning/jobs/{fresh.json()['id']}/cancel")
    check("FineTuningJob", cancelled)
    assert cancelled.json()["status"] == "cancelled"
    check("ErrorResponse", s.http("POST", f"/fine_tuning/jobs/{fresh.json()['id']}/cancel"), 400)

    check("ErrorResponse", s.http("GET", "/files", key="wrong"), 401)
    check("ErrorResponse", s.http("GET", "/fine_tuning/jobs", key=None), 401)
    check("ErrorResponse", s.http("GET", "/files/file-nope"), 404)
    check("ErrorResponse", s.http("GET", "/fine_tuning/jobs/ftjob-nope"), 404)
    check("ErrorResponse", s.http("GET", "/fine_tuning/jobs/ftjob-nope/events"), 404)
    check("ErrorResponse", s.http("POST", "/fine_tuning/jobs", json={"model": "gpt-9", "training_file": fid}), 400)
    check("ErrorResponse", s.http("POST", "/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid,
                                  "method": {"type": "supervised", "supervised": {"hyperparameters":
                                                                                  {"n_epochs": 0}}}}), 400)
    check("DeleteFileResponse", s.http("DELETE", f"/files/{fid}"))
    assert s.http("GET", f"/files/{fid}").status_code == 404
    for e in events.json()["data"]:
        assert KEY not in json.dumps(e)
    assert KEY not in (s.root / "server.log").read_text()


def test_pagination_of_jobs_and_events(server, seed_job):
    c = server.client()
    first = c.fine_tuning.jobs.list_events(seed_job, limit=3)
    assert len(first.data) == 3 and first.has_more
    rest = c.fine_tuning.jobs.list_events(seed_job, limit=100, after=first.data[-1].id)
    everything = c.fine_tuning.jobs.list_events(seed_job, limit=100)
    assert [e.id for e in first.data + rest.data] == [e.id for e in everything.data]
    assert everything.data[-1].message.startswith("Created fine-tuning job")  # newest first, as OpenAI lists
    ids = [j.id for j in c.fine_tuning.jobs.list(limit=100).data]
    page = c.fine_tuning.jobs.list(limit=1)
    assert page.data[0].id == ids[0] and page.has_more == (len(ids) > 1)
    assert [j.id for j in c.fine_tuning.jobs.list(limit=100, after=ids[0]).data] == ids[1:]


def test_uploads_are_limited_and_names_sanitised(server, toy_files):
    c = server.client(max_retries=0)
    obj = c.files.create(file=("../../etc/pass wd;rm.jsonl", (toy_files / "train.jsonl").read_bytes()),
                         purpose="fine-tune")
    assert obj.filename == "pass_wd_rm.jsonl" and obj.bytes == (toy_files / "train.jsonl").stat().st_size
    assert (server.data_dir / "files" / obj.id).read_bytes() == (toy_files / "train.jsonl").read_bytes()
    too_big = server.http("POST", "/files", files={"file": ("big.jsonl", b"x" * 60_000)}, data={"purpose": "fine-tune"})
    assert too_big.status_code == 413 and "too large" in too_big.json()["error"]["message"]
    bad_purpose = server.http("POST", "/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "nope"})
    assert bad_purpose.status_code == 400 and bad_purpose.json()["error"]["param"] == "purpose"


def test_malformed_training_file_fails_validation_with_the_reason(server, toy_files):
    c = server.client()
    bad = c.files.create(file=open(toy_files / "bad.jsonl", "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=bad.id, model="tiny-llama")
    assert job.status == "validating_files"
    job = wait_status(c, job.id, ("failed",), timeout=60)
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 17: example_missing_assistant_message" in job.error.message
    assert "line 18: invalid_json" in job.error.message
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert any(m.startswith("Validating training file") for m in messages)
    assert not any("started" in m for m in messages)


def test_unknown_model_and_file_are_client_errors(server):
    import openai

    c = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning") as e:
        c.fine_tuning.jobs.create(training_file="file-x", model="babbage-002")  # completion files: not here
    assert e.value.code == "model_not_available" and "gpt-4o-mini-2024-07-18" in e.value.message
    with pytest.raises(openai.BadRequestError, match="invalid training_file"):
        c.fine_tuning.jobs.create(training_file="file-nope", model="tiny-llama")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).files.list()


def test_cancel_mid_run_kills_the_training(server, toy_files):
    c = server.client()
    f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 1}}})
    deadline = time.time() + 120
    while not [e for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]:
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status in ("validating_files", "queued",
                                                                                       "running")
        time.sleep(0.3)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    run_dir = server.data_dir / "runs" / job.id
    deadline = time.time() + 20
    while training_pids(run_dir):
        assert time.time() < deadline, "training still running after cancel"
        time.sleep(0.3)
    time.sleep(1)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert not (run_dir / "summary.json").exists()


def killed_at_first_checkpoint(s: "Server", toy_files: Path, suffix: str, n_epochs: int):
    """A supervised job on the toy file; once its first checkpoint is complete the server is SIGKILLed and its
    training process is orphaned. Returns (client, file, job, run folder)."""
    c = s.client()
    f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", suffix=suffix, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 1}}})
    run_dir = s.data_dir / "runs" / job.id
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoint-*/trainer_state.json")):
        assert time.time() < deadline and s.proc.poll() is None
        time.sleep(0.2)
    s.kill(signal.SIGKILL)
    return c, f, job, run_dir


def test_server_killed_mid_job_resumes_after_restart(tmp_path, ft_model_dir, toy_files):
    s = Server(tmp_path, ft_model_dir).start()
    try:
        c, f, job, run_dir = killed_at_first_checkpoint(s, toy_files, "restart", n_epochs=10)
        for pid in training_pids(s.data_dir):
            os.kill(pid, signal.SIGSTOP)  # held mid-run until the restarted server stops it (else done in seconds)
        s.start()  # the same data folder and port
        job = wait_status(c, job.id, ("succeeded", "failed"), timeout=240)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any("server restarted" in m and "resumes from checkpoint-" in m for m in messages), messages
        assert "Fine-tuning job started (attempt 2)" in messages
        made = [m for m in messages if m.startswith("Checkpoint created at step ")]
        assert made and len(made) == len(set(made))  # each checkpoint once across the restart
        assert c.files.retrieve(f.id).id == f.id
        assert json.loads((run_dir / "summary.json").read_text())["resumed_from"]
        steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.type == "metrics" and "train_loss" in e.data]
        assert sorted(steps) == list(range(2, 321, 2)), steps  # each step reported once across the restart
        assert json.loads((tmp_path / "registry.json").read_text())["local"]["finetuned"]["model"] == \
            job.fine_tuned_model
    finally:
        s.stop()


def test_a_training_that_finished_while_the_server_was_down_completes_the_job(tmp_path, ft_model_dir, toy_files):
    s = Server(tmp_path, ft_model_dir).start()
    try:
        c, _, job, run_dir = killed_at_first_checkpoint(s, toy_files, "done", n_epochs=2)
        deadline = time.time() + 120
        while not (run_dir / "summary.json").exists() or training_pids(s.data_dir):  # the orphan trains to the end
            assert time.time() < deadline
            time.sleep(0.2)
        s.start()
        job = wait_status(c, job.id, ("succeeded", "failed"), timeout=120)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any("its training finished meanwhile" in m for m in messages), messages
        assert not any("attempt 2" in m for m in messages)  # not started again
        steps = json.loads((run_dir / "summary.json").read_text())["steps"]
        ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
        assert steps in [k.step_number for k in ckpts]  # saved after the server died, listed after the restart
        assert job.result_files and job.trained_tokens
    finally:
        s.stop()

def test_non_loopback_host_needs_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TUNEKIT_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "serve.finetune_api", "--host", "0.0.0.0", "--port", "1"],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "needs an API key" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- fault-injecting proxy


class FaultProxy:
    """A real HTTP proxy in front of the server that answers some requests itself with 500 / 429 or
    drops the connection, before they reach the server."""

    def __init__(self, upstream: str, every: int = 3):
        self.upstream, self.every, self.count, self.injected = upstream.rstrip("/"), every, 0, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with threading.Lock():
                    proxy.count += 1
                    n = proxy.count
                if n % proxy.every == 0:
                    fault = ("500", "429", "drop")[(n // proxy.every) % 3]
                    proxy.injected.append(fault)
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    payload = json.dumps({"error": {"message": f"injected {fault}", "type": "server_error",
                                                    "param": None, "code": None}}).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if fault == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length",
                                                                                      "connection")}
                r = httpx.request(self.command, proxy.upstream + self.path, headers=headers, content=body,
                                  timeout=60)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_DELETE = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_sdk_survives_injected_500_429_and_dropped_connections(server, toy_files):
    proxy = FaultProxy(server.base_url.removesuffix("/v1"), every=2)
    try:
        from openai import OpenAI

        c = OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=6)
        f = c.files.create(file=open(toy_files / "valid.jsonl", "rb"), purpose="fine-tune")
        for _ in range(6):
            assert c.files.retrieve(f.id).bytes == f.bytes
        assert len(c.fine_tuning.jobs.list(limit=5).data) >= 1
        assert {"500", "429", "drop"} <= set(proxy.injected)
        assert len(c.files.list().data) == len({x.id for x in c.files.list().data})  # no duplicate uploads
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- with the vLLM server
#
# test_finished_job_is_served_by_vllm (a job on the demo's base model, its adapter loaded into the running vLLM
# server, answering there) is in test_finetune_api_chat.py: it shares its training run with the chat tests there.
