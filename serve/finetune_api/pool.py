"""The vLLM servers behind the chat routes: which one a request goes to, and which are out.

``Pool`` holds a ``Server`` per URL (``vllm_urls``; or the one ``vllm_url``, or the server the command
starts). ``pick`` gives the healthy server with the fewest requests in flight, the one picked longest
ago among equals, so that requests one at a time go round in turn (``policy = "round_robin"`` ignores
the requests in flight: bench/serve_multi.py measures both). ``take_out`` removes a server that refused
a connection, or whose /health answered 5xx after it answered a request with one; a thread then polls
its /health every ``HEALTH_EVERY`` seconds and puts it back once it answers 200, with no adapter known
to be loaded there (a restarted vLLM server has none). With every server out, ``pick`` still offers
them, so a request finds a server that came back before the poll does, and the answer names them all.

Each server's /v1/models is cached (``Server.models``, read again after ``MODELS_TTL`` seconds): GET
/v1/models lists what any healthy server serves beyond the API's own models (adapters loaded by hand
with serve.adapters, the base model under vLLM's name), and a request for such a name goes to a server
that has it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import httpx

from tunekit.errors import UserError

from .config import FinetuneAPIConfig

log = logging.getLogger(__name__)
HEALTH_EVERY = 2.0  # seconds between two polls of a server that is out
HEALTH_TIMEOUT = 5.0
MODELS_TTL = 5.0  # seconds a server's /v1/models is taken as still true for GET /v1/models
POLICIES = ("least_outstanding", "round_robin")


def api_url(url: str) -> str:
    """An OpenAI-style base URL ending in /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def vllm_urls(cfg: FinetuneAPIConfig) -> list[str]:
    """The vLLM servers the config names: ``vllm_urls``, or ``vllm_url`` alone; a UserError when both are
    set, or an entry is no URL or comes twice."""
    urls = getattr(cfg, "vllm_urls", None) or []
    if urls and cfg.vllm_url:
        raise UserError(f"vllm_url ({cfg.vllm_url}) and vllm_urls ({' '.join(map(str, urls))}) are both set: give "
                        "one vLLM server as vllm_url or every one as vllm_urls (--vllm-urls URL URL ...), not both")
    seen = set()
    for url in urls:
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+(/v1)?/?", url):
            raise UserError(f"vllm_urls: {url!r} is not a vLLM server's URL; give each as http://host:port/v1")
        if api_url(url) in seen:
            raise UserError(f"vllm_urls: {url} is listed twice; give each vLLM server once")
        seen.add(api_url(url))
    return list(urls) or ([cfg.vllm_url] if cfg.vllm_url else [])


class Unreachable(Exception):
    """A vLLM server that could not be reached (or broke off before its answer began): try the next one."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass(eq=False)
class Server:
    """One vLLM server: ``url`` (with /v1), whether it is in, what runs and what is loaded there."""

    url: str
    healthy: bool = True
    outstanding: int = 0  # requests sent and not yet answered in full
    sent: int = 0  # requests sent, in all
    last: int = 0  # the pool's pick count when it was last picked
    why: str = ""  # why it is out
    out_since: float = 0.0
    loaded: set[str] = field(default_factory=set)  # adapters known to be loaded there
    base: str | None = None  # the name it serves the base model by
    models: dict[str, dict] | None = None  # its /v1/models: id -> model object (parent: None for the base)
    models_at: float = 0.0

    @property
    def root(self) -> str:
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    def note_models(self, data: list[dict]) -> None:
        self.models = {m["id"]: m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}
        self.models_at = time.monotonic()

    def forget(self) -> None:
        """What a restart loses: the adapters loaded there (and the cached model list)."""
        self.loaded.clear()
        self.base, self.models = None, None


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Pool:
    """The servers, the choice among them, and the thread that polls the ones taken out."""

    def __init__(self, urls: list[str], api_key: str | None = None, policy: str = "least_outstanding"):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        self.servers = [Server(u) for u in urls]
        self.api_key, self.policy = api_key, policy
        self.picks = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()  # the running polling thread's: set by close()
        self._thread: threading.Thread | None = None
        self._suspects: set[Server] = set()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __len__(self) -> int:
        return len(self.servers)

    # ------------------------------------------------------------------------- the choice

    def pick(self, tried=(), only: tuple[str, ...] | None = None) -> Server | None:
        """The server for the next request, none of ``tried`` (and one of ``only``, URLs, if given)."""
        with self._lock:
            candidates = [s for s in self.servers if s not in tried and (only is None or s.url in only)]
            ready = [s for s in candidates if s.healthy] or candidates  # all out: try them all the same
            if not ready:
                return None
            if self.policy == "round_robin":
                best = min(ready, key=lambda s: s.last)
            else:
                best = min(ready, key=lambda s: (s.outstanding, s.last))
            self.picks += 1
            best.last = self.picks
            return best

    # ------------------------------------------------------------------------- out and back in

    def take_out(self, server: Server, why: str) -> None:
        with self._lock:
            if server.healthy:
                server.healthy, server.out_since = False, time.monotonic()
                others = sum(s.healthy for s in self.servers)
                log.warning("vLLM server %s taken out (%s); polling its /health every %.0f s; %d of %d still in",
                            server.root, why, HEALTH_EVERY, others, len(self.servers))
            server.why = why
            self._watch()

    def put_back(self, server: Server) -> None:
        with self._lock:
            if not server.healthy:
                server.healthy, server.why = True, ""
                server.forget()
                log.info("vLLM server %s answers again: back in after %.0f s", server.root,
                         time.monotonic() - server.out_since)

    def suspect(self, server: Server) -> None:
        """A 5xx answer: its /health decides, at once and in the background, whether it is taken out."""
        with self._lock:
            self._suspects.add(server)
            self._watch()

    def health(self, client: httpx.Client, server: Server) -> str | None:
        """None when /health answers (anything but 5xx); otherwise why not."""
        try:
            resp = client.get(server.root + "/health")
        except httpx.TimeoutException:
            return f"/health did not answer within {HEALTH_TIMEOUT:.0f} s"
        except httpx.TransportError as e:
            return describe(e)
        return f"/health answered {resp.status_code}" if resp.status_code >= 500 else None

    def _watch(self) -> None:
        """Start the polling thread (under the lock) unless one runs that was not closed."""
        if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            return
        self._stop = threading.Event()  # a closed thread still running ends on its own one
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="vllm-health", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=HEALTH_TIMEOUT, headers=self.headers()) as client:
            while not stop.is_set():
                with self._lock:
                    suspects, self._suspects = self._suspects, set()
                for server in suspects:
                    problem = self.health(client, server)
                    if problem:
                        self.take_out(server, problem)
                with self._lock:
                    if not self._suspects and all(s.healthy for s in self.servers):
                        if self._stop is stop:
                            self._thread = None
                        return
                if stop.wait(HEALTH_EVERY):
                    return
                for server in [s for s in self.servers if not s.healthy]:
                    problem = self.health(client, server)
                    if problem is None:
                        self.put_back(server)
                    else:
                        server.why = problem

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------- what they serve

    def refresh_models(self) -> None:
        """Read each healthy server's /v1/models again where the cached one is older than MODELS_TTL
        (never on the event loop: GET /v1/models runs in a worker thread)."""
        if on_event_loop():
            return
        for server in [s for s in self.servers if s.healthy]:
            if server.models is not None and time.monotonic() - server.models_at < MODELS_TTL:
                continue
            try:
                resp = httpx.get(server.url + "/models", headers=self.headers(), timeout=HEALTH_TIMEOUT)
            except httpx.TimeoutException:
                continue
            except httpx.TransportError as e:
                self.take_out(server, describe(e))
                continue
            if resp.status_code == 200:
                try:
                    server.note_models(resp.json().get("data") or [])
                except (ValueError, AttributeError):
                    pass

    def extras(self, known: set[str]) -> list[dict]:
        """Model objects of what the healthy servers serve beyond ``known`` (OpenAI's four fields)."""
        out: dict[str, dict] = {}
        for server in self.servers:
            if server.healthy and server.models:
                for name, m in server.models.items():
                    if name not in known and name not in out:
                        out[name] = {"id": name, "object": "model", "created": int(m.get("created") or 0),
                                     "owned_by": str(m.get("owned_by") or "vllm")}
        return list(out.values())

    def where(self, name: str) -> tuple[str, ...]:
        """URLs of the servers whose last model list has ``name`` (healthy ones first)."""
        having = [s for s in self.servers if s.models and name in s.models]
        return tuple(s.url for s in sorted(having, key=lambda s: not s.healthy))

    def state(self) -> list[dict]:
        return [{"url": s.url, "healthy": s.healthy, "outstanding": s.outstanding, "sent": s.sent,
                 "why": s.why, "loaded": sorted(s.loaded)} for s in self.servers]


def describe(e: Exception) -> str:
    """A transport error in words: 'connection refused', 'connection reset', ..."""
    seen, cause = 0, e
    while cause is not None and seen < 8:  # the OSError under httpx's and anyio's wrappers
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        text = str(cause).lower()
        for words in ("connection refused", "connection reset", "name or service not known", "no route to host"):
            if words in text:
                return words
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return {httpx.ConnectError: "could not connect", httpx.ConnectTimeout: "connection timed out",
            httpx.RemoteProtocolError: "it closed the connection", httpx.ReadError: "the connection broke off"}.get(
        type(e), type(e).__name__)
