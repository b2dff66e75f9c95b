"""A job's files checked as OpenAI checks them, failures worded as OpenAI's ``job.error``.

The rules are data_prep's (``data_prep.validate.validate_file``), with its line numbers, by the job's method:

- supervised: the chat format of OpenAI's data-preparation cookbook (``{"messages": [...]}`` ending with
  the assistant's answer), at most 65,536 tokens per example, at least 10 examples;
- dpo: OpenAI's preference format, ``{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", ...}], "non_preferred_output": [{...}]}`` (``validate_file(path, method="dpo")``), at least
  10 examples too;
- reinforcement: OpenAI's RFT format, ``{"messages": [... ending with the user's turn], <fields>}``
  (``data_prep/reinforcement.py``), at least 10 and at most 50,000 training examples, at most 1,000
  validation ones (OpenAI's RFT guide), and every ``{{ item.x }}`` the job's grader reads present in every
  line (else each of that line's answers would score 0, an ``invalid_variable_error``).

A file of another method's format (a chat file on a DPO job, a preference file on a supervised one, a chat
file whose lines end with the answer on a reinforcement job) is named as such from its first example, before
data_prep's rules run (they would report each line's ``format_mismatch``). What a failed job then carries,
as OpenAI's do:

- a format problem: ``{"code": "invalid_training_file", "param": "training_file", "message": "The job
  failed due to an invalid training file. Invalid file format: line 17: example_missing_assistant_message:
  ...; line 18: invalid_json: ..."}`` (the first five problems; ``invalid_validation_file`` for the
  validation file);
- too few examples: ``{"code": "invalid_n_examples", "param": "training_file", "message": "Training file
  has 7 example(s), but must have at least 10 examples"}`` (a validation file needs one example);
- a file deleted before validation: ``invalid_training_file`` / ``invalid_validation_file``.
"""

from __future__ import annotations

from pathlib import Path

SHOWN = 5
KINDS = {"training_file": "training", "validation_file": "validation"}
DPO_LINE = ('{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}], '
            '"non_preferred_output": [{"role": "assistant", "content": ...}]}')
RFT_LINE = '{"messages": [... ending with the user\'s turn], <the fields the grader reads>}'
MAX_RL_EXAMPLES = {"training_file": 50_000, "validation_file": 1_000}


def where(problem) -> str:
    return (f"line {problem.line}: " if problem.line else "") + f"{problem.code}: {problem.message}"


def other_format(path: str, method: str) -> str | None:
    """Why the file is in another method's format (judged by its first example), or None."""
    from data_prep.reinforcement import ends_with_user
    from data_prep.sources import jsonl_lines
    from data_prep.validate import line_method

    line, ex = next(((n, ex) for n, ex, error in jsonl_lines(Path(path)) if not error and isinstance(ex, dict)),
                    (0, None))
    found = line_method(ex)
    if found == "supervised" and ends_with_user(ex):
        found = "reinforcement"
    if method == "reinforcement":
        if found == "dpo":
            return (f"line {line} is a DPO example (input, preferred_output, non_preferred_output) and this is a "
                    f"reinforcement job: each line of its files is a prompt, {RFT_LINE}")
        if found == "supervised":
            return (f"line {line} is a supervised (chat) example that ends with the assistant's answer, and this is a "
                    f"reinforcement job (method.type 'reinforcement'): each line of its files is a prompt, {RFT_LINE}; "
                    "`python -m data_prep.reinforcement CHAT.jsonl --out DIR` makes such a file (the answer becomes "
                    "the field reference_answer)")
        return None
    if found == "reinforcement":
        return (f"line {line} is a reinforcement example (its messages end with the user's turn) and this is a "
                f"{'DPO' if method == 'dpo' else 'supervised'} job: create it with method={{\"type\": "
                "\"reinforcement\", ...}} and a grader to train on prompts, or upload examples that end with the "
                "assistant's answer")
    if found == "supervised" and method == "dpo":
        return (f"line {line} is a supervised (chat) example, {{\"messages\": [...]}}, and this is a DPO job "
                f"(method.type 'dpo'): each line of its files is a preference pair, {DPO_LINE}; upload such a file, "
                "or create the job with method.type 'supervised' to train on this one")
    if found == "dpo" and method == "supervised":
        return (f"line {line} is a DPO example (input, preferred_output, non_preferred_output) and this is a "
                "supervised job: create it with method={\"type\": \"dpo\", ...} to train on preferences, or upload "
                "chat examples ({\"messages\": [...]})")
    return None


def file_error(param: str, file_id: str, path: str | None, method: str | dict = "supervised"
               ) -> tuple[int, dict | None]:
    """(examples in the file, None) or (examples, the job's ``error`` object), by the rules of ``method`` (its
    type, or the job's method object: a reinforcement job's grader is checked against the lines too)."""
    from data_prep.validate import MIN_EXAMPLES, validate_file

    grader = method.get("reinforcement", {}).get("grader") if isinstance(method, dict) else None
    method = method if isinstance(method, str) else method["type"]
    kind = KINDS[param]
    prefix = f"The job failed due to an invalid {kind} file."
    if path is None or not Path(path).is_file():
        return 0, {"code": f"invalid_{kind}_file", "param": param,
                   "message": f"{prefix} File {file_id} was deleted before it was validated."}
    if why := other_format(path, method):
        return 0, {"code": f"invalid_{kind}_file", "param": param, "message": f"{prefix} Invalid file format: {why}"}
    n, problems = validate_file(path, method=method)
    format_problems = [p for p in problems if p.code != "too_few_examples"]
    if format_problems:
        shown = "; ".join(where(p) for p in format_problems[:SHOWN])
        more = f" (and {len(format_problems) - SHOWN} more)" if len(format_problems) > SHOWN else ""
        return n, {"code": f"invalid_{kind}_file", "param": param,
                   "message": f"{prefix} Invalid file format: {shown}{more}"}
    if param == "training_file" and n < MIN_EXAMPLES:
        return n, {"code": "invalid_n_examples", "param": param,
                   "message": f"Training file has {n} example(s), but must have at least {MIN_EXAMPLES} examples"}
    if method == "reinforcement" and n > MAX_RL_EXAMPLES[param]:
        return n, {"code": "invalid_n_examples", "param": param,
                   "message": f"{kind.capitalize()} file has {n} example(s), but must have at most "
                              f"{MAX_RL_EXAMPLES[param]:,} examples for reinforcement fine-tuning"}
    if grader and (why := missing_item_fields(path, grader)):
        return n, {"code": f"invalid_{kind}_file", "param": param, "message": f"{prefix} Invalid file format: {why}"}
    return n, None


def missing_item_fields(path: str, grader: dict) -> str | None:
    """The first line that lacks an ``{{ item.x }}`` the grader reads (a python grader's source is its own), or
    None."""
    from data_prep.reinforcement import item_of
    from data_prep.sources import jsonl_lines
    from serve.graders.templates import item_paths, missing_item_path

    wanted = item_paths(grader)
    for n, ex, error in jsonl_lines(Path(path)) if wanted else ():
        if error or not isinstance(ex, dict):
            continue
        item = item_of(ex)
        if p := missing_item_path(wanted, item):
            return (f"line {n}: missing_item_field: the grader reads {{{{ {p} }}}} and this line has no such field "
                    f"(its fields: {', '.join(item) or 'none'}); every line needs the fields the grader reads")
    return None
