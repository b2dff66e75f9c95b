"""A grader's shape checked as OpenAI's API checks it (``validate``: a GraderInvalid naming the parameter), and the
walks grading shares with it (the sub-graders of a multi grader, a metric that cannot run here, the text parts
of a message)."""

from __future__ import annotations

import math
import os
from typing import Any

from . import formula as formula_mod
from .base import EMBEDDING_ENV, GRADER_TYPES, METRICS, OPERATIONS, GraderInvalid
from .sandbox import MAX_SOURCE_BYTES
from .templates import check_variables


def _refusal(metric: str) -> str | None:
    """Why ``metric`` cannot run here (one line), or None."""
    if metric == "cosine" and not os.environ.get(EMBEDDING_ENV):
        return (f"evaluation_metric 'cosine' needs an embedding model and none is configured: set {EMBEDDING_ENV} "
                "to an embedding model the backend serves (e.g. text-embedding-3-small on the openai backend)")
    if metric == "meteor" and not _have_wordnet():
        return ("evaluation_metric 'meteor' needs NLTK's WordNet data, a download this server does not make "
                "(python -m nltk.downloader wordnet omw-1.4 enables it); use bleu, gleu, rouge_* or fuzzy_match")
    return None


def _have_wordnet() -> bool:
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        return True
    except (LookupError, ImportError):
        return False


def _need_str(g: dict, key: str, param: str) -> str:
    value = g.get(key)
    if value is None:
        raise GraderInvalid(f"{param}.{key}", f"Missing required parameter: '{param}.{key}'.")
    if not isinstance(value, str):
        raise GraderInvalid(f"{param}.{key}", f"Invalid type for '{param}.{key}': expected a string.")
    return value


def _check_template(text: str, param: str) -> None:
    bad = check_variables(text)
    if bad is not None:
        raise GraderInvalid(param, f"Invalid '{param}': template variable {{{{ {bad} }}}} is not item.<field> "
                                   "or sample.<field>.")


def validate(grader: Any, param: str = "grader", *, inside_multi: bool = False) -> dict:
    """``grader`` if it is one this server can run; else :class:`GraderInvalid` naming the parameter."""
    if not isinstance(grader, dict):
        raise GraderInvalid(param, f"Invalid type for '{param}': expected an object.")
    kind = grader.get("type")
    if kind not in GRADER_TYPES:
        raise GraderInvalid(f"{param}.type", f"Invalid value for '{param}.type': expected one of "
                                             f"{', '.join(GRADER_TYPES)}, got {kind!r}.")
    _need_str(grader, "name", param)
    if kind in ("string_check", "text_similarity"):
        for key in ("input", "reference"):
            _check_template(_need_str(grader, key, param), f"{param}.{key}")
    if kind == "string_check":
        op = grader.get("operation")
        if op not in OPERATIONS:
            raise GraderInvalid(f"{param}.operation", f"Invalid value for '{param}.operation': expected one of "
                                                      f"{', '.join(OPERATIONS)}, got {op!r}.")
    elif kind == "text_similarity":
        metric = grader.get("evaluation_metric")
        if metric not in METRICS:
            raise GraderInvalid(f"{param}.evaluation_metric", f"Invalid value for '{param}.evaluation_metric': "
                                f"expected one of {', '.join(METRICS)}, got {metric!r}.")
        why = _refusal(metric)
        if why:
            raise GraderInvalid(f"{param}.evaluation_metric", why)
    elif kind == "python":
        source = _need_str(grader, "source", param)
        if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
            raise GraderInvalid(f"{param}.source", f"Invalid '{param}.source': larger than "
                                                   f"{MAX_SOURCE_BYTES // 1024} KB.")
        try:
            import ast

            tree = ast.parse(source)
        except SyntaxError as exc:
            raise GraderInvalid(f"{param}.source", f"Invalid '{param}.source': line {exc.lineno}: {exc.msg}.") from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise GraderInvalid(f"{param}.source", f"Invalid '{param}.source': it must define grade(sample, item).")
    elif kind in ("score_model", "label_model"):
        if kind == "label_model" and not inside_multi:
            raise GraderInvalid(f"{param}.type", "label_model graders are only supported inside a multi grader.")
        _need_str(grader, "model", param)
        messages = grader.get("input")
        if not isinstance(messages, list) or not messages:
            raise GraderInvalid(f"{param}.input", f"Invalid '{param}.input': expected a non-empty array of messages.")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
                raise GraderInvalid(f"{param}.input[{i}]", f"Invalid '{param}.input[{i}]': expected a message with "
                                                           "role system, developer, user or assistant.")
            for text in _texts(msg.get("content")):
                _check_template(text, f"{param}.input[{i}].content")
        if kind == "score_model":
            rng = grader.get("range", [0, 1])
            if (not isinstance(rng, list) or len(rng) != 2 or not all(_is_num(x) for x in rng)
                    or not rng[0] < rng[1]):
                raise GraderInvalid(f"{param}.range", f"Invalid '{param}.range': expected [min, max] with min < max.")
            sp = grader.get("sampling_params")
            if sp is not None and not isinstance(sp, dict):
                raise GraderInvalid(f"{param}.sampling_params", f"Invalid type for '{param}.sampling_params'.")
        else:
            labels, passing = grader.get("labels"), grader.get("passing_labels")
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise GraderInvalid(f"{param}.labels", f"Invalid '{param}.labels': expected a non-empty array of strings.")
            if not isinstance(passing, list) or not passing or not set(passing) <= set(labels):
                raise GraderInvalid(f"{param}.passing_labels", f"Invalid '{param}.passing_labels': expected a "
                                                               "non-empty subset of labels.")
    elif kind == "multi":
        if inside_multi:
            raise GraderInvalid(f"{param}.type", "multi graders cannot be nested.")
        subs = _sub_graders(grader, param)
        for name, (sub, sub_param) in subs.items():
            validate(sub, sub_param, inside_multi=True)
        try:
            formula_mod.parse(grader.get("calculate_output"), set(subs))
        except formula_mod.FormulaError as exc:
            raise GraderInvalid(f"{param}.calculate_output", f"Invalid '{param}.calculate_output': {exc}.") from None
    return grader


def python_graders(grader, param: str = "grader") -> list[str]:
    """The ``type`` params of the python graders in ``grader`` (itself, or inside a multi grader)."""
    if not isinstance(grader, dict):
        return []
    if grader.get("type") == "python":
        return [f"{param}.type"]
    if grader.get("type") == "multi":
        try:
            subs = _sub_graders(grader, param)
        except GraderInvalid:
            return []
        return [p for sub, sub_param in subs.values() for p in python_graders(sub, sub_param)]
    return []


def _sub_graders(grader: dict, param: str) -> dict[str, tuple[dict, str]]:
    """name -> (grader, param): ``graders`` as OpenAI's map {name: grader}, or one grader / a list (by name)."""
    graders = grader.get("graders")
    if isinstance(graders, dict) and "type" not in graders:
        if not graders:
            raise GraderInvalid(f"{param}.graders", f"Invalid '{param}.graders': expected at least one grader.")
        return {str(k): (v, f"{param}.graders.{k}") for k, v in graders.items()}
    if isinstance(graders, dict):
        graders = [graders]
    if not isinstance(graders, list) or not graders:
        raise GraderInvalid(f"{param}.graders", f"Invalid '{param}.graders': expected an object of named graders.")
    out = {}
    for i, g in enumerate(graders):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            raise GraderInvalid(f"{param}.graders[{i}]", f"Invalid '{param}.graders[{i}]': expected a named grader.")
        out[g["name"]] = (g, f"{param}.graders[{i}]")
    return out


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _texts(content) -> list[str]:
    """The text parts of a message's content (a string, a content part, or a list of parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, dict):
        return [content["text"]] if isinstance(content.get("text"), str) else []
    if isinstance(content, list):
        return [t for part in content for t in _texts(part)]
    return []
