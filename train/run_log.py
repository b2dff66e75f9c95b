"""The run directory's records of a training run (train/core.py): metrics.jsonl (``RunLog``), the peak memory for
summary.json, loss.png / accuracy.png, and the last complete checkpoint to resume from."""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

from transformers import TrainerCallback


class RunLog(TrainerCallback):
    """Appends one JSON line per log to metrics.jsonl, with tokens/s between logging steps."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.last = (time.time(), None)
        if self.path.exists():  # resuming: keep what the checkpoint covers, drop steps it will redo
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        rec.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()})
        tokens = logs.get("num_tokens")
        if tokens is not None and "loss" in logs:
            now, (then, before) = time.time(), self.last
            if before is not None and now > then:
                rec["tokens_per_s"] = round((tokens - before) / (now - then), 1)
            self.last = (now, tokens)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# (file, train key, eval key, y label) of train/sft.py's plots; each method script names its own
SFT_PLOTS = (("loss.png", "loss", "eval_loss", "loss"),
             ("accuracy.png", "mean_token_accuracy", "eval_mean_token_accuracy", "mean token accuracy"))


def plot_metrics(run_dir: Path, panels=SFT_PLOTS) -> list[str]:
    """One PNG per panel of metrics.jsonl's values, train as a line and evaluation as points."""
    # matplotlib's object API: no pyplot, so no backend switch (a notebook's stays as it is)
    from matplotlib.figure import Figure

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    written = []
    for name, train_key, eval_key, ylabel in panels:
        tr = [(r["step"], r[train_key]) for r in recs if train_key in r]
        ev = [(r["step"], r[eval_key]) for r in recs if eval_key in r]
        if not tr and not ev:
            continue
        fig = Figure(figsize=(7, 4), dpi=110)
        ax = fig.subplots()
        if tr:
            ax.plot(*zip(*tr), label="train", color="#4C72B0")
        if ev:
            ax.plot(*zip(*ev), "o-", label="valid", color="#DD8452")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{run_dir.name}: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name)
        written.append(str(run_dir / name))
    return written


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N that finished saving (a kill can leave a partial one)."""
    done = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()
            and re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
