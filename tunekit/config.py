"""Dataclass configs read from YAML, with command-line flags layered on top.

Precedence: dataclass defaults < YAML file (``--config``) < flags given on the command line.
Unknown YAML keys are errors that name the key, the file and the keys that exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tunekit.errors import UserError


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(cls, path: str | Path | None, overrides: dict[str, Any] | None = None):
    """Build dataclass ``cls`` from a YAML file and overrides (None values are ignored).

    A field whose type is itself a dataclass is a section: its YAML mapping is built the same way,
    and an unknown key inside it is reported as ``section.key``.
    """
    values: dict[str, Any] = {}
    if path:
        values.update(read_yaml(path))
        check_types(cls, values, str(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values, str(path) if path else "config")


def _describe(value) -> str:
    kind = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})" if not isinstance(value, (list, dict)) else kind


def _type_problem(hint, value) -> str | None:
    """Why ``value`` (read from YAML) does not fit the type ``hint``; None when it does."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(a, value) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if value is None:
        return "is empty; give a value or remove the key"
    if origin is typing.Literal:
        return None if value in args else f"is {value!r}; use one of {', '.join(map(repr, args))}"
    if hint is bool:
        return None if isinstance(value, bool) else f"is {_describe(value)}; write true or false"
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and isinstance(value, float)):
            quoted = isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).replace("e-", "", 1) \
                .replace("e", "", 1).isdigit()
            want = "a whole number" if hint is int else "a number"
            return (f"is the text {value!r}; write it as {want}, without quotes" if quoted
                    else f"is {_describe(value)}; it must be {want}")
        return None
    if hint is str:
        return None if isinstance(value, str) else f"is {_describe(value)}; it must be text (quote it)"
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"is {_describe(value)}; it must be a list (- item per line, or [a, b])"
        inner = args[0] if args else Any
        for i, item in enumerate(value):
            problem = _type_problem(inner, item)
            if problem:
                return f"[{i}]{'' if problem.startswith(('.', '[')) else ' '}{problem}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"is {_describe(value)}; it must be a mapping (key: value per line)"
        inner = args[1] if len(args) == 2 else Any
        for k, item in value.items():
            problem = _type_problem(inner, item)
            if problem:
                return f".{k}{'' if problem.startswith(('.', '[')) else ' '}{problem}"
        return None
    return None  # types the YAML cannot spell wrongly in a way we can check (paths, dataclasses below)


def check_types(cls, values: dict[str, Any], where: str, prefix: str = "") -> None:
    """Every YAML value against its dataclass field's type: one line naming the file, the key and the fix."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        name = key.replace("-", "_")
        hint = hints.get(name)
        if hint is None:
            continue  # unknown keys are reported by from_dict, with the keys that exist
        if dataclasses.is_dataclass(hint):
            if isinstance(value, dict):
                check_types(hint, value, where, f"{prefix}{name}.")
            continue
        problem = _type_problem(hint, value)
        if problem:
            sep = "" if problem.startswith((".", "[")) else " "  # a key or index inside the value
            raise UserError(f"{where}: {prefix}{name}{sep}{problem}")


def from_dict(cls, values: dict[str, Any], where: str, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + k for k in values if k.replace("-", "_") not in fields)
    if unknown:
        raise UserError(
            f"{where}: unknown config key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(prefix + k for k in sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        sub = hints.get(name)
        if dataclasses.is_dataclass(sub):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{where}: {prefix}{name} must be a mapping of {sub.__name__} keys")
            value = from_dict(sub, value, where, f"{prefix}{name}.")
        out[name] = value
    return cls(**out)


def load_dotenv(path: str | Path = ".env") -> None:
    """KEY=VALUE lines of ``.env`` (in the working directory) into os.environ, never overriding what the
    environment already sets; python-dotenv's parser (quotes, ``export``, comments, multi-line values)."""
    import dotenv

    if Path(path).is_file():
        dotenv.load_dotenv(path, override=False)


def _parse_pairs(flag: str):
    def parse(item: str) -> tuple[str, str]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        return key, value
    return parse


def opt(default, help: str, **kw):
    """A config field with its flag's help text (add_dataclass_flags); ``list``, ``dict`` or a
    function as the default is a factory (a new empty list or mapping per instance)."""
    if default in (list, dict) or (callable(default) and not isinstance(default, type)):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _one_of(choices: list):
    """A Literal field's flag: its choices in any case (--log-level DEBUG is debug)."""
    def parse(item: str):
        return next((c for c in choices if str(c).lower() == item.lower()), item)
    parse.__name__ = "choice"
    return parse


def _number_or_text(number: type):
    """``int | str`` / ``float | str`` fields ("auto" or a value): a number when the flag spells one."""
    def parse(item: str):
        try:
            return number(item)
        except ValueError:
            return item
    parse.__name__ = f"{number.__name__} or text"
    return parse


def add_dataclass_flags(parser, cls, exclude: tuple[str, ...] = (), metavars: dict[str, str] | None = None) -> list[str]:
    """One ``--kebab-case`` flag per field of dataclass ``cls`` (``--snake_case`` accepted too), typed
    from the field and helped from its ``metadata["help"]``; so flags and YAML keys cannot drift.

    Flags default to "not given" (None): ``load_config(cls, path, overrides)`` then layers those given
    over the YAML file over the defaults. Returns the field names that got a flag."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
        origin = typing.get_origin(base)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if default not in (None, "", [], {}) and base is not bool:
            help_text += f" (default {default})"
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw = dict(dest=f.name, default=None, help=help_text.strip() or None)
        if (metavars or {}).get(f.name):
            kw["metavar"] = metavars[f.name]
        if base is bool:
            kw.update(action=argparse.BooleanOptionalAction)
            kw["help"] = (kw["help"] or "") + f" (default {'on' if default else 'off'})"
        elif origin is typing.Literal:
            choices = list(typing.get_args(base))
            kw.update(choices=choices, type=_one_of(choices))
        elif base in (int, float, str):
            kw.update(type=base)
        elif set(args) in ({int, str}, {float, str}):
            kw.update(type=_number_or_text(int if int in args else float))
        elif origin is list and typing.get_args(base) in ((str,), (int,), (float,)):
            kw.update(nargs="+", type=typing.get_args(base)[0])
        elif origin is dict and typing.get_args(base) == (str, str):
            kw.update(nargs="+", type=_parse_pairs(flags[0]), metavar=kw.get("metavar", "KEY=VALUE"))
        else:
            continue  # a type a flag cannot spell (nested mappings): the YAML file only
        parser.add_argument(*flags, **kw)
        names.append(f.name)
    return names


def flag_overrides(args, names: list[str]) -> dict[str, Any]:
    """The flags the user gave, as config values (KEY=VALUE lists become mappings)."""
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        out[name] = value
    return out
