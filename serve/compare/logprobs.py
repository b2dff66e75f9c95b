"""Class scores of a language model's label answer, from its log-probabilities (``logprobs: true``).

The request asks for the top 20 alternatives of every generated token (``top_logprobs: 20``). The
position read is the token where the label value starts: the first non-blank token of a plain label
answer, or, with ``label_field``, the token where the value after ``"<label_field>": "`` begins
(found by walking the tokens' text and character offsets). A class gets the probability mass of the
alternatives at that position whose text (stripped, lower-cased, without what precedes the value in
that token) is a non-empty prefix of the class name (lower-cased); the scores are normalised over
the classes, and are uniform when no mass falls on any class (or the position is not found). Those
scores feed ROC AUC (binary, or one-vs-rest); each answer's scores are kept in ``out/raw`` beside it.
"""

from __future__ import annotations

import math
import re

TOP_LOGPROBS = 20  # OpenAI's maximum, and vLLM's default --max-logprobs

# one generated token: (its text, [(alternative's text, logprob), ...])
Token = tuple[str, list[tuple[str, float]]]


def reply_tokens(choice) -> list[Token]:
    """The (token, top alternatives) of an SDK chat choice; [] when it carries no log-probabilities."""
    content = getattr(getattr(choice, "logprobs", None), "content", None) or []
    return [(t.token, [(a.token, a.logprob) for a in (t.top_logprobs or [])]) for t in content]


def label_start(tokens: list[Token], label_field: str | None) -> tuple[int, str] | None:
    """(index of the token where the label value starts, the part of that token before the value)."""
    starts, text = [], ""
    for tok, _ in tokens:
        starts.append(len(text))
        text += tok
    if label_field is None:
        m = re.search(r"\S", text)
    else:
        m = re.search(r'"' + re.escape(label_field) + r'"\s*:\s*"?', text)
    if m is None:
        return None
    at = m.start() if label_field is None else m.end()
    if at >= len(text):
        return None
    i = max(k for k, s in enumerate(starts) if s <= at and len(tokens[k][0]) > 0)
    return i, text[starts[i]:at]


def _stem(alternative: str, lead: str, in_json: bool) -> str:
    """An alternative's text as the start of a label: lead removed, stripped, lower-cased."""
    if lead and alternative.startswith(lead):
        alternative = alternative[len(lead):]
    if in_json:
        alternative = alternative.lstrip().lstrip('"').split('"')[0]
    return alternative.strip().rstrip(".").strip().lower()


def class_scores(tokens: list[Token], classes: list[str], label_field: str | None) -> dict[str, float]:
    """Per class, the normalised probability mass that the label-start alternatives put on it (6 digits)."""
    uniform = {c: round(1 / len(classes), 6) for c in classes} if classes else {}
    where = label_start(tokens, label_field)
    if where is None or not classes:
        return uniform
    i, lead = where
    names = [c.lower() for c in classes]
    mass = [0.0] * len(classes)
    for alt, logprob in tokens[i][1]:
        stem = _stem(alt, lead, label_field is not None)
        if not stem or logprob is None:
            continue
        p = math.exp(max(logprob, -9999.0))
        for k, name in enumerate(names):
            if name.startswith(stem):
                mass[k] += p
    total = sum(mass)
    if total <= 0:
        return uniform
    return {c: round(m / total, 6) for c, m in zip(classes, mass) if m > 0}  # the classes left out score 0


def score_matrix(records: list[dict | None], classes: list[str]):
    """One row per answer (its saved class_scores in ``classes`` order; uniform when missing), rows sum to 1."""
    import numpy as np

    rows = np.full((len(records), len(classes)), 1.0 / max(1, len(classes)))
    for r, rec in enumerate(records):
        saved = (rec or {}).get("class_scores")
        if saved:
            row = np.array([float(saved.get(c, 0.0)) for c in classes])
            if row.sum() > 0:
                rows[r] = row / row.sum()
    return rows
