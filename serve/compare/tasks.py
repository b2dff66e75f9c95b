"""The task table: per task, how one answer is scored, a model's summary metrics, the headline
metric and its per-example scores (for the bootstrap), and the report's columns. Everything
task-specific in serve.compare reads TASKS.

  label  the answer is a class (``label_field``: the JSON field holding it); accuracy, macro-F1,
         precision, recall, confusion matrix, share that parses, share off-label (parsed but not
         a class: wrong); the TF-IDF baseline applies; with ``logprobs`` ROC AUC of the language
         models from the top-20 log-probabilities of the token where the label starts (logprobs.py)
  json   a JSON object; share of valid objects, per-field accuracy, exact match; the baseline
         applies (each distinct reference object of train_data is a class)
  text   free text; ROUGE-L F1, ``format_check`` (markdown_headings: share with a heading line),
         and the LLM judge (``judge_model``) applies
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .scoring import extract_label, format_ok, json_exact, json_metrics, label_metrics, parse_json, rouge_l

if TYPE_CHECKING:
    from .config import CompareConfig
    from .data import Example


def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass(frozen=True)
class Column:
    """One task-specific column of report.md's table: its header and a summary -> cell function."""

    header: str
    cell: Callable[[dict], str]
    shown: Callable[[CompareConfig], bool] = lambda cfg: True


def col(header: str, key: str, shown: Callable[[CompareConfig], bool] | None = None) -> Column:
    """A column showing summary[key], formatted (only where ``shown(cfg)``, when given)."""
    return Column(header, lambda s: fmt(s.get(key)), *([shown] if shown else []))


@dataclass(frozen=True)
class Task:
    name: str
    score: Callable[[CompareConfig, str, str], float]  # (cfg, reference, answer) -> row score; answer not None
    # (cfg, refs, answers, classes=None, scores=None) -> summary keys; classes/scores: label task only
    metrics: Callable[..., dict]
    headline: str  # the summary key of the main metric: plotted first, printed first
    per_example: Callable[[CompareConfig, list[str], list[str | None]], list[float]]  # the headline is their mean
    columns: tuple[Column, ...]  # report.md: between the model column and the common ones (failed, latency ...)
    also_plotted: tuple[str, ...] = ()  # summary keys plotted beside the headline
    also_printed: tuple[tuple[str, str], ...] = ()  # (name, summary key) printed after the headline
    model_id_in_report: bool = False  # report.md's model column: "alias (`model id`)" instead of "alias"
    baseline: bool = False  # the TF-IDF + logistic-regression baseline is scored beside the models (baseline.py)
    judge: bool = False  # the pairwise LLM judge (judge_model) runs

    @property
    def plotted(self) -> tuple[str, ...]:
        return (self.headline, *self.also_plotted)


# ---- label ------------------------------------------------------------------------------------

def label_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    label = extract_label(answer, cfg.label_field)
    return float(label is not None and label == extract_label(reference, cfg.label_field))


def label_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None], classes=None,
                  scores=None) -> dict:
    """label_metrics; ``classes``: what counts as a class (off_label), ``scores``: their ROC AUC."""
    return label_metrics([extract_label(r, cfg.label_field) or "<none>" for r in refs],
                         [extract_label(a, cfg.label_field) for a in answers], scores=scores, classes=classes)


def label_classes(cfg: CompareConfig, examples: list[Example]) -> list[str]:
    """The sorted labels of the held-out references, and of train_data's when given."""
    from .data import load_examples

    refs = [ex.reference for ex in examples] + (
        [ex.reference for ex in load_examples(cfg.train_data)] if cfg.train_data else [])
    return sorted({label for r in refs if (label := extract_label(r, cfg.label_field)) is not None})


# ---- json -------------------------------------------------------------------------------------

def json_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    obj, ref = parse_json(answer), parse_json(reference)
    ref = ref if isinstance(ref, dict) else {}  # a reference that is no object: only json_fields are compared
    fields = cfg.json_fields or list(ref)
    return float(isinstance(obj, dict) and all(obj.get(f) == ref.get(f) for f in fields))


def json_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None], **_) -> dict:
    return json_metrics(refs, answers, cfg.json_fields)


def per_field(s: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in s.get("field_accuracy", {}).items())


# ---- text -------------------------------------------------------------------------------------

def text_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    return round(rouge_l(answer, reference), 4)


def text_rows(cfg: CompareConfig, refs: list[str], answers: list[str | None]) -> list[float]:
    return [rouge_l(a or "", r) for a, r in zip(answers, refs)]


def text_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None], **_) -> dict:
    out = {"rouge_l": round(sum(text_rows(cfg, refs, answers)) / len(refs), 4)}
    if cfg.format_check:
        out["format_ok"] = format_ok(cfg.format_check, answers)
    return out


def rows_of(score: Callable) -> Callable[[CompareConfig, list[str], list[str | None]], list[float]]:
    """per_example from a row score: a failed request (None) scores 0."""
    return lambda cfg, refs, answers: [0.0 if a is None else score(cfg, r, a) for r, a in zip(refs, answers)]


TASKS: dict[str, Task] = {
    "label": Task("label", label_score, label_summary, headline="accuracy", per_example=rows_of(label_score),
                  columns=(col("accuracy", "accuracy"), col("macro-F1", "macro_f1"), col("precision", "precision"),
                           col("recall", "recall"), col("parsed", "parsed"), col("off-label", "off_label"),
                           col("ROC AUC", "roc_auc")),
                  also_plotted=("macro_f1",), also_printed=(("macro-F1", "macro_f1"),), model_id_in_report=True,
                  baseline=True),
    "json": Task("json", json_score, json_summary, headline="exact_match",
                 per_example=lambda cfg, refs, answers: json_exact(refs, answers, cfg.json_fields),
                 columns=(col("valid JSON", "valid_json"), col("exact match", "exact_match"),
                          Column("per field", per_field)), baseline=True),
    "text": Task("text", text_score, text_summary, headline="rouge_l", per_example=text_rows,
                 columns=(col("ROUGE-L", "rouge_l"), col("format ok", "format_ok", lambda cfg: bool(cfg.format_check))),
                 judge=True),
}


def row_score(cfg: CompareConfig, reference: str, answer: str | None) -> float:
    """One answer's score under cfg.task; no answer (a failed request) scores 0."""
    if answer is None:
        return 0.0
    return TASKS[cfg.task].score(cfg, reference, answer)
