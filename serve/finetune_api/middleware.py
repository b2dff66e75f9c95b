"""What wraps every route: the API-key check, the request log, and errors in OpenAI's envelope.

Both middlewares are plain ASGI (no ``BaseHTTPMiddleware``), so a streamed response passes through
untouched and an exception reaches ``RequestLog`` as itself, logged once with its own traceback.

- ``KeyCheck``: every /v1 path needs ``Authorization: Bearer KEY`` when the server has a key (401
  ``invalid_api_key`` otherwise); /health, the docs and the dashboard's page and static files (/, /static:
  no data, dashboard.py) do not. The dashboard sends the key on each /v1 call it makes, like any client.
- ``RequestLog`` (outermost, logger ``serve.finetune_api.middleware``): one line per request at INFO
  (/health at DEBUG): client, method, path, status, milliseconds. It never logs a header, the query
  or a body, so never the key. An exception that no handler took is logged with its traceback and
  answered with status 500 in the envelope (``type: server_error``), unless the response had begun.
- ``add_error_handlers``: ``APIError`` with its status, FastAPI's parameter errors as 400 with
  ``param``, unknown paths and methods (404, 405) in the envelope.
"""

from __future__ import annotations

import logging
import secrets
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .models import envelope
from .service import APIError

log = logging.getLogger(__name__)
INTERNAL_ERROR = "The server had an error while processing your request."


class KeyCheck:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                msg = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer KEY'."
                response = JSONResponse(envelope(msg, code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequestLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            log.exception("%s %s: internal error", scope["method"], scope["path"])
            if status[0]:  # the response has begun: nothing else can be sent
                raise
            await JSONResponse(envelope(INTERNAL_ERROR, "server_error"), status_code=500)(scope, receive, send_status)
        finally:
            client = scope.get("client") or ("-",)
            log.log(logging.DEBUG if scope["path"] == "/health" else logging.INFO, "%s %s %s %s %.0f ms", client[0],
                    scope["method"], scope["path"], status[0] or "-", (time.perf_counter() - start) * 1000)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(envelope(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(envelope(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", [])[1:]) or None
        return JSONResponse(envelope(f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where),
                            status_code=400)


def add_middleware(app: FastAPI, api_key: str | None) -> None:
    app.add_middleware(KeyCheck, api_key=api_key)
    app.add_middleware(RequestLog)  # added last, so outermost: it sees the 401s and every exception
