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


def model_name(job: dict, organization: str = "personal") -> str:
    """OpenAI's shape ``ft:<model>:<organization>:<suffix>:<id>`` (the suffix part empty without one); the id
    part is the job id without ``ftjob-``, so the name leads back to its job. Checkpoints append
    ``:ckpt-step-N``."""
    return f"ft:{job['model']}:{organization}:{job.get('user_provided_suffix') or ''}:{job['id'].removeprefix('ftjob-')}"


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
    """OpenAI's wording: "Step 300/300: training loss=0.15, validation loss=0.27" (two decimals)."""
    parts = [f"{label} loss={d[key]:.2f}" for key, label in (("train_loss", "training"), ("valid_loss", "validation"))
             if key in d]
    return f"Step {d['step']}/{d['total_steps']}: " + ", ".join(parts)


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


def trained_tokens(run_dir: Path) -> int | None:
    """The job's ``trained_tokens``: train/sft.py's summary.json ``train_tokens`` (TRL's count of the tokens
    trained on, every epoch), else the last ``num_tokens`` metrics.jsonl logged."""
    path = run_dir / "summary.json"
    try:
        n = json.loads(path.read_text()).get("train_tokens") if path.exists() else None
    except (OSError, ValueError):
        n = None
    if n is None:
        n = max((r["num_tokens"] for r in read_metrics(run_dir) if isinstance(r.get("num_tokens"), (int, float))),
                default=None)
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n == n else None
