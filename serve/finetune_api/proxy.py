"""Chat through the fine-tuning API's port: /v1/models, /v1/chat/completions and /v1/completions.

The models are the base model (every name ``base_names`` gives), each succeeded job's
``fine_tuned_model`` and each checkpoint's ``fine_tuned_model_checkpoint`` whose folder is still on
disk. A request names one of them; ``Proxy`` translates it to what the vLLM server serves (the base
model's served name, or a LoRA adapter of that name, loaded on demand with serve.adapters.add_adapter
from the job's run folder or its ``checkpoint-N``), forwards the body with the vLLM server's key, and
rewrites ``model`` in the answer (and in each streamed chunk, relayed as it comes) back to the name
asked for. Errors come in OpenAI's envelope: an unknown model is 404 ``model_not_found``, a vLLM
server that does not answer is 503 naming the fix, the vLLM server's own 4xx/5xx are passed on.

``Upstream`` is where the vLLM server is: ``vllm_url``, or the one the command starts and stops
(``cli.LocalVLLM``, ``managed``), whose state while it starts or after it failed each 503 reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tunekit.errors import UserError

from . import config as api_config
from .cli import VLLM_HINT
from .config import FinetuneAPIConfig, base_model_of
from .models import envelope
from .service import APIError
from .store import Store

log = logging.getLogger(__name__)
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long answer on a CPU takes minutes


def base_names(cfg: FinetuneAPIConfig) -> list[str]:
    """Every name that means the base model (config.base_names where the config has it)."""
    names = getattr(api_config, "base_names", None)
    return list(names(cfg)) if names else [base_model_of(cfg)[0]]


def api_url(url: str) -> str:
    """An OpenAI-style base URL ending in /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Upstream:
    """The vLLM server chat goes to: ``url`` (with /v1) and ``api_key``, or the ``managed`` one."""

    url: str | None = None
    api_key: str | None = None
    managed: object | None = None  # cli.LocalVLLM: url, settings, unavailable(), server.log_path
    transport: httpx.AsyncBaseTransport | None = None  # another httpx transport than the network (tests)

    @classmethod
    def of(cls, cfg: FinetuneAPIConfig, managed=None) -> "Upstream":
        url = managed.url if managed else cfg.vllm_url
        return cls(api_url(url) if url else None, os.environ.get(cfg.vllm_api_key_env) or None, managed)

    def check(self) -> None:
        reason = self.managed.unavailable() if self.managed else None
        if not self.url and not reason:
            reason = ("chat is off on this server: it runs with start_vllm false and no vllm_url; restart it "
                      "without --no-start-vllm, or with --vllm-url of a running vLLM server")
        if reason:
            raise APIError(503, reason, type_="server_error")

    def down(self) -> APIError:
        if self.managed:
            return APIError(503, self.managed.unavailable() or f"the vLLM server behind this API ({self.url}) "
                            f"does not answer; its log: {self.managed.server.log_path}", type_="server_error")
        return APIError(503, f"the vLLM server at {self.url} (vllm_url) does not answer; start it ({VLLM_HINT}) "
                        "or unset vllm_url so that this API starts its own", type_="server_error")


# ----------------------------------------------------------------------------- the models


@dataclass
class Target:
    """What a requested model name is on the vLLM server: the base model, or an adapter from ``folder``."""
    name: str
    folder: Path | None = None  # None: the base model


def not_found(name: str, known: list[str], why: str = "") -> APIError:
    """OpenAI's 404 for a model, naming a few that exist here (the fine-tuned ones, newest, first)."""
    known = [m for m in reversed(known) if m.startswith("ft:")] + [m for m in known if not m.startswith("ft:")]
    shown = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.{why} This server "
                    f"serves {shown} (GET /v1/models lists them).", code="model_not_found")


class Models:
    """The model names the API serves, from the store (and the base names of the config)."""

    def __init__(self, cfg: FinetuneAPIConfig, store: Store):
        self.store, self.bases = store, base_names(cfg)
        path = base_model_of(cfg)[1]
        local = Path(path).exists() or path.startswith((".", "/"))
        self.listed_bases = [n for n in self.bases if not (local and n == path)]  # a folder is no model id
        self.base_created = int(Path(path).stat().st_mtime) if Path(path).exists() else int(time.time())

    def run_dir(self, job_id: str) -> Path | None:
        run_dir = self.store.get_private(job_id).get("run_dir")
        return Path(run_dir) if run_dir else None

    def listing(self) -> list[dict]:
        """Model objects: the base names, each succeeded job's model, each checkpoint still on disk."""
        out = [{"id": name, "object": "model", "created": self.base_created, "owned_by": "system"}
               for name in self.listed_bases]
        jobs, _ = self.store.list_jobs(None, 10**9)
        for job in reversed(jobs):  # oldest first
            owner = job.get("organization_id") or "org-local"
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                out.append({"id": job["fine_tuned_model"], "object": "model",
                            "created": job.get("finished_at") or job["created_at"], "owned_by": owner})
            run_dir = self.run_dir(job["id"])
            ckpts, _ = self.store.list_checkpoints(job["id"], None, 10**9)
            for ckpt in reversed(ckpts):
                if run_dir and (run_dir / f"checkpoint-{ckpt['step_number']}" / "adapter_config.json").is_file():
                    out.append({"id": ckpt["fine_tuned_model_checkpoint"], "object": "model",
                                "created": ckpt["created_at"], "owned_by": owner})
        return out

    def get(self, name: str) -> dict:
        listed = self.listing()
        found = next((m for m in listed if m["id"] == name), None)
        if not found:
            raise not_found(name, [m["id"] for m in listed])
        return found

    def owner(self, name: str) -> tuple[dict, int | None] | None:
        """(job, checkpoint step or None) of a fine-tuned model's name (``Store.model_owner``)."""
        return self.store.model_owner(name)

    def resolve(self, name: str) -> Target:
        """The base model or the adapter a requested name means; 404 model_not_found otherwise."""
        if name in self.bases:
            return Target(name)
        found = self.owner(name) if name.startswith("ft:") else None
        if found:
            job, step = found
            run_dir = self.run_dir(job["id"])
            folder = run_dir / f"checkpoint-{step}" if run_dir and step is not None else run_dir
            if folder and (folder / "adapter_config.json").is_file():
                return Target(name, folder)
            raise not_found(name, [m["id"] for m in self.listing()],
                            f" Its adapter is no longer on the server ({folder} is gone"
                            + (": training keeps the last save_total_limit checkpoints)." if step else ")."))
        raise not_found(name, [m["id"] for m in self.listing()])


# ----------------------------------------------------------------------------- forwarding


def upstream_error(status: int, raw: bytes) -> JSONResponse:
    """The vLLM server's error answer in OpenAI's envelope (vLLM's types and integer codes made OpenAI's)."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    err = body.get("error", body) if isinstance(body, dict) else None
    err = err if isinstance(err, dict) and err.get("message") else {}
    message = str(err.get("message") or raw.decode(errors="replace").strip()[:2000]
                  or f"the vLLM server answered HTTP {status}")
    kind = err.get("type")
    if not (isinstance(kind, str) and re.fullmatch(r"[a-z_]+", kind)):
        kind = "server_error" if status >= 500 else "invalid_request_error"
    param, code = err.get("param"), err.get("code")
    if status >= 500:
        log.warning("the vLLM server answered %s: %s", status, message[:500])
    return JSONResponse(envelope(message, kind, param if isinstance(param, str) else None,
                                 code if isinstance(code, str) else None), status_code=status)


@dataclass
class Proxy:
    cfg: FinetuneAPIConfig
    models: Models
    upstream: Upstream
    loaded: set[str] = field(default_factory=set)  # adapters known to be on the vLLM server
    served_base: str | None = None
    _loop: object = None
    _client: httpx.AsyncClient | None = None
    _lock: asyncio.Lock | None = None

    def __post_init__(self):
        if self.upstream.managed:
            self.served_base = self.upstream.managed.settings.served_base_name()

    def client(self) -> httpx.AsyncClient:
        """One client (and load lock) per event loop: the app's, or each request's in FastAPI's TestClient."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._lock = loop, asyncio.Lock()
            self._client = httpx.AsyncClient(transport=self.upstream.transport, timeout=TIMEOUT)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None

    def headers(self) -> dict:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """A request to the vLLM server, its body not yet read; errors as the 5xx they mean to a client."""
        client = self.client()
        try:
            resp = await client.send(client.build_request(method, self.upstream.url + path, json=body,
                                                          headers=self.headers()), stream=True)
        except httpx.TimeoutException:
            raise APIError(504, f"the vLLM server did not answer within {TIMEOUT.read:.0f} s",
                           type_="server_error") from None
        except httpx.TransportError:
            raise self.upstream.down() from None
        if resp.status_code in (401, 403):
            await resp.aclose()
            log.error("the vLLM server at %s refused this API's key", self.upstream.url)
            raise APIError(502, f"the vLLM server refused this API's key: set {self.cfg.vllm_api_key_env} to the key "
                           "it was started with", type_="server_error")
        return resp

    async def read(self, resp: httpx.Response) -> bytes:
        try:
            return await resp.aread()
        except httpx.TimeoutException:
            raise APIError(504, f"the vLLM server did not answer within {TIMEOUT.read:.0f} s",
                           type_="server_error") from None
        except httpx.TransportError:
            raise self.upstream.down() from None
        finally:
            await resp.aclose()

    async def upstream_models(self) -> list[dict]:
        resp = await self.send("GET", "/models")
        raw = await self.read(resp)
        if resp.status_code != 200:
            raise APIError(502, f"the vLLM server's /v1/models answered {resp.status_code}", type_="server_error")
        return json.loads(raw).get("data", [])

    async def served(self, target: Target) -> str:
        """The name the vLLM server knows ``target`` by, loading its adapter first where it has not got it."""
        if target.folder is None:
            if not self.served_base:
                data = await self.upstream_models()
                roots = [m["id"] for m in data if not m.get("parent")] or [m["id"] for m in data]
                if not roots:
                    raise APIError(502, "the vLLM server serves no model", type_="server_error")
                self.served_base = roots[0]
            return self.served_base
        self.client()
        async with self._lock:
            if target.name not in self.loaded:
                if target.name not in {m["id"] for m in await self.upstream_models()}:
                    await asyncio.to_thread(self.load, target)
                self.loaded.add(target.name)
        return target.name

    def load(self, target: Target) -> None:
        from ..adapters import add_adapter

        try:
            add_adapter(self.upstream.url, target.name, target.folder, api_key=self.upstream.api_key)
        except UserError as e:
            if "already been loaded" in str(e):
                return
            if "no server answers" in str(e):
                raise self.upstream.down() from None
            log.error("could not load %s into the vLLM server: %s", target.name, e)
            raise APIError(500, f"could not load the adapter of {target.name} into the vLLM server: {e}",
                           type_="server_error") from None
        log.info("adapter %s loaded into the vLLM server from %s", target.name, target.folder)

    async def forward(self, request: Request, path: str):
        """POST /v1/chat/completions or /v1/completions: to the vLLM server and back, streamed or not."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        asked = body.get("model")
        if not isinstance(asked, str) or not asked:
            raise APIError(400, "you must provide a model parameter", param="model")
        target = self.models.resolve(asked)
        self.upstream.check()
        for attempt in (1, 2):
            resp = await self.send("POST", path, {**body, "model": await self.served(target)})
            if resp.status_code != 404 or attempt == 2:
                break
            await resp.aclose()  # the vLLM server lost the model (restarted?): find or load it again
            self.loaded.discard(target.name)
            self.served_base = None if target.folder is None and not self.upstream.managed else self.served_base
        if resp.status_code >= 400:
            return upstream_error(resp.status_code, await self.read(resp))
        if not body.get("stream"):
            answer = json.loads(await self.read(resp))
            if isinstance(answer, dict) and "model" in answer:
                answer["model"] = asked
            return JSONResponse(answer, status_code=resp.status_code)
        return StreamingResponse(self.relay(resp, asked), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def relay(self, resp: httpx.Response, asked: str):
        """The vLLM server's server-sent events, line by line as they come, each chunk's ``model`` rewritten."""
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                    try:
                        chunk = json.loads(line[5:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict) and "model" in chunk:
                        chunk["model"] = asked
                        line = "data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
                yield line + "\n"
        except httpx.HTTPError as e:  # the answer has begun: the error goes in the stream, as OpenAI's do
            log.warning("the vLLM server's stream broke off: %s", type(e).__name__)
            error = envelope("the vLLM server's stream broke off; retry the request", "server_error")
            yield "data: " + json.dumps(error) + "\n\n"
        finally:
            await resp.aclose()
