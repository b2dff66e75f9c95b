"""Where fine-tuned model ids are recorded, so the client's aliases (``finetuned``, ...) find them.

One small JSON file (``runs/registry.json``; env ``TUNEKIT_REGISTRY`` moves it) maps
backend -> alias -> {"model": id, ...info}. ``tunekit jobs follow`` records the
``ft:gpt-4o-mini...`` id of a finished OpenAI job there; the local fine-tuning API records its
adapters the same way. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

DEFAULT_PATH = Path("runs/registry.json")


def registry_path() -> Path:
    return Path(os.environ.get("TUNEKIT_REGISTRY") or DEFAULT_PATH)


def load() -> dict:
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def record_model(backend: str, alias: str, model_id: str, **info) -> None:
    """Point ``alias`` on ``backend`` at ``model_id`` (extra info such as job_id is kept beside it)."""
    path = registry_path()
    data = load()
    data.setdefault(backend, {})[alias] = {"model": model_id, "recorded_at": int(time.time()), **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def lookup(backend: str, alias: str) -> str | None:
    entry = load().get(backend, {}).get(alias)
    return entry.get("model") if isinstance(entry, dict) else None
