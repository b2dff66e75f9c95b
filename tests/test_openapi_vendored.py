"""The vendored OpenAI schemas (tests/data/openai-openapi/schemas.yaml) are complete and current.

Fast and server-free: a schema name a test starts using, or a schema one of them references, that
is missing from the vendored file fails here rather than deep inside a vLLM or fine-tuning test.
Regenerate the file with `python tests/data/openai-openapi/extract.py /path/to/openapi.yaml`.
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from conftest import OPENAPI, ROOT

EXTRACT = ROOT / "tests" / "data" / "openai-openapi" / "extract.py"
FULL_SPEC = ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"  # optional, beside the checkout
# The names the tests used when this file was written; the scan of tests/test_*.py must find them.
KNOWN = {"ListModelsResponse", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "OpenAIFile", "ListFilesResponse", "DeleteFileResponse", "FineTuningJob",
         "ListPaginatedFineTuningJobsResponse", "ListFineTuningJobEventsResponse",
         "ListFineTuningJobCheckpointsResponse", "ErrorResponse"}


def _load(path):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


@pytest.fixture(scope="module")
def extract():
    spec = importlib.util.spec_from_file_location("openapi_extract", EXTRACT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vendored() -> dict:
    assert OPENAPI.is_file(), f"{OPENAPI} missing"
    doc = _load(OPENAPI)
    assert set(doc) == {"components"} and set(doc["components"]) == {"schemas"}
    return doc["components"]["schemas"]


def test_holds_every_schema_the_tests_use(extract, vendored):
    used = extract.schema_names_used()
    assert KNOWN <= used, f"the scan of tests/test_*.py missed {sorted(KNOWN - used)}"
    missing = sorted(used - vendored.keys())
    assert not missing, f"not vendored (rerun extract.py): {missing}"


def test_every_ref_resolves_inside_the_file(extract, vendored):
    dangling = {name: sorted(extract.refs(schema) - vendored.keys()) for name, schema in vendored.items()}
    dangling = {k: v for k, v in dangling.items() if v}
    assert not dangling, f"$refs to schemas not vendored (rerun extract.py): {dangling}"
    # nothing extra either: the file is exactly the closure of the names the tests use
    assert extract.closure(vendored, extract.schema_names_used()).keys() == vendored.keys()


def test_header_names_source_and_licence():
    head = OPENAPI.read_text(encoding="utf-8").split("components:", 1)[0]
    assert "openapi.yaml" in head and "info.version" in head and "MIT" in head and "extract.py" in head
    assert "MIT License" in (OPENAPI.parent / "LICENSE").read_text(encoding="utf-8")


def test_matches_the_full_spec_when_present(vendored):
    if not FULL_SPEC.is_file():
        pytest.skip(f"{FULL_SPEC} not present: nothing to compare the vendored schemas with")
    full = _load(FULL_SPEC)["components"]["schemas"]
    differ = sorted(name for name, schema in vendored.items() if full.get(name) != schema)
    assert not differ, f"vendored schemas differ from {FULL_SPEC} (rerun extract.py): {differ}"
