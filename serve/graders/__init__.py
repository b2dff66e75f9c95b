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

Grading is here; a grader's checks are in ``checks.py``, the shared types and the result in ``base.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

from . import formula as formula_mod
from .base import (EMBEDDING_ENV, ERROR_FLAGS, GRADER_TYPES, METRICS, OPERATIONS, GradeResult,  # noqa: F401
                   GraderInvalid, error_flags)
from .checks import _have_wordnet, _is_num, _refusal, _sub_graders, _texts, python_graders, validate  # noqa: F401
from .sandbox import MAX_SOURCE_BYTES, run_python_grader
from .templates import SampleParseError, TemplateError, make_sample, render

__all__ = ["GRADER_TYPES", "GradeResult", "GraderInvalid", "MAX_SOURCE_BYTES", "error_flags", "grade",
           "make_sample", "python_graders", "run_grader", "validate"]


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
