"""The servers' logging, written once: the fine-tuning API, its job worker and the vLLM launcher.

One stderr handler on the root logger: the program's own loggers at ``--log-level`` (default info),
everything else (uvicorn, httpx, ...) at warning and up. Every line passes through a formatter that
masks the API keys it was given, so even a traceback that quotes one does not show it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Literal, get_args

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
MASK = "[redacted]"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """A formatter that replaces each secret (of 4 characters or more) in the formatted line by ``[redacted]``."""

    def __init__(self, fmt: str, secrets: list[str | None]):
        super().__init__(fmt)
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def setup_logging(level: str, loggers: tuple[str, ...], secrets: list[str | None] = ()) -> logging.Handler:
    """One stderr handler on the root logger: ``loggers`` at ``level``, the rest at warning and up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(FORMAT, list(secrets)))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in loggers:
        logging.getLogger(name).setLevel(level.upper())
    return handler


def add_log_level_flag(p: argparse.ArgumentParser, what: str, default: str | None = "info") -> None:
    p.add_argument("--log-level", dest="log_level", type=str.lower, choices=LOG_LEVELS, default=default,
                   help=f"of {what} on stderr (default info)")
