"""The API client and the job records: backends, one-line API errors, runs/openai_jobs/<job id>.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunekit.config import load_dotenv
from tunekit.errors import UserError

BACKENDS = {"openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
            "local": ("http://127.0.0.1:8100/v1", "TUNEKIT_API_KEY")}
TERMINAL = ("succeeded", "failed", "cancelled")
JOBS_DIR = "runs/openai_jobs"  # job records and the upload cache (OpenAIJobConfig.jobs_dir's default)


def make_client(backend: str, base_url: str | None, max_retries: int = 5, timeout_s: float = 120.0):
    import openai

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: choose openai or local")
    default_url, key_var = BACKENDS[backend]
    load_dotenv()
    key = os.environ.get(key_var)
    if not key and backend == "openai":
        raise UserError(f"{key_var} is not set; put it in the environment or in a .env file (KEY=VALUE)")
    client = openai.OpenAI(api_key=key or "none", base_url=base_url or default_url, max_retries=max_retries,
                           timeout=timeout_s)
    return client


def server_url(client) -> str:
    """The client's API address without the trailing slash, as records and messages show it."""
    return str(client.base_url).rstrip("/")


def explain(exc: Exception, client) -> UserError:
    """One line for an API failure, with the server's own message."""
    import openai

    where = server_url(client)
    if isinstance(exc, openai.AuthenticationError):
        var = "OPENAI_API_KEY" if "api.openai.com" in where else "TUNEKIT_API_KEY"
        return UserError(f"{where} refused the API key; set {var} (environment or .env) to the right key")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        msg = body.get("message") or str(exc)
        param = f" (param {body['param']})" if body.get("param") else ""
        return UserError(f"{where}: {exc.status_code} {msg}{param}")
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return UserError(f"cannot reach {where} ({type(exc).__name__}) after {client.max_retries} retries; "
                         "is the server running? (local: `python -m serve.finetune_api --config ...`)")
    return UserError(f"{where}: {exc}")


def transient(exc: Exception) -> bool:
    import openai

    return isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                            openai.InternalServerError)) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500)


# ----------------------------------------------------------------------------- job records


def jobs_dir(path: str | None) -> Path:
    return Path(path or JOBS_DIR)


def read_record(job_id: str, folder: Path) -> dict:
    path = folder / f"{job_id}.json"
    return json.loads(path.read_text()) if path.is_file() else {"job_id": job_id}


def write_record(rec: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rec['job_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def backend_flags(rec: dict) -> str:
    """The flags that point a printed follow-up command at the job's backend (none for OpenAI)."""
    if rec.get("backend") == "local":
        return f" --backend local --base-url {rec['base_url']}"
    return ""


# ----------------------------------------------------------------------------- a job's client


def client_for(args, rec: dict):
    backend = args.backend or rec.get("backend") or "openai"
    base_url = args.base_url or (rec.get("base_url") if backend == rec.get("backend") else None)
    return make_client(backend, base_url, args.max_retries, args.timeout), backend


def api_call(args, fn):
    rec = read_record(args.job_id, jobs_dir(args.jobs_dir)) if getattr(args, "job_id", None) else {}
    client, _ = client_for(args, rec)
    try:
        return fn(client), rec
    except Exception as e:
        raise explain(e, client) from None
