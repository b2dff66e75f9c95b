"""Scoring primitives: find JSON in an answer, extract a label, ROUGE-L, and label / JSON metrics."""

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
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # absent classes score 0, as documented
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = sorted(set(refs))
    shown = [p if p in labels else ("<unparsed>" if p is None else "<other>") for p in preds]
    extra = [x for x in ("<other>", "<unparsed>") if x in shown]
    p, r, f1, _ = precision_recall_fscore_support(refs, shown, labels=labels, average="macro", zero_division=0)
    out = {"n": len(refs), "accuracy": accuracy_score(refs, shown), "macro_f1": f1, "precision": p, "recall": r,
           "parsed": sum(x is not None for x in preds) / len(preds),
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


def json_metrics(refs: list[str], answers: list[str | None], fields: list[str]) -> dict:
    ref_objs = [parse_json(r) or {} for r in refs]
    objs = [parse_json(a) if a is not None else None for a in answers]
    fields = fields or sorted({k for o in ref_objs if isinstance(o, dict) for k in o})
    valid = [isinstance(o, dict) for o in objs]
    per_field = {f: round(sum(isinstance(o, dict) and o.get(f) == r.get(f) for o, r in zip(objs, ref_objs))
                          / len(refs), 4) for f in fields}
    exact = sum(isinstance(o, dict) and all(o.get(f) == r.get(f) for f in fields) for o, r in zip(objs, ref_objs))
    return {"n": len(refs), "valid_json": round(sum(valid) / len(refs), 4), "field_accuracy": per_field,
            "exact_match": round(exact / len(refs), 4)}
