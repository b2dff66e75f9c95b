"""``create``: the job config, the file checks and cost estimate, uploads (reused by content) and the job."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from train.jobs.client import JOBS_DIR, backend_flags, explain, make_client, server_url, write_record
from tunekit.config import flag_overrides, load_config
from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import UserError


@dataclass
class OpenAIJobConfig:
    train_file: str = field(default="", metadata={"help": "chat JSONL to train on (from `tunekit build`)"})
    valid_file: str | None = field(default=None, metadata={"help": "chat JSONL to validate on"})
    model: str = field(default=DEFAULT_OPENAI_MODEL, metadata={
        "help": "the model to fine-tune on OpenAI (and whose tokenizer counts)"})
    local_model: str = field(default="SmolLM2-135M-Instruct", metadata={
        "help": "the model name the local fine-tuning API trains"})
    suffix: str | None = field(default=None, metadata={"help": "added to the fine-tuned model's name"})
    seed: int | None = field(default=42, metadata={"help": "the job's seed"})
    n_epochs: int | str = field(default="auto", metadata={"help": "epochs, or auto"})
    batch_size: int | str = field(default="auto", metadata={"help": "batch size, or auto"})
    learning_rate_multiplier: float | str = field(default="auto", metadata={
        "help": "learning-rate multiplier, or auto"})
    wandb_project: str | None = field(default=None, metadata={
        "help": "OpenAI's Weights & Biases integration (needs wandb linked to the org)"})
    backend: Literal["openai", "local"] = field(default="openai", metadata={
        "help": "openai (api.openai.com, OPENAI_API_KEY) or local (serve.finetune_api, TUNEKIT_API_KEY)"})
    base_url: str | None = field(default=None, metadata={
        "help": "API address (default: api.openai.com, or http://127.0.0.1:8100/v1 for local)"})
    jobs_dir: str = field(default=JOBS_DIR, metadata={"help": "job records and the upload cache"})
    max_retries: int = field(default=5, metadata={
        "help": "retries per request, for 429 / 5xx / timeouts / dropped connections"})
    timeout_s: float = field(default=120.0, metadata={"help": "seconds per request"})
    poll_interval_s: float = field(default=10.0, metadata={"help": "seconds between polls when following the job"})
    assume_yes: bool = field(default=False, metadata={
        "help": "create a paid OpenAI job without asking (the flag is --yes)"})


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
    server = server_url(client)
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


def check_files(cfg: OpenAIJobConfig) -> dict:
    """data_prep's validation of both files, then the token count and cost estimate of the train file."""
    from data_prep.stats import compute
    from data_prep.validate import validate_file

    if not cfg.train_file:
        raise UserError("train_file: required (the chat JSONL from `tunekit build`)")
    problems = []
    for key in ("train_file", "valid_file"):
        path = getattr(cfg, key)
        if path:
            _, found = validate_file(path, cfg.model)
            problems += [str(p) for p in found]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"the files are not valid fine-tuning data ({len(problems)} problem(s)):\n  {shown}\n"
                        "fix them (see `tunekit validate FILE`) and run create again")
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
    cfg = load_config(OpenAIJobConfig, args.config, flag_overrides(args, args.config_flags))
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
    rec = {"job_id": job.id, "backend": cfg.backend, "base_url": server_url(client),
           "created_at": job.created_at, "model": job.model, "status": job.status, "request": kwargs,
           "files": {k: getattr(cfg, k) for k in ("train_file", "valid_file")},
           "estimate": {k: stats[k] for k in ("examples", "epochs", "billed_tokens_total", "estimated_cost_usd")},
           "config": asdict(cfg), "last_event_id": None, "fine_tuned_model": None}
    path = write_record(rec, folder)
    print(f"created {job.id} ({job.status}); recorded in {path}")
    print(f"follow it with: tunekit jobs follow {job.id}" + backend_flags(rec))
    return 0
