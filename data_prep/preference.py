"""OpenAI's DPO (preference) training format: one prompt, a preferred and a non-preferred answer.

    python -m data_prep validate prefs.jsonl --method dpo
    python -m data_prep stats prefs.jsonl
    python -m data_prep build --config prefs_build.yaml     # method: dpo, with chosen / rejected

One line per example::

    {"input": {"messages": [... ending with a user turn], "tools": [...], "parallel_tool_calls": true},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

``input.messages`` gets the supervised per-message checks (``validate.check_messages``); each output
is exactly one assistant message without ``weight``. Tokens are counted the cookbook's way
(``tokens.MessageCounter``): the prompt as a conversation, each output as one more message, so
prompt + output is what the conversation prompt + [output] counts. The 65,536-token limit applies
to the prompt plus the longer output.
"""

from __future__ import annotations

from pathlib import Path

from tunekit.errors import UserError
from .sources import check_readable, iter_jsonl
from .tokens import TOKENS_REPLY_PRIMER
from .validate import ALLOWED_KEYS, check_messages, too_many_tokens

TOP_KEYS = {"input", "preferred_output", "non_preferred_output"}
INPUT_KEYS = {"messages", "tools", "parallel_tool_calls"}
OUTPUTS = ("preferred_output", "non_preferred_output")


def _check_input(inp) -> list[tuple[str, str]]:
    if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list) or not inp["messages"]:
        return [("missing_messages_list", "'input' needs a non-empty 'messages' list")]
    messages = inp["messages"]
    out = check_messages(messages, "input.messages")
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        out.append(("input_ends_with_assistant", "input.messages ends with an assistant message; end it with "
                                                 "the user turn (the outputs are the assistant's answer)"))
    extra = sorted(set(inp) - INPUT_KEYS)
    if extra:
        out.append(("unrecognized_key", f"input has unrecognised key(s) {', '.join(extra)}; "
                                        f"allowed: {', '.join(sorted(INPUT_KEYS))}"))
    if "tools" in inp and not isinstance(inp["tools"], list):
        out.append(("invalid_tools", "input.tools must be a list of tool definitions"))
    if "parallel_tool_calls" in inp and not isinstance(inp["parallel_tool_calls"], bool):
        out.append(("invalid_parallel_tool_calls", "input.parallel_tool_calls must be true or false"))
    return out


def _check_output(ex: dict, key: str) -> list[tuple[str, str]]:
    if key not in ex:
        return [(f"missing_{key}", f"no '{key}'; give a list of one assistant message")]
    value = ex[key]
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        return [(f"invalid_{key}", f"{key} must be a list of exactly one assistant message")]
    m, where = value[0], f"{key}[0]"
    out = []
    if m.get("role") != "assistant":
        out.append(("output_not_assistant", f"{where} role {m.get('role')!r} must be 'assistant'"))
    content = m.get("content")
    if not (m.get("tool_calls") or m.get("function_call")) and (not content or not isinstance(content, str)):
        out.append(("missing_content", f"{where} has no text content"))
    if "weight" in m:
        out.append(("weight_in_output", f"{where} has 'weight', which DPO outputs may not; remove it"))
    extra = sorted(set(m) - ALLOWED_KEYS)
    if extra:
        out.append(("message_unrecognized_key", f"{where} has unrecognised key(s) {', '.join(extra)}"))
    return out


def check_preference_example(ex) -> list[tuple[str, str]]:
    """OpenAI's DPO format checks for one parsed line: [(code, message)]."""
    if not isinstance(ex, dict):
        return [("data_type", f"expected a JSON object, got {type(ex).__name__}")]
    out = []
    extra = sorted(set(ex) - TOP_KEYS)
    if extra:
        out.append(("unrecognized_key", f"unrecognised key(s) {', '.join(extra)}; "
                                        "allowed: input, preferred_output, non_preferred_output"))
    out += _check_input(ex["input"]) if "input" in ex else [("missing_input", "no 'input' with the prompt messages")]
    outputs = [_check_output(ex, key) for key in OUTPUTS]
    out += outputs[0] + outputs[1]
    if not outputs[0] + outputs[1] and ex["preferred_output"] == ex["non_preferred_output"]:
        out.append(("identical_outputs", "preferred_output and non_preferred_output are the same, so the "
                                         "pair teaches nothing; fix or drop it"))
    return out


def conversations(ex: dict) -> list[list[dict]]:
    """[prompt + preferred, prompt + non-preferred]: the two conversations a trainer sees."""
    prompt = ex["input"]["messages"]
    return [prompt + ex[key] for key in OUTPUTS]


def count_tokens(ex: dict, counter) -> tuple[int, int, int]:
    """(prompt, preferred, non-preferred) tokens; prompt + an output = that whole conversation's count."""
    prompt = counter.messages(ex["input"]["messages"])
    return (prompt, *(counter.messages(ex[key]) - TOKENS_REPLY_PRIMER for key in OUTPUTS))


def preference_token_problems(ex: dict, counter, model: str) -> list[tuple[str, str]]:
    prompt, preferred, rejected = count_tokens(ex, counter)
    return too_many_tokens(prompt + max(preferred, rejected), model, " (prompt + longer output)")


def load_preference_examples(path: Path) -> list[dict]:
    """Every line of a DPO file; the first malformed one is a UserError naming it."""
    check_readable(path, "jsonl")
    out = []
    for lineno, ex in iter_jsonl(path):
        found = check_preference_example(ex)
        if found:
            code, message = found[0]
            raise UserError(f"{path}:{lineno}: {code}: {message}; "
                            f"run `tunekit validate {path}` for every problem")
        out.append(ex)
    if not out:
        raise UserError(f"{path}: no examples")
    return out
