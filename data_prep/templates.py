"""Jinja2 templates over a row's columns, with the filters data preparation needs.

    --user "Review: {{ review_text }}"
    --assistant "{{ review_rating | lookup({'1': 'negative', '2': 'negative', '3': 'neutral', '4': 'positive', '5': 'positive'}) }}"
    --assistant "{{ {'category': category} | tojson }}"
    --user "{{ review | truncate_tokens(400) }}"
    --derive "main_category={{ category | lookup_file('configs/banking77_json/main_categories.yaml') }}"

Templates run in Jinja's sandbox; an empty cell renders as an empty string.

``lookup_file(path, default)`` is ``lookup`` with the table in a YAML (or JSON) file, its path
relative to the working directory like the build's ``input``. The file is either ``value: result``
pairs or groups, ``result: [value, value, ...]`` (e.g. a main category -> its intents), where each
value may be listed once. A value the table lacks drops its row (``template_error``, with the value
and the file named), unless a default is given; a missing or malformed file stops the build.
"""

from __future__ import annotations

import json
from pathlib import Path

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


_TABLES: dict[str, tuple[int, dict[str, object]]] = {}  # resolved path -> (mtime, table)


def load_table(path: str | Path) -> dict[str, object]:
    """The lookup table of a YAML/JSON file: ``value: result`` pairs, or ``result: [values]`` groups
    (inverted, so each value maps to its group). Cached per file version; raises UserError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"lookup_file: {path} not found (paths are relative to the working directory, "
                        "like the build's input)")
    key, mtime = str(path.resolve()), path.stat().st_mtime_ns
    if key in _TABLES and _TABLES[key][0] == mtime:
        return _TABLES[key][1]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"lookup_file: {path} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping, value: result or result: [values, ...]")
    table: dict[str, object] = {}
    owner: dict[str, str] = {}
    for result, values in data.items():
        if isinstance(values, list):
            for v in values:
                if isinstance(v, (dict, list)) or v is None:
                    raise UserError(f"{path}: {result}: expected a list of plain values, found {v!r}")
                v = str(v).strip()
                if v in owner:
                    raise UserError(f"{path}: {v!r} is listed under both {owner[v]!r} and {result!r}; "
                                    "list each value once")
                owner[v] = str(result)
                table[v] = result
        elif isinstance(values, dict):
            raise UserError(f"{path}: {result}: expected a result or a list of values, found a mapping")
        else:
            if str(result) in owner:
                raise UserError(f"{path}: {result!r} is given twice; list each value once")
            owner[str(result)] = str(result)
            table[str(result)] = values
    _TABLES[key] = (mtime, table)
    return table


def _lookup_file(value, path: str, default=...):
    """``lookup`` with the table read from ``path`` (see load_table)."""
    table = load_table(path)
    try:
        return _lookup(value, table, default)
    except RowError:
        key = "" if value is None else str(value).strip()
        raise RowError(f"value {key!r} not in {path} ({len(table)} values)") from None


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
    env.filters.update(lookup=_lookup, lookup_file=_lookup_file, tojson=_tojson, truncate_tokens=_truncate_tokens)
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
    except (RowError, UserError):  # a row's own problem, or the build's (a lookup file missing)
        raise
    except Exception as e:  # a filter failing on this row's value: counted as this row's drop reason
        raise RowError(f"{type(e).__name__}: {e}") from None
