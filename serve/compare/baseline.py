"""The bag-of-words baseline: TF-IDF + logistic regression trained on ``train_data``, scored like a model.

Only for tasks whose table entry has ``baseline``. It learns, from each training example's last user
message, the reference's class: for ``label`` the reference's label; for ``json`` the reference
object itself (canonical JSON with sorted keys, restricted to ``json_fields`` when set), each
distinct object being a class. It predicts the held-out examples, and the json predictions are
scored with the json metrics (per field and exact match) like a model's answers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .data import Example, load_examples
from .scoring import canonical_json, extract_label, label_metrics, parse_json
from .tasks import TASKS

if TYPE_CHECKING:
    from .config import CompareConfig

BASELINE = "tfidf-logreg"


def target(cfg: CompareConfig, reference: str) -> str | None:
    """The class the baseline learns for a reference; None leaves the example out."""
    if cfg.task == "json":
        return canonical_json(parse_json(reference), cfg.json_fields)
    return extract_label(reference, cfg.label_field)


def train_baseline(cfg: CompareConfig, examples: list[Example]) -> dict | None:
    """TF-IDF + logistic regression on the user messages of train_data (tasks with ``baseline``)."""
    if not TASKS[cfg.task].baseline or not cfg.baseline or not cfg.train_data:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train = load_examples(cfg.train_data)
    x = [ex.text for ex in train]
    y = [target(cfg, ex.reference) for ex in train]
    keep = [i for i, label in enumerate(y) if label is not None]
    if len({y[i] for i in keep}) < 2:
        return None
    t0 = time.perf_counter()
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, C=10.0))
    pipe.fit([x[i] for i in keep], [y[i] for i in keep])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = [ex.text for ex in examples]
    preds = list(pipe.predict(texts))
    scores = pipe.predict_proba(texts)
    per = (time.perf_counter() - t0) / len(examples)
    return {"preds": [str(p) for p in preds], "scores": scores, "classes": [str(c) for c in pipe.classes_],
            "fit_s": round(fit_s, 3), "latency_s": per, "train_examples": len(keep)}


def baseline_rows(cfg: CompareConfig, examples: list[Example], baseline: dict) -> list[float]:
    """Per held-out example, the baseline's headline score (its mean is the baseline's headline)."""
    if cfg.task == "json":
        return TASKS["json"].per_example(cfg, [ex.reference for ex in examples], baseline["preds"])
    return [float(p == extract_label(ex.reference, cfg.label_field)) for ex, p in zip(examples, baseline["preds"])]


def baseline_score(cfg: CompareConfig, reference: str, pred: str) -> float:
    """predictions.csv: the baseline's prediction against the reference."""
    if cfg.task == "json":
        return TASKS["json"].score(cfg, reference, pred)
    return float(pred == extract_label(reference, cfg.label_field))


def baseline_summary(cfg: CompareConfig, examples: list[Example], baseline: dict) -> dict:
    """The baseline's row of metrics.json, in the shape of a model's summary."""
    b = {"alias": BASELINE, "model": "TF-IDF + logistic regression", "backend": "local (scikit-learn)",
         "n": len(examples), "answered": len(examples), "failed": {},
         "latency_p50_s": round(baseline["latency_s"], 6), "latency_p95_s": round(baseline["latency_s"], 6),
         "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "fit_s": baseline["fit_s"],
         "train_examples": baseline["train_examples"]}
    if cfg.task == "json":
        b.update(TASKS["json"].metrics(cfg, [ex.reference for ex in examples], baseline["preds"]))
        b["classes"] = len(baseline["classes"])
    else:
        refs = [extract_label(ex.reference, cfg.label_field) or "<none>" for ex in examples]
        b.update(label_metrics(refs, baseline["preds"], baseline["scores"], baseline["classes"]))
    return b
