"""SQLite state of the local fine-tuning API: files, jobs, events and checkpoints.

Every object is kept as the JSON the API returns, beside the few columns the server queries
(status, order). One connection, one lock: the request threads and the job worker share it.
A job's ``private`` JSON holds what the API does not show (pid, run folder, attempts, counters, its profile,
base model and ``init_adapter``, what a pause left). ``model_owner`` finds the job behind an ``ft:`` name.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, obj TEXT, path TEXT,
                                  deleted INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, status TEXT, obj TEXT,
                                 private TEXT);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, job_id TEXT, obj TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, job_id TEXT,
                                        step INTEGER, obj TEXT, UNIQUE(job_id, step));
"""


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")[:24]


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _all(self, sql: str, *args) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _run(self, sql: str, *args) -> None:
        with self.lock:
            self.db.execute(sql, args)

    # ----------------------------------------------------------------------------- files

    def add_file(self, obj: dict, path: str) -> None:
        self._run("INSERT INTO files (id, obj, path) VALUES (?, ?, ?)", obj["id"], json.dumps(obj), path)

    def get_file(self, file_id: str) -> tuple[dict, str] | None:
        rows = self._all("SELECT obj, path FROM files WHERE id = ? AND deleted = 0", file_id)
        return (json.loads(rows[0][0]), rows[0][1]) if rows else None

    def list_files(self, purpose: str | None, order: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows = [json.loads(r[0]) for r in self._all("SELECT obj FROM files WHERE deleted = 0 ORDER BY seq "
                                                   + ("ASC" if order == "asc" else "DESC"))]
        if purpose:
            rows = [r for r in rows if r["purpose"] == purpose]
        return page(rows, after, limit)

    def delete_file(self, file_id: str) -> None:
        self._run("UPDATE files SET deleted = 1 WHERE id = ?", file_id)

    # ----------------------------------------------------------------------------- jobs

    def add_job(self, obj: dict, private: dict) -> None:
        self._run("INSERT INTO jobs (id, status, obj, private) VALUES (?, ?, ?, ?)",
                  obj["id"], obj["status"], json.dumps(obj), json.dumps(private))

    def get_job(self, job_id: str) -> dict | None:
        rows = self._all("SELECT obj FROM jobs WHERE id = ?", job_id)
        return json.loads(rows[0][0]) if rows else None

    def get_private(self, job_id: str) -> dict:
        rows = self._all("SELECT private FROM jobs WHERE id = ?", job_id)
        return json.loads(rows[0][0]) if rows else {}

    def update_job(self, job_id: str, private: dict | None = None, **changes) -> dict:
        """Change fields of a job atomically; returns the new object."""
        with self.lock:
            obj = self.get_job(job_id)
            obj.update(changes)
            self.db.execute("UPDATE jobs SET obj = ?, status = ? WHERE id = ?", (json.dumps(obj), obj["status"], job_id))
            if private is not None:
                merged = {**self.get_private(job_id), **private}
                self.db.execute("UPDATE jobs SET private = ? WHERE id = ?", (json.dumps(merged), job_id))
            return obj

    def list_jobs(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows = [json.loads(r[0]) for r in self._all("SELECT obj FROM jobs ORDER BY seq DESC")]
        return page(rows, after, limit)

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        return [json.loads(r[0]) for r in self._all(f"SELECT obj FROM jobs WHERE status IN ({marks}) ORDER BY seq ASC",
                                                    *statuses)]

    # ----------------------------------------------------------------------------- events, checkpoints

    def add_event(self, job_id: str, message: str, level: str = "info", type_: str = "message",
                  data: dict | None = None) -> dict:
        obj = {"object": "fine_tuning.job.event", "id": new_id("ftevent-"), "created_at": int(time.time()),
               "level": level, "message": message, "type": type_, "data": data or {}}
        self._run("INSERT INTO events (id, job_id, obj) VALUES (?, ?, ?)", obj["id"], job_id, json.dumps(obj))
        return obj

    def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; ``after`` is the id of the last event of the previous page (older ones follow)."""
        rows = [json.loads(r[0]) for r in self._all("SELECT obj FROM events WHERE job_id = ? ORDER BY seq DESC", job_id)]
        return page(rows, after, limit)

    def add_checkpoint(self, job_id: str, step: int, obj: dict) -> bool:
        with self.lock:
            if self.db.execute("SELECT 1 FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step)).fetchall():
                return False
            self.db.execute("INSERT INTO checkpoints (id, job_id, step, obj) VALUES (?, ?, ?, ?)",
                            (obj["id"], job_id, step, json.dumps(obj)))
            return True

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        rows = [json.loads(r[0]) for r in self._all("SELECT obj FROM checkpoints WHERE job_id = ? ORDER BY step DESC",
                                                    job_id)]
        return page(rows, after, limit)

    # ----------------------------------------------------------------------------- fine-tuned models

    def model_owner(self, name: str) -> tuple[dict, int | None] | None:
        """(job, checkpoint step or None) of a fine-tuned model's name (a succeeded job's ``fine_tuned_model`` or
        a checkpoint's ``fine_tuned_model_checkpoint``): found by the job id the name ends with (``ftjob-`` or
        not), else by looking through every job. None: no model of this server."""
        parts = name.split(":")
        ckpt = re.fullmatch(r"ckpt-step-(\d+)", parts[-1])
        step = int(ckpt.group(1)) if ckpt else None
        tail = parts[-2] if ckpt and len(parts) > 1 else parts[-1]
        by_id = [job for job in (self.get_job(tail), self.get_job("ftjob-" + tail)) if job]
        for job in by_id or self.list_jobs(None, 10**9)[0]:
            if step is None and job["status"] == "succeeded" and job.get("fine_tuned_model") == name:
                return job, None
            if step is not None and any(c["fine_tuned_model_checkpoint"] == name
                                        for c in self.list_checkpoints(job["id"], None, 10**9)[0]):
                return job, step
        return None


def page(rows: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Cursor pagination as OpenAI's API does it: the objects listed after the one with id ``after``."""
    if after:
        ids = [r["id"] for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    return rows[:limit], len(rows) > limit
