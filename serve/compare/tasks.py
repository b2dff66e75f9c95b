"""The task table: per task, how one answer is scored, a model's summary metrics, the headline
metric, and the report's columns. Everything task-specific in serve.compare reads TASKS.

  label  the answer is a class (``label_field``: the JSON field holding it); accuracy, macro-F1,
         precision, recall, confusion matrix, share that parses; the TF-IDF baseline applies
  json   a JSON object; share of valid objects, per-field accuracy, exact match
  text   free text; ROUGE-L F1, and the LLM judge (``judge_model``) applies
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .scoring import extract_label, json_metrics, label_metrics, parse_json, rouge_l

if TYPE_CHECKING:
    from .cli import CompareConfig


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


def col(header: str, key: str) -> Column:
    """A column showing summary[key], formatted."""
    return Column(header, lambda s: fmt(s.get(key)))


@dataclass(frozen=True)
class Task:
    name: str
    score: Callable[[CompareConfig, str, str], float]  # (cfg, reference, answer) -> row score; answer not None
    metrics: Callable[[CompareConfig, list[str], list[str | None]], dict]  # (cfg, refs, answers) -> summary keys
    headline: str  # the summary key of the main metric: plotted first, printed first
    columns: tuple[Column, ...]  # report.md: between the model column and the common ones (failed, latency ...)
    also_plotted: tuple[str, ...] = ()  # summary keys plotted beside the headline
    also_printed: tuple[tuple[str, str], ...] = ()  # (name, summary key) printed after the headline
    model_id_in_report: bool = False  # report.md's model column: "alias (`model id`)" instead of "alias"
    baseline: bool = False  # the TF-IDF + logistic-regression baseline is scored beside the models
    judge: bool = False  # the pairwise LLM judge (judge_model) runs

    @property
    def plotted(self) -> tuple[str, ...]:
        return (self.headline, *self.also_plotted)


# ---- label ------------------------------------------------------------------------------------

def label_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    return float(extract_label(answer, cfg.label_field) == extract_label(reference, cfg.label_field))


def label_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None]) -> dict:
    return label_metrics([extract_label(r, cfg.label_field) or "<none>" for r in refs],
                         [extract_label(a, cfg.label_field) for a in answers])


# ---- json -------------------------------------------------------------------------------------

def json_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    obj, ref = parse_json(answer), parse_json(reference) or {}
    fields = cfg.json_fields or list(ref)
    return float(isinstance(obj, dict) and all(obj.get(f) == ref.get(f) for f in fields))


def json_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None]) -> dict:
    return json_metrics(refs, answers, cfg.json_fields)


def per_field(s: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in s.get("field_accuracy", {}).items())


# ---- text -------------------------------------------------------------------------------------

def text_score(cfg: CompareConfig, reference: str, answer: str) -> float:
    return round(rouge_l(answer, reference), 4)


def text_summary(cfg: CompareConfig, refs: list[str], answers: list[str | None]) -> dict:
    return {"rouge_l": round(sum(rouge_l(a or "", r) for a, r in zip(answers, refs)) / len(refs), 4)}


TASKS: dict[str, Task] = {
    "label": Task("label", label_score, label_summary, headline="accuracy",
                  columns=(col("accuracy", "accuracy"), col("macro-F1", "macro_f1"), col("precision", "precision"),
                           col("recall", "recall"), col("parsed", "parsed"), col("ROC AUC", "roc_auc")),
                  also_plotted=("macro_f1",), also_printed=(("macro-F1", "macro_f1"),), model_id_in_report=True,
                  baseline=True),
    "json": Task("json", json_score, json_summary, headline="exact_match",
                 columns=(col("valid JSON", "valid_json"), col("exact match", "exact_match"),
                          Column("per field", per_field))),
    "text": Task("text", text_score, text_summary, headline="rouge_l", columns=(col("ROUGE-L", "rouge_l"),),
                 judge=True),
}


def row_score(cfg: CompareConfig, reference: str, answer: str | None) -> float:
    """One answer's score under cfg.task; no answer (a failed request) scores 0."""
    if answer is None:
        return 0.0
    return TASKS[cfg.task].score(cfg, reference, answer)
