# ruff: noqa: F811 (the fixtures of test_finetune_api.py, imported, are taken by name as arguments)
"""The dashboard of the fine-tuning API (GET /, serve/finetune_api/dashboard.py and static/), in headless Chromium
against a real server process with a real training job on the tiny model, as test_ui.py drives its browser.

    TUNEKIT_DOCS_SCREENSHOT=1 .venv/bin/python -m pytest -q tests/test_dashboard.py   # also writes docs/dashboard.png

A fast unit test checks what the key guards: the page and its static files load without one, the API does not.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import ROOT
from test_finetune_api import KEY, TOY, Server, ft_model_dir, toy_files, wait_status  # noqa: F401
from test_finetune_api_units import KEY as UNIT_KEY
from test_finetune_api_units import app, cfg  # noqa: F401
from test_ui import CHROMIUM_ARGS, chromium_path

SCREENSHOT = ROOT / "docs" / "dashboard.png"
WRONG = "Incorrect API key provided."


# ----------------------------------------------------------------------------- without a server


def test_page_loads_without_the_key_and_the_api_still_needs_it(app):
    from fastapi.testclient import TestClient

    client = TestClient(app)  # no Authorization header
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/dashboard.js"' in page.text and 'id="login-form"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "Authorization" in script.text and "sessionStorage" in script.text and "localStorage" not in script.text
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = client.get("/v1/fine_tuning/jobs", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", resp.text
    assert client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {UNIT_KEY}"}).status_code == 200
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is no API route


# ----------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, ft_model_dir):
    # a gentler learning rate than test_finetune_api's, so the curves in the screenshot fall over more steps
    s = Server(tmp_path_factory.mktemp("dashboard"), ft_model_dir, max_steps=5000, max_file_mb=1,
               sft={"learning_rate": 0.0005, "logging_steps": 4, "eval_steps": 20, "save_steps": 100}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def job(server, toy_files) -> str:
    """A job long enough to watch: batch 1 on 320 toy examples, 5,000 steps (metrics every 4). The tiny model
    trains ~100 steps/s on 2 cores: 200 steps would be over before two refreshes and a click; this job is
    cancelled long before its end (about a minute)."""
    rows = [{"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in TOY]
    c = server.client()
    f = c.files.create(file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows * 40).encode()),
                       purpose="fine-tune")
    v = c.files.create(file=open(toy_files / "valid.jsonl", "rb"), purpose="fine-tune")
    return c.fine_tuning.jobs.create(training_file=f.id, validation_file=v.id, model="tiny-llama", suffix="watch",
                                     method={"type": "supervised", "supervised": {"hyperparameters": {
                                         "n_epochs": 20, "batch_size": 1}}}).id


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base_url.removesuffix("/v1") + "/")
    page.wait_for_selector("#login-form")
    yield page
    page.close()
    assert not errors, errors  # no uncaught script error


def expect(locator):
    """Playwright's expect, waiting up to 30 s (its own matchers: the page's CSP forbids the eval that
    page.wait_for_function needs, and the tests run under that CSP)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    return expect(locator)


def points(page) -> int:
    return int(page.get_attribute("#loss-chart", "data-points"))


def log_in(page, key: str) -> None:
    page.fill("#login-key", key)
    page.click("#login-form button")


@pytest.mark.slow
def test_wrong_key_shows_the_api_error(page, job):  # `job`: its training starts while this runs
    log_in(page, "not-the-key")
    expect(page.locator("#login-error")).to_have_text(WRONG)
    assert page.is_visible("#login-form") and not page.is_visible("#nav")
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept


@pytest.mark.slow
def test_watch_the_loss_grow_pause_resume_and_cancel(page, server, job):
    log_in(page, KEY)
    row = page.locator("#jobs-body tr", has_text=job)  # the jobs list shows the job
    row.wait_for()
    assert "tiny-llama" in row.inner_text() and "supervised" in row.inner_text()
    assert page.evaluate(f"sessionStorage.getItem('tunekit.apiKey') === {KEY!r}")
    row.locator("a").click()
    page.wait_for_selector("#job-status[class*=s-running]", timeout=90_000)
    assert page.inner_text("#job-id") == job
    hp = page.inner_text("#job-hp")
    assert "n_epochs\n20" in hp and "batch_size\n1" in hp, hp

    chart = page.locator("#loss-chart")
    expect(chart).not_to_have_attribute("data-points", "0", timeout=120_000)  # the training's start-up
    first = points(page)
    expect(chart).not_to_have_attribute("data-points", str(first))  # the next refresh plotted more steps
    assert points(page) > first
    assert page.locator("#loss-chart polyline.train").count() == 1
    assert page.locator("#events li", has_text="training loss=").count() > 0
    if os.environ.get("TUNEKIT_DOCS_SCREENSHOT") == "1":
        for _ in range(240):  # until 300 steps (90 points), at most 2 minutes
            if points(page) >= 90:
                break
            page.wait_for_timeout(500)
        page.wait_for_selector("#ckpt-body tr")
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert page.is_visible("#job-pause") and not page.is_visible("#job-resume")
    page.click("#job-pause")  # the buttons follow the status
    expect(page.locator("#job-status")).to_have_text("paused")
    assert page.is_visible("#job-resume") and not page.is_visible("#job-pause") and page.is_visible("#job-cancel")
    page.click("#job-resume")
    expect(page.locator("#job-status")).to_have_text(re.compile("queued|running"))
    assert server.client().fine_tuning.jobs.retrieve(job).status in ("queued", "running")
    page.click("#job-cancel")
    page.wait_for_selector("#job-status[class*=s-cancelled]")
    assert not page.is_visible("#job-cancel") and not page.is_visible("#job-pause")
    assert server.client().fine_tuning.jobs.retrieve(job).status == "cancelled"


@pytest.mark.slow
def test_failed_validation_and_chat_unavailable(page, server, toy_files):
    log_in(page, KEY)
    page.wait_for_selector("#jobs-body tr")
    page.click("nav >> text=New job")
    page.set_input_files("#new-train", str(toy_files / "bad.jsonl"))
    page.fill("#new-model", "tiny-llama")
    page.select_option("#new-method", "supervised")
    page.click("#new-submit")
    page.wait_for_selector("#job-status[class*=s-failed]")
    error = page.inner_text(".job-failure")  # the API's message, with its line numbers
    assert "line 17: example_missing_assistant_message" in error and "line 18: invalid_json" in error, error
    job_id = page.inner_text("#job-id")
    assert server.client().fine_tuning.jobs.retrieve(job_id).status == "failed"

    page.click("#job-play")  # the playground, set to the job's models
    expect(page.locator(".play-model").first).to_have_value("tiny-llama")
    page.fill("#play-prompt", "w1 w2")
    page.click("#play-form button")
    page.wait_for_selector(".answer-panel.failed")
    assert "Chat is unavailable" in page.inner_text("#play-out")  # start_vllm: false, so 503


def test_the_dashboard_ships_in_the_package():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = ROOT / "serve" / "finetune_api" / "static"
    assert "static/*" in data["serve.finetune_api"]
    assert {p.name for p in static.iterdir()} == {"index.html", "dashboard.js", "dashboard.css"}
    assert len((static / "dashboard.js").read_text().splitlines()) < 500
    for name in ("index.html", "dashboard.css"):  # nothing from elsewhere: the machine may be offline
        assert "//" not in (static / name).read_text().replace("://www.w3.org", ""), name
