"""What a train/sft.py run leaves, in OpenAI's shapes: metrics events, checkpoint metrics, the result file.

train/sft.py writes ``metrics.jsonl`` (one JSON record per logging or evaluation step: ``loss``,
``mean_token_accuracy``, ``eval_loss``, ...) and ``checkpoint-N`` folders into the job's run folder;
the worker turns them into ``metrics`` events, checkpoint objects and ``step_metrics.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


def model_name(job: dict) -> str:
    return f"ft:{job['model']}:{job.get('user_provided_suffix') or 'local'}:{job['id']}"


def last_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
            and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def metrics_data(rec: dict, total: int) -> dict | None:
    """One metrics.jsonl record of train/sft.py in OpenAI's event ``data`` shape."""
    data = {"step": rec.get("step", 0), "total_steps": total}
    if "loss" in rec:
        data["train_loss"] = rec["loss"]
        if "mean_token_accuracy" in rec:
            data["train_mean_token_accuracy"] = rec["mean_token_accuracy"]
    if "eval_loss" in rec:
        data["valid_loss"] = rec["eval_loss"]
        if "eval_mean_token_accuracy" in rec:
            data["valid_mean_token_accuracy"] = rec["eval_mean_token_accuracy"]
    return data if len(data) > 2 else None


def metrics_message(d: dict) -> str:
    parts = [f"Step {d['step']}/{d['total_steps']}:"]
    if "train_loss" in d:
        parts.append(f"training loss={d['train_loss']:.4f}")
    if "valid_loss" in d:
        parts.append(f"validation loss={d['valid_loss']:.4f}")
    return " ".join(parts)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def step_metrics(run_dir: Path, step: int) -> dict:
    out = {"step": step}
    for rec in read_metrics(run_dir):
        if rec.get("step", 0) <= step:
            d = metrics_data(rec, 0) or {}
            d.pop("total_steps", None)
            out.update(d)
    out["step"] = step
    return out


def results_csv(run_dir: Path) -> bytes:
    """OpenAI's result file: one row per training step, validation columns where evaluated."""
    rows: dict[int, dict] = {}
    for rec in read_metrics(run_dir):
        row = rows.setdefault(rec.get("step", 0), {"step": rec.get("step", 0)})
        if "loss" in rec:
            row.update(train_loss=rec["loss"], train_accuracy=rec.get("mean_token_accuracy", ""))
        if "eval_loss" in rec:
            row.update(valid_loss=rec["eval_loss"], valid_mean_token_accuracy=rec.get("eval_mean_token_accuracy", ""))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, RESULT_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return buf.getvalue().encode()
