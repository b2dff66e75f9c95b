"""Scoring primitives: find JSON in an answer, extract a label, ROUGE-L, label / JSON metrics, format checks."""

from __future__ import annotations

import json
import re


def parse_json(text: str):
    """The first JSON object in an answer (models wrap JSON in prose or code fences), else None."""
    text = text.strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            return obj
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def extract_label(text: str | None, label_field: str | None) -> str | None:
    if text is None:
        return None
    if label_field is None:
        label = text.strip().strip(".").strip()
        return label or None
    obj = parse_json(text)
    if isinstance(obj, dict) and obj.get(label_field) is not None:
        return str(obj[label_field]).strip()
    return None


def canonical_json(obj, fields: list[str] | None = None) -> str | None:
    """An object as sorted-key JSON, restricted to ``fields`` when given; None for a non-object."""
    if not isinstance(obj, dict):
        return None
    if fields:
        obj = {f: obj[f] for f in fields if f in obj}
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


# format_check: name -> the regex an answer must match somewhere, and what that means
FORMAT_CHECKS = {"markdown_headings": re.compile(r"^#{1,6} \S", re.MULTILINE)}
FORMAT_MEANING = {"markdown_headings": "at least one markdown heading line (`# ...` to `###### ...`)"}


def format_ok(check: str, answers: list[str | None]) -> float:
    """Share of answers (a failed request counts as not ok) that pass FORMAT_CHECKS[check]."""
    pattern = FORMAT_CHECKS[check]
    return round(sum(a is not None and bool(pattern.search(a)) for a in answers) / max(1, len(answers)), 4)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def label_metrics(refs: list[str], preds: list[str | None], scores=None, classes=None) -> dict:
    """Accuracy, macro-F1, precision, recall, confusion matrix; ``parsed``: share of answers with a label;
    ``off_label``: share whose label is none of ``classes`` (default: the references' labels), counted as
    wrong; ``roc_auc`` (binary, or one-vs-rest) when ``scores`` (one row per answer, a column per class)."""
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # absent classes score 0, as documented
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = sorted(set(refs))
    known = set(classes or labels)
    shown = [p if p in labels else ("<unparsed>" if p is None else "<other>") for p in preds]
    extra = [x for x in ("<other>", "<unparsed>") if x in shown]
    p, r, f1, _ = precision_recall_fscore_support(refs, shown, labels=labels, average="macro", zero_division=0)
    out = {"n": len(refs), "accuracy": accuracy_score(refs, shown), "macro_f1": f1, "precision": p, "recall": r,
           "parsed": sum(x is not None for x in preds) / len(preds),
           "off_label": sum(x is not None and x not in known for x in preds) / len(preds),
           "confusion": {"labels": labels + extra,
                         "matrix": confusion_matrix(refs, shown, labels=labels + extra).tolist()}}
    if scores is not None and classes is not None and len(labels) > 1:
        import numpy as np

        try:
            if len(classes) == 2:
                out["roc_auc"] = roc_auc_score([c == classes[1] for c in refs], np.asarray(scores)[:, 1])
            else:
                keep = [i for i, c in enumerate(refs) if c in set(classes)]
                sc = np.asarray(scores)[keep]
                sc = sc / sc.sum(axis=1, keepdims=True)
                out["roc_auc"] = roc_auc_score([refs[i] for i in keep], sc, multi_class="ovr", labels=list(classes))
        except ValueError:
            pass  # a class absent from the held-out set: no AUC
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def _json_objects(refs: list[str], answers: list[str | None], fields: list[str]):
    ref_objs = [o if isinstance(o := parse_json(r), dict) else {} for r in refs]
    objs = [parse_json(a) if a is not None else None for a in answers]
    fields = fields or sorted({k for o in ref_objs for k in o})
    return ref_objs, objs, fields


def json_exact(refs: list[str], answers: list[str | None], fields: list[str]) -> list[float]:
    """Per answer: 1.0 when it is an object matching its reference on every scored field (exact_match's rows)."""
    ref_objs, objs, fields = _json_objects(refs, answers, fields)
    return [float(isinstance(o, dict) and all(o.get(f) == r.get(f) for f in fields)) for o, r in zip(objs, ref_objs)]


def json_metrics(refs: list[str], answers: list[str | None], fields: list[str]) -> dict:
    ref_objs, objs, fields = _json_objects(refs, answers, fields)
    valid = [isinstance(o, dict) for o in objs]
    per_field = {f: round(sum(isinstance(o, dict) and o.get(f) == r.get(f) for o, r in zip(objs, ref_objs))
                          / len(refs), 4) for f in fields}
    exact = sum(json_exact(refs, answers, fields))
    return {"n": len(refs), "valid_json": round(sum(valid) / len(refs), 4), "field_accuracy": per_field,
            "exact_match": round(exact / len(refs), 4)}
