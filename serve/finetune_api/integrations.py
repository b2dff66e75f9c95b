"""A job's ``integrations``: Weights & Biases, as OpenAI's fine-tuning sends a job's metrics there.

OpenAI logs to the wandb ``project`` (and ``entity``) of the job's first wandb integration, names the
run ``name`` or else the job id, and adds its own tags ("openai/finetune", "openai/{base-model}",
"openai/{ftjob-abcdef}") to the job's ``tags``. Here train/sft.py does the same through transformers'
wandb callback: ``report_to: [wandb]`` and ``run_name`` in the job's sft config, the project, entity and
tags as WANDB_PROJECT, WANDB_ENTITY and WANDB_TAGS of the training process, its files under the
job's run folder (WANDB_DIR). That needs the ``wandb`` package and a login (WANDB_API_KEY, or ``wandb
login``'s entry in ~/.netrc; WANDB_MODE=offline needs none and keeps the run for ``wandb sync``).
Without them the job trains anyway and says why nothing went to wandb in a ``warn`` event.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path


def wandb_ready() -> tuple[bool, str]:
    """(can this server log to wandb, why not / how)."""
    if importlib.util.find_spec("wandb") is None:
        return False, "the wandb package is not installed on this server (pip install wandb)"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return False, "wandb is disabled on this server (WANDB_MODE=disabled or WANDB_DISABLED)"
    if mode in ("offline", "dryrun"):
        return True, "offline (WANDB_MODE=offline: upload it with `wandb sync`)"
    if os.environ.get("WANDB_API_KEY"):
        return True, "online"
    try:
        path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
        if path.is_file() and netrc.netrc(str(path)).authenticators("api.wandb.ai"):
            return True, "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return False, "this server has no wandb login (set WANDB_API_KEY or run `wandb login`)"


def wandb_settings(job: dict, run_dir: Path) -> tuple[dict, dict, list[tuple[str, str]]]:
    """(sft config keys, environment of the training process, events [(level, message)]) for ``job``."""
    found = [i["wandb"] for i in job.get("integrations") or [] if i.get("type") == "wandb"]
    if not found:
        return {}, {}, []
    events = []
    if len(found) > 1:
        events.append(("warn", f"{len(found)} Weights & Biases integrations given; this job logs to the first "
                               f"(project {found[0]['project']})"))
    ready, how = wandb_ready()
    if not ready:
        return {}, {}, events + [("warn", f"Weights & Biases integration skipped: {how}; the job trains without it")]
    wb = found[0]
    tags = [*(wb.get("tags") or []), "openai/finetune", f"openai/{job['model']}", f"openai/{job['id']}"]
    env = {"WANDB_PROJECT": wb["project"], "WANDB_TAGS": ",".join(t.replace(",", " ") for t in tags),
           "WANDB_DIR": str(run_dir)}
    if wb.get("entity"):
        env["WANDB_ENTITY"] = wb["entity"]
    name = wb.get("name") or job["id"]
    events.append(("info", f"Weights & Biases: logging to project {wb['project']}"
                           + (f" of {wb['entity']}" if wb.get("entity") else "") + f" as run {name}, {how}"))
    return {"report_to": ["wandb"], "run_name": name}, env, events
