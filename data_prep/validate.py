"""Check fine-tuning JSONL files against OpenAI's format rules and a local model's limits.

    python -m data_prep validate runs/demo/data/train.jsonl runs/demo/data/valid.jsonl
    python -m data_prep validate train.jsonl --tokenizer .cache/models/smollm2-135m --max-length 512
    python -m data_prep validate prefs.jsonl --method dpo
    python -m data_prep validate rft.jsonl --method reinforcement

Three formats: supervised (``{"messages": [...]}`` per line), DPO (``{"input": {"messages": [...]},
"preferred_output": [...], "non_preferred_output": [...]}``, see ``preference.py``) and reinforcement
(``{"messages": [... ending with the user's turn], <the grader's item fields>}``, see ``reinforcement.py``);
``--method auto`` (the default) tells them apart by the file's first JSON object (:func:`detect_method`).

The supervised rules are those of OpenAI's chat fine-tuning data-prep cookbook, plus ``weight``
(0 or 1, assistant messages only), at least 10 examples, and at most 65,536 tokens per example
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
METHODS = ("supervised", "dpo", "reinforcement")
DPO_KEYS = ("input", "preferred_output", "non_preferred_output")
MISMATCH = {
    ("supervised", "dpo"): 'this line is in the supervised format ({"messages": [...]}), not DPO '
                           '({"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}); '
                           "convert it, or check the file with --method supervised",
    ("dpo", "supervised"): "this line is in the DPO (preference) format (input, preferred_output, "
                           'non_preferred_output), not supervised ({"messages": [...]}); '
                           "check the file with --method dpo, or convert it",
    ("dpo", "reinforcement"): "this line is in the DPO (preference) format (input, preferred_output, "
                              "non_preferred_output), not reinforcement ({\"messages\": [... ending with the user's "
                              "turn], <fields the grader reads>}); check the file with --method dpo, or convert it",
    ("reinforcement", "dpo"): "this line is in the reinforcement format (messages ending with the user's turn, plus "
                              "fields a grader reads), not DPO; check the file with --method reinforcement, or "
                              "convert it",
}


@dataclass
class Problem:
    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code}: {self.message}"


def check_messages(messages: list, prefix: str = "messages") -> list[tuple[str, str]]:
    """The cookbook's checks for each message of a list (named ``prefix[i]``): [(code, message)]."""
    out = []
    for i, m in enumerate(messages):
        where = f"{prefix}[{i}]"
        if not isinstance(m, dict):
            out.append(("message_data_type", f"{where} is not an object"))
            continue
        if "role" not in m or "content" not in m and "tool_calls" not in m:
            out.append(("message_missing_key", f"{where} needs 'role' and 'content'"))
        extra = sorted(set(m) - ALLOWED_KEYS)
        if extra:
            out.append(("message_unrecognized_key", f"{where} has unrecognised key(s) {', '.join(extra)}"))
        if m.get("role") not in ALLOWED_ROLES:
            out.append(("unrecognized_role", f"{where} role {m.get('role')!r} is not one of "
                                             f"{', '.join(sorted(ALLOWED_ROLES))}"))
        content = m.get("content")
        if not (m.get("function_call") or m.get("tool_calls")) and (not content or not isinstance(content, str)):
            out.append(("missing_content", f"{where} ({m.get('role')}) has no text content"))
        if "weight" in m:
            if m.get("role") != "assistant":
                out.append(("weight_not_assistant", f"{where} has 'weight' but only assistant messages may"))
            elif m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                out.append(("invalid_weight", f"{where} weight {m['weight']!r} must be 0 or 1"))
    return out


def check_example(ex) -> list[tuple[str, str]]:
    """The cookbook's format checks for one parsed supervised line: [(code, message)]."""
    if not isinstance(ex, dict):
        return [("data_type", f"expected a JSON object, got {type(ex).__name__}")]
    messages = ex.get("messages")
    if not messages or not isinstance(messages, list):
        return [("missing_messages_list", "no non-empty 'messages' list")]
    out = check_messages(messages)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        out.append(("example_missing_assistant_message", "no assistant message to learn from"))
    return out


def line_method(ex) -> str | None:
    """The format one parsed line is in: "dpo", "supervised", or None when it looks like neither."""
    if not isinstance(ex, dict):
        return None
    if any(k in ex for k in DPO_KEYS):
        return "dpo"
    return "supervised" if "messages" in ex else None


def detect_method(path: str | Path) -> str:
    """"dpo" when the file's first JSON object has an ``input`` / ``preferred_output`` /
    ``non_preferred_output`` key, "reinforcement" when its ``messages`` end with the user's turn, else
    "supervised". Missing, empty or binary files are a UserError."""
    from .reinforcement import ends_with_user

    path = Path(path)
    check_readable(path, "jsonl")
    for _, ex, error in jsonl_lines(path):
        if not error and isinstance(ex, dict):
            method = line_method(ex)
            return "dpo" if method == "dpo" else "reinforcement" if ends_with_user(ex) else "supervised"
    return "supervised"


def _mismatch(ex, method: str) -> str | None:
    """Why a line is in another method's format than ``method`` (one ``format_mismatch``), or None. A chat line
    checked as supervised is never one: a missing answer is that line's own problem."""
    from .reinforcement import ends_with_user

    other = line_method(ex)
    if other in (None, method) or (other == "supervised" and method == "reinforcement"):
        return None  # the reinforcement rules name an assistant ending themselves
    if other == "supervised" and ends_with_user(ex):
        other = "reinforcement"
    return MISMATCH.get((other, method))


def too_many_tokens(tokens: int, model: str, what: str = "") -> list[tuple[str, str]]:
    if tokens <= MAX_TOKENS_PER_EXAMPLE:
        return []
    return [("too_many_tokens", f"{tokens} tokens{what} > {MAX_TOKENS_PER_EXAMPLE} allowed for {model}; "
                                "shorten or drop this example")]


def local_model_problems(tokenizer, conversations: list[list[dict]], max_length: int | None,
                         what: str = "") -> list[tuple[str, str]]:
    """Render each conversation with the model's chat template; the longest must fit max_length."""
    lengths = []
    for messages in conversations:
        try:
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        except Exception as e:  # the model's template rejects this conversation
            return [("chat_template_error",
                     f"the model's chat template fails on this example: {str(e).splitlines()[0]}")]
        lengths.append(len(ids))
    if max_length and max(lengths) > max_length:
        return [("exceeds_max_length", f"{max(lengths)} tokens{what} > max_length {max_length}; "
                                       "raise max_length or shorten the example")]
    return []


def _length_problems(ex: dict, method: str, counter, model: str, tokenizer, max_length) -> list[tuple[str, str]]:
    if method == "reinforcement":
        from .reinforcement import reinforcement_token_problems

        found = reinforcement_token_problems(ex, counter, model)
        if tokenizer is not None:
            found += local_model_problems(tokenizer, [ex["messages"]], max_length, " (prompt)")
        return found
    if method == "dpo":
        from .preference import conversations, preference_token_problems

        found = preference_token_problems(ex, counter, model)
        if tokenizer is not None:
            found += local_model_problems(tokenizer, conversations(ex), max_length, " (prompt + longer output)")
        return found
    found = too_many_tokens(counter.messages(ex["messages"]), model)
    if tokenizer is not None:
        found += local_model_problems(tokenizer, [ex["messages"]], max_length)
    return found


def _resolve_method(method: str | None, path: Path) -> str:
    if method in (None, "auto"):
        return detect_method(path)
    if method not in METHODS:
        raise UserError(f"--method {method}: use auto, supervised, dpo or reinforcement")
    return method


def validate_file(path: str | Path, model: str = DEFAULT_OPENAI_MODEL, tokenizer=None,
                  max_length: int | None = None, method: str | None = None) -> tuple[int, list[Problem]]:
    """Returns (number of examples, problems). ``tokenizer`` is a loaded HF tokenizer or None.

    ``method``: "supervised", "dpo", "reinforcement", or None / "auto" for :func:`detect_method`'s choice. A
    line in another method's format is one ``format_mismatch`` problem, not a cascade of missing keys.
    """
    from .tokens import MessageCounter

    path = Path(path)
    name = str(path)
    problems: list[Problem] = []
    try:
        check_readable(path, "jsonl")
    except UserError as e:
        code = "empty_file" if "empty" in str(e) else "not_found" if "not found" in str(e) else "unreadable"
        return 0, [Problem(name, 0, code, str(e).split(": ", 1)[-1])]
    method = _resolve_method(method, path)
    check = CHECKS[method]()
    counter = MessageCounter(model)
    n = 0
    for lineno, ex, error in jsonl_lines(path):
        if error:
            code = "invalid_json" if "JSON" in error else "invalid_encoding"
            problems.append(Problem(name, lineno, code, error))
            continue
        n += 1
        mismatch = _mismatch(ex, method)
        found = [("format_mismatch", mismatch)] if mismatch else check(ex)
        if not found:
            found = _length_problems(ex, method, counter, model, tokenizer, max_length)
        problems += [Problem(name, lineno, c, m) for c, m in found]
    if n < MIN_EXAMPLES:
        problems.append(Problem(name, 0, "too_few_examples",
                                f"{n} examples; OpenAI needs at least {MIN_EXAMPLES}"))
    return n, problems


def _reinforcement_check():
    from .reinforcement import check_reinforcement_example

    return check_reinforcement_example


def _preference_check():
    from .preference import check_preference_example

    return check_preference_example


# method -> its per-line check (imported when used: preference.py and reinforcement.py import this module)
CHECKS = {"supervised": lambda: check_example, "dpo": _preference_check, "reinforcement": _reinforcement_check}
WHAT = {"supervised": "chat", "dpo": "DPO", "reinforcement": "reinforcement (RFT)"}
SHOWN = 5  # problems named in a checked_examples error


def checked_examples(path: str | Path | None, key: str, method: str = "supervised",
                     limit: int | None = None) -> list[dict]:
    """The examples of a chat (``supervised``), DPO or reinforcement JSONL file that a training script or the
    comparison reads (the first ``limit`` of them), each checked with OpenAI's rules; a missing file, or problems
    (the first five named with their lines), are one UserError naming the config ``key``."""
    check, what = CHECKS[method](), WHAT[method]
    flag = f" --method {method}" if method != "supervised" else ""
    made_by = "`python -m data_prep.reinforcement CHAT.jsonl --out DIR`" if method == "reinforcement" else \
        "`tunekit build --config ...`"
    if not path:
        raise UserError(f"{key}: required (the {what} JSONL from {made_by})")
    if not Path(path).is_file():
        raise UserError(f"{key}: {path} not found; make it with {made_by}")
    examples, problems = [], []
    for lineno, ex, error in jsonl_lines(Path(path)):
        found = [("invalid_json", error)] if error else check(ex)
        problems += [f"{path}:{lineno}: {code}: {msg}" for code, msg in found]
        if not found:
            examples.append(ex)
            if limit and len(examples) >= limit:
                break
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise UserError(f"{key}: {path} is not valid {what} JSONL: {'; '.join(problems[:SHOWN])}{more}; "
                        f"run `tunekit validate{flag} {path}`")
    if not examples:
        raise UserError(f"{key}: {path} holds no examples")
    return examples
