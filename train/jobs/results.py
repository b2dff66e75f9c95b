"""The other commands: ``list``, ``status``, ``cancel``, ``checkpoints`` and ``results`` (result CSV + plot)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import time
from pathlib import Path

from train.jobs.client import TERMINAL, api_call, jobs_dir
from tunekit.errors import UserError


def job_line(job) -> str:
    extra = f"  {job.fine_tuned_model}" if job.fine_tuned_model else ""
    if job.status == "failed" and job.error:
        extra = f"  {job.error.code}: {job.error.message}"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at))
    return f"{job.id}  {job.status:<16} {when}  {job.model}{extra}"


def cmd_list(args) -> int:
    page, _ = api_call(args, lambda c: c.fine_tuning.jobs.list(limit=args.limit))
    for job in page.data:
        print(job_line(job))
    if not page.data:
        print("no fine-tuning jobs")
    return 0


def cmd_status(args) -> int:
    job, _ = api_call(args, lambda c: c.fine_tuning.jobs.retrieve(args.job_id))
    print(job_line(job))
    hp = job.method.supervised.hyperparameters if job.method and job.method.supervised else job.hyperparameters
    if hp:
        print(f"  hyperparameters: n_epochs {hp.n_epochs}, batch_size {hp.batch_size}, "
              f"learning_rate_multiplier {hp.learning_rate_multiplier}")
    print(f"  files: train {job.training_file}, valid {job.validation_file}")
    if job.result_files:
        print(f"  result files: {', '.join(job.result_files)}")
    return 1 if job.status == "failed" else 0


def cmd_cancel(args) -> int:
    job, _ = api_call(args, lambda c: c.fine_tuning.jobs.cancel(args.job_id))
    print(job_line(job))
    return 0


def cmd_checkpoints(args) -> int:
    page, _ = api_call(args, lambda c: c.fine_tuning.jobs.checkpoints.list(args.job_id))
    for ck in page.data:
        m = ck.metrics
        parts = [f"step {ck.step_number:>6}", ck.fine_tuned_model_checkpoint]
        for key in ("train_loss", "valid_loss", "valid_mean_token_accuracy"):
            if getattr(m, key, None) is not None:
                parts.append(f"{key} {getattr(m, key):.4f}")
        print("  ".join(parts))
    if not page.data:
        print("no checkpoints yet")
    return 0


def decode_result(content: bytes) -> str:
    """OpenAI serves result files base64-encoded; plain CSV is taken as it is."""
    text = content.decode("utf-8", errors="replace").strip()
    if text.startswith("step"):
        return text + "\n"
    try:
        return base64.b64decode(text, validate=True).decode("utf-8").strip() + "\n"
    except (binascii.Error, UnicodeDecodeError):
        raise UserError("the result file is neither CSV nor base64-encoded CSV") from None


def plot_results(rows: list[dict], out: Path, title: str) -> Path:
    # matplotlib's object API: no pyplot, so no backend switch (a notebook's stays as it is)
    from matplotlib.figure import Figure

    def series(key):
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return list(zip(*pts)) if pts else None

    fig = Figure(figsize=(11, 4), dpi=110)
    axes = fig.subplots(1, 2)
    for ax, (train_key, valid_key, label) in zip(axes, (("train_loss", "valid_loss", "loss"),
                                                        ("train_accuracy", "valid_mean_token_accuracy",
                                                         "mean token accuracy"))):
        tr, va = series(train_key), series(valid_key)
        if tr:
            ax.plot(*tr, label="train", color="#4C72B0")
        if va:
            ax.plot(*va, "o-", label="valid", color="#DD8452")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if tr or va:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def cmd_results(args) -> int:
    def fetch(client):
        job = client.fine_tuning.jobs.retrieve(args.job_id)
        if not job.result_files:
            raise UserError(f"{args.job_id} is {job.status} and has no result file yet"
                            + ("; wait for it with `follow`" if job.status not in TERMINAL else ""))
        return job, client.files.content(job.result_files[0]).content

    (job, content), _ = api_call(args, fetch)
    text = decode_result(content)
    out = Path(args.out) if args.out else jobs_dir(args.jobs_dir) / args.job_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.csv").write_text(text)
    rows = list(csv.DictReader(io.StringIO(text)))
    plot = plot_results(rows, out / "results.png", f"{job.fine_tuned_model or job.id}")
    last = next((r for r in reversed(rows) if r.get("valid_loss")), rows[-1] if rows else {})
    print(f"{len(rows)} steps; last: " + ", ".join(f"{k} {v}" for k, v in last.items() if v not in (None, "")))
    print(f"wrote {out / 'results.csv'} and {plot}")
    return 0
