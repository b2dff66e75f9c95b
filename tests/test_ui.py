"""The Gradio UI (serve.ui) against the session's real vLLM server, driven in headless Chromium.

Chromium comes from Debian (`apt-get install -y chromium`); the tests fail, naming that command,
where it is missing. TUNEKIT_CHROMIUM points at another binary.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, SMOL_SYSTEM, SMOL_TOY, free_port, run_cli

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATS = re.compile(r"\d+\.\d\d s.* · \d+ in / \d+ out tokens")
CODE_WORDS = {a for _, a in SMOL_TOY}


def chromium_path() -> str:
    path = os.environ.get("TUNEKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"Chromium not found at {path}: install it with `apt-get install -y chromium` "
                    "(or set TUNEKIT_CHROMIUM to a Chromium binary)")
    return path


@pytest.fixture(scope="module")
def ui(vllm_server, tmp_path_factory):
    """`python -m serve.ui` as a user starts it, on a free port; its process group is killed after."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve.ui", "--config", str(vllm_server.config), "--port", str(port)],
                            cwd=ROOT, env=vllm_server.env(GRADIO_ANALYTICS_ENABLED="False"), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"serve.ui did not answer at {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    out.close()
    assert vllm_server.api_key not in log.read_text(), "the API key leaked into the UI's output"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, ui):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(ui)
    page.wait_for_selector("#status")
    yield page
    page.close()


def choose(page, dropdown: str, value: str) -> None:
    box = page.locator(f"#{dropdown} input")
    box.click()
    options = box.get_attribute("aria-controls")  # the list this dropdown opened (others may stay in the DOM)
    page.locator(f"#{options} [role=option][aria-label='{value}']").click()
    assert page.locator(f"#{dropdown} input").input_value() == value


def wait_done(page, *ids: str) -> None:
    """Until each stats line shows a result (tokens) or an error (the progress timer shows before)."""
    page.wait_for_function("ids => ids.every(id => /out tokens|^error: /m.test(document.getElementById(id).innerText))",
                           arg=list(ids))


def in_thread(coro):
    """asyncio.run outside the thread where Playwright's sync API keeps its event loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_compare_base_and_adapter_side_by_side(page):
    question, expected = SMOL_TOY[0]  # ("code red 1", "ALPHA")
    assert "local backend" in page.inner_text("#status")
    assert page.locator("#system textarea").input_value() == SMOL_SYSTEM  # the config's system message
    page.get_by_role("tab", name="Compare").click()
    choose(page, "model_a", "base")
    choose(page, "model_b", "finetuned")
    page.locator("#compare_prompt textarea").fill(question)
    page.click("#compare_send")
    wait_done(page, "stats_a", "stats_b")
    stats_a, stats_b = page.inner_text("#stats_a"), page.inner_text("#stats_b")
    answer_a = page.locator("#answer_a textarea").input_value()
    answer_b = page.locator("#answer_b textarea").input_value()
    assert answer_b.strip() == expected, (answer_b, stats_b)
    assert answer_a.strip() and not any(w in answer_a for w in CODE_WORDS), (answer_a, stats_a)
    assert STATS.search(stats_a) and stats_a.startswith("base:"), stats_a
    assert STATS.search(stats_b) and stats_b.startswith("finetuned:"), stats_b


def test_chat_streams_the_adapter_answer(page):
    question, expected = SMOL_TOY[1]  # ("code blue 2", "BRAVO")
    choose(page, "chat_model", "finetuned")
    page.locator("#chat_input textarea").fill(question)
    page.click("#chat_send")
    wait_done(page, "chat_stats")
    assert STATS.search(page.inner_text("#chat_stats")), page.inner_text("#chat_stats")
    text = page.inner_text("#chatbot")
    assert question in text and expected in text, text


def test_unknown_model_shows_one_line_error(page):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#model_a input").fill("no-such-model")
    page.locator("#model_a input").press("Enter")
    choose(page, "model_b", "finetuned")
    page.locator("#compare_prompt textarea").fill(SMOL_TOY[0][0])
    page.click("#compare_send")
    wait_done(page, "stats_a", "stats_b")
    stats_a = page.inner_text("#stats_a")
    assert stats_a.startswith("error: model 'no-such-model' is not served") and "\n" not in stats_a.strip(), stats_a
    assert "Traceback" not in page.content()
    assert STATS.search(page.inner_text("#stats_b"))  # the other side still answers


# ---------------------------------------------------------------------------------------------
# Without a browser: the errors users cause, as the one-line messages the UI shows.

def test_errors_are_one_line(vllm_server, monkeypatch):
    from serve.client import load_backend
    from serve.ui import compare, model_choices

    monkeypatch.setenv("TUNEKIT_API_KEY", "wrong-key")
    wrong_key = load_backend(vllm_server.config, "local")
    a, b = in_thread(compare(wrong_key, "base", "finetuned", SMOL_SYSTEM, "code red 1"))
    assert "refused the API key" in a.error and "TUNEKIT_API_KEY" in b.error, (a, b)
    assert "refused the API key" in model_choices(wrong_key)[1]

    monkeypatch.setenv("TUNEKIT_API_KEY", vllm_server.api_key)
    down = load_backend(vllm_server.config, "local")
    down.base_url = f"http://127.0.0.1:{free_port()}/v1"
    down.settings.max_retries = 0
    a, _ = in_thread(compare(down, "base", "finetuned", None, "hi"))
    assert a.error.startswith("no server answers at") and a.stats().startswith("error: "), a
    choices, error = model_choices(down)
    assert choices[:2] == ["base", "finetuned"] and error.startswith("no server answers")


def test_public_host_needs_a_login(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != "TUNEKIT_UI_AUTH"}
    proc = subprocess.run([sys.executable, "-m", "serve.ui", "--host", "0.0.0.0", "--port", str(free_port())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**env_free, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --host 0.0.0.0 is reachable") and "TUNEKIT_UI_AUTH" in proc.stderr
    assert run_cli("-m", "serve.ui", "--help").returncode == 0
