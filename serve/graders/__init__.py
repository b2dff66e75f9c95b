"""OpenAI's graders, one implementation: the graders API (serve/finetune_api), reinforcement training and
compare all import this.

    from serve.graders import grade, validate, run_grader
    validate(grader)                                   # raises GraderInvalid(param, message)
    result = grade(grader, {"output_text": "..."}, item)   # GradeResult(reward, sub_rewards, metadata...)
    run_grader(grader, model_sample, item)             # the JSON of POST /v1/fine_tuning/alpha/graders/run

Types: ``string_check`` (eq, ne, like = contains, ilike = case-insensitive contains), ``text_similarity``
(fuzzy_match with rapidfuzz; bleu with sacrebleu; gleu with nltk; rouge_1..5, rouge_l with rouge-score;
``meteor`` and ``cosine`` refused, see ``refusal``), ``python`` (``sandbox.py``: each grade in a process of its
own, in new user, network and PID namespaces, Landlock-confined to an empty folder, no new processes, limited
CPU, memory and time), ``score_model`` and
``label_model`` (asked through an openai-style client: pass ``client=``, else ``serve.client.load_backend()``
is used; label_model only inside multi, as OpenAI has it) and ``multi`` (``formula.py``).

Errors while grading do not raise: they set OpenAI's ``metadata.errors`` flags and the reward is 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from . import formula as formula_mod
from .sandbox import MAX_SOURCE_BYTES, run_python_grader
from .templates import SampleParseError, TemplateError, check_variables, make_sample, render

__all__ = ["GRADER_TYPES", "GradeResult", "GraderInvalid", "MAX_SOURCE_BYTES", "error_flags", "grade",
           "make_sample", "python_graders", "run_grader", "validate"]

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
           "rouge_5", "rouge_l")
EMBEDDING_ENV = "TUNEKIT_GRADER_EMBEDDING_MODEL"
ERROR_FLAGS = ("formula_parse_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error", "invalid_variable_error", "other_error", "python_grader_server_error",
               "python_grader_server_error_type", "python_grader_runtime_error", "python_grader_runtime_error_details",
               "model_grader_server_error", "model_grader_refusal_error", "model_grader_parse_error",
               "model_grader_server_error_details")
_DETAILS = {"python_grader_server_error_type", "python_grader_runtime_error_details", "model_grader_server_error_details"}


def error_flags(**set_: Any) -> dict:
    """OpenAI's ``metadata.errors``: every flag false, every details null, then ``set_``."""
    flags = {k: (None if k in _DETAILS else False) for k in ERROR_FLAGS}
    flags.update(set_)
    return flags


class GraderInvalid(ValueError):
    """A grader the API refuses (400): ``param`` is its path, e.g. ``grader.operation``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass
class GradeResult:
    reward: float
    sub_rewards: dict = field(default_factory=dict)
    name: str = ""
    type: str = ""
    errors: dict = field(default_factory=error_flags)
    execution_time: float = 0.0
    scores: dict = field(default_factory=dict)
    token_usage: int | None = None
    sampled_model_name: str | None = None
    usage_per_model: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(v for k, v in self.errors.items() if k not in _DETAILS)

    def metadata(self) -> dict:
        return {"name": self.name, "type": self.type, "errors": self.errors, "execution_time": self.execution_time,
                "scores": self.scores, "token_usage": self.token_usage, "sampled_model_name": self.sampled_model_name}

    def to_response(self) -> dict:
        """RunGraderResponse."""
        return {"reward": self.reward, "metadata": self.metadata(), "sub_rewards": self.sub_rewards,
                "model_grader_token_usage_per_model": self.usage_per_model}


# ----------------------------------------------------------------------------- validation


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


# ----------------------------------------------------------------------------- grading


def grade(grader: dict, sample, item: dict | None = None, *, client=None, timeout_s: float | None = None,
          allow_unisolated: bool | None = None) -> GradeResult:
    """The reward of ``sample`` (a model's text, or ``{"output_text": ...}``) for ``item`` under ``grader``.

    ``client``: an openai.OpenAI-like object for score_model / label_model / cosine (default: the project's
    backend, ``serve.client.load_backend()``). ``timeout_s``: the python grader's wall-clock limit.
    ``allow_unisolated``: run python graders where the OS grants only part of the sandbox (default: the
    environment's TUNEKIT_PYTHON_GRADERS=on; see sandbox.py).
    """
    sample = make_sample(sample)
    item = item or {}
    start = time.perf_counter()
    res = GradeResult(0.0, name=str(grader.get("name", "")), type=str(grader.get("type", "")))
    ctx = _Context(client, timeout_s, allow_unisolated)
    try:
        _grade_into(res, grader, sample, item, ctx)
    except TemplateError as exc:
        res.reward, res.errors["invalid_variable_error"] = 0.0, True
        res.scores.setdefault("error", str(exc))
    except SampleParseError as exc:
        res.reward, res.errors["sample_parse_error"] = 0.0, True
        res.scores.setdefault("error", str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is OpenAI's other_error, not a crash of the caller
        res.reward, res.errors["other_error"] = 0.0, True
        res.scores.setdefault("error", f"{type(exc).__name__}: {exc}")
    if not res.ok:
        res.reward = 0.0
    res.execution_time = time.perf_counter() - start
    if ctx.usage:
        res.usage_per_model = ctx.usage
        res.token_usage = sum(u["total_tokens"] for u in ctx.usage.values())
        res.sampled_model_name = next(iter(ctx.usage))
    return res


class _Context:
    def __init__(self, client, timeout_s, allow_unisolated=None):
        self._client, self.timeout_s, self.usage = client, timeout_s, {}
        self.allow_unisolated = allow_unisolated
        self._backend = None

    def client(self):
        if self._client is None:
            from serve.client import load_backend

            self._backend = load_backend()
            self._client = self._backend.client()
        return self._client

    def model(self, name: str) -> str:
        if self._backend is not None:
            try:
                return self._backend.resolve(name)
            except Exception:  # noqa: BLE001 - a name the config does not alias goes as is
                return name
        return name

    def add_usage(self, model: str, usage) -> None:
        if usage is None:
            return
        get = (lambda k: getattr(usage, k, None)) if not isinstance(usage, dict) else usage.get
        u = self.usage.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                          "cached_tokens": 0})
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            u[k] += int(get(k) or 0)


def _grade_into(res: GradeResult, g: dict, sample: dict, item: dict, ctx: _Context) -> None:
    kind = g.get("type")
    if kind == "string_check":
        a, b = render(g["input"], sample, item), render(g["reference"], sample, item)
        op = g["operation"]
        ok = {"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}[op]
        res.reward = 1.0 if ok else 0.0
    elif kind == "text_similarity":
        a, b = render(g["input"], sample, item), render(g["reference"], sample, item)
        res.reward = similarity(g["evaluation_metric"], a, b, ctx)
    elif kind == "python":
        out = run_python_grader(g["source"], sample, item, allow_unisolated=ctx.allow_unisolated,
                                **({"timeout_s": ctx.timeout_s} if ctx.timeout_s else {}))
        if out.ok:
            res.reward = out.reward
        elif out.kind == "server":
            res.errors.update(python_grader_server_error=True, python_grader_server_error_type=out.error)
        else:
            res.errors.update(python_grader_runtime_error=True, python_grader_runtime_error_details=out.error)
    elif kind in ("score_model", "label_model"):
        _model_grade(res, g, sample, item, ctx)
    elif kind == "multi":
        subs = _sub_graders(g, "grader")
        try:
            tree = formula_mod.parse(g.get("calculate_output"), set(subs))
        except formula_mod.FormulaError as exc:
            res.errors["formula_parse_error"] = True
            res.scores["error"] = str(exc)
            return
        values = {}
        for name, (sub, _param) in subs.items():
            sub_res = GradeResult(0.0, name=name, type=str(sub.get("type")))
            try:
                _grade_into(sub_res, sub, sample, item, ctx)
            except TemplateError:
                sub_res.errors["invalid_variable_error"] = True
            except SampleParseError:
                sub_res.errors["sample_parse_error"] = True
            if not sub_res.ok:
                sub_res.reward = 0.0
                for k, v in sub_res.errors.items():
                    if v and not res.errors.get(k):
                        res.errors[k] = v
            values[name] = sub_res.reward
            res.sub_rewards[name] = sub_res.reward
            res.scores[name] = sub_res.scores.get("label", sub_res.reward)
        try:
            res.reward = formula_mod.evaluate(tree, values)
        except (ArithmeticError, ValueError) as exc:
            res.errors["other_error"] = True
            res.scores["error"] = f"calculate_output: {exc}"
    else:
        raise ValueError(f"unknown grader type {kind!r}")
    if kind != "multi":
        res.scores.setdefault(str(g.get("name", kind)), res.reward)


# ----------------------------------------------------------------------------- text similarity


def similarity(metric: str, text: str, reference: str, ctx: _Context | None = None) -> float:
    """``metric`` (OpenAI's evaluation_metric) of ``text`` against ``reference``, in [0, 1]."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100.0
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return BLEU(effective_order=True).sentence_score(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric.startswith("rouge_"):
        from rouge_score import rouge_scorer

        key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        return float(rouge_scorer.RougeScorer([key]).score(reference, text)[key].fmeasure)
    if metric == "meteor":
        why = _refusal("meteor")
        if why:
            raise ValueError(why)
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference.split()], text.split()))
    if metric == "cosine":
        model = os.environ.get(EMBEDDING_ENV)
        if not model:
            raise ValueError(_refusal("cosine"))
        ctx = ctx or _Context(None, None)
        resp = ctx.client().embeddings.create(model=ctx.model(model), input=[text, reference])
        a, b = resp.data[0].embedding, resp.data[1].embedding
        ctx.add_usage(model, getattr(resp, "usage", None))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0
    raise ValueError(f"unknown evaluation_metric {metric!r}")


# ----------------------------------------------------------------------------- model graders

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _messages(g: dict, sample: dict, item: dict) -> list[dict]:
    out = []
    for msg in g["input"]:
        text = "\n".join(render(t, sample, item) for t in _texts(msg.get("content")))
        out.append({"role": "system" if msg["role"] == "developer" else msg["role"], "content": text})
    return out


def _model_grade(res: GradeResult, g: dict, sample: dict, item: dict, ctx: _Context) -> None:
    messages = _messages(g, sample, item)
    if g["type"] == "score_model":
        low, high = g.get("range", [0, 1])
        instruction = (f"Answer with JSON only: {{\"result\": <a number from {low} to {high}>}}.")
    else:
        instruction = f"Answer with JSON only: {{\"label\": <one of {json.dumps(g['labels'])}>}}."
    messages.append({"role": "system", "content": instruction})
    sp = dict(g.get("sampling_params") or {})
    kwargs = {k: sp[k] for k in ("temperature", "top_p", "seed") if sp.get(k) is not None}
    if sp.get("max_completions_tokens") is not None:
        kwargs["max_tokens"] = sp["max_completions_tokens"]
    model = g["model"]
    try:
        resp = ctx.client().chat.completions.create(model=ctx.model(model), messages=messages, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the model server's failure is a flag, not a crash
        res.errors.update(model_grader_server_error=True,
                          model_grader_server_error_details=f"{type(exc).__name__}: {exc}"[:2000])
        return
    ctx.add_usage(model, getattr(resp, "usage", None))
    message = resp.choices[0].message
    if getattr(message, "refusal", None):
        res.errors["model_grader_refusal_error"] = True
        return
    text = (message.content or "").strip()
    parsed = _json_object(text)
    if g["type"] == "score_model":
        value = parsed.get("result") if parsed else None
        if not _is_num(value):
            m = _NUMBER.search(text)
            value = float(m.group()) if m else None
        if value is None:
            res.errors["model_grader_parse_error"] = True
            return
        res.reward = float(min(max(value, low), high))
    else:
        label = parsed.get("label") if parsed else text.strip().strip('"').strip()
        by_lower = {lab.lower(): lab for lab in g["labels"]}
        label = by_lower.get(str(label).lower()) if label is not None else None
        if label is None:
            res.errors["model_grader_parse_error"] = True
            return
        res.scores["label"] = label
        res.reward = 1.0 if label in g["passing_labels"] else 0.0


def _json_object(text: str) -> dict | None:
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        value = json.loads(m.group())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def run_grader(grader: dict, model_sample, item: dict | None = None, **kwargs) -> dict:
    """POST /v1/fine_tuning/alpha/graders/run: validate (GraderInvalid), grade, RunGraderResponse's JSON."""
    validate(grader)
    if item is not None and not isinstance(item, dict):
        raise GraderInvalid("item", "Invalid type for 'item': expected an object.")
    return grade(grader, model_sample, item or {}, **kwargs).to_response()
