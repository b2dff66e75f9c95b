"""The outputs in ``out``: predictions.csv, metrics.json, report.md and its PNG plots, and the console lines.

Plots use matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: writing a report
from a notebook leaves the notebook's backend as it was.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .baseline import BASELINE, baseline_score
from .findings import collapse, collapse_line, collapse_lines, delta_lines, example_lines
from .grading import console_part as grader_part
from .grading import report_lines as grader_lines
from .preference import console_part
from .preference import report_lines as preference_lines
from .scoring import FORMAT_MEANING
from .tasks import TASKS, Column, fmt, row_score

if TYPE_CHECKING:
    from .config import CompareConfig

# the columns after the task's own, for every task
COMMON_COLUMNS = (
    Column("failed", lambda s: str(sum(s.get("failed", {}).values()))),
    Column("p50 s", lambda s: fmt(s.get("latency_p50_s"))),
    Column("p95 s", lambda s: fmt(s.get("latency_p95_s"))),
    Column("tokens in / out", lambda s: f"{s.get('input_tokens', '–')} / {s.get('output_tokens', '–')}"),
    Column("cost USD", lambda s: fmt(s.get("cost_usd"), 4)),
)


def system_message(ex) -> str:
    return next((str(m.get("content") or "") for m in ex.messages if m.get("role") == "system"), "")


def write_predictions(path: Path, cfg, examples, results, baseline) -> None:
    """One row per held-out example: its system message (empty if none), input (the last user message),
    reference, then per model its answer, score, latency and error, then the baseline's answer and score."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        header = ["idx", "line", "system", "input", "reference"]
        graded = bool(cfg.grader)
        for alias in results:
            header += [f"{alias}_answer", f"{alias}_score", f"{alias}_latency_s", f"{alias}_error",
                       *([f"{alias}_reward"] if graded else [])]
        if baseline:
            header += [f"{BASELINE}_answer", f"{BASELINE}_score"]
        w.writerow(header)
        for ex in examples:
            row = [ex.idx, ex.line, system_message(ex), ex.text, ex.reference]
            for alias, recs in results.items():
                rec = recs.get(ex.idx, {"error": "not_sent"})
                row += [rec.get("answer"), row_score(cfg, ex.reference, rec.get("answer")), rec.get("latency_s"),
                        rec.get("error") or "", *([rec.get("reward")] if graded else [])]
            if baseline:
                pred = baseline["preds"][ex.idx]
                row += [pred, baseline_score(cfg, ex.reference, pred)]
            w.writerow(row)
    tmp.replace(path)


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot(out: Path, cfg: CompareConfig, summaries: list[dict]) -> list[str]:
    """metrics.png (the task's plotted metrics), latency.png, confusion_<alias>.png; the names written."""
    import numpy as np
    from matplotlib.figure import Figure

    files = []
    task = TASKS[cfg.task]
    names = [s["alias"] for s in summaries]
    fig = Figure(figsize=(max(4, 1.6 * len(names)), 3.2))
    ax = fig.subplots()
    keys = task.plotted
    w = 0.8 / len(keys)
    for k, key in enumerate(keys):
        vals = [s.get(key) or 0 for s in summaries]
        bars = ax.bar(np.arange(len(names)) + k * w, vals, w, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(names)) + w * (len(keys) - 1) / 2, names)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title(f"{task.headline} on {summaries[0]['n']} held-out examples")
    _save(fig, out / "metrics.png", 120)
    files.append("metrics.png")

    timed = [s for s in summaries if s.get("latency_p50_s") is not None]
    if timed:
        fig = Figure(figsize=(max(4, 1.6 * len(timed)), 3.2))
        ax = fig.subplots()
        x = np.arange(len(timed))
        ax.bar(x - 0.2, [s["latency_p50_s"] for s in timed], 0.4, label="p50")
        ax.bar(x + 0.2, [s["latency_p95_s"] for s in timed], 0.4, label="p95")
        ax.set_xticks(x, [s["alias"] for s in timed])
        ax.set_ylabel("seconds per request")
        ax.legend(fontsize=8)
        ax.set_title(f"latency at concurrency {cfg.concurrency}")
        _save(fig, out / "latency.png", 120)
        files.append("latency.png")

    for s in summaries:
        conf = s.get("confusion")
        if not conf:
            continue
        m = np.asarray(conf["matrix"], dtype=float)
        n = len(conf["labels"])
        size = min(14, 3 + 0.28 * n)
        fig = Figure(figsize=(size, size))
        ax = fig.subplots()
        ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), conf["labels"], rotation=90, fontsize=6 if n > 20 else 8)
        ax.set_yticks(range(n), conf["labels"], fontsize=6 if n > 20 else 8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(f"{s['alias']}: accuracy {s['accuracy']:.2f}")
        name = f"confusion_{re.sub(r'[^A-Za-z0-9_.-]+', '_', s['alias'])}.png"
        _save(fig, out / name, 110)
        files.append(name)
    return files


def write_report(out: Path, cfg: CompareConfig, metrics: dict, plots: list[str], examples=None,
                 results: dict | None = None) -> None:
    """report.md: the table, the deltas against the base and the baseline, and (given the examples and
    results) the before/after examples."""
    task = TASKS[cfg.task]
    columns = tuple(c for c in (*task.columns, *COMMON_COLUMNS) if c.shown(cfg))
    lines = [f"# Comparison: {Path(cfg.data).name}", "",
             f"{metrics['examples']} held-out examples from `{cfg.data}`, backend `{metrics['backend']}`, "
             f"task `{cfg.task}`, sampling {json.dumps(metrics['sampling'])}.", "",
             "| " + " | ".join(["model", *(c.header for c in columns)]) + " |", "|" + "---|" * (1 + len(columns))]
    for s in metrics["models"]:
        model = f"{s['alias']} (`{s['model']}`)" if task.model_id_in_report else s["alias"]
        lines.append("| " + " | ".join([model, *(c.cell(s) for c in columns)]) + " |")
    if cfg.task == "label":
        lines += ["", "off-label: answers that parse but name none of the classes; they count as wrong."]
        if cfg.logprobs:
            lines += ["", "ROC AUC of the language models: from the first label token's top-20 log-probabilities "
                      "(the mass on tokens that start each class name, normalised over the classes)."]
    if cfg.format_check:
        lines += ["", f"format ok (`{cfg.format_check}`): share of answers with {FORMAT_MEANING[cfg.format_check]}."]
    for j in metrics.get("judge", []):
        lines += ["", f"LLM judge `{j['judge']}` (both orders, a win needs both): "
                  + ", ".join(f"{k} {v}" for k, v in j.items() if k not in ("judge", "pair", "failed_reason"))
                  + (f" (the first failure: {j['failed_reason']})" if j.get("failed_reason") else "")]
    failures = {s["alias"]: s["failed"] for s in metrics["models"] if s.get("failed")}
    lines += ["", "Failed requests (counted as wrong, listed in predictions.csv): "
              + (json.dumps(failures) if failures else "none") + "."]
    lines += collapse_lines(metrics)
    lines += delta_lines(metrics)
    lines += preference_lines(cfg, metrics)
    lines += grader_lines(cfg, metrics)
    if cfg.reference_figures:
        lines += ["", "## Figures from elsewhere", "",
                  "Measured on other data and splits (`reference_figures`): context beside the table above, "
                  "not a like-for-like comparison.", "", *(f"- {f}" for f in cfg.reference_figures)]
    if examples is not None and results:
        lines += example_lines(cfg, examples, results)
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def write_outputs(out: Path, cfg: CompareConfig, examples, results: dict, baseline: dict | None,
                  metrics: dict) -> list[str]:
    """predictions.csv, the plots, metrics.json and report.md (in that order); the plot names. A model that
    collapsed onto one answer is named in metrics.json's ``collapse`` and its summary's (the console's warning)."""
    metrics["collapse"] = collapse(cfg, examples, results, metrics["models"])
    by = {s["alias"]: s for s in metrics["models"]}
    for c in metrics["collapse"]:
        by[c["model"]]["collapse"] = c
    write_predictions(out / "predictions.csv", cfg, examples, results, baseline)
    plots = plot(out, cfg, metrics["models"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(out, cfg, metrics, plots, examples, results)
    return plots


def console_lines(cfg: CompareConfig, summaries: list[dict]) -> list[str]:
    """One line per model for stdout: the headline metric (and the task's extras), p50, failures."""
    task = TASKS[cfg.task]
    lines = []
    for s in summaries:
        failed = sum(s.get("failed", {}).values())
        extras = "".join(f", {name} {fmt(s.get(key))}" for name, key in task.also_printed)
        lines.append(f"{s['alias']:>16}: {task.headline} {fmt(s.get(task.headline))}{extras}"
                     f"{console_part(s)}{grader_part(s)}, p50 {fmt(s.get('latency_p50_s'))} s, failed {failed}")
    lines += [f"warning: {collapse_line(s['collapse'])}" for s in summaries if s.get("collapse")]
    return lines
