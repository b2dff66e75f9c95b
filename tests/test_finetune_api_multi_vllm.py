"""Chat through the fine-tuning API spread over several vLLM servers (``vllm_urls``).

Fast: the config's spellings and mistakes, the choice of server, a server taken out and polled back in
(a real local HTTP server whose /health fails, then passes), every server down (OpenAI's envelope).
Slow: ``python -m serve.finetune_api --vllm-urls A B`` in front of two real vLLM CPU servers (the
session's and one started here): requests reach both, an adapter is loaded where a request lands, a
finished job's adapter goes into both, /v1/models lists the union, and with one server stopped chat goes
on (streamed too) until it is back after a restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, SERVE_KEY, SMOL, SMOL_SYSTEM, free_port

KEY = "multi-key-7d2e90a1"  # the API's key
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": "code red 1"}]


def wait_for(condition, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(every)


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# ----------------------------------------------------------------------------- fast


def test_config_names_one_server_or_several_never_both(tmp_path):
    from tunekit.config import flag_overrides, load_config
    from tunekit.errors import UserError

    from serve.finetune_api import FinetuneAPIConfig
    from serve.finetune_api.cli import parser
    from serve.finetune_api.proxy import Upstream

    args = parser().parse_args(["--vllm-urls", "http://127.0.0.1:8001/v1", "http://127.0.0.1:8002"])
    cfg = load_config(FinetuneAPIConfig, None, flag_overrides(args, args.config_flags))
    assert cfg.vllm_urls == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002"] and cfg.vllm_url is None
    assert Upstream.of(cfg).urls == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert Upstream.of(FinetuneAPIConfig(vllm_url="http://h:1")).urls == ["http://h:1/v1"]  # the one-server spelling
    cfg.vllm_url = "http://127.0.0.1:8000/v1"
    with pytest.raises(UserError, match=r"vllm_url \(.*\) and vllm_urls \(.*\) are both set"):
        Upstream.of(cfg)
    for urls, problem in [(["127.0.0.1:8001"], "is not a vLLM server's URL"),
                          (["http://a:1/v1", "http://a:1"], "is listed twice")]:
        with pytest.raises(UserError, match=problem):
            Upstream.of(FinetuneAPIConfig(vllm_urls=urls))
    yaml_cfg = tmp_path / "api.yaml"
    yaml_cfg.write_text("vllm_urls: [http://a:1/v1, http://b:2/v1]\n")
    assert load_config(FinetuneAPIConfig, str(yaml_cfg), {}).vllm_urls == ["http://a:1/v1", "http://b:2/v1"]


def test_least_outstanding_then_in_turn_and_all_out_still_tried():
    from serve.finetune_api.pool import Pool

    pool = Pool([closed_url(), closed_url(), closed_url()])
    a, b, c = pool.servers
    assert [pool.pick() for _ in range(6)] == [a, b, c, a, b, c]  # one at a time: in turn
    a.outstanding, b.outstanding = 2, 1
    assert pool.pick() is c and pool.pick(tried=[c]) is b and pool.pick(only=(a.url,)) is a
    c.outstanding = 1
    assert pool.pick() in (b, c) and pool.pick() in (b, c)
    pool.take_out(b, "connection refused")
    pool.take_out(c, "connection refused")
    assert pool.pick() is a  # the one in, however busy
    pool.take_out(a, "connection refused")
    assert pool.pick() is not None and pool.pick(tried=pool.servers) is None  # all out: tried all the same
    rr = Pool([closed_url(), closed_url()], policy="round_robin")
    rr.servers[0].outstanding = 5
    assert [rr.pick() for _ in range(4)] == rr.servers * 2
    pool.close()


class Health:
    """A local HTTP server whose /health answers ``status``."""

    def __init__(self):
        self.status, self.calls = 503, 0
        health = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                health.calls += 1
                self.send_response(health.status if self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_taken_out_is_polled_until_its_health_passes(caplog, monkeypatch):
    from serve.finetune_api import pool as pool_module
    from serve.finetune_api.pool import Pool

    HEALTH_EVERY = 0.3
    monkeypatch.setattr(pool_module, "HEALTH_EVERY", HEALTH_EVERY)  # 2 s in the API
    caplog.set_level("INFO", logger="serve.finetune_api.pool")
    health = Health()
    pool = Pool([health.url, closed_url()])
    try:
        server = pool.servers[0]
        server.loaded.add("ft:x")
        pool.suspect(server)  # it answered a request with a 5xx: its /health (503) takes it out
        wait_for(lambda: not server.healthy, 5, "taken out")
        assert server.why == "/health answered 503" and pool.pick() is pool.servers[1]
        wait_for(lambda: health.calls >= 3, 10, "polled twice")
        assert not server.healthy  # polled, still failing: still out
        health.status = 200
        wait_for(lambda: server.healthy, 10, "back in")
        assert server.loaded == set() and server.why == ""  # a restarted vLLM has no adapter loaded
        pool.suspect(server)  # a 5xx answer while /health passes: it stays in
        time.sleep(0.5)
        assert server.healthy
        assert "taken out (/health answered 503)" in caplog.text and "back in after" in caplog.text
    finally:
        pool.close()
        health.close()


def test_every_server_down_is_one_503_in_openai_envelope(tmp_path):
    from fastapi.testclient import TestClient

    from serve.finetune_api import FinetuneAPIConfig, create_app
    from serve.finetune_api.proxy import Upstream

    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model_name_or_path: {tmp_path / 'tiny-llama'}\nlora_r: 8\n")
    urls = [closed_url(), closed_url()]
    cfg = FinetuneAPIConfig(data_dir=str(tmp_path / "data"), sft_config=str(sft), base_model="tiny-llama",
                            vllm_urls=urls)
    app = create_app(cfg, KEY, run_worker=False, upstream=Upstream.of(cfg))
    with TestClient(app, headers=AUTH) as c:
        for stream in (False, True, False):
            resp = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": MESSAGES, "stream": stream})
            assert resp.status_code == 503, resp.text
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
            assert err["message"].startswith("none of the 2 vLLM servers behind this API answers")
            assert all(f"{u.removesuffix('/v1')}: connection refused" in err["message"] for u in urls)
            assert "vllm_urls" in err["message"]
        assert c.get("/v1/models").status_code == 200
        assert [s["healthy"] for s in app.state.proxy.pool.state()] == [False, False]
    app.state.store.close()


# ----------------------------------------------------------------------------- two real vLLM servers (slow)
#
# One vLLM start here (each takes ~30 s on 2 cores): the second server is still starting when the API
# starts, comes up while the API runs, and is stopped again; the same path as a restart (taken out,
# polled, back in), less the forgetting of its adapters, which the fast test above checks.


def vllm_metric(url: str, name: str = "vllm:request_success_total") -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def served(url: str) -> set[str]:
    resp = httpx.get(url + "/models", headers={"Authorization": f"Bearer {SERVE_KEY}"}, timeout=10)
    return {m["id"] for m in resp.json()["data"]}


class Servers:
    """The session's vLLM server (``a``) and a second one (``b``) of the same base model with no adapter,
    started (``python -m serve.vllm_server``, as users start one) and stopped by the tests."""

    def __init__(self, a, root: Path):
        self.a, self.root, self.b_proc = a.base_url, root, None
        serve = yaml.safe_load(a.config.read_text())
        serve["server"].update(port=free_port(), adapters={}, smoke_test=False)
        self.config = root / "serve-b.yaml"
        self.config.write_text(yaml.safe_dump(serve))
        self.b = f"http://127.0.0.1:{serve['server']['port']}/v1"
        self.out = root / "cli-b.out"

    def start_b(self) -> None:
        """Starts it and returns at once: vLLM takes half a minute to answer (connections are refused until)."""
        self.b_proc = subprocess.Popen(
            [sys.executable, "-m", "serve.vllm_server", "--config", str(self.config), "--quiet", "--log",
             str(self.root / "vllm-b.log")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                            "TUNEKIT_API_KEY": SERVE_KEY},
            stdout=self.out.open("w"), stderr=subprocess.STDOUT)

    def wait_b(self) -> None:
        def ready():
            assert self.b_proc.poll() is None, self.out.read_text()[-3000:]
            return "ready in" in self.out.read_text()
        wait_for(ready, 600, "ready: the second vLLM server", every=0.5)

    def stop_b(self) -> None:
        if self.b_proc and self.b_proc.poll() is None:
            self.b_proc.send_signal(signal.SIGTERM)
            assert self.b_proc.wait(timeout=90) == 0, self.out.read_text()[-3000:]


@pytest.fixture(scope="module")
def servers(vllm_server, tmp_path_factory):
    s = Servers(vllm_server, tmp_path_factory.mktemp("multi_vllm"))
    yield s
    s.stop_b()
    from serve.adapters import list_models, remove_adapter

    for name in sorted(m["id"] for m in list_models(s.a, SERVE_KEY)):  # the session's server as it was
        if name.startswith("ft:smol-base:personal:multi"):
            remove_adapter(s.a, name, SERVE_KEY)


def add_job(store, run_dir: Path, suffix: str, status: str = "succeeded") -> dict:
    from serve.finetune_api.metrics import model_name
    from serve.finetune_api.store import new_id

    job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": "smol-base", "status": status,
           "created_at": int(time.time()), "finished_at": int(time.time()), "organization_id": "org-local",
           "user_provided_suffix": suffix}
    job["fine_tuned_model"] = model_name(job) if status == "succeeded" else None
    store.add_job(job, {"run_dir": str(run_dir)})
    return job


@pytest.fixture(scope="module")
def api(servers, smol_adapter, tmp_path_factory):
    """``python -m serve.finetune_api --vllm-urls A B`` with two jobs on the session's SmolLM2 adapter: ``done``
    finished by Worker.succeed just before (B still starting: loaded into A only), ``lazy`` loaded nowhere.
    B starts first, so that its half minute overlaps with the rest."""
    from serve.finetune_api import FinetuneAPIConfig
    from serve.finetune_api.store import Store
    from serve.finetune_api.worker import Worker

    root = tmp_path_factory.mktemp("multi_api")
    port = free_port()
    config = root / "api.yaml"
    config.write_text(yaml.safe_dump({
        "port": port, "data_dir": str(root / "data"), "sft_config": "configs/banking77/sft_cpu.yaml",
        "base_model": "smol-base", "vllm_api_key_env": "TUNEKIT_VLLM_KEY",
        "sft_overrides": {"model_name_or_path": str(SMOL), "lora_r": 8}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": KEY, "TUNEKIT_VLLM_KEY": SERVE_KEY,
           "HF_HUB_OFFLINE": "1", "TUNEKIT_REGISTRY": str(root / "registry.json")}
    cfg = FinetuneAPIConfig(data_dir=str(root / "data"), sft_config="configs/banking77/sft_cpu.yaml",
                            base_model="smol-base", vllm_api_key_env="TUNEKIT_VLLM_KEY",
                            sft_overrides={"model_name_or_path": str(SMOL)}, vllm_urls=[servers.a, servers.b])
    servers.start_b()
    store = Store((root / "data").resolve() / "state.db")
    done = add_job(store, smol_adapter, "multi-done", status="running")
    lazy = add_job(store, smol_adapter, "multi-lazy")
    saved = os.environ.copy()
    os.environ.update(TUNEKIT_VLLM_KEY=SERVE_KEY, TUNEKIT_REGISTRY=str(root / "registry.json"))
    try:
        Worker(store, cfg, (root / "data").resolve()).succeed(done, smol_adapter)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    events = [e["message"] for e in store.list_events(done["id"], None, 100)[0]]
    done = store.get_job(done["id"])
    store.close()
    log = root / "api.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve.finetune_api", "--config", str(config),
                             "--vllm-urls", servers.a, servers.b], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def up():
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, "answering /health", every=0.3)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"client": client, "done": done, "lazy": lazy, "events": events, "log": log}
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 0 and KEY not in text and SERVE_KEY not in text, text[-3000:]


def chat(client, model: str, stream: bool = False) -> str:
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                                     stream=True))
        assert len(chunks) > 1 and {c.model for c in chunks} == {model}
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
    return reply.choices[0].message.content


def taken_out(log: Path, url: str) -> int:
    pattern = rf"vLLM server {re.escape(url.removesuffix('/v1'))} taken out \(connection refused\)"
    return len(re.findall(pattern, log.read_text()))


@pytest.mark.slow
def test_a_server_that_is_down_is_left_out_then_in_once_it_answers(servers, api):
    client, done, lazy, log = api["client"], api["done"]["fine_tuned_model"], api["lazy"]["fine_tuned_model"], api["log"]
    assert api["done"]["status"] == "succeeded"  # into the one server that answered
    assert f"Adapter loaded into the vLLM server at {servers.a} as {done}" in api["events"], api["events"]
    assert any(e.startswith(f"The adapter was not loaded into vLLM at {servers.b}: no server answers")
               for e in api["events"]), api["events"]
    for model in ("smol-base", lazy, "smol-base"):  # one of the first two lands on the server that is down
        assert isinstance(chat(client, model), str)
    assert chat(client, done, stream=True) is not None
    assert taken_out(log, servers.b) == 1, log.read_text()[-3000:]

    meanwhile = []  # while the second server starts, the session's answers
    asking = threading.Thread(target=lambda: meanwhile.append(chat(client, lazy)))
    asking.start()
    servers.wait_b()
    asking.join(120)
    assert len(meanwhile) == 1
    wait_for(lambda: "back in after" in log.read_text(), 10, "back in: the second server")

    listed = {m.id for m in client.models.list().data}
    # the union: the API's models, and the adapter loaded by hand into the session's server only
    assert {"smol-base", done, lazy, "finetuned"} <= listed, listed
    before = {u: vllm_metric(u) for u in (servers.a, servers.b)}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda m: chat(client, m), [lazy] * 4))
    assert all(isinstance(a, str) for a in answers)
    wait_for(lambda: all(vllm_metric(u) > before[u] for u in before), 10, "answered by both servers")
    assert sum(vllm_metric(u) - before[u] for u in before) == 4
    assert lazy in served(servers.b) and done not in served(servers.b)  # loaded where a request landed

    a_before, b_before = vllm_metric(servers.a), vllm_metric(servers.b)
    assert chat(client, "finetuned") is not None  # only the session's server has it: there it goes
    wait_for(lambda: vllm_metric(servers.a) > a_before, 10, "answered by the session's server")
    assert vllm_metric(servers.b) == b_before
    body = httpx.get(str(client.base_url) + "models", headers=AUTH).json()
    assert json.dumps(body).count('"finetuned"') == 1


@pytest.mark.slow
def test_stopping_a_server_keeps_chat_working(servers, api):
    client, lazy, log = api["client"], api["lazy"]["fine_tuned_model"], api["log"]
    servers.stop_b()
    for model in (lazy, "smol-base", lazy):  # one of the first two lands on the stopped server
        assert isinstance(chat(client, model), str)
    assert chat(client, lazy, stream=True) is not None
    assert taken_out(log, servers.b) == 2, log.read_text()[-3000:]
