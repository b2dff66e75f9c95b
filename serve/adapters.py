"""Add or remove a LoRA adapter on a running local vLLM server (runtime LoRA loading).

    python -m serve.adapters add support-v2 runs/banking77/sft_cpu [--config configs/banking77/serve.yaml]
    python -m serve.adapters remove support-v2
    python -m serve.adapters list

The server must have been started by ``python -m serve.vllm_server`` (it turns on
VLLM_ALLOW_RUNTIME_LORA_UPDATING). The API key comes from the environment variable named by the
config's ``server.api_key_env`` (default TUNEKIT_API_KEY) or a ``.env`` file, never from a flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from tunekit.constants import VLLM_LORA_RANKS
from tunekit.errors import UserError, run_main

SUPPORTED_RANKS = VLLM_LORA_RANKS  # vLLM's --max-lora-rank choices


def read_adapter(run_dir: str | Path) -> dict:
    """adapter_config.json of a training run directory, checked for what vLLM refuses to serve."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "adapter_config.json"
    if not cfg_path.is_file():
        hint = " (training has not finished: no adapter yet)" if run_dir.is_dir() else ""
        raise UserError(f"{run_dir}: no adapter_config.json{hint}; pass the output_dir of a finished "
                        "`train/sft.py` run")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("modules_to_save"):
        raise UserError(f"{cfg_path}: modules_to_save={cfg['modules_to_save']}: vLLM cannot serve adapters "
                        "that train whole modules; retrain without modules_to_save")
    return cfg


def server_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    for r in SUPPORTED_RANKS:
        if r >= rank:
            return r
    raise UserError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {SUPPORTED_RANKS[-1]}")


def _root(base_url: str) -> str:
    """http://host:port from an OpenAI-style base URL (with or without /v1)."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def _post(base_url: str, path: str, payload: dict, api_key: str | None) -> httpx.Response:
    url = _root(base_url) + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.post(url, json=payload, headers=headers, timeout=300)
    except httpx.TransportError:
        raise UserError(f"no server answers at {_root(base_url)}; start it with "
                        "`python -m serve.vllm_server --config configs/<use_case>/serve.yaml`") from None
    if resp.status_code == 401:
        raise UserError(f"{_root(base_url)} refused the API key; set the key the server was started with "
                        "(environment variable TUNEKIT_API_KEY or .env)")
    if resp.status_code == 404 and "adapter" not in resp.text.lower():
        raise UserError(f"{url}: not found; the server was started without runtime LoRA loading "
                        "(start it with `python -m serve.vllm_server`, which enables it)")
    return resp


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return resp.text.strip()


def add_adapter(base_url: str, name: str, run_dir: str | Path, api_key: str | None = None) -> None:
    """Load the adapter in ``run_dir`` into the server as model ``name``; raises UserError."""
    read_adapter(run_dir)
    resp = _post(base_url, "/v1/load_lora_adapter",
                 {"lora_name": name, "lora_path": str(Path(run_dir).resolve())}, api_key)
    if resp.status_code != 200:
        raise UserError(f"the server refused adapter {name!r} from {run_dir}: {_message(resp)}")


def remove_adapter(base_url: str, name: str, api_key: str | None = None) -> None:
    resp = _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key)
    if resp.status_code != 200:
        raise UserError(f"the server could not remove adapter {name!r}: {_message(resp)}")


def list_models(base_url: str, api_key: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(_root(base_url) + "/v1/models", headers=headers, timeout=30)
    except httpx.TransportError:
        raise UserError(f"no server answers at {_root(base_url)}; start it with "
                        "`python -m serve.vllm_server --config configs/<use_case>/serve.yaml`") from None
    if resp.status_code == 401:
        raise UserError(f"{_root(base_url)} refused the API key; set TUNEKIT_API_KEY (or .env) to the server's key")
    resp.raise_for_status()
    return resp.json()["data"]


def main(argv=None) -> int:
    from .client import load_settings

    p = argparse.ArgumentParser(prog="python -m serve.adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="serve.yaml of the running server (for its address and key variable)")
    p.add_argument("--base-url", help="server address, e.g. http://127.0.0.1:8000/v1 (default: from --config)")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="load a training run's adapter under NAME")
    a.add_argument("name")
    a.add_argument("run_dir")
    r = sub.add_parser("remove", help="unload adapter NAME")
    r.add_argument("name")
    sub.add_parser("list", help="models the server serves")
    args = p.parse_args(argv)

    settings = load_settings(args.config, backend="local")
    base_url = args.base_url or settings.local_base_url
    key = settings.local_api_key()
    if args.cmd == "add":
        add_adapter(base_url, args.name, args.run_dir, key)
        print(f"added {args.name} ({args.run_dir}) to {base_url}")
    elif args.cmd == "remove":
        remove_adapter(base_url, args.name, key)
        print(f"removed {args.name} from {base_url}")
    else:
        for m in list_models(base_url, key):
            parent = f"  (adapter on {m['parent']})" if m.get("parent") else ""
            print(f"{m['id']}{parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
