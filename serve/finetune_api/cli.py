"""The command line: ``python -m serve.finetune_api`` and ``tunekit api`` both call ``main(argv)``.

Flags are the config's keys (``--data-dir`` for ``data_dir``), layered over ``--config``. A mistake the
user can fix is a ``UserError`` (one line, exit status 2). Logging goes to stderr at ``--log-level``
(default info) for the server's loggers (``serve.finetune_api.*``), warnings and up for everything
else (uvicorn included); every line passes through a formatter that masks the API keys, so even a
traceback that quotes one does not show it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tunekit import logs
from tunekit.config import add_dataclass_flags, flag_overrides, load_config
from tunekit.errors import UserError
from tunekit.net import is_loopback

from .config import FinetuneAPIConfig, base_model_of, load_dotenv

log = logging.getLogger(__name__)
PACKAGE_LOGGER = __name__.rsplit(".", 1)[0]  # serve.finetune_api: the routes, the service, the worker, this


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
    p.set_defaults(config_flags=add_dataclass_flags(p, FinetuneAPIConfig, metavars={"vllm_url": "URL"}))
    return p


def main(argv=None) -> int:
    # the [serve] extra before anything, --help included: on a base install `tunekit api` names it
    import fastapi  # noqa: F401
    import uvicorn

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
    setup_logging(cfg.log_level, [api_key, os.environ.get(cfg.vllm_api_key_env)])
    if not Path(base_path).exists():
        log.warning("model %s not found; jobs will fail until it exists (`make model`)", base_path)
    from .routes import create_app

    app = create_app(cfg, api_key)
    log.info("fine-tuning API on http://%s:%s/v1: base model %s (%s), data in %s, %s%s", cfg.host, cfg.port,
             base_name, base_path, cfg.data_dir, "API key required" if api_key else "no API key",
             f", adapters to {cfg.vllm_url}" if cfg.vllm_url else "")
    # uvicorn logs through the same handler; its startup lines repeat the one above and its access
    # log the request log, so it shows warnings and up (or everything, at debug)
    uvicorn_level = cfg.log_level if cfg.log_level in ("debug", "error", "critical") else "warning"
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, log_level=uvicorn_level)
    return 0
