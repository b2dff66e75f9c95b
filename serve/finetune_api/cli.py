"""The command line: ``python -m serve.finetune_api`` and ``tunekit api`` both call ``main(argv)``.

Flags are the config's keys (``--data-dir`` for ``data_dir``), layered over ``--config``. A mistake the
user can fix is a ``UserError`` (one line, exit status 2). Logging goes to stderr at ``--log-level``
(default info) for the server's loggers (``serve.finetune_api.*``), warnings and up for everything
else (uvicorn included); every line passes through a formatter that masks the API keys, so even a
traceback that quotes one does not show it.

Without ``vllm_url`` (and unless ``--no-start-vllm``) the command also runs the vLLM server that the
chat routes forward to (``LocalVLLM``): it starts in the background, so the fine-tuning routes answer
at once and chat answers 503 ("still starting") for the minute or so vLLM takes; Ctrl-C, SIGTERM and
SIGHUP stop uvicorn, then vLLM (its whole process group), and a SIGKILLed API takes vLLM with it.
A mistake in the config is a ``UserError`` at start-up; what keeps vLLM from starting on this
machine (not installed, no model, port taken) is logged, and every chat request's 503 says it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from tunekit import logs
from tunekit.config import add_dataclass_flags, flag_overrides, load_config, read_yaml
from tunekit.errors import UserError
from tunekit.net import free_port, is_loopback

from .config import FinetuneAPIConfig, base_model_of, load_dotenv

log = logging.getLogger(__name__)
PACKAGE_LOGGER = __name__.rsplit(".", 1)[0]  # serve.finetune_api: the routes, the service, the worker, this
VLLM_HINT = "`python -m serve.vllm_server --config configs/banking77/serve.yaml`"


def setup_logging(level: str, secrets: list[str | None] = ()) -> logging.Handler:
    """This package's loggers (the VLLMServer it starts included) at ``level``, the rest at warning and up."""
    return logs.setup_logging(level, (PACKAGE_LOGGER, "serve.vllm_server"), secrets)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.finetune_api", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML whose keys are the long flags' names (data_dir for --data-dir)")
    p.add_argument("--api-key", dest="api_key", help="key clients must send (prefer the environment variable "
                                                      "api_key_env names: a flag shows in process listings)")
    # every other flag is a config key: generated from the same fields, so the two cannot drift
    metavars = {"vllm_url": "URL", "vllm_port": "PORT", "serve_config": "YAML"}
    p.set_defaults(config_flags=add_dataclass_flags(p, FinetuneAPIConfig, metavars=metavars))
    return p


def vllm_settings(cfg: FinetuneAPIConfig):
    """serve.client.Settings of the vLLM server the API starts: serve_config's sections (or OpenAI's sampling
    defaults), the sft config's base model on 127.0.0.1:vllm_port, LoRA ranks up to the sft config's."""
    from serve.adapters import server_rank
    from serve.client import Sampling, Settings, load_settings

    base_name, base_path = base_model_of(cfg)
    if cfg.serve_config:
        if not Path(cfg.serve_config).is_file():
            raise UserError(f"serve_config: {cfg.serve_config} not found (a serve.yaml such as "
                            "configs/banking77/serve.yaml)")
        settings = load_settings(cfg.serve_config, backend="local")
    else:  # what an OpenAI client expects when it sends no temperature
        settings = Settings(sampling=Sampling(temperature=1.0, top_p=1.0))
    s = settings.server
    s.model, s.host, s.port, s.adapters = base_path, "127.0.0.1", cfg.vllm_port or free_port(), {}
    s.served_model_name = s.served_model_name or base_name
    s.api_key_env = cfg.vllm_api_key_env
    # every profile a job may train with (sft_config, the models: map's), and the largest LoRA rank among them
    profiles = {cfg.sft_config, *(str(v) for v in (getattr(cfg, "models", None) or {}).values())}
    ranks = [int({**read_yaml(p), **(cfg.sft_overrides or {})}.get("lora_r") or 16) for p in profiles
             if Path(p).is_file()]
    s.max_lora_rank = s.max_lora_rank or server_rank(max(ranks, default=16))
    return settings


class LocalVLLM:
    """The vLLM server behind the chat routes when no ``vllm_url`` is given: started in the background by
    ``start()`` (the API serves fine-tuning meanwhile; chat answers 503 until it is ready), ``stop()``ped
    with the API. ``state``: starting | ready | failed (``reason`` says why)."""

    def __init__(self, cfg: FinetuneAPIConfig, api_key: str | None):
        from serve.vllm_server import VLLMServer

        self.cfg, self.settings = cfg, vllm_settings(cfg)  # a config mistake is a UserError here, at start-up
        self.server = VLLMServer(self.settings, api_key=api_key,
                                 log_path=Path(cfg.data_dir).resolve() / "vllm.log")
        self.url = self.server.base_url
        self.state, self.reason, self.since = "starting", "", time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vllm-server", daemon=True)

    def check(self) -> str | None:
        """Why vLLM cannot start here (not installed, no model, port taken), checked before starting."""
        try:
            self.server.command()
        except UserError as e:
            return str(e)
        if self.cfg.vllm_port:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", self.cfg.vllm_port))
                except OSError:
                    return (f"vllm_port: 127.0.0.1:{self.cfg.vllm_port} is in use; pick another port, leave "
                            "vllm_port unset for a free one, or set vllm_url to the vLLM server that holds it")
        return None

    def start(self) -> None:
        problem = self.check()
        if problem:
            self.fail(f"could not start: {problem}")
            return
        log.info("starting vLLM for chat on %s (%s); its log: %s", self.url, self.settings.server.model,
                 self.server.log_path)
        self.thread.start()

    def fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        log.error("the vLLM server for chat %s; /v1/chat/completions answers 503 (fine-tuning works)", reason)

    def _run(self) -> None:
        try:
            self.server.start()
        except BaseException as e:  # noqa: BLE001 (a failed start is reported, never raised in this thread)
            if not self.done.is_set():
                self.fail(f"did not start: {e}")
            return
        if self.done.is_set():
            return self.server.stop()
        self.state = "ready"
        self.cfg.vllm_url = self.url  # the worker loads each finished job's adapter into it from now on
        log.info("vLLM ready in %.0f s: chat on the API's port goes to %s", time.monotonic() - self.since, self.url)
        while not self.done.wait(2):  # this thread must outlive vLLM (die_with_parent)
            if self.server.proc.poll() is not None:
                self.cfg.vllm_url = None
                self.fail(f"exited with code {self.server.proc.returncode}; its log {self.server.log_path} "
                          f"ends:\n{self.server.log_tail(10)}")
                self.server.stop()
                return

    def stop(self, timeout: float = 90) -> None:
        """Stop vLLM (its whole process group), also while it is still starting."""
        self.done.set()
        deadline = time.monotonic() + timeout
        while True:
            self.server.stop()
            if not self.thread.is_alive():
                break
            self.thread.join(1)
            if time.monotonic() > deadline:
                break
        self.server.stop()

    def unavailable(self) -> str | None:
        if self.state == "starting":
            return (f"the vLLM server behind this API is still starting ({time.monotonic() - self.since:.0f} s so "
                    f"far; its log: {self.server.log_path}); retry in a minute")
        if self.state == "failed":
            return (f"the vLLM server behind this API {self.reason}. Fix that and restart the API, or set "
                    f"vllm_url to a running vLLM server ({VLLM_HINT})")
        return None


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv=None) -> int:
    # the [serve] extra before anything, --help included: on a base install `tunekit api` names it
    import fastapi  # noqa: F401
    import uvicorn

    from tunekit.processes import signals_raise

    args = parser().parse_args(argv)
    cfg = load_config(FinetuneAPIConfig, args.config, flag_overrides(args, args.config_flags))
    load_dotenv()
    api_key = args.api_key or os.environ.get(cfg.api_key_env) or None
    if not is_loopback(cfg.host) and not api_key:
        raise UserError(f"--host {cfg.host}: listening beyond this machine needs an API key; set "
                        f"{cfg.api_key_env} (environment or .env) or pass --api-key")
    if not Path(cfg.sft_config).is_file():
        raise UserError(f"sft_config: {cfg.sft_config} not found (a train/sft.py YAML such as "
                        "configs/banking77/sft_cpu.yaml)")
    base_name, base_path = base_model_of(cfg)
    vllm_key = os.environ.get(cfg.vllm_api_key_env) or None
    setup_logging(cfg.log_level, [api_key, vllm_key])
    if not Path(base_path).exists():
        log.warning("model %s not found; jobs will fail until it exists (`make model`)", base_path)
    local = LocalVLLM(cfg, vllm_key) if cfg.start_vllm and not (cfg.vllm_url or cfg.vllm_urls) else None
    if local and port_taken(cfg.host, cfg.port):  # before vLLM starts for nothing
        raise UserError(f"port: {cfg.host}:{cfg.port} is in use; stop what holds it or pass --port")
    from .proxy import Upstream
    from .routes import create_app

    app = create_app(cfg, api_key, upstream=Upstream.of(cfg, local))
    chat = (f"chat through vLLM at {cfg.vllm_url or ', '.join(cfg.vllm_urls)}" if cfg.vllm_url or cfg.vllm_urls
            else "chat through the vLLM server it starts"
            if local else "chat off (start_vllm false, no vllm_url)")
    log.info("fine-tuning API on http://%s:%s/v1: base model %s (%s), data in %s, %s, %s", cfg.host, cfg.port,
             base_name, base_path, cfg.data_dir, "API key required" if api_key else "no API key", chat)
    # uvicorn logs through the same handler; its startup lines repeat the one above and its access
    # log the request log, so it shows warnings and up (or everything, at debug)
    uvicorn_level = cfg.log_level if cfg.log_level in ("debug", "error", "critical") else "warning"
    # uvicorn takes SIGINT/SIGTERM while it runs and raises them again once it has shut down: then
    # they are a KeyboardInterrupt here, and the finally below stops vLLM
    signals_raise()
    try:
        if local:
            local.start()
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, log_level=uvicorn_level)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            log.info("stopping the vLLM server ...")
            local.stop()
            log.info("stopped")
    return 0
