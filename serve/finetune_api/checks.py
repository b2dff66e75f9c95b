"""The checks of a POST /v1/fine_tuning/jobs body that need no server state, with OpenAI's rules and wording.

The limits are CreateFineTuningJobRequest's in OpenAI's openapi.yaml: ``suffix`` "a string of up to 64
characters" (minLength 1; here also only letters, digits, '.', '-' and '_', since it becomes a part of
``ft:<model>:<organization>:<suffix>:<id>``), ``seed`` an integer from 0 to 2147483647, ``metadata``
"16 key-value pairs ... keys ... maximum length of 64 characters ... values ... 512", ``integrations``
at most 5 (the job object's maxItems) of ``{"type": "wandb", "wandb": {"project", "name", "entity",
"tags"}}``.

``method``: ``{"type": "supervised", "supervised": {"hyperparameters": {...}}}`` with
FineTuneSupervisedHyperparameters (``n_epochs`` 1-50, ``batch_size`` 1-256, ``learning_rate_multiplier``
> 0), or ``{"type": "dpo", "dpo": {"hyperparameters": {...}}}`` with FineTuneDPOHyperparameters (the same
three and ``beta``, > 0 and <= 2), each "auto" or a number, or ``{"type": "reinforcement", "reinforcement":
{"grader": {...}, "hyperparameters": {...}, "response_format": {...}}}``: the grader is required and checked
as the graders API checks it (``serve.graders.validate``; a 400 names ``method.reinforcement.grader.<param>``),
FineTuneReinforcementHyperparameters are the three above and ``compute_multiplier`` (> 0.00001, <= 10),
``eval_interval`` and ``eval_samples`` (integers >= 1), each "auto" or a number, and ``reasoning_effort``
(default, low, medium or high; "default" when not given); ``response_format`` (OpenAI's guide passes one for
structured outputs) is a ``json_schema``, ``json_object`` or ``text`` format. The object given must be the
type's (``method.supervised`` with type dpo is an error naming it). The deprecated top-level
``hyperparameters`` is the supervised ones' old spelling, as on OpenAI: refused with the other types.

Each refusal is an ``APIError`` (400, ``invalid_request_error``) whose ``param`` names the field as the
request spelled it (``method.supervised.hyperparameters.n_epochs``) and whose ``code`` and message
follow OpenAI's request validation ("Invalid 'seed': integer below minimum value. Expected a value >= 0,
but got -1 instead.", ``integer_below_min_value``).
"""

from __future__ import annotations

import math
import re

from pydantic import ValidationError

from .errors import APIError
from .models import FineTuningJobWandbIntegrationObject

# (low, high): integers low..high; decimals above low (exclusive), at most high
HYPERPARAMETERS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (0, None)}
DPO_HYPERPARAMETERS = {"beta": (0, 2), **HYPERPARAMETERS}
REASONING_EFFORTS = ("default", "low", "medium", "high")
RL_HYPERPARAMETERS = {**HYPERPARAMETERS, "compute_multiplier": (0.00001, 10), "eval_interval": (1, None),
                      "eval_samples": (1, None), "reasoning_effort": REASONING_EFFORTS}
BOUNDS = {"supervised": HYPERPARAMETERS, "dpo": DPO_HYPERPARAMETERS, "reinforcement": RL_HYPERPARAMETERS}
INTEGERS = ("n_epochs", "batch_size", "eval_interval", "eval_samples")
METHODS = ("supervised", "dpo", "reinforcement")
RL_KEYS = ("grader", "hyperparameters", "response_format")
RESPONSE_FORMATS = ("json_schema", "json_object", "text")
SUFFIX = re.compile(r"[A-Za-z0-9._-]+")
MAX_SEED, MAX_SUFFIX, MAX_METADATA, MAX_KEY, MAX_VALUE, MAX_INTEGRATIONS = 2**31 - 1, 64, 16, 64, 512, 5


def kind(value) -> str:
    """OpenAI's name for a JSON value's type ("got a string instead")."""
    return {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def bad_type(param: str, expected: str, value) -> APIError:
    return APIError(400, f"Invalid type for '{param}': expected {expected}, but got {kind(value)} instead.",
                    param, "invalid_type")


def missing(param: str) -> APIError:
    return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def too_long(param: str, limit: int, length: int, what: str = "string") -> APIError:
    return APIError(400, f"Invalid '{param}': {what} too long. Expected {'an array' if what == 'array' else 'a string'} "
                    f"with maximum length {limit}, but got {'an array' if what == 'array' else 'a string'} with "
                    f"length {length} instead.", param, f"{what}_above_max_length")


def whole(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer()


def check_integer(param: str, value, low: int, high: int | None, auto: bool = False) -> int:
    expected = "one of 'auto' or an integer" if auto else "an integer"
    if not whole(value):
        raise bad_type(param, expected, value)
    if value < low:
        raise APIError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, but got "
                       f"{int(value)} instead.", param, "integer_below_min_value")
    if high is not None and value > high:
        raise APIError(400, f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, but got "
                       f"{int(value)} instead.", param, "integer_above_max_value")
    return int(value)


def auto(kind: str) -> dict:
    """Every hyperparameter of method ``kind`` as not given: "auto" ("default" for reasoning_effort)."""
    return {key: "default" if key == "reasoning_effort" else "auto" for key in BOUNDS[kind]}


def method(body: dict) -> dict:
    """The job's ``method`` object: ``{"type": "supervised" | "dpo" | "reinforcement", "<type>":
    {"hyperparameters": {...}}}`` (a reinforcement one with its ``grader`` too), each hyperparameter "auto" or its
    number. Without ``method``, supervised with the deprecated top-level ``hyperparameters`` (both spellings may be
    given for a supervised job when they agree; the other methods' go in ``method.<type>.hyperparameters`` only,
    as on OpenAI)."""
    given = body.get("method")
    if given is None:
        return {"type": "supervised", "supervised": {"hyperparameters": supervised({}, body.get("hyperparameters"))}}
    if not isinstance(given, dict):
        raise bad_type("method", "an object", given)
    if "type" not in given:
        raise missing("method.type")
    kind_ = given["type"]
    if kind_ not in METHODS:
        raise APIError(400, f"Invalid value: {kind_!r}. Supported values are: 'supervised', 'dpo', and "
                       "'reinforcement'.", "method.type", "invalid_value")
    for key in given:
        if key not in ("type", *METHODS):
            raise APIError(400, f"Unknown parameter: 'method.{key}'.", f"method.{key}", "unknown_parameter")
        if key in METHODS and key != kind_ and given[key] is not None:
            raise APIError(400, f"Invalid 'method.{key}': method.type is {kind_!r}; give the hyperparameters as "
                           f"'method.{kind_}.hyperparameters' (or set method.type to {key!r}).", f"method.{key}",
                           "invalid_value")
    extra = reinforcement(given.get(kind_)) if kind_ == "reinforcement" else {}
    hp = method_hyperparameters(kind_, given.get(kind_))
    if kind_ == "supervised":
        hp = supervised(hp, body.get("hyperparameters"))
    elif body.get("hyperparameters"):
        what = "a DPO job's" if kind_ == "dpo" else "a reinforcement job's"
        raise APIError(400, "Invalid 'hyperparameters': the top-level hyperparameters are for supervised jobs only "
                       f"(and deprecated); give {what} as 'method.{kind_}.hyperparameters'.", "hyperparameters",
                       "invalid_value")
    return {"type": kind_, kind_: {**extra, "hyperparameters": hp or auto(kind_)}}


def reinforcement(obj) -> dict:
    """``method.reinforcement``'s grader (required, checked as the graders API checks it) and response_format."""
    from serve.graders import GraderInvalid, validate

    if obj is None:
        raise missing("method.reinforcement.grader")
    if not isinstance(obj, dict):
        raise bad_type("method.reinforcement", "an object", obj)
    if obj.get("grader") is None:
        raise missing("method.reinforcement.grader")
    try:
        validate(obj["grader"], "method.reinforcement.grader")
    except GraderInvalid as exc:
        raise APIError(400, exc.message, exc.param, "invalid_value") from None
    out = {"grader": obj["grader"]}
    if obj.get("response_format") is not None:
        out["response_format"] = response_format(obj["response_format"])
    return out


def response_format(value) -> dict:
    param = "method.reinforcement.response_format"
    if not isinstance(value, dict):
        raise bad_type(param, "an object", value)
    if value.get("type") not in RESPONSE_FORMATS:
        raise APIError(400, f"Invalid value: {value.get('type')!r}. Supported values are: 'json_schema', "
                       "'json_object', and 'text'.", f"{param}.type", "invalid_value")
    if value["type"] == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict):
            raise missing(f"{param}.json_schema") if schema is None else bad_type(f"{param}.json_schema",
                                                                                  "an object", schema)
        if not isinstance(schema.get("name"), str):
            raise missing(f"{param}.json_schema.name")
    return value


def method_hyperparameters(kind_: str, obj) -> dict | None:
    """``method.<kind>.hyperparameters`` checked: None when not given, else every key ("auto" where left out)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise bad_type(f"method.{kind_}", "an object", obj)
    for key in obj:
        if key not in (RL_KEYS if kind_ == "reinforcement" else ("hyperparameters",)):
            raise APIError(400, f"Unknown parameter: 'method.{kind_}.{key}'.", f"method.{kind_}.{key}",
                           "unknown_parameter")
    return checked(f"method.{kind_}.hyperparameters", obj.get("hyperparameters"), BOUNDS[kind_])


def supervised(from_method: dict | None, top_level) -> dict:
    """A supervised job's hyperparameters from ``method.supervised`` and/or the deprecated top-level spelling."""
    deprecated = checked("hyperparameters", top_level, HYPERPARAMETERS)
    if from_method and deprecated and from_method != deprecated:
        raise APIError(400, "Invalid 'hyperparameters': it disagrees with 'method.supervised.hyperparameters'; "
                       "give only method (the top-level hyperparameters are deprecated).", "hyperparameters",
                       "invalid_value")
    return from_method or deprecated or {key: "auto" for key in HYPERPARAMETERS}


def checked(prefix: str, hp, bounds: dict) -> dict | None:
    """Each key of ``bounds`` "auto" or a number within them; None for a missing or empty object."""
    if hp is None:
        return None
    if not isinstance(hp, dict):
        raise bad_type(prefix, "an object", hp)
    for key in hp:
        if key not in bounds:
            raise APIError(400, f"Unknown parameter: '{prefix}.{key}'.", f"{prefix}.{key}", "unknown_parameter")
    if not hp:
        return None
    return {key: one_hyperparameter(f"{prefix}.{key}", key, hp.get(key), bounds[key]) for key in bounds}


def one_hyperparameter(param: str, key: str, value, bounds: tuple):
    if key == "reasoning_effort":  # an enum with no "auto" (FineTuneReinforcementHyperparameters)
        if value is None:
            return "default"
        if value not in bounds:
            raise APIError(400, f"Invalid value: {value!r}. Supported values are: 'default', 'low', 'medium', and "
                           "'high'.", param, "invalid_value")
        return value
    if value in ("auto", None):  # null: as if not given
        return "auto"
    low, high = bounds
    if key in INTEGERS:
        return check_integer(param, value, low, high, auto=True)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad_type(param, "one of 'auto' or a number", value)
    if not math.isfinite(value):
        raise APIError(400, f"Invalid value for '{param}': {value}; expected a finite number.", param, "invalid_value")
    if value <= low:
        raise APIError(400, f"Invalid '{param}': decimal below minimum value. Expected a value > {low:g}, but got "
                       f"{value:g} instead.", param, "decimal_below_min_value")
    if high is not None and value > high:
        raise APIError(400, f"Invalid '{param}': decimal above maximum value. Expected a value <= {high:g}, but got "
                       f"{value:g} instead.", param, "decimal_above_max_value")
    return float(value)


def suffix(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_type("suffix", "a string", value)
    if not value:
        raise APIError(400, "Invalid 'suffix': string too short. Expected a string with minimum length 1, but got an "
                       "empty string instead.", "suffix", "string_below_min_length")
    if len(value) > MAX_SUFFIX:
        raise too_long("suffix", MAX_SUFFIX, len(value))
    if not SUFFIX.fullmatch(value):
        raise APIError(400, f"Invalid 'suffix': {value!r}; use letters, digits, '.', '-' or '_' (it becomes a part "
                       "of the model name ft:<model>:<organization>:<suffix>:<id>).", "suffix", "invalid_value")
    return value


def seed(value) -> int | None:
    return None if value is None else check_integer("seed", value, 0, MAX_SEED)


def metadata(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_type("metadata", "an object", value)
    if len(value) > MAX_METADATA:
        raise APIError(400, f"Invalid 'metadata': too many properties. Expected an object with at most {MAX_METADATA} "
                       f"properties, but got an object with {len(value)} properties instead.", "metadata",
                       "object_above_max_properties")
    for key, item in value.items():
        if len(key) > MAX_KEY:
            raise too_long("metadata", MAX_KEY, len(key))
        if not isinstance(item, str):
            raise bad_type(f"metadata.{key}", "a string", item)
        if len(item) > MAX_VALUE:
            raise too_long(f"metadata.{key}", MAX_VALUE, len(item))
    return value


def integrations(value) -> list[dict] | None:
    """OpenAI's integrations; one object (what some scripts pass) is taken as a list of one."""
    if value is None:
        return None
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise bad_type("integrations", "an array", value)
    if len(items) > MAX_INTEGRATIONS:
        raise too_long("integrations", MAX_INTEGRATIONS, len(items), "array")
    for i, item in enumerate(items):
        where = f"integrations[{i}]"
        if not isinstance(item, dict):
            raise bad_type(where, "an object", item)
        for key in ("type", "wandb"):
            if key not in item:
                raise missing(f"{where}.{key}")
        if item["type"] != "wandb":
            raise APIError(400, f"Invalid value: {item['type']!r}. Supported values are: 'wandb'.", f"{where}.type",
                           "invalid_value")
        wandb = item["wandb"]
        if not isinstance(wandb, dict):
            raise bad_type(f"{where}.wandb", "an object", wandb)
        if not wandb.get("project"):
            raise missing(f"{where}.wandb.project")
        for key, expected in (("project", str), ("name", (str, type(None))), ("entity", (str, type(None)))):
            if key in wandb and not isinstance(wandb[key], expected):
                raise bad_type(f"{where}.wandb.{key}", "a string", wandb[key])
        tags = wandb.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise bad_type(f"{where}.wandb.tags", "an array of strings", tags)
        try:  # and the rest as OpenAI's job object types it
            FineTuningJobWandbIntegrationObject.model_validate(item)
        except ValidationError as e:
            raise APIError(400, f"Invalid '{where}': {e.errors()[0]['msg']}", where, "invalid_value") from None
    return items or None
