"""Held-out examples: a chat JSONL whose last assistant message is each example's reference answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_prep.sources import iter_jsonl
from tunekit.errors import UserError


@dataclass
class Example:
    idx: int
    line: int
    messages: list[dict]  # the prompt: everything before the reference answer
    reference: str

    @property
    def text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    out = []
    for line, row in iter_jsonl(Path(path)):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise UserError(f"{path}:{line}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}} "
                            "(the last message is the reference answer)")
        out.append(Example(len(out), line, msgs[:-1], str(msgs[-1].get("content", ""))))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path}: no examples")
    return out
