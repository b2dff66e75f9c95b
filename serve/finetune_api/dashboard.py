"""The fine-tuning dashboard: ``GET /`` answers one HTML page, ``/static/`` its JS and CSS (this package's
static/ folder: plain files, no build step, nothing fetched from elsewhere, so it works offline).

The page holds no data: it is served without the API key, asks for the key in a login form, keeps it in the
tab's sessionStorage and sends ``Authorization: Bearer <key>`` on each call it makes to the same /v1
endpoints a script uses (the key check in middleware.py guards those as always). Its Content-Security-Policy
allows scripts, styles and requests from this origin only, so a job name or an event message shown on it
can never run as code (the script also writes every value as text, never as HTML).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# no-cache: the browser revalidates (ETag), so a server upgrade never meets an old script
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}


class Static(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


def add_dashboard(app: FastAPI) -> None:
    app.add_api_route("/", dashboard, methods=["GET"], include_in_schema=False)
    app.mount("/static", Static(directory=STATIC), name="static")
