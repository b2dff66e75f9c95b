"""A job's files checked as OpenAI checks them, failures worded as OpenAI's ``job.error``.

The rules are data_prep's (``data_prep.validate.validate_file``: the chat format of OpenAI's
data-preparation cookbook, at most 65,536 tokens per example, at least 10 examples), with its line
numbers. What a failed job then carries, as OpenAI's do:

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


def where(problem) -> str:
    return (f"line {problem.line}: " if problem.line else "") + f"{problem.code}: {problem.message}"


def file_error(param: str, file_id: str, path: str | None) -> tuple[int, dict | None]:
    """(examples in the file, None) or (examples, the job's ``error`` object)."""
    from data_prep.validate import MIN_EXAMPLES, validate_file

    kind = KINDS[param]
    prefix = f"The job failed due to an invalid {kind} file."
    if path is None or not Path(path).is_file():
        return 0, {"code": f"invalid_{kind}_file", "param": param,
                   "message": f"{prefix} File {file_id} was deleted before it was validated."}
    n, problems = validate_file(path)
    format_problems = [p for p in problems if p.code != "too_few_examples"]
    if format_problems:
        shown = "; ".join(where(p) for p in format_problems[:SHOWN])
        more = f" (and {len(format_problems) - SHOWN} more)" if len(format_problems) > SHOWN else ""
        return n, {"code": f"invalid_{kind}_file", "param": param,
                   "message": f"{prefix} Invalid file format: {shown}{more}"}
    if param == "training_file" and n < MIN_EXAMPLES:
        return n, {"code": "invalid_n_examples", "param": param,
                   "message": f"Training file has {n} example(s), but must have at least {MIN_EXAMPLES} examples"}
    return n, None
