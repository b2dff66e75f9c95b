"""``follow``: events and metrics until the job ends; Ctrl-C detaches, and the fine-tuned model is recorded."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from train.jobs.client import (TERMINAL, backend_flags, client_for, explain, jobs_dir, read_record, server_url,
                               transient, write_record)
from tunekit.errors import UserError


def new_events(client, job_id: str, last_id: str | None) -> list:
    """Events after ``last_id``, oldest first (the API lists newest first)."""
    out, after = [], None
    while True:
        page = client.fine_tuning.jobs.list_events(job_id, limit=100, **({"after": after} if after else {}))
        for ev in page.data:
            if ev.id == last_id:
                return out[::-1]
            out.append(ev)
        if not page.has_more or not page.data:
            return out[::-1]
        after = page.data[-1].id


def format_event(ev) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(ev.created_at))
    data = ev.data if isinstance(ev.data, dict) else {}
    if ev.type == "metrics" and data:
        step, total = data.get("step"), data.get("total_steps")
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            done = int(20 * step / total) if step is not None else 0
            parts.insert(0, "[" + "#" * done + "." * (20 - done) + "]")
        for key, label in (("train_loss", "train loss"), ("train_mean_token_accuracy", "train acc"),
                           ("valid_loss", "valid loss"), ("valid_mean_token_accuracy", "valid acc")):
            if data.get(key) is not None:
                parts.append(f"{label} {data[key]:.4f}")
        return f"{when}  " + "  ".join(parts)
    level = "" if ev.level == "info" else f"{ev.level.upper()}: "
    return f"{when}  {level}{ev.message}"


def cmd_follow(args) -> int:
    folder = jobs_dir(args.jobs_dir)
    rec = read_record(args.job_id, folder)
    client, backend = client_for(args, rec)
    rec.setdefault("backend", backend)
    rec.setdefault("base_url", server_url(client))
    failures = 0
    interval = args.interval or (rec.get("config") or {}).get("poll_interval_s") or 10.0
    guard = DeferredInterrupt()
    previous = signal.signal(signal.SIGINT, guard)
    print(f"following {args.job_id} on {server_url(client)} (Ctrl-C detaches; the job keeps running)", flush=True)
    try:
        while True:
            try:
                job = client.fine_tuning.jobs.retrieve(args.job_id)
                events = new_events(client, args.job_id, rec.get("last_event_id"))
                failures = 0
            except Exception as e:
                if not transient(e):
                    raise explain(e, client) from None
                failures += 1
                if failures > args.max_failures:
                    raise UserError(f"{client.base_url}: still failing after {failures} attempts ({e}); the job "
                                    f"is not affected: run follow again later") from None
                wait = min(60.0, interval * 2 ** (failures - 1))
                print(f"warning: {type(e).__name__} ({str(e)[:120]}); retrying in {wait:.0f} s", file=sys.stderr,
                      flush=True)
                time.sleep(wait)
                continue
            guard.critical = True  # a Ctrl-C here waits until the printed events are recorded as seen
            for ev in events:
                print(format_event(ev), flush=True)
                rec["last_event_id"] = ev.id
            rec["status"] = job.status
            write_record(rec, folder)
            guard.critical = False
            if guard.pending:
                raise KeyboardInterrupt
            if job.status in TERMINAL:
                return finish(job, rec, folder)
            time.sleep(interval)
    except KeyboardInterrupt:
        write_record(rec, folder)
        print(f"\ndetached from {args.job_id}; it keeps running. Re-attach with: "
              f"tunekit jobs follow {args.job_id}" + backend_flags(rec), flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)


class DeferredInterrupt:
    """SIGINT handler: KeyboardInterrupt at once, or at the end of a critical section."""

    def __init__(self):
        self.critical = self.pending = False

    def __call__(self, signum, frame):
        if self.critical:
            self.pending = True
        else:
            raise KeyboardInterrupt


def finish(job, rec: dict, folder: Path) -> int:
    rec.update(status=job.status, fine_tuned_model=job.fine_tuned_model, finished_at=job.finished_at,
               trained_tokens=job.trained_tokens, result_files=list(job.result_files or []))
    if job.status == "succeeded":
        from serve.registry import load, record_model, registry_path

        known = load().get(rec["backend"], {}).get("finetuned") or {}  # the local API may have recorded it
        kept = {k: v for k, v in known.items() if k not in ("model", "recorded_at")} \
            if known.get("model") == job.fine_tuned_model else {}
        record_model(rec["backend"], "finetuned", job.fine_tuned_model, **{**kept, "job_id": job.id,
                     "suffix": job.user_provided_suffix, "base_model": job.model})
        write_record(rec, folder)
        print(f"succeeded: {job.fine_tuned_model} ({job.trained_tokens or 0:,} trained tokens); recorded as "
              f"'finetuned' for backend {rec['backend']} in {registry_path()}")
        print(f"results: tunekit jobs results {job.id}" + backend_flags(rec))
        return 0
    write_record(rec, folder)
    if job.status == "failed":
        err = job.error
        detail = f"{err.code}: {err.message}" + (f" (param {err.param})" if err.param else "") if err else "no reason given"
        print(f"failed: {detail}", file=sys.stderr)
    else:
        print(f"{job.status}", file=sys.stderr)
    return 1
