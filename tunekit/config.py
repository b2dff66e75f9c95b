"""Dataclass configs read from YAML, with command-line flags layered on top.

Precedence: dataclass defaults < YAML file (``--config``) < flags given on the command line.
Unknown YAML keys are errors that name the key, the file and the keys that exist.
"""

from __future__ import annotations

import dataclasses
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
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values, str(path) if path else "config")


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
