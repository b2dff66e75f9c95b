"""``migrate``: re-create OpenAI fine-tuning jobs on the local fine-tuning API (``python -m serve.finetune_api``).

    tunekit jobs migrate --dry-run                  # the plan; nothing is downloaded, uploaded or created
    tunekit jobs migrate                            # every succeeded job -> http://127.0.0.1:8100/v1
    tunekit jobs migrate --job ftjob-abc --file data/train.jsonl --to-base-url http://gpu-box:8100/v1

OpenAI takes no new fine-tuning jobs after 6 January 2027. Each job is re-created with the same base
model name (the local API maps OpenAI's names, o4-mini-2025-04-16 included, onto its own base model), the
same method (supervised, dpo or reinforcement) with the hyperparameters OpenAI resolved (n_epochs, batch_size,
learning_rate_multiplier; a DPO job's beta; a reinforcement job's compute_multiplier, eval_interval,
eval_samples and reasoning_effort, and its grader and response_format as they are), suffix, seed and
metadata, plus metadata ``migrated_from`` = the OpenAI job id. A reinforcement job with a python grader is
refused by a target that does not run python graders (one listening beyond loopback without
``python_graders: on``): the error names that key. A job trained on top of an ``ft:`` model (DPO after a
supervised fine-tune) comes after the job that made it, and trains on the local model that job's copy made:
once that copy has succeeded (until then it is listed as ``waits``; run migrate again). Its training and
validation files are downloaded from OpenAI
(into <jobs dir>/migrate/<file id>/); where OpenAI refuses the download (a 4xx: it may, for purpose
fine-tune) the local copy named with ``--file PATH`` is used, matched by byte size and, among equal
sizes, by filename (``--file file-abc=PATH`` names the OpenAI file outright). Uploads reuse ``create``'s
content-hash cache; each new job is recorded like ``create``'s, so ``tunekit jobs follow NEW_ID`` works.

Run it again at any time: a job already migrated (a job on the target whose metadata.migrated_from
names it, or a record of one) is skipped with a note. Keys: OPENAI_API_KEY for the source,
TUNEKIT_API_KEY for the target (environment or .env); they are never printed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from train.jobs.client import BACKENDS, backend_flags, explain, jobs_dir, make_client, server_url, write_record
from train.jobs.create import sha256, upload
from tunekit.errors import UserError

STATUSES = ("succeeded", "failed", "cancelled", "running", "queued", "validating_files", "all")
FILE_KEYS = (("training_file", "train_file"), ("validation_file", "valid_file"))  # job field, record key
MAX_METADATA = 16  # keys a job's metadata may have (OpenAI's limit, which the local API keeps)
FILE_ID = re.compile(r"^(file-[A-Za-z0-9_-]+)=(.+)$")


def add_flags(sp) -> None:
    sp.add_argument("--from-base-url", dest="from_base_url", metavar="URL",
                    help=f"the API to migrate from (default {BACKENDS['openai'][0]}; key OPENAI_API_KEY)")
    sp.add_argument("--to-base-url", dest="to_base_url", metavar="URL",
                    help=f"the local fine-tuning API to migrate to (default {BACKENDS['local'][0]}; "
                         "key TUNEKIT_API_KEY)")
    sp.add_argument("--status", choices=STATUSES, default="succeeded",
                    help="migrate the jobs with this status (default succeeded; all: every job)")
    sp.add_argument("--limit", type=int, metavar="N", help="at most N jobs, newest first (default: all that match)")
    sp.add_argument("--job", action="append", default=[], metavar="ID",
                    help="migrate this job whatever its status (repeatable; instead of --status/--limit)")
    sp.add_argument("--file", action="append", default=[], metavar="PATH",
                    help="a local copy of a training/validation file OpenAI will not let you download, matched "
                         "by size and filename; FILE_ID=PATH names the OpenAI file (repeatable)")
    sp.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan; create nothing")
    sp.add_argument("--jobs-dir", dest="jobs_dir", metavar="DIR",
                    help="job records, upload cache and downloads (default runs/openai_jobs)")
    sp.add_argument("--max-retries", dest="max_retries", type=int, default=5, metavar="N",
                    help="retries per request on 429/5xx/timeouts (default 5)")
    sp.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request (default 120)")


# ----------------------------------------------------------------------------- the source jobs


MIGRATED_METHODS = ("supervised", "dpo", "reinforcement")  # the methods the local API trains
KEYS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
        "dpo": ("beta", "n_epochs", "batch_size", "learning_rate_multiplier"),
        "reinforcement": ("n_epochs", "batch_size", "learning_rate_multiplier", "compute_multiplier", "eval_interval",
                          "eval_samples", "reasoning_effort")}


def method_type(job) -> str:
    return (job.method.type if job.method and job.method.type else None) or "supervised"


def hyperparameters_of(job) -> dict:
    """The job's hyperparameters as the source resolved them: its method's (method.supervised's or method.dpo's,
    beta included), else the legacy top-level field of an older supervised job."""
    kind = method_type(job)
    section = getattr(job.method, kind, None) if job.method else None
    hp = section.hyperparameters if section is not None else job.hyperparameters if kind == "supervised" else None
    out = {}
    for key in KEYS.get(kind, ()):
        value = getattr(hp, key, None) if hp is not None else None
        if value is not None:
            out[key] = value
    return out


def method_object(job) -> dict:
    """``method.<type>`` of the local job: the hyperparameters, and a reinforcement job's grader (and
    response_format) exactly as the source sent them (the SDK's types hold one grader where a multi grader's
    ``graders`` may be OpenAI's {name: grader} map, so they are read back as the JSON they came as)."""
    kind = method_type(job)
    out = {"hyperparameters": hyperparameters_of(job)}
    section = getattr(job.method, kind, None) if job.method else None
    if kind == "reinforcement" and section is not None:
        raw = section.to_dict(mode="json", warnings=False)
        out = {"grader": raw.get("grader"), **({"response_format": raw["response_format"]}
                                               if raw.get("response_format") else {}), **out}
    return out


def parent_model(model: str) -> str | None:
    """The fine-tuned model a job was trained on top of (a checkpoint's name without ``:ckpt-step-N``)."""
    if not model.startswith("ft:"):
        return None
    return re.sub(r":ckpt-step-\d+$", "", model)


def source_jobs(client, ids: list[str], status: str, limit: int | None) -> list:
    """The jobs named with --job, or the newest ``limit`` jobs with ``status`` (every page of jobs.list)."""
    if ids:
        return [client.fine_tuning.jobs.retrieve(i) for i in dict.fromkeys(ids)]
    out = []
    for job in client.fine_tuning.jobs.list(limit=100):  # the SDK's page iterator follows has_more/after
        if status == "all" or job.status == status:
            out.append(job)
            if limit is not None and len(out) >= limit:
                break
    return out


def already_migrated(client, folder: Path) -> dict:
    """{source job id: the target's job} from the target's jobs (metadata.migrated_from) and our records."""
    import openai

    found = {}
    for job in client.fine_tuning.jobs.list(limit=100):
        source = (job.metadata or {}).get("migrated_from")
        if source and source not in found:  # newest first: the latest copy wins
            found[source] = job
    url = server_url(client)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        source = (rec.get("migrated_from") or {}).get("job_id") if isinstance(rec, dict) else None
        if source and source not in found and rec.get("base_url") == url:
            try:  # a record of a job the target no longer has (its data folder wiped) does not count
                found[source] = client.fine_tuning.jobs.retrieve(rec["job_id"])
            except openai.NotFoundError:
                pass
    return found


# ----------------------------------------------------------------------------- files


def local_files(values: list[str]) -> tuple[list[Path], dict[str, Path]]:
    """--file values: plain paths (matched by size and name) and FILE_ID=PATH pairs."""
    paths, named = [], {}
    for value in values:
        m = FILE_ID.match(value)
        path = Path(m.group(2) if m else value).expanduser()
        if not path.is_file():
            raise UserError(f"--file {value}: no such file")
        if m:
            named[m.group(1)] = path
        else:
            paths.append(path)
    return paths, named


def describe(fobj) -> str:
    size = f"{fobj.bytes:,}" if fobj.bytes is not None else "?"
    return f"{fobj.id} ({fobj.filename}, {size} bytes)"


def match_file(fobj, paths: list[Path], why: str = "cannot be downloaded") -> Path:
    """The one local file that is ``fobj`` (an OpenAI file object): the same byte size, and among equal sizes
    the same filename; files with the same content count as one. A UserError naming the file otherwise."""
    same_size = [p for p in dict.fromkeys(Path(p) for p in paths) if p.stat().st_size == fobj.bytes]
    if not same_size:
        raise UserError(f"{describe(fobj)} {why}, and no --file has its size: pass its local copy with --file PATH")
    named = [p for p in same_size if p.name == fobj.filename] or same_size
    if len({sha256(p) for p in named}) > 1:
        raise UserError(f"{describe(fobj)} {why}, and {len(named)} different --file match it "
                        f"({', '.join(map(str, named))}): name the right one with --file {fobj.id}=PATH")
    return named[0]


@dataclass
class Files:
    """Local copies of the source's files: downloaded, or the user's --file; problems collected, not raised."""
    client: object
    folder: Path
    paths: list[Path]
    named: dict[str, Path]
    dry_run: bool
    done: dict = field(default_factory=dict)  # file id -> (path or None, how)
    problems: list = field(default_factory=list)

    def get(self, file_id: str) -> tuple[Path | None, str]:
        if file_id not in self.done:
            try:
                self.done[file_id] = self.resolve(file_id)
            except UserError as e:
                self.problems.append(str(e))
                self.done[file_id] = (None, "needs --file")
        return self.done[file_id]

    def resolve(self, file_id: str) -> tuple[Path | None, str]:
        import openai

        if file_id in self.named:
            return self.named[file_id], "--file"
        try:
            fobj = self.client.files.retrieve(file_id)
        except openai.NotFoundError:
            raise UserError(f"{file_id} is no longer on {server_url(self.client)}: pass its local copy with "
                            f"--file {file_id}=PATH") from None
        name = Path(fobj.filename or "").name or f"{file_id}.jsonl"
        path = self.folder / "migrate" / file_id / name
        if path.is_file() and path.stat().st_size == fobj.bytes:
            return path, "downloaded before"
        try:
            with self.client.files.with_streaming_response.content(file_id) as response:
                if self.dry_run:  # the download is allowed: that is all a dry run needs to know
                    return None, "download"
                path.parent.mkdir(parents=True, exist_ok=True)
                part = path.with_name(path.name + ".part")
                with part.open("wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
        except openai.APIStatusError as e:
            if not 400 <= e.status_code < 500 or e.status_code in (401, 429):
                raise
            body = e.body if isinstance(e.body, dict) else {}
            why = f"cannot be downloaded from {server_url(self.client)} ({e.status_code} {body.get('message') or e})"
            return match_file(fobj, self.paths, why), "--file"
        size = part.stat().st_size
        if fobj.bytes is not None and size != fobj.bytes:
            part.unlink()
            raise UserError(f"{describe(fobj)}: the download has {size:,} bytes; try again")
        os.replace(part, path)
        print(f"downloaded {describe(fobj)} to {path}")
        return path, "downloaded"


# ----------------------------------------------------------------------------- the plan and the jobs


@dataclass
class Row:
    job: object
    action: str = "create"  # create | skip | needs --file
    note: str = ""
    files: dict = field(default_factory=dict)  # job field -> local path
    model: str | None = None  # the local model to train on, for a job on top of an ft: model
    new_id: str = ""
    new_status: str = ""


def job_request(job, file_ids: dict, model: str | None = None) -> dict:
    """The local job's create request: the same method and hyperparameters; ``model`` replaces an ``ft:`` base
    with the local model that the migrated parent job made."""
    kind = method_type(job)
    kwargs = {"model": model or job.model, "training_file": file_ids["training_file"],
              "method": {"type": kind, kind: method_object(job)},
              "metadata": {**(job.metadata or {}), "migrated_from": job.id}}
    if file_ids.get("validation_file"):
        kwargs["validation_file"] = file_ids["validation_file"]
    suffix = getattr(job, "user_provided_suffix", None)
    if suffix:
        kwargs["suffix"] = suffix
    if job.seed is not None:
        kwargs["seed"] = job.seed
    return kwargs


def order(jobs: list) -> list:
    """Jobs on top of an ``ft:`` model after the job that made it (oldest first otherwise as given)."""
    made = {j.fine_tuned_model: j for j in jobs if j.fine_tuned_model}
    out: list = []

    def visit(job, seen=()):
        parent = made.get(parent_model(job.model) or "")
        if parent is not None and parent not in out and parent.id not in seen:
            visit(parent, (*seen, job.id))
        if job not in out:
            out.append(job)

    for job in jobs:
        visit(job)
    return out


def on_top_of(row: Row, done: dict, by_model: dict) -> None:
    """A job trained on an ``ft:`` model: train on the local model its migrated parent made, or wait for it."""
    parent_name = parent_model(row.job.model)
    parent = by_model.get(parent_name)
    if parent is None:
        row.action, row.new_status = "skip", "not migrated"
        row.note = (f"{row.job.id} trains on {row.job.model}, which no job of the source made that this run "
                    f"sees; migrate that job too (--job ID or --status all), then run migrate again")
        return
    new = done.get(parent.id)
    if new is None or new.status != "succeeded" or not new.fine_tuned_model:
        row.action, row.new_status = "skip", "waits"
        row.note = (f"{row.job.id} trains on {row.job.model}, made by {parent.id}, migrated "
                    + (f"as {new.id} ({new.status})" if new else "in this run") + "; run migrate again when "
                    "that job has succeeded here (tunekit jobs follow ID)")
        return
    row.model = new.fine_tuned_model
    if row.job.model != parent_name:
        row.note = (f"{row.job.id} trained on the checkpoint {row.job.model}; it trains here on the final model "
                    f"{new.fine_tuned_model} of {new.id} (checkpoint steps differ between the two APIs)")


def plan(rows: list[Row], done: dict, files: Files) -> None:
    by_model = {r.job.fine_tuned_model: r.job for r in rows if r.job.fine_tuned_model}
    for row in rows:
        job = row.job
        if job.id in done:
            new = done[job.id]
            row.action, row.new_id, row.new_status = "skip", new.id, new.status
            row.note = f"{job.id} was migrated before, as {new.id} ({new.status}); skipped"
            continue
        if method_type(job) not in MIGRATED_METHODS:
            row.action, row.new_status = "skip", "not migrated"
            row.note = (f"{job.id}: {method_type(job)} fine-tuning is not available locally (the local API trains "
                        f"{' and '.join(MIGRATED_METHODS)}); skipped")
            continue
        if parent_model(job.model):
            on_top_of(row, done, by_model)
            if row.action != "create":
                continue
        if len({**(job.metadata or {}), "migrated_from": job.id}) > MAX_METADATA:
            row.action, row.new_status = "skip", "not migrated"
            row.note = (f"{job.id}: its metadata has {MAX_METADATA} keys, the most a job may have, and leaves no "
                        "room for migrated_from; skipped")
            continue
        for key, _ in FILE_KEYS:
            file_id = getattr(job, key)
            if file_id:
                path, how = files.get(file_id)
                row.files[key] = path
                if path is None and how == "needs --file":
                    row.action, row.new_status = "needs --file", "needs --file"
        if row.action == "create":
            row.new_status = "would create" if files.dry_run else ""


def create(row: Row, src_url: str, dst, folder: Path) -> None:
    ids = {}
    for key, _ in FILE_KEYS:
        if row.files.get(key):
            ids[key], reused = upload(dst, row.files[key], folder)
            print(f"{'reusing' if reused else 'uploaded'} {row.files[key]} as {ids[key]}")
    kwargs = job_request(row.job, ids, row.model)
    job = dst.fine_tuning.jobs.create(**kwargs)
    row.new_id, row.new_status = job.id, job.status
    write_record({"job_id": job.id, "backend": "local", "base_url": server_url(dst), "created_at": job.created_at,
                  "model": job.model, "status": job.status, "request": kwargs,
                  "files": {rk: str(row.files[k]) if row.files.get(k) else None for k, rk in FILE_KEYS},
                  "migrated_from": {"job_id": row.job.id, "base_url": src_url, "status": row.job.status,
                                    "fine_tuned_model": row.job.fine_tuned_model},
                  "last_event_id": None, "fine_tuned_model": None}, folder)


def table(rows: list[Row]) -> str:
    head = ("OLD JOB", "MODEL", "SUFFIX", "STATUS", "", "NEW JOB", "STATUS")
    body = [(r.job.id, r.job.model, getattr(r.job, "user_provided_suffix", None) or "-", r.job.status, "->",
             r.new_id or "-", r.new_status or "-") for r in rows]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def source_error(exc: Exception, client) -> UserError:
    import openai

    if isinstance(exc, openai.AuthenticationError):
        return UserError(f"{server_url(client)} refused the API key; set OPENAI_API_KEY (environment or .env) to "
                         "the key of the account whose jobs to migrate")
    return explain(exc, client)


def cmd_migrate(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be 1 or more")
    folder = jobs_dir(args.jobs_dir)
    paths, named = local_files(args.file)
    src = make_client("openai", args.from_base_url, args.max_retries, args.timeout)
    dst = make_client("local", args.to_base_url, args.max_retries, args.timeout)
    src_url, dst_url = server_url(src), server_url(dst)
    if src_url == dst_url:
        raise UserError(f"--from-base-url and --to-base-url are the same API ({src_url})")
    try:
        jobs = source_jobs(src, args.job, args.status, args.limit)
    except Exception as e:
        raise source_error(e, src) from None
    if not jobs:
        print(f"no {'' if args.status == 'all' else args.status + ' '}fine-tuning jobs on {src_url} to migrate")
        return 0
    try:
        done = already_migrated(dst, folder)
    except Exception as e:
        raise explain(e, dst) from None
    rows = [Row(job) for job in order(jobs)]
    files = Files(src, folder, paths, named, args.dry_run)
    try:
        plan(rows, done, files)
    except UserError:
        raise
    except Exception as e:
        raise source_error(e, src) from None
    print(f"{len(rows)} job(s) on {src_url} -> {dst_url}{' (dry run: nothing created)' if args.dry_run else ''}")
    if files.problems:
        if args.dry_run:
            print(table(rows))
        lines = "\n  ".join(files.problems)
        raise UserError(f"{len(files.problems)} file(s) need --file"
                        + ("" if args.dry_run else "; nothing was created") + f":\n  {lines}")
    if not args.dry_run:
        try:
            for row in rows:
                if row.action == "create":
                    create(row, src_url, dst, folder)
        except Exception as e:
            err = e if isinstance(e, UserError) else explain(e, dst)
            made = [r for r in rows if r.action == "create" and r.new_id]
            if not made:
                raise err from None
            print(table(made))
            raise UserError(f"{err}; the {len(made)} job(s) above were created and recorded: run migrate again "
                            "to go on (they are skipped)") from None
    print(table(rows))
    for row in rows:
        if row.note:
            print(f"note: {row.note}")
    created = [r for r in rows if r.action == "create" and r.new_id]
    if created:
        print(f"created {len(created)} job(s), recorded in {folder}; follow one with: tunekit jobs follow "
              f"{created[0].new_id}" + backend_flags({"backend": "local", "base_url": dst_url}))
    return 0
