"""Vendor the part of OpenAI's openapi.yaml that the tests validate against.

    python tests/data/openai-openapi/extract.py /path/to/openapi.yaml

Writes schemas.yaml beside this script: `components: {schemas: {...}}` with every schema name the
tests use (found in tests/test_*.py by `schema_names_used`) plus everything those schemas reference
through `$ref: '#/components/schemas/X'`, followed transitively. The full description is OpenAI's
public openapi.yaml (github.com/openai/openai-openapi, MIT licence, LICENSE beside this script).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
OUT = HERE / "schemas.yaml"
REF = "#/components/schemas/"

# openapi_validate(body, "Name") in any test; check("Name", ...) / check_schema(x, "Name", ...) in
# test_finetune_api.py (its `check` lambda passes the name on to check_schema).
_PATTERNS = (
    re.compile(r'openapi_validate\(.*,\s*"([A-Za-z_]\w*)"\s*\)'),
    re.compile(r'\bcheck\(\s*"([A-Za-z_]\w*)"'),
    re.compile(r'\bcheck_schema\(\s*\w+\s*,\s*"([A-Za-z_]\w*)"'),
)


def schema_names_used(tests_dir: Path = TESTS) -> set[str]:
    """Every schema name a test validates a body against (literal names in tests/test_*.py)."""
    names: set[str] = set()
    for path in sorted(tests_dir.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in _PATTERNS:
            names.update(pattern.findall(text))
    return names


def refs(node) -> set[str]:
    """Names of the component schemas that `node` references directly or in any nested part."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith(REF):
                raise ValueError(f"unsupported $ref {ref!r} inside a schema")
            found.add(ref[len(REF):])
        for v in node.values():
            found |= refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= refs(v)
    return found


def closure(schemas: dict, roots: set[str]) -> dict:
    """roots plus every schema they reference, transitively: name -> schema."""
    keep: dict = {}
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in schemas:
            raise KeyError(f"schema {name!r} is not in the OpenAPI description")
        keep[name] = schemas[name]
        todo.extend(sorted(refs(schemas[name]) - keep.keys()))
    return keep


def load(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = load(Path(argv[0]))
    names = schema_names_used()
    if not names:
        raise SystemExit("found no schema names in tests/test_*.py")
    keep = closure(spec["components"]["schemas"], names)
    info = spec.get("info") or {}
    header = (
        "# A subset of OpenAI's OpenAPI description (openapi.yaml, github.com/openai/openai-openapi),\n"
        f"# \"{info.get('title', 'OpenAI API')}\" info.version {info.get('version', 'unknown')}"
        f" (openapi {spec.get('openapi', '?')}).\n"
        "# MIT licence, Copyright (c) OpenAI: see LICENSE beside this file.\n"
        f"# {len(names)} schemas the tests validate against plus all they reference: {len(keep)} in all.\n"
        "# Generated, do not edit; regenerate with\n"
        "#   python tests/data/openai-openapi/extract.py /path/to/openapi.yaml\n"
    )
    body = yaml.safe_dump({"components": {"schemas": keep}}, sort_keys=True, allow_unicode=True, width=100)
    OUT.write_text(header + body, encoding="utf-8")
    print(f"{OUT}: {len(keep)} schemas ({len(names)} used by tests), {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
