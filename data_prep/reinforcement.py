"""OpenAI's reinforcement fine-tuning (RFT) format: a prompt, and the fields a grader reads.

    python -m data_prep validate rft.jsonl --method reinforcement
    python -m data_prep.reinforcement runs/demo/data/train.jsonl runs/demo/data/valid.jsonl --out runs/demo/rl_data

One line per example::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "tools": [...], "category": "card_arrival", "reference_answer": "{\\"category\\": \\"card_arrival\\"}"}

``messages`` and ``tools`` are the only reserved keys: every other key of the line is the grader's ``item``
(``{{ item.category }}``). The rules, as OpenAI states them for RFT: ``messages`` is a non-empty list whose
messages pass the supervised per-message checks (``validate.check_messages``; the ``developer`` role is
allowed too, as reasoning models take it) and whose **last message is the user's** (the model writes the
answer, the grader scores it); ``tools``, when given, is a list of function tools, each with a ``name`` of
at most 64 letters, digits, ``_`` or ``-``. At most 65,536 tokens per prompt, at least 10 examples.

The command above makes RFT files from supervised chat JSONL (what ``tunekit build`` writes): each line's
final assistant message is taken off the prompt and kept as ``reference_answer``; when that answer is a JSON
object, its fields become item fields too (``{"category": ...}`` -> ``item.category``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tunekit.errors import UserError, run_main

RESERVED = ("messages", "tools")
REFERENCE = "reference_answer"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_tools(tools) -> list[tuple[str, str]]:
    if not isinstance(tools, list):
        return [("invalid_tools", "tools must be a list of tool definitions")]
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            out.append(("invalid_tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"))
        elif not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
            out.append(("invalid_tools", f"tools[{i}].function.name {fn.get('name')!r} must be 1-64 letters, digits, "
                                         "'_' or '-'"))
        elif "parameters" in fn and not isinstance(fn["parameters"], dict):
            out.append(("invalid_tools", f"tools[{i}].function.parameters must be a JSON Schema object"))
    return out


def check_reinforcement_example(ex) -> list[tuple[str, str]]:
    """OpenAI's RFT format checks for one parsed line: [(code, message)]."""
    from .validate import MISMATCH, check_messages, line_method

    if not isinstance(ex, dict):
        return [("data_type", f"expected a JSON object, got {type(ex).__name__}")]
    if line_method(ex) == "dpo" and "messages" not in ex:
        return [("format_mismatch", MISMATCH["dpo", "reinforcement"])]
    messages = ex.get("messages")
    if not messages or not isinstance(messages, list):
        return [("missing_messages_list", "no non-empty 'messages' list (the prompt)")]
    # developer is the system role of reasoning models; the per-message checks know it as system
    shown = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]
    out = check_messages(shown)
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        out.append(("ends_with_assistant", "messages ends with an assistant message; in reinforcement fine-tuning the "
                                           "model writes the answer and the grader scores it: end with the user turn "
                                           f"and move the answer into a field the grader reads (e.g. {REFERENCE}), or "
                                           "check the file with --method supervised"))
    elif isinstance(last, dict) and last.get("role") != "user":
        out.append(("last_message_not_user", f"the last message is {last.get('role')!r}; a reinforcement prompt ends "
                                             "with the user's turn"))
    if "tools" in ex:
        out += _check_tools(ex["tools"])
    return out


def ends_with_user(ex) -> bool:
    """Is this parsed line a prompt ending with the user's turn (the RFT shape, not a supervised example)?"""
    messages = ex.get("messages") if isinstance(ex, dict) else None
    return bool(messages) and isinstance(messages, list) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "user"


def item_of(ex: dict) -> dict:
    """The grader's ``item``: every field of the line but ``messages`` and ``tools``."""
    return {k: v for k, v in ex.items() if k not in RESERVED}


def reinforcement_token_problems(ex: dict, counter, model: str) -> list[tuple[str, str]]:
    from .validate import too_many_tokens

    return too_many_tokens(counter.messages(ex["messages"]), model, " (prompt)")


# ----------------------------------------------------------------------------- from supervised chat JSONL


def from_chat(ex: dict) -> dict:
    """A supervised example as an RFT line: the prompt without the final assistant answer, which becomes
    ``reference_answer`` (and, when it is a JSON object, its fields become item fields as well)."""
    messages = ex["messages"]
    last = messages[-1]
    answer = last.get("content")
    if last.get("role") != "assistant" or not isinstance(answer, str):
        raise ValueError("the last message is not an assistant answer with text content")
    out = {"messages": messages[:-1], **({"tools": ex["tools"]} if "tools" in ex else {}), REFERENCE: answer}
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        out.update({k: v for k, v in parsed.items() if k not in (*RESERVED, REFERENCE)})
    return out


def convert(path: Path, out_dir: Path) -> tuple[Path, int]:
    """``path`` (checked supervised chat JSONL) -> ``out_dir/<same name>`` in the RFT format."""
    from .validate import checked_examples

    examples = checked_examples(path, str(path))
    rows = []
    for i, ex in enumerate(examples, 1):
        try:
            row = from_chat(ex)
        except ValueError as e:
            raise UserError(f"{path}: example {i}: {e}; every line must end with the assistant's answer") from None
        if check_reinforcement_example(row):
            code, message = check_reinforcement_example(row)[0]
            raise UserError(f"{path}: example {i} makes no RFT prompt ({code}: {message})")
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    if target.resolve() == path.resolve():
        raise UserError(f"--out {out_dir}: would overwrite its input {path}; choose another folder")
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(target)
    return target, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.reinforcement", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each FILE's final assistant answer becomes reference_answer (and its JSON "
                                       "fields item fields); the files keep their names under --out.")
    p.add_argument("files", nargs="+", metavar="FILE.jsonl", help="supervised chat JSONL (tunekit build)")
    p.add_argument("--out", required=True, help="folder for the RFT files")

    def run(args):
        for f in args.files:
            target, n = convert(Path(f), Path(args.out))
            print(f"{f}: {n} examples -> {target} (reinforcement format)")
        return 0

    return run_main(lambda a: run(p.parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
