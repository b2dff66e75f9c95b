"""``{{ item.x }}``, ``{{ sample.output_text }}``, ``{{ sample.output_json.a.b }}``: a regex substitution.

No Jinja (no code runs): a template is only dotted paths into two namespaces, ``item`` and ``sample``.
A string value goes in as is, anything else as JSON. A path that is missing is a
:class:`TemplateError` (OpenAI's ``invalid_variable_error``); ``sample.output_json...`` when the sample
is not JSON is a :class:`SampleParseError` (``sample_parse_error``).
"""

from __future__ import annotations

import json
import re

VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PATH = re.compile(r"^(item|sample)((?:\.[A-Za-z_0-9][\w-]*)*)$")
MISSING = object()


class TemplateError(ValueError):
    """A variable that is not a path into item/sample, or names a field that is not there."""


class SampleParseError(ValueError):
    """``sample.output_json`` was asked for and the sample's text is not JSON."""


def make_sample(model_sample) -> dict:
    """The ``sample`` namespace: ``{"output_text", "output_json"}`` from the model's text (or a dict as is)."""
    if isinstance(model_sample, dict):
        sample = dict(model_sample)
        text = sample.get("output_text")
        if "output_json" not in sample and isinstance(text, str):
            sample["output_json"] = _json_or_missing(text)
        return sample
    text = "" if model_sample is None else str(model_sample)
    return {"output_text": text, "output_json": _json_or_missing(text)}


def _json_or_missing(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return MISSING


def lookup(path: str, sample: dict, item: dict):
    m = _PATH.match(path)
    if not m:
        raise TemplateError(f"invalid variable {{{{ {path} }}}}: expected item.<field> or sample.<field>")
    value = item if m.group(1) == "item" else sample
    parts = [p for p in m.group(2).split(".") if p]
    for i, part in enumerate(parts):
        if m.group(1) == "sample" and i == 0 and part == "output_json" and value.get(part, None) is MISSING:
            raise SampleParseError("the model sample is not valid JSON, so sample.output_json is unavailable")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise TemplateError(f"invalid variable {{{{ {path} }}}}: {'.'.join([m.group(1), *parts[:i + 1]])} "
                                "is not there")
    if value is MISSING:
        raise SampleParseError("the model sample is not valid JSON, so sample.output_json is unavailable")
    return value


def render(template, sample: dict, item: dict) -> str:
    """``template`` with every ``{{ path }}`` replaced by its value."""
    if not isinstance(template, str):
        return template

    def sub(m: re.Match) -> str:
        value = lookup(m.group(1), sample, item or {})
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return VARIABLE.sub(sub, template)


def variables(template: str) -> list[str]:
    """The variable paths ``template`` uses (for validation)."""
    return VARIABLE.findall(template) if isinstance(template, str) else []


def check_variables(template: str) -> str | None:
    """The first variable that is not a path into item/sample, else None."""
    for path in variables(template):
        if not _PATH.match(path):
            return path
    return None


def item_paths(grader) -> list[str]:
    """The ``item.x`` paths a grader's templates read, sorted (a python grader's ``source`` is its own)."""
    def paths(node) -> set[str]:
        if isinstance(node, dict):
            return {p for k, v in node.items() if k != "source" for p in paths(v)}
        if isinstance(node, list):
            return {p for v in node for p in paths(v)}
        return {p for p in variables(node) if p.startswith("item.")} if isinstance(node, str) else set()

    return sorted(paths(grader))


def missing_item_path(paths: list[str], item: dict) -> str | None:
    """The first of ``paths`` (from :func:`item_paths`) that ``item`` lacks, or None."""
    for path in paths:
        try:
            lookup(path, {}, item)
        except TemplateError:
            return path
    return None
