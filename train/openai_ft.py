"""Fine-tuning jobs on OpenAI, or on the same API served locally (``python -m serve.finetune_api``).

    python -m train.openai_ft create --config configs/banking77/openai.yaml
    python -m train.openai_ft follow ftjob-abc123
    python -m train.openai_ft results ftjob-abc123          # result CSV + loss/accuracy plot
    python -m train.openai_ft list | status JOB | cancel JOB | checkpoints JOB
    python -m train.openai_ft create --config configs/banking77/openai.yaml --backend local \\
        --base-url http://127.0.0.1:8100/v1

``create`` checks the files with data_prep's rules, prints the cost estimate (billed tokens x epochs
x price from tunekit/prices.yaml), uploads train and valid files (a file already uploaded with the
same content is reused), creates the job and records it in ``runs/openai_jobs/<job id>.json``.
``follow`` prints events and metrics until the job ends (Ctrl-C detaches; ``follow`` again picks up
where it left off) and records the fine-tuned model id in runs/registry.json, where the serving
client's ``finetuned`` alias finds it.

Keys: OPENAI_API_KEY for ``--backend openai``, TUNEKIT_API_KEY for ``--backend local``, from the
environment or a ``.env`` file in the working directory. Transient failures (429, 5xx, timeouts,
dropped connections) are retried with backoff.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.config import load_config, load_dotenv  # noqa: E402
from tunekit.errors import UserError, run_main  # noqa: E402

BACKENDS = {"openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
            "local": ("http://127.0.0.1:8100/v1", "TUNEKIT_API_KEY")}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class OpenAIJobConfig:
    train_file: str = ""
    valid_file: str | None = None
    model: str = DEFAULT_OPENAI_MODEL  # the model to fine-tune on OpenAI (and whose tokenizer counts)
    local_model: str = "SmolLM2-135M-Instruct"  # the model name the local fine-tuning API trains
    suffix: str | None = None
    seed: int | None = 42
    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"
    wandb_project: str | None = None  # OpenAI's Weights & Biases integration (needs wandb linked to the org)
    backend: str = "openai"  # openai | local
    base_url: str | None = None  # default: api.openai.com, or http://127.0.0.1:8100/v1 for local
    jobs_dir: str = "runs/openai_jobs"  # job records and the upload cache
    max_retries: int = 5  # per request, for 429 / 5xx / timeouts / dropped connections
    timeout_s: float = 120.0
    poll_interval_s: float = 10.0
    assume_yes: bool = False  # skip the confirmation before a paid OpenAI job (--yes)


# ----------------------------------------------------------------------------- client and records


def make_client(backend: str, base_url: str | None, max_retries: int = 5, timeout_s: float = 120.0):
    import openai

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: choose openai or local")
    default_url, key_var = BACKENDS[backend]
    load_dotenv()
    key = os.environ.get(key_var)
    if not key and backend == "openai":
        raise UserError(f"{key_var} is not set; put it in the environment or in a .env file (KEY=VALUE)")
    client = openai.OpenAI(api_key=key or "none", base_url=base_url or default_url, max_retries=max_retries,
                           timeout=timeout_s)
    return client


def explain(exc: Exception, client) -> UserError:
    """One line for an API failure, with the server's own message."""
    import openai

    where = str(client.base_url).rstrip("/")
    if isinstance(exc, openai.AuthenticationError):
        var = "OPENAI_API_KEY" if "api.openai.com" in where else "TUNEKIT_API_KEY"
        return UserError(f"{where} refused the API key; set {var} (environment or .env) to the right key")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        msg = body.get("message") or str(exc)
        param = f" (param {body['param']})" if body.get("param") else ""
        return UserError(f"{where}: {exc.status_code} {msg}{param}")
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return UserError(f"cannot reach {where} ({type(exc).__name__}) after {client.max_retries} retries; "
                         "is the server running? (local: `python -m serve.finetune_api --config ...`)")
    return UserError(f"{where}: {exc}")


def jobs_dir(path: str | None) -> Path:
    return Path(path or OpenAIJobConfig.jobs_dir)


def read_record(job_id: str, folder: Path) -> dict:
    path = folder / f"{job_id}.json"
    return json.loads(path.read_text()) if path.is_file() else {"job_id": job_id}


def write_record(rec: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rec['job_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upload(client, path: Path, folder: Path) -> tuple[str, bool]:
    """File id for ``path`` on this server: the one uploaded before with the same content, or a new one."""
    import openai

    cache_path = folder / "uploads.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    server = str(client.base_url).rstrip("/")
    digest = sha256(path)
    known = cache.get(server, {}).get(digest)
    if known:
        try:
            if client.files.retrieve(known).purpose == "fine-tune":
                return known, True
        except openai.NotFoundError:
            pass
    with path.open("rb") as f:
        file_id = client.files.create(file=(path.name, f), purpose="fine-tune").id
    cache.setdefault(server, {})[digest] = file_id
    folder.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    return file_id, False


# ----------------------------------------------------------------------------- create


def check_files(cfg: OpenAIJobConfig) -> dict:
    """data_prep's validation of both files, then the token count and cost estimate of the train file."""
    from data_prep.stats import compute
    from data_prep.validate import validate_file

    if not cfg.train_file:
        raise UserError("train_file: required (the chat JSONL from `python -m data_prep build`)")
    problems = []
    for key in ("train_file", "valid_file"):
        path = getattr(cfg, key)
        if path:
            _, found = validate_file(path, cfg.model)
            problems += [str(p) for p in found]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"the files are not valid fine-tuning data ({len(problems)} problem(s)):\n  {shown}\n"
                        "fix them (see `python -m data_prep validate FILE`) and run create again")
    epochs = cfg.n_epochs if isinstance(cfg.n_epochs, int) else None
    return compute(Path(cfg.train_file), cfg.model, None, epochs)


def cost_lines(stats: dict, cfg: OpenAIJobConfig) -> list[str]:
    lines = [f"{stats['file']}: {stats['examples']} examples, {stats['billed_tokens_per_epoch']:,} billed tokens "
             f"per epoch ({stats['tokenizer']})",
             f"  {stats['billed_tokens_per_epoch']:,} tokens x {stats['epochs']} epochs ({stats['epochs_source']}) = "
             f"{stats['billed_tokens_total']:,} training tokens"]
    lines[1] = lines[1].replace("(--epochs)", "(n_epochs)")
    if cfg.backend == "local":
        lines.append("  local backend: no charge (trains on this machine)")
    elif stats["price_per_1m_training_tokens"] is None:
        lines.append(f"  no training price for {cfg.model} in tunekit/prices.yaml: cost unknown")
    else:
        lines.append(f"  x ${stats['price_per_1m_training_tokens']:.2f} per 1M tokens = estimated cost "
                     f"${stats['estimated_cost_usd']:.2f}")
    return lines


def job_kwargs(cfg: OpenAIJobConfig, train_id: str, valid_id: str | None) -> dict:
    hp = {"n_epochs": cfg.n_epochs, "batch_size": cfg.batch_size,
          "learning_rate_multiplier": cfg.learning_rate_multiplier}
    kwargs = {"model": cfg.local_model if cfg.backend == "local" else cfg.model, "training_file": train_id,
              "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    if valid_id:
        kwargs["validation_file"] = valid_id
    if cfg.seed is not None:
        kwargs["seed"] = cfg.seed
    if cfg.suffix:
        kwargs["suffix"] = cfg.suffix
    if cfg.wandb_project:
        kwargs["integrations"] = [{"type": "wandb", "wandb": {"project": cfg.wandb_project}}]
    return kwargs


def cmd_create(args) -> int:
    overrides = {k: getattr(args, k, None) for k in ("backend", "base_url", "train_file", "valid_file", "model",
                                                    "suffix", "seed", "n_epochs", "jobs_dir")}
    overrides["assume_yes"] = True if args.yes else None
    cfg = load_config(OpenAIJobConfig, args.config, overrides)
    stats = check_files(cfg)
    print("\n".join(cost_lines(stats, cfg)))
    if cfg.backend == "openai" and not cfg.assume_yes:
        if not sys.stdin.isatty():
            raise UserError("a paid OpenAI job needs confirmation: pass --yes (or set assume_yes: true in the config)")
        if input("create this job? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not created")
            return 1
    client = make_client(cfg.backend, cfg.base_url, cfg.max_retries, cfg.timeout_s)
    folder = Path(cfg.jobs_dir)
    try:
        ids = {}
        for key in ("train_file", "valid_file"):
            path = getattr(cfg, key)
            if path:
                ids[key], reused = upload(client, Path(path), folder)
                print(f"{'reusing' if reused else 'uploaded'} {path} as {ids[key]}")
        kwargs = job_kwargs(cfg, ids["train_file"], ids.get("valid_file"))
        job = client.fine_tuning.jobs.create(**kwargs)
    except UserError:
        raise
    except Exception as e:
        raise explain(e, client) from None
    rec = {"job_id": job.id, "backend": cfg.backend, "base_url": str(client.base_url).rstrip("/"),
           "created_at": job.created_at, "model": job.model, "status": job.status, "request": kwargs,
           "files": {k: getattr(cfg, k) for k in ("train_file", "valid_file")},
           "estimate": {k: stats[k] for k in ("examples", "epochs", "billed_tokens_total", "estimated_cost_usd")},
           "config": asdict(cfg), "last_event_id": None, "fine_tuned_model": None}
    path = write_record(rec, folder)
    print(f"created {job.id} ({job.status}); recorded in {path}")
    print(f"follow it with: python -m train.openai_ft follow {job.id}" + backend_flags(rec))
    return 0


def backend_flags(rec: dict) -> str:
    if rec.get("backend") == "local":
        return f" --backend local --base-url {rec['base_url']}"
    return ""


# ----------------------------------------------------------------------------- follow


def client_for(args, rec: dict):
    backend = args.backend or rec.get("backend") or "openai"
    base_url = args.base_url or (rec.get("base_url") if backend == rec.get("backend") else None)
    return make_client(backend, base_url, args.max_retries, args.timeout), backend


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


def transient(exc: Exception) -> bool:
    import openai

    return isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                            openai.InternalServerError)) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500)


def cmd_follow(args) -> int:
    folder = jobs_dir(args.jobs_dir)
    rec = read_record(args.job_id, folder)
    client, backend = client_for(args, rec)
    rec.setdefault("backend", backend)
    rec.setdefault("base_url", str(client.base_url).rstrip("/"))
    failures = 0
    interval = args.interval or (rec.get("config") or {}).get("poll_interval_s") or 10.0
    guard = DeferredInterrupt()
    previous = signal.signal(signal.SIGINT, guard)
    print(f"following {args.job_id} on {str(client.base_url).rstrip('/')} (Ctrl-C detaches; the job keeps running)", flush=True)
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
              f"python -m train.openai_ft follow {args.job_id}" + backend_flags(rec), flush=True)
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
        print(f"results: python -m train.openai_ft results {job.id}" + backend_flags(rec))
        return 0
    write_record(rec, folder)
    if job.status == "failed":
        err = job.error
        detail = f"{err.code}: {err.message}" + (f" (param {err.param})" if err.param else "") if err else "no reason given"
        print(f"failed: {detail}", file=sys.stderr)
    else:
        print(f"{job.status}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- the other commands


def api_call(args, fn):
    rec = read_record(args.job_id, jobs_dir(args.jobs_dir)) if getattr(args, "job_id", None) else {}
    client, _ = client_for(args, rec)
    try:
        return fn(client), rec
    except Exception as e:
        raise explain(e, client) from None


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


# ----------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.openai_ft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, create=False):
        sp.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="openai (api.openai.com, OPENAI_API_KEY) or local (serve.finetune_api, TUNEKIT_API_KEY)"
                             + ("" if create else "; default: the one the job was created with"))
        sp.add_argument("--base-url", dest="base_url", help="API address, e.g. http://127.0.0.1:8100/v1")
        sp.add_argument("--jobs-dir", dest="jobs_dir", help="job records (default runs/openai_jobs)")
        if not create:
            sp.add_argument("--max-retries", dest="max_retries", type=int, default=5,
                            help="retries per request on 429/5xx/timeouts (default 5)")
            sp.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")

    c = sub.add_parser("create", help="validate, estimate the cost, upload the files and create the job",
                       description="Keys of the YAML mirror the flags; flags override it.")
    c.add_argument("--config", help="configs/<use_case>/openai.yaml")
    common(c, create=True)
    c.add_argument("--train-file", dest="train_file")
    c.add_argument("--valid-file", dest="valid_file")
    c.add_argument("--model", help=f"model to fine-tune on OpenAI (default {DEFAULT_OPENAI_MODEL})")
    c.add_argument("--suffix")
    c.add_argument("--seed", type=int)
    c.add_argument("--n-epochs", dest="n_epochs", type=int)
    c.add_argument("--yes", action="store_true", help="create a paid OpenAI job without asking")
    c.set_defaults(fn=cmd_create)

    f = sub.add_parser("follow", help="events and metrics until the job ends (Ctrl-C detaches)")
    f.add_argument("job_id")
    common(f)
    f.add_argument("--interval", type=float, help="seconds between polls (default: the config's poll_interval_s, 10)")
    f.add_argument("--max-failures", dest="max_failures", type=int, default=20,
                   help="consecutive failed polls before giving up (default 20)")
    f.set_defaults(fn=cmd_follow)

    ls = sub.add_parser("list", help="recent fine-tuning jobs")
    common(ls)
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(fn=cmd_list)

    for name, fn, help_ in (("status", cmd_status, "a job's status, hyperparameters and files"),
                            ("cancel", cmd_cancel, "cancel a job"),
                            ("checkpoints", cmd_checkpoints, "a job's checkpoints and their metrics")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("job_id")
        common(sp)
        sp.set_defaults(fn=fn)

    r = sub.add_parser("results", help="download the result CSV and plot loss and accuracy (train vs valid)")
    r.add_argument("job_id")
    common(r)
    r.add_argument("--out", help="folder for results.csv and results.png (default runs/openai_jobs/JOB_ID)")
    r.set_defaults(fn=cmd_results)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
