"""What a train/sft.py, train/dpo.py or train/grpo.py run leaves, in OpenAI's shapes: metrics events, checkpoint
metrics, the result file, the model's name.

Each writes ``metrics.jsonl`` (one JSON record per logging or evaluation step) and ``checkpoint-N`` folders
into the job's run folder; the worker turns them into ``metrics`` events, checkpoint objects and
``step_metrics.csv`` (OpenAI's columns: step, train_loss, train_accuracy, valid_loss,
valid_mean_token_accuracy). The accuracy of each method:

- supervised (train/sft.py, TRL's SFTTrainer): ``mean_token_accuracy`` / ``eval_mean_token_accuracy``, the
  share of answer tokens predicted right;
- dpo (train/dpo.py, TRL's DPOTrainer, whose lines carry ``loss``, ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/...`` and ``eval_...``): ``rewards/accuracies`` /
  ``eval_rewards/accuracies``, the share of pairs whose preferred output the model ranks above the other.
  The events' data also carry the reward margin (``train_reward_margin``, ``valid_reward_margin``: the
  chosen reward minus the rejected one, in units of beta x log-probability).

A reinforcement run (train/grpo.py, TRL's GRPOTrainer: ``reward``, ``reward_std``, ``sub_rewards/<name>`` of a
multi grader, ``grader_error_rate``, ``completions/mean_length``, and ``eval_...`` when it evaluates) has no
accuracy; its events carry OpenAI's RFT metrics (its guide's example event): ``train_mean_reward``,
``full_valid_mean_reward`` (the evaluated validation prompts' mean reward), ``scores`` (``train_reward_mean``,
``valid_reward_mean`` and, for a multi grader, one entry per sub-grader under ``graders``),
``completion_tokens_mean``, plus ``train_reward_std`` / ``valid_reward_std`` and the grader's error rate; the
message is OpenAI's "Step 10/20 , train mean reward=0.42, full validation mean reward=0.68". Checkpoints carry
the flat numbers (``train_mean_reward``, ``full_valid_mean_reward``, the losses); the result file has its own
columns (``RL_COLUMNS``: OpenAI documents none for RFT).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
RL_COLUMNS = ["step", "train_reward_mean", "train_reward_std", "valid_reward_mean", "valid_reward_std",
              "train_grader_error_rate", "train_loss", "valid_loss"]
ACCURACY = ("mean_token_accuracy", "rewards/accuracies")  # supervised, dpo
MARGIN = "rewards/margins"


def model_name(job: dict, organization: str = "personal", base: str | None = None) -> str:
    """OpenAI's shape ``ft:<model>:<organization>:<suffix>:<id>`` (the suffix part empty without one); the id
    part is the job id without ``ftjob-``, so the name leads back to its job. Checkpoints append
    ``:ckpt-step-N``. ``base``: the base snapshot of a job on an ``ft:`` model, which OpenAI names the new
    model after (``ft:gpt-4o-mini-2024-07-18:org:suffix:id``, not the ft: name it continued from)."""
    model = base or job["model"]
    return f"ft:{model}:{organization}:{job.get('user_provided_suffix') or ''}:{job['id'].removeprefix('ftjob-')}"


def last_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
            and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def accuracy(rec: dict, prefix: str = "") -> float | None:
    """The record's accuracy, either method's (see the module doc); None without one."""
    return next((rec[prefix + key] for key in ACCURACY if prefix + key in rec), None)


def metrics_data(rec: dict, total: int, margins: bool = True) -> dict | None:
    """One metrics.jsonl record of train/sft.py or train/dpo.py in OpenAI's event ``data`` shape (``margins``:
    with the DPO reward margins, which OpenAI's checkpoint metrics have no field for)."""
    data = {"step": rec.get("step", 0), "total_steps": total}
    for prefix, side in (("", "train"), ("eval_", "valid")):
        if prefix + "loss" not in rec:
            continue
        data[f"{side}_loss"] = rec[prefix + "loss"]
        if (acc := accuracy(rec, prefix)) is not None:
            data[f"{side}_mean_token_accuracy"] = acc
        if margins and prefix + MARGIN in rec:
            data[f"{side}_reward_margin"] = rec[prefix + MARGIN]
    reward_data(rec, data, full=margins)
    return data if len(data) > 2 else None


def reward_data(rec: dict, data: dict, full: bool = True) -> None:
    """A train/grpo.py record's rewards into ``data``, as OpenAI's RFT metrics events name them (the module doc);
    ``full``: with the nested ``scores`` and the extras, else the flat numbers a checkpoint carries."""
    for prefix, side, name in (("", "train", "train_mean_reward"), ("eval_", "valid", "full_valid_mean_reward")):
        if prefix + "reward" not in rec:
            continue
        data[name] = rec[prefix + "reward"]
        if not full:
            continue
        scores = data.setdefault("scores", {})
        scores[f"{side}_reward_mean"] = rec[prefix + "reward"]
        subs = sorted(k for k in rec if k.startswith(prefix + "sub_rewards/"))
        if subs:
            scores["graders"] = [{"name": k.split("/", 1)[1], f"{side}_reward_mean": rec[k]} for k in subs]
        for key, out in (("reward_std", f"{side}_reward_std"), ("grader_error_rate", f"{side}_grader_error_rate"),
                         ("completions/mean_length", "completion_tokens_mean" if side == "train"
                          else "valid_completion_tokens_mean")):
            if prefix + key in rec:
                data[out] = rec[prefix + key]


def metrics_message(d: dict) -> str:
    """OpenAI's wording: "Step 300/300: training loss=0.15, validation loss=0.27" (two decimals); a reinforcement
    run's: "Step 10/20 , train mean reward=0.42, full validation mean reward=0.68" (its space before the comma)."""
    if "train_mean_reward" in d or "full_valid_mean_reward" in d:
        parts = [f"{label}={d[key]:.2f}" for key, label in (("train_mean_reward", "train mean reward"),
                                                             ("full_valid_mean_reward", "full validation mean reward"))
                 if key in d]
        return f"Step {d['step']}/{d['total_steps']} , " + ", ".join(parts)
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
            d = metrics_data(rec, 0, margins=False) or {}
            d.pop("total_steps", None)
            out.update(d)
    out["step"] = step
    return out


def value(x) -> object:
    return "" if x is None else x


def results_csv(run_dir: Path) -> bytes:
    """OpenAI's result file: one row per training step, validation columns where evaluated (a reinforcement run's:
    RL_COLUMNS)."""
    records = read_metrics(run_dir)
    if any("reward" in r or "eval_reward" in r for r in records):
        return rl_results_csv(records)
    rows: dict[int, dict] = {}
    for rec in records:
        row = rows.setdefault(rec.get("step", 0), {"step": rec.get("step", 0)})
        if "loss" in rec:
            row.update(train_loss=rec["loss"], train_accuracy=value(accuracy(rec)))
        if "eval_loss" in rec:
            row.update(valid_loss=rec["eval_loss"], valid_mean_token_accuracy=value(accuracy(rec, "eval_")))
    return steps_csv(rows, RESULT_COLUMNS)


def trained_tokens(run_dir: Path) -> int | None:
    """The job's ``trained_tokens``: summary.json's ``train_tokens`` (TRL's count of the tokens trained on,
    every epoch; a DPO pair's prompt, chosen and rejected tokens), else the last ``num_tokens`` metrics.jsonl
    logged."""
    path = run_dir / "summary.json"
    try:
        n = json.loads(path.read_text()).get("train_tokens") if path.exists() else None
    except (OSError, ValueError):
        n = None
    if n is None:
        n = max((r["num_tokens"] for r in read_metrics(run_dir) if isinstance(r.get("num_tokens"), (int, float))),
                default=None)
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n == n else None


def rl_results_csv(records: list[dict]) -> bytes:
    rows: dict[int, dict] = {}
    names = {"reward": "train_reward_mean", "reward_std": "train_reward_std", "eval_reward": "valid_reward_mean",
             "eval_reward_std": "valid_reward_std", "grader_error_rate": "train_grader_error_rate", "loss": "train_loss",
             "eval_loss": "valid_loss"}
    for rec in records:
        row = rows.setdefault(rec.get("step", 0), {"step": rec.get("step", 0)})
        row.update({column: rec[key] for key, column in names.items() if key in rec})
    return steps_csv(rows, RL_COLUMNS)


def steps_csv(rows: dict[int, dict], columns: list[str]) -> bytes:
    """A result file's CSV: ``columns`` as the header, one row per step in step order, blanks where not logged."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return buf.getvalue().encode()
