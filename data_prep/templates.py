"""Jinja2 templates over a row's columns, with the filters data preparation needs.

    --user "Review: {{ review_text }}"
    --assistant "{{ review_rating | lookup({'1': 'negative', '2': 'negative', '3': 'neutral', '4': 'positive', '5': 'positive'}) }}"
    --assistant "{{ {'category': category} | tojson }}"
    --user "{{ review | truncate_tokens(400) }}"

Templates run in Jinja's sandbox; an empty cell renders as an empty string.
"""

from __future__ import annotations

import json

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import UserError


class RowError(Exception):
    """A template failed on one row (e.g. a value missing from a lookup): that row is dropped, counted."""


def _lookup(value, mapping: dict, default=...):
    """Map a cell's value through a table; YAML int keys and "4.0"-style numbers both match."""
    table = {str(k): v for k, v in mapping.items()}
    key = "" if value is None else str(value).strip()
    if key not in table:
        try:
            number = float(key)
            key = str(int(number)) if number.is_integer() else key
        except ValueError:
            pass
    if key in table:
        return table[key]
    if default is not ...:
        return default
    raise RowError(f"value {key!r} not in the lookup table (keys: {', '.join(table)})")


def _tojson(value, indent=None):
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _truncate_tokens(value, n: int, model: str = DEFAULT_OPENAI_MODEL):
    from .tokens import encoding_for_model

    if value is None:
        return ""
    enc = encoding_for_model(model)
    ids = enc.encode_ordinary(str(value))
    return str(value) if len(ids) <= n else enc.decode(ids[:n])


def make_env() -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False,
                               finalize=lambda v: "" if v is None else v)
    env.filters.update(lookup=_lookup, tojson=_tojson, truncate_tokens=_truncate_tokens)
    return env


def compile_template(env, source: str, key: str):
    """Compile one template; returns (template, the column names it reads)."""
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as e:
        raise UserError(f"{key}: template syntax error at line {e.lineno}: {e.message}") from None
    return env.from_string(source), sorted(meta.find_undeclared_variables(ast))


def render(template, row: dict) -> str:
    try:
        return template.render(row)
    except RowError:
        raise
    except Exception as e:  # a filter failing on this row's value: counted as this row's drop reason
        raise RowError(f"{type(e).__name__}: {e}") from None
