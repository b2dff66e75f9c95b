"""A browser UI to chat with a model and compare two models side by side, on either backend.

    python -m serve.ui --config configs/banking77/serve.yaml            # then open http://127.0.0.1:7860
    python -m serve.ui --config configs/banking77/serve.yaml --backend openai --port 7861

Chat tab: one model, streamed answers. Compare tab: the same prompt to model A and model B at
once; each answer comes with its latency and input/output tokens. Models are the backend's aliases
(base, finetuned, adapter names) plus, on the local backend, the ids the server lists; Refresh
reads them again. The system message defaults to the config's ``system``; sampling is the config's
pinned ``sampling`` section, the same for both models.

The UI binds 127.0.0.1. Another host (e.g. 0.0.0.0) is refused unless a login is set:
TUNEKIT_UI_AUTH=user:password in the environment or in .env (Gradio's login page then guards it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass

from tunekit.errors import UserError, run_main
from tunekit.net import is_loopback

from .client import BACKENDS, Backend, load_backend, load_dotenv

AUTH_ENV = "TUNEKIT_UI_AUTH"


# ---------------------------------------------------------------------------------------------
# Talking to the backend (no Gradio here, so these are testable on their own)

_backends: dict[tuple[str | None, str], Backend] = {}


def get_backend(config: str | None, name: str) -> Backend:
    """One Backend per (config, backend name), loaded on first use."""
    key = (config, name)
    if key not in _backends:
        _backends[key] = load_backend(config, name)
    return _backends[key]


def model_choices(backend: Backend) -> tuple[list[str], str | None]:
    """Aliases first, then ids the local server lists that no alias names; and an error line, if any."""
    aliases = backend.aliases()
    choices = list(aliases)
    error = None
    if backend.name == "local":
        try:
            ids = [m.id for m in backend.client(max_retries=0, timeout=10).models.list()]
        except Exception as e:  # noqa: BLE001 - shown in the UI as one line
            error = str(backend.explain(e))
        else:
            known = set(aliases) | set(aliases.values())
            choices += [i for i in ids if i not in known]
    return choices, error


def build_messages(system: str | None, history: list[dict], text: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant"):
            msgs.append({"role": m["role"], "content": _text(m.get("content"))})
    return msgs + [{"role": "user", "content": text}]


def _text(content) -> str:
    """A Chatbot message's content (a string, a part, or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return str(content)


@dataclass
class Answer:
    """One model's reply to one prompt, or the one-line error explaining why there is none."""

    model: str
    text: str = ""
    seconds: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    first_token_s: float | None = None  # streamed answers only

    def stats(self) -> str:
        if self.error:
            return f"error: {self.error}"
        first = f" (first token {self.first_token_s:.2f} s)" if self.first_token_s is not None else ""
        tokens = (f" · {self.prompt_tokens} in / {self.completion_tokens} out tokens"
                  if self.prompt_tokens is not None else "")
        return f"{self.model}: {self.seconds:.2f} s{first}{tokens}"


async def ask(backend: Backend, client, model: str, messages: list[dict]) -> Answer:
    """One non-streamed completion with the pinned sampling; API errors become Answer.error."""
    t0 = time.perf_counter()
    try:
        model_id = backend.resolve(model)
        reply = await client.chat.completions.create(model=model_id, messages=messages,
                                                     **backend.sampling_kwargs())
    except Exception as e:  # noqa: BLE001 - every API error becomes one line naming the fix
        return Answer(model, error=str(backend.explain(e, model)))
    usage = reply.usage
    return Answer(model, reply.choices[0].message.content or "", time.perf_counter() - t0,
                  usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None)


async def compare(backend: Backend, model_a: str, model_b: str, system: str | None, prompt: str) -> tuple[Answer, Answer]:
    """The same prompt to both models, concurrently."""
    messages = build_messages(system, [], prompt)
    try:
        client = backend.async_client()
    except UserError as e:  # e.g. no OpenAI key
        return Answer(model_a, error=str(e)), Answer(model_b, error=str(e))
    async with client:
        a, b = await asyncio.gather(ask(backend, client, model_a, messages), ask(backend, client, model_b, messages))
    return a, b


def stream_chat(backend: Backend, model: str, messages: list[dict]):
    """Yields (text so far, stats line) while the answer streams in; errors as the stats line."""
    t0 = time.perf_counter()
    text, first, usage = "", None, None
    try:
        model_id = backend.resolve(model)
        stream = backend.client().chat.completions.create(model=model_id, messages=messages, stream=True,
                                                          stream_options={"include_usage": True},
                                                          **backend.sampling_kwargs())
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - t0
                text += chunk.choices[0].delta.content
                yield text, f"{model}: streaming…"
            usage = chunk.usage or usage
    except Exception as e:  # noqa: BLE001
        yield text, f"error: {backend.explain(e, model)}"
        return
    answer = Answer(model, text, time.perf_counter() - t0, usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None, first_token_s=first)
    yield text, answer.stats()


# ---------------------------------------------------------------------------------------------
# The Gradio app

def build_app(config: str | None, backend_name: str):
    import gradio as gr

    backend = get_backend(config, backend_name)
    choices, error = model_choices(backend)
    default_b = "finetuned" if "finetuned" in choices else choices[0]

    def status_line(b: Backend, err: str | None) -> str:
        where = b.base_url or "https://api.openai.com/v1"
        return f"error: {err}" if err else f"{b.name} backend at {where}"

    with gr.Blocks(title="tunekit") as app:
        gr.Markdown("## tunekit: chat with and compare fine-tuned models")
        with gr.Row():
            backend_radio = gr.Radio(list(BACKENDS), value=backend.name, label="Backend", elem_id="backend", scale=1)
            refresh = gr.Button("Refresh models", elem_id="refresh", scale=0)
        status = gr.Markdown(status_line(backend, error), elem_id="status")
        system = gr.Textbox(backend.settings.system or "", label="System message", lines=2, elem_id="system")

        with gr.Tab("Chat", id="chat", elem_id="tab_chat"):
            chat_model = gr.Dropdown(choices, value=default_b, label="Model", allow_custom_value=True,
                                     elem_id="chat_model")
            chatbot = gr.Chatbot(elem_id="chatbot", height=360)
            with gr.Row():
                chat_input = gr.Textbox(placeholder="Message", show_label=False, elem_id="chat_input", scale=4)
                chat_send = gr.Button("Send", variant="primary", elem_id="chat_send", scale=0)
                chat_clear = gr.Button("Clear", elem_id="chat_clear", scale=0)
            chat_stats = gr.Markdown("", elem_id="chat_stats")

        with gr.Tab("Compare", id="compare", elem_id="tab_compare"):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare_prompt")
            compare_send = gr.Button("Send", variant="primary", elem_id="compare_send")
            with gr.Row():
                with gr.Column():
                    model_a = gr.Dropdown(choices, value=choices[0], label="Model A", allow_custom_value=True,
                                          elem_id="model_a")
                    answer_a = gr.Textbox(label="Answer A", lines=6, interactive=False, elem_id="answer_a")
                    stats_a = gr.Markdown("", elem_id="stats_a")
                with gr.Column():
                    model_b = gr.Dropdown(choices, value=default_b, label="Model B", allow_custom_value=True,
                                          elem_id="model_b")
                    answer_b = gr.Textbox(label="Answer B", lines=6, interactive=False, elem_id="answer_b")
                    stats_b = gr.Markdown("", elem_id="stats_b")

        def reload(name, current_chat, current_a, current_b):
            try:
                b = get_backend(config, name)
            except UserError as e:
                return f"error: {e}", gr.update(), gr.update(), gr.update()
            names, err = model_choices(b)

            def keep(value, fallback):
                return gr.update(choices=names, value=value if value in names else fallback)

            fallback_b = "finetuned" if "finetuned" in names else names[0]
            return (status_line(b, err), keep(current_chat, fallback_b), keep(current_a, names[0]),
                    keep(current_b, fallback_b))

        reload_io = dict(inputs=[backend_radio, chat_model, model_a, model_b],
                         outputs=[status, chat_model, model_a, model_b])
        refresh.click(reload, **reload_io)
        backend_radio.change(reload, **reload_io)

        def chat(name, model, system_text, history, text):
            history = list(history or [])
            if not text or not text.strip():
                yield history, "", gr.update()
                return
            try:
                b = get_backend(config, name)
            except UserError as e:
                yield history, f"error: {e}", gr.update()
                return
            messages = build_messages(system_text, history, text)
            history = history + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            stats = ""
            for partial, stats in stream_chat(b, model, messages):
                history[-1] = {"role": "assistant", "content": partial}
                yield history, stats, ""
            if not history[-1]["content"]:
                yield history[:-2], stats, text  # no answer (an error): the question goes back to the box

        chat_io = dict(inputs=[backend_radio, chat_model, system, chatbot, chat_input],
                       outputs=[chatbot, chat_stats, chat_input])
        chat_send.click(chat, **chat_io)
        chat_input.submit(chat, **chat_io)
        chat_clear.click(lambda: ([], ""), outputs=[chatbot, chat_stats])

        async def run_compare(name, a, b_model, system_text, text):
            if not text or not text.strip():
                return "", "error: type a prompt first", "", ""
            try:
                b = get_backend(config, name)
            except UserError as e:
                return "", f"error: {e}", "", f"error: {e}"
            ra, rb = await compare(b, a, b_model, system_text, text)
            return ra.text, ra.stats(), rb.text, rb.stats()

        compare_io = dict(inputs=[backend_radio, model_a, model_b, system, prompt],
                          outputs=[answer_a, stats_a, answer_b, stats_b])
        compare_send.click(run_compare, **compare_io)
        prompt.submit(run_compare, **compare_io)
    return app


# ---------------------------------------------------------------------------------------------

def ui_auth() -> tuple[str, str] | None:
    """The login from TUNEKIT_UI_AUTH=user:password (environment or .env), if set."""
    load_dotenv()
    value = os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError(f"{AUTH_ENV}: expected user:password")
    return user, password


def check_bind(host: str, port: int, auth) -> None:
    if not is_loopback(host) and not auth:
        raise UserError(f"--host {host} is reachable from other machines; set a login ({AUTH_ENV}=user:password "
                        "in the environment or .env) or bind 127.0.0.1")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"--port: {host}:{port} is in use; stop what holds it or pass another --port") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="serve.yaml (backend, server, openai, sampling and system)")
    p.add_argument("--backend", choices=list(BACKENDS), help="backend selected at start (overrides the config and "
                                                              "LLM_BACKEND); the UI can switch")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; another one needs "
                                                        f"{AUTH_ENV})")
    p.add_argument("--port", type=int, default=7860, help="port to bind (default: 7860)")
    args = p.parse_args(argv)

    auth = ui_auth()
    check_bind(args.host, args.port, auth)
    backend = load_backend(args.config, args.backend)
    _backends[(args.config, backend.name)] = backend
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(args.config, backend.name)
    url_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"UI at http://{url_host}:{args.port} ({backend.name} backend, {backend.base_url or 'api.openai.com'}"
          f"{', login required' if auth else ''}); Ctrl-C stops it", flush=True)
    app.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, auth=auth,
                                                  ssr_mode=False, quiet=True, show_error=False, footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
