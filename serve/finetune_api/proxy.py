"""Chat through the fine-tuning API's port: /v1/models, /v1/chat/completions and /v1/completions.

The models are the base model (every name ``base_names`` gives), each succeeded job's
``fine_tuned_model`` and each checkpoint's ``fine_tuned_model_checkpoint`` whose folder is still on
disk, and whatever else a vLLM server behind the API serves (an adapter loaded there by hand). A
request names one of them; ``Proxy`` picks a vLLM server (``pool.Pool``: the healthy one with the
fewest requests in flight), translates the name to what that server serves (the base model's served
name, or a LoRA adapter of that name, loaded there on demand with serve.adapters.add_adapter from the
job's run folder or its ``checkpoint-N``), forwards the body with the vLLM server's key, and rewrites
``model`` in the answer (and in each streamed chunk, relayed as it comes) back to the name asked for.
A server that cannot be reached is taken out (and polled until it answers) and the request goes to the
next one. Errors come in OpenAI's envelope: an unknown model is 404 ``model_not_found``, no vLLM server
that answers is 503 naming the fix, the vLLM server's own 4xx/5xx are passed on.

``Upstream`` is where the vLLM servers are: ``vllm_urls``, ``vllm_url``, or the one the command starts
and stops (``cli.LocalVLLM``, ``managed``), whose state while it starts or after it failed each 503 reports.
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
from .pool import HEALTH_EVERY, MODELS_TTL, Pool, Server, Unreachable, api_url, describe, vllm_urls
from .service import APIError
from .store import Store

log = logging.getLogger(__name__)
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long answer on a CPU takes minutes


def base_names(cfg: FinetuneAPIConfig) -> list[str]:
    """Every name that means the base model (config.base_names where the config has it)."""
    names = getattr(api_config, "base_names", None)
    return list(names(cfg)) if names else [base_model_of(cfg)[0]]


@dataclass
class Upstream:
    """Where chat goes: the vLLM servers ``urls`` (with /v1; ``url`` is the first) and ``api_key``, or the
    ``managed`` one."""

    url: str | None = None
    api_key: str | None = None
    managed: object | None = None  # cli.LocalVLLM: url, settings, unavailable(), server.log_path
    transport: httpx.AsyncBaseTransport | None = None  # another httpx transport than the network (tests)
    urls: list[str] = field(default_factory=list)
    key: str = "vllm_url"  # the config key that named them

    def __post_init__(self):
        self.urls = [api_url(u) for u in (self.urls or ([self.url] if self.url else []))]
        self.url = self.urls[0] if self.urls else None

    @classmethod
    def of(cls, cfg: FinetuneAPIConfig, managed=None) -> "Upstream":
        urls = [managed.url] if managed else vllm_urls(cfg)
        return cls(None, os.environ.get(cfg.vllm_api_key_env) or None, managed, urls=urls,
                   key="vllm_urls" if getattr(cfg, "vllm_urls", None) else "vllm_url")

    def check(self) -> None:
        reason = self.managed.unavailable() if self.managed else None
        if not self.url and not reason:
            reason = ("chat is off on this server: it runs with start_vllm false and no vllm_url; restart it "
                      "without --no-start-vllm, or with --vllm-url of a running vLLM server (--vllm-urls of several)")
        if reason:
            raise APIError(503, reason, type_="server_error")

    def down(self) -> APIError:
        if self.managed:
            return APIError(503, self.managed.unavailable() or f"the vLLM server behind this API ({self.url}) "
                            f"does not answer; its log: {self.managed.server.log_path}", type_="server_error")
        return APIError(503, f"the vLLM server at {self.url} ({self.key}) does not answer; start it ({VLLM_HINT}) "
                        f"or unset {self.key} so that this API starts its own", type_="server_error")


# ----------------------------------------------------------------------------- the models


@dataclass
class Target:
    """What a requested model name is on a vLLM server: the base model, an adapter from ``folder``, or (``only``)
    a name that only the servers of these URLs serve, passed on as it is."""
    name: str
    folder: Path | None = None  # None: the base model
    only: tuple[str, ...] | None = None


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
        self.pool = None  # pool.Pool: what the vLLM servers serve beyond these (set by Proxy)

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
        if self.pool is not None:  # the union: what any vLLM server serves beyond these
            self.pool.refresh_models()
            out += self.pool.extras({m["id"] for m in out} | set(self.bases))
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
        only = self.pool.where(name) if self.pool is not None else ()
        if only:
            return Target(name, only=only)
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
    pool: Pool = None  # the vLLM servers of ``upstream``
    managed_base: str | None = None  # the served name of the base on the server the command started
    _loop: object = None
    _client: httpx.AsyncClient | None = None
    _locks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.pool = Pool(self.upstream.urls, self.upstream.api_key)
        self.models.pool = self.pool
        if self.upstream.managed:
            self.managed_base = self.upstream.managed.settings.served_base_name()

    def client(self) -> httpx.AsyncClient:
        """One client (and load locks) per event loop: the app's, or each request's in FastAPI's TestClient."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._locks = loop, {}
            self._client = httpx.AsyncClient(transport=self.upstream.transport, timeout=TIMEOUT)
        return self._client

    def lock(self, server: Server) -> asyncio.Lock:
        self.client()
        return self._locks.setdefault(server.url, asyncio.Lock())

    async def aclose(self) -> None:
        self.pool.close()
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None

    def headers(self) -> dict:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send(self, server: Server, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """A request to a vLLM server, its body not yet read; ``Unreachable`` where it could not be reached,
        other errors as the 5xx they mean to a client."""
        client = self.client()
        try:
            resp = await client.send(client.build_request(method, server.url + path, json=body,
                                                          headers=self.headers()), stream=True)
        except httpx.ConnectTimeout as e:
            raise Unreachable(describe(e)) from None
        except httpx.TimeoutException:
            raise APIError(504, f"the vLLM server did not answer within {TIMEOUT.read:.0f} s",
                           type_="server_error") from None
        except httpx.TransportError as e:
            raise Unreachable(describe(e)) from None
        if resp.status_code in (401, 403):
            await resp.aclose()
            log.error("the vLLM server at %s refused this API's key", server.url)
            raise APIError(502, f"the vLLM server refused this API's key: set {self.cfg.vllm_api_key_env} to the key "
                           "it was started with", type_="server_error")
        return resp

    async def read(self, resp: httpx.Response) -> bytes:
        try:
            return await resp.aread()
        except httpx.TimeoutException:
            raise APIError(504, f"the vLLM server did not answer within {TIMEOUT.read:.0f} s",
                           type_="server_error") from None
        except httpx.TransportError as e:
            raise Unreachable(describe(e)) from None
        finally:
            await resp.aclose()

    async def upstream_models(self, server: Server) -> list[dict]:
        resp = await self.send(server, "GET", "/models")
        raw = await self.read(resp)
        if resp.status_code != 200:
            raise APIError(502, f"the vLLM server's /v1/models answered {resp.status_code}", type_="server_error")
        data = json.loads(raw).get("data", [])
        server.note_models(data)
        return data

    async def refresh_models(self) -> bool:
        """Read the healthy servers' model lists again (those older than MODELS_TTL); whether any was read."""
        stale = [s for s in self.pool.servers if s.healthy and (s.models is None or
                                                                time.monotonic() - s.models_at > MODELS_TTL)]
        for server in stale:
            try:
                await self.upstream_models(server)
            except Unreachable as e:
                self.pool.take_out(server, e.why)
            except APIError:
                pass
        return bool(stale)

    async def served(self, server: Server, target: Target) -> str:
        """The name ``server`` knows ``target`` by, loading its adapter there first where it has not got it."""
        if target.only is not None:
            return target.name
        if target.folder is None:
            if not server.base:
                server.base = self.managed_base
            if not server.base:
                data = await self.upstream_models(server)
                roots = [m["id"] for m in data if not m.get("parent")] or [m["id"] for m in data]
                if not roots:
                    raise APIError(502, f"the vLLM server at {server.url} serves no model", type_="server_error")
                server.base = roots[0]
            return server.base
        async with self.lock(server):
            if target.name not in server.loaded:
                if target.name not in {m["id"] for m in await self.upstream_models(server)}:
                    await asyncio.to_thread(self.load, server, target)
                server.loaded.add(target.name)
        return target.name

    def load(self, server: Server, target: Target) -> None:
        from ..adapters import add_adapter

        try:
            add_adapter(server.url, target.name, target.folder, api_key=self.upstream.api_key)
        except UserError as e:
            if "already been loaded" in str(e):
                return
            if "no server answers" in str(e):
                raise Unreachable("connection refused") from None
            log.error("could not load %s into the vLLM server at %s: %s", target.name, server.url, e)
            raise APIError(500, f"could not load the adapter of {target.name} into the vLLM server: {e}",
                           type_="server_error") from None
        log.info("adapter %s loaded into the vLLM server at %s from %s", target.name, server.url, target.folder)

    async def attempt(self, server: Server, target: Target, path: str, body: dict) -> tuple[httpx.Response, bytes]:
        """The request on ``server``: its response and, unless it streams, its body (b"" when it does)."""
        for attempt in (1, 2):
            resp = await self.send(server, "POST", path, {**body, "model": await self.served(server, target)})
            if resp.status_code == 404 and attempt == 1:
                await resp.aclose()  # the vLLM server lost the model (restarted?): find or load it again
                server.loaded.discard(target.name)
                server.base = None if target.folder is None else server.base
                continue
            if body.get("stream") and resp.status_code < 400:
                return resp, b""
            return resp, await self.read(resp)
        raise AssertionError("unreachable")

    async def dispatch(self, target: Target, path: str, body: dict) -> tuple[Server, httpx.Response, bytes]:
        """The request on the server ``pool`` picks, or on the next one while a server cannot be reached
        (nothing has reached the client yet); the chosen server's ``outstanding`` stays counted."""
        tried: list[Server] = []
        while True:
            server = self.pool.pick(tried, target.only)
            if server is None:
                raise self.none_answers(tried, target)
            tried.append(server)
            server.outstanding += 1
            server.sent += 1
            try:
                resp, raw = await self.attempt(server, target, path, body)
            except Unreachable as e:
                server.outstanding -= 1
                self.pool.take_out(server, e.why)
                if len(self.pool) > 1:
                    log.info("a request to %s failed (%s): trying another vLLM server", server.root, e.why)
                continue
            except BaseException:
                server.outstanding -= 1
                raise
            if not server.healthy:
                self.pool.put_back(server)  # it answered before the poll saw it back
            if resp.status_code >= 500:
                self.pool.suspect(server)
            return server, resp, raw

    def none_answers(self, tried: list[Server], target: Target) -> APIError:
        if len(self.pool) == 1 and target.only is None:
            return self.upstream.down()
        now = time.monotonic()
        states = "; ".join(f"{s.root}: {s.why or 'no answer'}" + (f", out for {now - s.out_since:.0f} s"
                                                                  if not s.healthy else "") for s in tried)
        if target.only is not None:
            return APIError(503, f"the model `{target.name}` is served only by vLLM servers that do not answer "
                            f"({states}); start them again ({VLLM_HINT}) and load the adapter there "
                            "(python -m serve.adapters add)", type_="server_error")
        return APIError(503, f"none of the {len(self.pool)} vLLM servers behind this API answers ({states}); "
                        f"each is polled every {HEALTH_EVERY:.0f} s and takes requests again once its /health "
                        f"answers: start them ({VLLM_HINT}) or correct vllm_urls", type_="server_error")

    async def forward(self, request: Request, path: str):
        """POST /v1/chat/completions or /v1/completions: to a vLLM server and back, streamed or not."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        asked = body.get("model")
        if not isinstance(asked, str) or not asked:
            raise APIError(400, "you must provide a model parameter", param="model")
        try:
            target = self.models.resolve(asked)
        except APIError as e:  # a name a vLLM server may have got since its model list was read
            managed = self.upstream.managed
            if (e.status != 404 or not self.upstream.url or (managed and managed.unavailable())
                    or not await self.refresh_models()):
                raise
            target = self.models.resolve(asked)
        self.upstream.check()
        server, resp, raw = await self.dispatch(target, path, body)
        if body.get("stream") and resp.status_code < 400:
            return StreamingResponse(self.relay(server, resp, asked), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        server.outstanding -= 1
        if resp.status_code >= 400:
            return upstream_error(resp.status_code, raw)
        answer = json.loads(raw)
        if isinstance(answer, dict) and "model" in answer:
            answer["model"] = asked
        return JSONResponse(answer, status_code=resp.status_code)

    async def relay(self, server: Server, resp: httpx.Response, asked: str):
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
            self.pool.suspect(server)
            error = envelope("the vLLM server's stream broke off; retry the request", "server_error")
            yield "data: " + json.dumps(error) + "\n\n"
        finally:
            server.outstanding -= 1
            await resp.aclose()
