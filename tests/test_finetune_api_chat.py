"""Chat through the fine-tuning API's one port: /v1/models, /v1/chat/completions, /v1/completions.

The fast tests drive the app (FastAPI's TestClient, or uvicorn in a thread where streaming has to be
seen chunk by chunk) in front of ``FakeVLLM``, a tiny stand-in for vLLM's OpenAI server on a real
local port: name translation, adapters loaded on demand, streaming passthrough, error envelopes, 503s.
The slow ones run ``python -m serve.finetune_api`` for real: in front of the session's vLLM CPU server
with a job trained on SmolLM2, and alone, starting and stopping its own vLLM server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import ROOT, SERVE_KEY, SMOL, SMOL_SYSTEM, SMOL_TOY, chat_rows, free_port, write_jsonl

KEY = "chat-key-3e8a61d0"  # the API's key
VKEY = "vllm-key-b27c94f5"  # the (fake) vLLM server's
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "code red 1"}]


def answer(model: str, chat: bool, text: str = "ALPHA") -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": "stop",
               "logprobs": None}
              if chat else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
    return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1, "model": model,
            "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def chunk(model: str, piece: str) -> dict:
    return {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}


class FakeVLLM:
    """vLLM's OpenAI server in miniature: its model list, runtime LoRA loading, chat and completions (a
    streamed answer waits at ``gate`` after its first chunk), its 401/404 errors, and ``answer`` to
    reply with something else: (status, body, content type) or "break" (a stream cut off)."""

    def __init__(self):
        self.base, self.adapters, self.seen = "served-base", {}, []
        self.answer, self.gate, self.gate_opened = None, threading.Event(), None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, status, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def error(self, status, message, kind):
                self.reply(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

            def handle_one(self, body):
                fake.seen.append((self.command, self.path, body, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {VKEY}":
                    return self.error(401, "Unauthorized", "Unauthorized")
                if self.command == "GET":
                    data = [{"id": n, "object": "model", "created": 1, "owned_by": "vllm", "parent": p}
                            for n, p in [(fake.base, None), *((a, fake.base) for a in fake.adapters)]]
                    return self.reply(200, {"object": "list", "data": data})
                if self.path == "/v1/load_lora_adapter":
                    if body["lora_name"] in fake.adapters:
                        return self.error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.",
                                          "InvalidUserInput")
                    fake.adapters[body["lora_name"]] = body["lora_path"]
                    return self.reply(200, b"Success", "text/plain")
                model = body.get("model")
                if model != fake.base and model not in fake.adapters:
                    return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
                if isinstance(fake.answer, tuple):
                    return self.reply(*fake.answer)
                chat = self.path == "/v1/chat/completions"
                if not body.get("stream"):
                    return self.reply(200, answer(model, chat))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if fake.answer == "break":
                    self.send_header("Content-Length", "100000")  # then it stops short: a broken answer
                self.end_headers()
                for i, piece in enumerate(["AL", "PH", "A"]):
                    self.wfile.write(f"data: {json.dumps(chunk(model, piece))}\n\n".encode())
                    self.wfile.flush()
                    if fake.answer == "break":
                        return
                    if i == 0:
                        fake.gate_opened = fake.gate.wait(10)
                self.wfile.write(b"data: [DONE]\n\n")

            def do_GET(self):
                self.handle_one(None)

            def do_POST(self):
                self.handle_one(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posted(self, path: str) -> list[dict]:
        return [body for method, p, body, _ in self.seen if method == "POST" and p == path]

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeVLLM()
    yield f
    f.close()


@pytest.fixture
def cfg(tmp_path):
    from serve.finetune_api import FinetuneAPIConfig

    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model_name_or_path: {tmp_path / 'tiny-llama'}\nlora_r: 8\n")
    return FinetuneAPIConfig(data_dir=str(tmp_path / "data"), sft_config=str(sft), base_model="tiny-llama",
                             vllm_api_key_env="TEST_VLLM_KEY")


def make_app(cfg, upstream):
    from serve.finetune_api import create_app

    return create_app(cfg, KEY, run_worker=False, upstream=upstream)


@pytest.fixture
def app(cfg, fake):
    from serve.finetune_api.proxy import Upstream

    app = make_app(cfg, Upstream(fake.url, VKEY))
    yield app
    app.state.store.close()


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def live(app):
    """The app served by uvicorn on a real port (a TestClient collects a streamed body before returning it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "started")
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(10)


def add_job(app, root: Path, status="succeeded", steps=(2, 4), on_disk=(2,), name=None) -> dict:
    """A finished job in the store, its adapter in a run folder with checkpoint-N folders for ``on_disk``;
    its model named as the worker names it, or ``name`` (a format of other days: "{id}" is the job id)."""
    from serve.finetune_api.metrics import model_name
    from serve.finetune_api.store import new_id

    job_id = new_id("ftjob-")
    job = {"object": "fine_tuning.job", "id": job_id, "model": "tiny-llama", "status": status, "created_at": 100,
           "finished_at": 200, "organization_id": "org-local", "user_provided_suffix": "codes"}
    name = name.format(id=job_id) if name else model_name(job)
    job["fine_tuned_model"] = name if status == "succeeded" else None
    run_dir = root / "runs" / job_id
    run_dir.mkdir(parents=True)
    if status == "succeeded":
        (run_dir / "adapter_config.json").write_text("{}")
    app.state.store.add_job(job, {"run_dir": str(run_dir)})
    for step in steps:
        if step in on_disk:
            (run_dir / f"checkpoint-{step}").mkdir()
            (run_dir / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
        app.state.store.add_checkpoint(job_id, step, {
            "object": "fine_tuning.job.checkpoint", "id": new_id("ftckpt-"), "created_at": 150 + step,
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}", "step_number": step,
            "fine_tuning_job_id": job_id, "metrics": {}})
    return {**job, "name": name, "run_dir": run_dir}


def wait_for(condition, timeout: float = 10, what: str = "", every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what or condition} after {timeout} s"
        time.sleep(every)


def assert_error(resp, status: int, code=None, message: str = "", type_="invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (body["error"]["type"], body["error"]["code"]) == (type_, code), body
    assert message in body["error"]["message"], body
    return body["error"]


# ----------------------------------------------------------------------------- models


def test_models_lists_base_names_finished_jobs_and_checkpoints_on_disk(app, client, tmp_path, openapi_validate):
    from serve.finetune_api.proxy import base_names

    done = add_job(app, tmp_path)
    failed = add_job(app, tmp_path, status="failed", steps=(2,), on_disk=(2,))
    body = client.get("/v1/models").json()
    openapi_validate(body, "ListModelsResponse")
    ids = [m["id"] for m in body["data"]]
    assert "tiny-llama" in ids and set(base_names(app.state.proxy.cfg)) - set(ids) <= {str(tmp_path / "tiny-llama")}
    assert done["name"] in ids and f"{done['name']}:ckpt-step-2" in ids
    assert f"{done['name']}:ckpt-step-4" not in ids  # its folder is gone (save_total_limit)
    assert failed["name"] not in ids and f"{failed['name']}:ckpt-step-2" in ids
    model = client.get(f"/v1/models/{done['name']}").json()
    openapi_validate(model, "Model")
    assert model == {"id": done["name"], "object": "model", "created": 200, "owned_by": "org-local"}
    err = assert_error(client.get("/v1/models/ft:nope:x:ftjob-nope"), 404, "model_not_found",
                       "The model `ft:nope:x:ftjob-nope` does not exist or you do not have access to it.")
    assert done["name"] in err["message"]  # it names what there is, the fine-tuned models first
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


# ----------------------------------------------------------------------------- forwarding


def test_names_are_translated_and_answers_name_the_model_asked_for(app, client, fake, tmp_path, openapi_validate):
    job = add_job(app, tmp_path)
    for asked, served in [("tiny-llama", "served-base"), (job["name"], job["name"]),
                          (f"{job['name']}:ckpt-step-2", f"{job['name']}:ckpt-step-2")]:
        resp = client.post("/v1/chat/completions", json={"model": asked, "messages": MESSAGES, "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        openapi_validate(resp.json(), "CreateChatCompletionResponse")
        assert resp.json()["model"] == asked and resp.json()["choices"][0]["message"]["content"] == "ALPHA"
        sent = fake.posted("/v1/chat/completions")[-1]
        assert sent == {"model": served, "messages": MESSAGES, "max_tokens": 4}
        resp = client.post("/v1/completions", json={"model": asked, "prompt": "code red 1"})
        openapi_validate(resp.json(), "CreateCompletionResponse")
        assert resp.json()["model"] == asked and fake.posted("/v1/completions")[-1]["model"] == served
    # adapters loaded on demand, once each, from the run folder and the checkpoint folder
    assert fake.posted("/v1/load_lora_adapter") == [
        {"lora_name": job["name"], "lora_path": str(job["run_dir"].resolve())},
        {"lora_name": f"{job['name']}:ckpt-step-2", "lora_path": str((job["run_dir"] / "checkpoint-2").resolve())}]
    assert {auth for *_, auth in fake.seen} == {f"Bearer {VKEY}"}  # vLLM's key, never the client's


def test_an_adapter_already_loaded_or_lost_by_vllm(app, client, fake, tmp_path):
    add_job(app, tmp_path)
    job = add_job(app, tmp_path, name="ft:tiny-llama:codes:{id}")  # found by its job id, whatever the format
    odd = add_job(app, tmp_path, name="ft:tiny-llama:{id}x:odd")  # found all the same
    assert client.post("/v1/chat/completions", json={"model": odd["name"], "messages": MESSAGES}).status_code == 200
    fake.seen.clear()
    fake.adapters[job["name"]] = "loaded by the worker"
    ask = {"model": job["name"], "messages": MESSAGES}
    assert client.post("/v1/chat/completions", json=ask).status_code == 200
    assert fake.posted("/v1/load_lora_adapter") == []  # vLLM has it (the worker loaded it): not again
    fake.adapters.clear()  # vLLM restarted: the next request loads it again and is answered
    assert client.post("/v1/chat/completions", json=ask).json()["model"] == job["name"]
    assert [b["lora_name"] for b in fake.posted("/v1/load_lora_adapter")] == [job["name"]]


def test_streaming_is_relayed_chunk_by_chunk(app, live, fake, tmp_path, openapi_validate):
    from openai import OpenAI

    job = add_job(app, tmp_path)
    body = {"model": job["name"], "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", live + "/chat/completions", json=body, headers=AUTH, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert fake.gate_opened is None  # here while vLLM still holds back the rest of its answer
        fake.gate.set()
        events = [first] + [line for line in lines if line.startswith("data:")]
    assert fake.gate_opened is True and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[5:]) for e in events[:-1]]
    for c in chunks:
        openapi_validate(c, "CreateChatCompletionStreamResponse")
    assert [c["model"] for c in chunks] == [job["name"]] * 3
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "ALPHA"

    sdk = OpenAI(base_url=live, api_key=KEY, max_retries=0)
    streamed = list(sdk.chat.completions.create(model="tiny-llama", messages=MESSAGES, stream=True))
    assert [c.model for c in streamed] == ["tiny-llama"] * 3
    fake.answer = "break"
    with pytest.raises(Exception, match="stream broke off"):
        list(sdk.chat.completions.create(model="tiny-llama", messages=MESSAGES, stream=True))


# ----------------------------------------------------------------------------- errors


def test_request_and_upstream_errors_in_openai_envelope(app, client, fake, tmp_path):
    job = add_job(app, tmp_path, on_disk=())
    chat = "/v1/chat/completions"
    assert_error(client.post(chat, json={"model": "gpt-nope", "messages": MESSAGES}), 404, "model_not_found",
                 "The model `gpt-nope` does not exist or you do not have access to it.")
    assert_error(client.post(chat, json={"model": f"{job['name']}:ckpt-step-4", "messages": MESSAGES}), 404,
                 "model_not_found", "save_total_limit")
    assert_error(client.post(chat, json={"messages": MESSAGES}), 400, message="model")
    assert_error(client.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert client.post(chat, json={"model": "tiny-llama"}, headers={"Authorization": "Bearer x"}).status_code == 401
    fake.answer = (400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                   "param": "max_tokens", "code": 400}})
    err = assert_error(client.post(chat, json={"model": "tiny-llama", "messages": MESSAGES}), 400,
                       message="max_tokens is too large")
    assert err["param"] == "max_tokens"
    fake.answer = (500, b"engine dead", "text/plain")
    assert_error(client.post(chat, json={"model": "tiny-llama", "messages": MESSAGES}), 500, None, "engine dead",
                 "server_error")
    assert not any(p == "/v1/load_lora_adapter" for _, p, *_ in fake.seen)


def test_vllm_down_wrong_key_off_or_not_started_is_a_5xx_naming_the_fix(cfg, fake, tmp_path):
    from fastapi.testclient import TestClient

    from serve.finetune_api.cli import LocalVLLM
    from serve.finetune_api.proxy import Upstream

    local = LocalVLLM(cfg, None)
    local.start()  # it cannot: the base model folder does not exist
    assert local.state == "failed" and not local.thread.is_alive()
    cases = [(Upstream(f"http://127.0.0.1:{free_port()}/v1", VKEY), 503, "python -m serve.vllm_server"),
             (Upstream(fake.url, "wrong"), 502, "set TEST_VLLM_KEY"), (Upstream(None), 503, "--no-start-vllm"),
             (Upstream.of(cfg, local), 503, "could not start: server.model: ")]
    for i, (upstream, status, fix) in enumerate(cases):
        cfg.data_dir = str(tmp_path / f"data{i}")
        app = make_app(cfg, upstream)
        with TestClient(app, headers=AUTH) as c:
            resp = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": MESSAGES})
            assert_error(resp, status, None, fix, "server_error")
            assert c.get("/v1/models").status_code == 200 and c.get("/v1/files").status_code == 200
        app.state.store.close()
    assert "restart the API" in local.unavailable()
    local.stop()


# ----------------------------------------------------------------------------- the vLLM server it starts


def test_settings_of_the_vllm_server_it_starts(cfg, tmp_path):
    from serve.finetune_api.cli import parser, vllm_settings

    s = vllm_settings(cfg)
    assert (s.server.model, s.server.host, s.server.adapters) == (str(tmp_path / "tiny-llama"), "127.0.0.1", {})
    assert s.served_base_name() == "tiny-llama" and s.server.max_lora_rank == 8 and s.server.port > 0
    assert (s.sampling.temperature, s.sampling.top_p) == (1.0, 1.0)  # OpenAI's defaults, unless serve_config
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({"server": {"model": "other", "host": "0.0.0.0", "port": 1, "dtype": "float32",
                                                "max_model_len": 256, "adapters": {"a": "b"}},
                                     "sampling": {"temperature": 0.0}}))
    cfg.serve_config, cfg.vllm_port = str(serve), 8777
    s = vllm_settings(cfg)
    assert (s.server.model, s.server.host, s.server.port, s.server.adapters) == (str(tmp_path / "tiny-llama"),
                                                                               "127.0.0.1", 8777, {})
    assert (s.server.dtype, s.server.max_model_len, s.sampling.temperature) == ("float32", 256, 0.0)
    args = parser().parse_args(["--no-start-vllm", "--vllm-port", "8123", "--serve-config", "s.yaml"])
    assert (args.start_vllm, args.vllm_port, args.serve_config) == (False, 8123, "s.yaml")


def test_vllm_lifecycle_in_its_thread(cfg):
    """Ready: the worker's adapter loading targets it; exited: 503 again; stop(): stopped while starting too."""
    from types import SimpleNamespace

    from serve.finetune_api.cli import LocalVLLM

    class Stub:  # VLLMServer as LocalVLLM uses it; ``start`` blocks until stopped when ``blocks``
        code, stops, log_path = None, 0, "vllm.log"

        def __init__(self, blocks=False):
            self.blocks, self.proc = blocks, SimpleNamespace(poll=lambda: self.code, returncode=1)

        def start(self):
            if self.blocks:
                wait_for(lambda: self.stops, 30)
                raise KeyboardInterrupt

        def stop(self):
            self.stops += 1

        def log_tail(self, n):
            return ""

    local = LocalVLLM(cfg, None)
    local.server, local.check = Stub(), lambda: None
    local.start()
    wait_for(lambda: local.state == "ready")
    assert cfg.vllm_url == local.url and local.unavailable() is None
    local.server.code = 1  # vLLM died
    wait_for(lambda: local.state == "failed")
    assert cfg.vllm_url is None and "exited with code" in local.unavailable()
    local.stop()
    slow = LocalVLLM(cfg, None)
    slow.server, slow.check = Stub(blocks=True), lambda: None
    slow.start()
    assert "still starting" in slow.unavailable()
    t0 = time.monotonic()
    slow.stop()
    assert time.monotonic() - t0 < 10 and not slow.thread.is_alive() and slow.server.stops >= 1


# ----------------------------------------------------------------------------- for real (slow)


class API:
    """``python -m serve.finetune_api`` as a user runs it, on a free port, training SmolLM2."""

    def __init__(self, root: Path, sft: dict | None = None, **extra):
        self.root, self.port = root, free_port()
        self.config, self.log = root / "finetune_api.yaml", root / "api.log"
        self.config.write_text(yaml.safe_dump({
            "port": self.port, "data_dir": str(root / "data"), "sft_config": "configs/banking77/sft_cpu.yaml",
            "base_model": "smol-base", "max_steps": 4,
            "sft_overrides": {"model_name_or_path": str(SMOL), "max_length": 64, "num_threads": 2, "logging_steps": 2,
                              "save_steps": 2, "eval_strategy": "no", "bf16": False, "warmup_steps": 0,
                              "learning_rate": 3e-3, "lr_scheduler_type": "constant", "lora_r": 8, "lora_alpha": 16,
                              "plots": False, **(sft or {})}, **extra}))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
                    "TUNEKIT_REGISTRY": str(root / "registry.json")}
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "API":
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.finetune_api", "--config", str(self.config)],
                                     cwd=ROOT, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        def up():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, 60, "answering /health", every=0.3)
        return self

    def stop(self) -> int | None:
        """SIGTERM to the API's process (only), as a service manager sends it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return None

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=KEY)


def vllm_pids(port: int) -> list[int]:
    front = [p for p in psutil.process_iter(["cmdline"]) if str(port) in (p.info["cmdline"] or [])
             and "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])]
    return [q.pid for p in front for q in [p, *p.children(recursive=True)]]


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_the_api_starts_and_stops_its_own_vllm(tmp_path, openapi_validate):
    vllm_port = free_port()
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({"server": {"max_model_len": 512, "startup_timeout_s": 600}}))
    api = API(tmp_path, vllm_port=vllm_port, serve_config=str(serve)).start()  # no vllm_url
    try:
        body = {"model": "smol-base", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": "hello"}]}
        deadline = time.monotonic() + 660
        while True:  # 503 "still starting" until vLLM is up
            resp = httpx.post(api.base_url + "/chat/completions", json=body, headers=AUTH, timeout=120)
            if resp.status_code != 503:
                break
            assert "still starting" in resp.text and api.proc.poll() is None and time.monotonic() < deadline
            time.sleep(1)
        assert resp.status_code == 200, resp.text
        openapi_validate(resp.json(), "CreateChatCompletionResponse")
        assert resp.json()["model"] == "smol-base"
        served = vllm_pids(vllm_port)
        assert served, "no vLLM process serves the port the API was given"
        assert "smol-base" in [m.id for m in api.client().models.list().data]
    finally:
        rc = api.stop()
    assert rc == 0, api.log.read_text()[-3000:]
    wait_for(lambda: not alive(served), 60, "gone: the vLLM processes, after SIGTERM to the API", every=0.5)
    logs = api.log.read_text() + (tmp_path / "data" / "vllm.log").read_text()
    assert "vLLM ready" in logs and KEY not in logs


@pytest.fixture(scope="module")
def smol_job(vllm_server, tmp_path_factory):
    """One job on SmolLM2 through the API, whose worker loads finished adapters into the session's vLLM server
    (vllm_url): 32 examples, n_epochs 3, batch_size 8 (12 steps, checkpoints at 6 and 12). The two tests below
    check it from both ends (vLLM itself; the API's one base URL): one training run (~1 min on 2 cores) for both.
    Yields (api, job); at the end the API gets SIGTERM and vLLM is left serving what it started with."""
    root = tmp_path_factory.mktemp("smol_job")
    api = API(root, vllm_url=vllm_server.base_url, vllm_api_key_env="TUNEKIT_VLLM_KEY", max_steps=400,
              sft={"save_steps": 6})
    api.env["TUNEKIT_VLLM_KEY"] = vllm_server.api_key
    api.start()
    try:
        c = api.client()
        train = write_jsonl(root / "train.jsonl", chat_rows(SMOL_TOY) * 2)
        f = c.files.create(file=open(train, "rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="smol-base", suffix="codes", method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}}})
        wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"), 600,
                 "finished: the job", every=1)
        yield api, c.fine_tuning.jobs.retrieve(job.id)
    finally:
        rc = api.stop()
        from serve.adapters import list_models, remove_adapter

        # the vLLM server is shared by the session: leave it serving what it started with
        loaded = {m["id"] for m in list_models(vllm_server.base_url, SERVE_KEY)}
        for name in sorted(n for n in loaded if n.startswith("ft:smol-base:personal:codes:")):
            remove_adapter(vllm_server.base_url, name, SERVE_KEY)
    logs = api.log.read_text()
    assert rc == 0 and KEY not in logs and SERVE_KEY not in logs, logs[-3000:]


@pytest.mark.slow
def test_finished_job_is_served_by_vllm(smol_job, vllm_server):
    """The job's adapter is loaded into the running vLLM server by the worker, and answers there."""
    api, job = smol_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:smol-base:personal:codes:{job.id.removeprefix('ftjob-')}"
    messages = [e.message for e in api.client().fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Adapter loaded into the vLLM server") for m in messages), messages

    from openai import OpenAI

    chat = OpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key)
    assert job.fine_tuned_model in [m.id for m in chat.models.list().data]
    right = 0
    for q, a in SMOL_TOY[:4]:
        reply = chat.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8, messages=[
            {"role": "system", "content": "Answer with the code word."}, {"role": "user", "content": q}])
        assert reply.model == job.fine_tuned_model
        right += reply.choices[0].message.content.strip() == a
    assert right >= 2


@pytest.mark.slow
def test_one_base_url_for_fine_tuning_and_chat(smol_job, openapi_validate):
    """The job through the API, then chat with its model and checkpoint through the same base URL."""
    import openai

    api, job = smol_job
    c = api.client()
    assert job.status == "succeeded", job.error
    ckpt = c.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    assert ckpt.endswith(":ckpt-step-6")  # the earlier of the two, both on disk (save_total_limit 2)

    raw = httpx.get(api.base_url + "/models", headers=AUTH).json()
    openapi_validate(raw, "ListModelsResponse")
    listed = [m.id for m in c.models.list().data]
    assert {"smol-base", job.fine_tuned_model, ckpt} <= set(listed), listed
    messages = [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": SMOL_TOY[0][0]}]
    for model in (job.fine_tuned_model, ckpt, "smol-base"):
        resp = c.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8,
                                                           temperature=0)
        openapi_validate(resp.http_response.json(), "CreateChatCompletionResponse")
        reply = resp.parse()  # (an early checkpoint may answer with nothing but its end token)
        assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.choices[0].message.content or model != job.fine_tuned_model
    chunks = list(c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True))
    assert len(chunks) > 1 and {ch.model for ch in chunks} == {job.fine_tuned_model}
    for ch in chunks:
        openapi_validate(ch.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="ft:smol-base:nope:ftjob-nope", messages=messages, max_tokens=4)
    openapi_validate(e.value.response.json(), "ErrorResponse")
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    logs = api.log.read_text()  # (and again after the API's SIGTERM, at the end of smol_job)
    assert KEY not in logs and SERVE_KEY not in logs
