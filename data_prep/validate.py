"""Check chat JSONL files against OpenAI's fine-tuning format rules and a local model's limits.

    python -m data_prep validate runs/demo/data/train.jsonl runs/demo/data/valid.jsonl
    python -m data_prep validate train.jsonl --tokenizer .cache/models/smollm2-135m --max-length 512

The OpenAI rules are those of OpenAI's chat fine-tuning data-prep cookbook, plus ``weight`` (0 or 1,
assistant messages only), at least 10 examples, and at most 65,536 tokens per example
(gpt-4o-mini). Each problem prints as ``FILE:LINE: code: message`` (line 0: the whole file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import UserError
from .sources import check_readable, jsonl_lines

ALLOWED_KEYS = {"role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight"}
ALLOWED_ROLES = {"system", "user", "assistant", "function", "tool"}
MIN_EXAMPLES = 10
MAX_TOKENS_PER_EXAMPLE = 65_536


@dataclass
class Problem:
    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code}: {self.message}"


def check_example(ex) -> list[tuple[str, str]]:
    """The cookbook's format checks for one parsed line: [(code, message)]."""
    if not isinstance(ex, dict):
        return [("data_type", f"expected a JSON object, got {type(ex).__name__}")]
    messages = ex.get("messages")
    if not messages or not isinstance(messages, list):
        return [("missing_messages_list", "no non-empty 'messages' list")]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(("message_data_type", f"messages[{i}] is not an object"))
            continue
        if "role" not in m or "content" not in m and "tool_calls" not in m:
            out.append(("message_missing_key", f"messages[{i}] needs 'role' and 'content'"))
        extra = sorted(set(m) - ALLOWED_KEYS)
        if extra:
            out.append(("message_unrecognized_key", f"messages[{i}] has unrecognised key(s) {', '.join(extra)}"))
        if m.get("role") not in ALLOWED_ROLES:
            out.append(("unrecognized_role", f"messages[{i}] role {m.get('role')!r} is not one of "
                                             f"{', '.join(sorted(ALLOWED_ROLES))}"))
        content = m.get("content")
        if not (m.get("function_call") or m.get("tool_calls")) and (not content or not isinstance(content, str)):
            out.append(("missing_content", f"messages[{i}] ({m.get('role')}) has no text content"))
        if "weight" in m:
            if m.get("role") != "assistant":
                out.append(("weight_not_assistant", f"messages[{i}] has 'weight' but only assistant messages may"))
            elif m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                out.append(("invalid_weight", f"messages[{i}] weight {m['weight']!r} must be 0 or 1"))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        out.append(("example_missing_assistant_message", "no assistant message to learn from"))
    return out


def validate_file(path: str | Path, model: str = DEFAULT_OPENAI_MODEL, tokenizer=None,
                  max_length: int | None = None) -> tuple[int, list[Problem]]:
    """Returns (number of examples, problems). ``tokenizer`` is a loaded HF tokenizer or None."""
    from .tokens import MessageCounter

    path = Path(path)
    name = str(path)
    problems: list[Problem] = []
    try:
        check_readable(path, "jsonl")
    except UserError as e:
        code = "empty_file" if "empty" in str(e) else "not_found" if "not found" in str(e) else "unreadable"
        return 0, [Problem(name, 0, code, str(e).split(": ", 1)[-1])]
    counter = MessageCounter(model)
    n = 0
    for lineno, ex, error in jsonl_lines(path):
        if error:
            code = "invalid_json" if "JSON" in error else "invalid_encoding"
            problems.append(Problem(name, lineno, code, error))
            continue
        n += 1
        found = check_example(ex)
        problems += [Problem(name, lineno, c, m) for c, m in found]
        if found:
            continue
        tokens = counter.messages(ex["messages"])
        if tokens > MAX_TOKENS_PER_EXAMPLE:
            problems.append(Problem(name, lineno, "too_many_tokens",
                                    f"{tokens} tokens > {MAX_TOKENS_PER_EXAMPLE} allowed for {model}; "
                                    "shorten or drop this example"))
        if tokenizer is not None:
            try:
                ids = tokenizer.apply_chat_template(ex["messages"], tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            except Exception as e:  # the model's template rejects this conversation
                problems.append(Problem(name, lineno, "chat_template_error",
                                        f"the model's chat template fails on this example: {str(e).splitlines()[0]}"))
                continue
            if max_length and len(ids) > max_length:
                problems.append(Problem(name, lineno, "exceeds_max_length",
                                        f"{len(ids)} tokens > max_length {max_length}; "
                                        "raise max_length or shorten the example"))
    if n < MIN_EXAMPLES:
        problems.append(Problem(name, 0, "too_few_examples",
                                f"{n} examples; OpenAI needs at least {MIN_EXAMPLES}"))
    return n, problems

