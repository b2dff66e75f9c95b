"""Held-out examples: a chat JSONL whose last assistant message is each example's reference answer.

Each example also carries its grader ``item`` (``grader``: grading.py): the line's other fields,
``reference_answer`` and, when the reference is a JSON object, its fields, as data_prep/reinforcement.py makes
a reinforcement line's item from the same chat line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_prep.sources import iter_jsonl
from tunekit.errors import UserError


@dataclass
class Example:
    idx: int
    line: int
    messages: list[dict]  # the prompt: everything before the reference answer
    reference: str
    item: dict = field(default_factory=dict)  # what a grader's {{ item.x }} reads

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
        out.append(Example(len(out), line, msgs[:-1], str(msgs[-1].get("content", "")), item_of_line(row)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def item_of_line(row: dict) -> dict:
    """The grader's item of a chat line (data_prep.reinforcement's, of the line as an RFT prompt)."""
    from data_prep.reinforcement import REFERENCE, from_chat, item_of

    fields = item_of(row)
    try:
        return {**fields, **item_of(from_chat(row))}
    except (ValueError, KeyError, TypeError, AttributeError):  # an answer without text content: the fields only
        return {**fields, REFERENCE: ""}
