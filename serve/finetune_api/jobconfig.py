"""A job's training config: the YAML the job worker hands to ``accelerate launch train/<method>.py``.

- supervised: the job's profile (``models:``) + ``sft_overrides`` + the job's settings;
- dpo: ``dpo_config`` (a train/dpo.py profile) + ``sft_overrides`` (less the SFT-only keys, SFT_ONLY) + the
  job's settings + ``method: dpo`` and ``beta``;
- reinforcement: ``rl_config`` (a train/grpo.py profile) + ``sft_overrides`` (less NOT_RL) + the job's settings
  + ``method: reinforcement``, its ``grader``, ``num_generations`` and the evaluation's settings;
- on an ``ft:`` model (any method): ``init_adapter``, the folder of that model's adapter.

The steps come from ``hyperparameters.plan`` (train/recipe.py's rule); what each OpenAI hyperparameter means
here is in hyperparameters.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from . import hyperparameters
from .config import dpo_profile, profile_for
from .integrations import wandb_settings
from .store import Store

# train/sft.py keys a DPO run has no use for: left out of sft_overrides for DPO jobs (train/dpo.py refuses
# unknown keys)
SFT_ONLY = ("assistant_only_loss", "completion_only_loss", "shared_prefix", "train_sampling_strategy", "packing",
            "packing_strategy", "padding_free", "dataset_text_field")
# and the ones a reinforcement run (train/grpo.py, TRL's GRPOConfig) has no use for: it cuts no prompt and bounds
# each completion with max_completion_length
NOT_RL = (*SFT_ONLY, "max_length")
SKIPPED = {"dpo": SFT_ONLY, "reinforcement": NOT_RL}  # method -> sft_overrides keys its script refuses


def base_of(store: Store, job: dict) -> str:
    """The base snapshot the job fine-tunes (its ``model``, or the base of the ft: model it names)."""
    return store.get_private(job["id"]).get("base_model") or job["model"]


def default_profile(cfg, job: dict) -> str:
    """The profile of a job stored without one (the service records it at creation)."""
    if job["method"]["type"] == "dpo":
        return dpo_profile(cfg) or cfg.dpo_config
    if job["method"]["type"] == "reinforcement":
        return cfg.rl_config
    return profile_for(cfg, job["model"]) or cfg.sft_config


def plan(store: Store, cfg, job: dict) -> tuple[str, dict, dict, dict]:
    """(profile, its config with the server's overrides, resolved hyperparameters, hyperparameters.plan)."""
    from tunekit.config import read_yaml

    priv = store.get_private(job["id"])
    kind = job["method"]["type"]
    profile = priv.get("profile") or default_profile(cfg, job)
    config = read_yaml(profile)
    overrides = cfg.sft_overrides or {}
    config.update({k: v for k, v in overrides.items() if k not in SKIPPED.get(kind, ())})
    n = priv.get("train_examples") or 1
    valid = store.get_file(job["validation_file"]) if kind == "reinforcement" and job["validation_file"] \
        else None  # eval_samples' "auto": the validation examples (data_prep counted them at validation)
    n_valid = sum(1 for line in Path(valid[1]).open("rb") if line.strip()) if valid and Path(valid[1]).is_file() \
        else None
    base = base_of(store, job)
    hp = hyperparameters.resolve(job["method"][kind]["hyperparameters"], n, base, kind, config, n_valid)
    return profile, config, hp, hyperparameters.plan(config, hp, n, base, cfg.max_steps)


def write(store: Store, cfg, job: dict, run_dir: Path) -> tuple[Path, dict]:
    """Write this job's training config (``<runs>/<job id>.yaml``): its profile, the server's overrides, the
    job's hyperparameters, its seed and its wandb integration, the method's own keys. Returns its path and
    ``{"total_steps", "hyperparameters", "env", "events"}`` (the events: the plan's line first)."""
    profile, config, hp, steps_plan = plan(store, cfg, job)
    steps = steps_plan["max_steps"]
    wandb_keys, env, events = wandb_settings(job, run_dir)
    if job["method"]["type"] == "dpo":
        config.update(method="dpo", beta=steps_plan["beta"])
    if job["method"]["type"] == "reinforcement":
        events += reinforcement_keys(cfg, job, config, steps_plan, hp, env)
    if init := store.get_private(job["id"]).get("init_adapter"):
        config["init_adapter"] = init
    config.update(train_file=store.get_file(job["training_file"])[1],
                  valid_file=store.get_file(job["validation_file"])[1] if job["validation_file"] else None,
                  output_dir=str(run_dir), seed=job["seed"], report_to="none",
                  **{k: steps_plan[k] for k in ("max_steps", "num_train_epochs", "per_device_train_batch_size",
                                                "gradient_accumulation_steps", "learning_rate")})
    config.update(wandb_keys)
    if config.get("valid_file") is None:
        config.pop("valid_file")
        config["eval_strategy"] = "no"
    elif config.get("eval_strategy", "no") != "no":
        config["eval_steps"] = min(int(config.get("eval_steps") or steps), steps)
    path = run_dir.parent / f"{job['id']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    base = base_of(store, job)
    plan_line = (f"Training {Path(str(config.get('model_name_or_path', ''))).name} with {profile}"
                 + (f" from {job['model']}" if init else "") + ": " + hyperparameters.describe(steps_plan, hp, base))
    return path, {"total_steps": steps, "hyperparameters": hp, "env": env, "events": [("info", plan_line), *events]}


def reinforcement_keys(cfg, job: dict, config: dict, steps_plan: dict, hp: dict, env: dict) -> list[tuple[str, str]]:
    """A reinforcement job's train/grpo.py keys (into ``config``) and sandbox setting (into ``env``); the events
    that say what of the request has no local meaning."""
    rl = job["method"]["reinforcement"]
    config.update(method="reinforcement", grader=rl["grader"], num_generations=steps_plan["num_generations"],
                  per_device_eval_batch_size=steps_plan["per_device_eval_batch_size"], logging_steps=1,  # per step
                  **{k: steps_plan[k] for k in ("eval_steps", "max_eval_examples") if k in steps_plan})
    env["TUNEKIT_PYTHON_GRADERS"] = "on" if cfg.python_graders == "on" else ""
    events = []
    if hp.get("reasoning_effort", "default") != "default":
        events.append(("info", f"reasoning_effort {hp['reasoning_effort']!r} is recorded; it has no effect here: "
                               f"{Path(str(config.get('model_name_or_path', ''))).name} does not reason before it "
                               "answers"))
    if rl.get("response_format"):
        events.append(("warn", "response_format is recorded and not enforced: the completions are sampled freely "
                               "(the grader's sample.output_json reads those that are JSON); ask for the format "
                               "in the prompt, or train it first with a supervised job"))
    return events
