"""The server's configuration: the YAML keys (and long flags) of ``python -m serve.finetune_api``.

Precedence as everywhere in tunekit (``tunekit.config.load_config``): these defaults < the YAML file
given with ``--config`` < flags on the command line. This module imports no web framework, so the
config loads on the base install (train/jobs and the tests read it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunekit.config import load_dotenv, opt, read_yaml  # noqa: F401 (load_dotenv: re-exported)
from tunekit.errors import UserError
from tunekit.logs import LOG_LEVELS, LogLevel  # noqa: F401 (re-exported)


DEFAULT_DPO_CONFIG = "configs/banking77/dpo_cpu.yaml"  # the CPU demo's DPO profile (see check_models)
DEFAULT_RL_CONFIG = "configs/banking77/grpo_cpu.yaml"  # the CPU demo's reinforcement profile


@dataclass
class FinetuneAPIConfig:
    host: str = opt("127.0.0.1", "address to listen on (others need an API key)")
    port: int = opt(8100, "port")
    data_dir: str = opt("runs/finetune_api", "SQLite state, uploaded files, one run directory per job")
    sft_config: str = opt("configs/banking77/sft_cpu.yaml", "train/sft.py config jobs start from")
    dpo_config: str = opt(DEFAULT_DPO_CONFIG, "train/dpo.py profile DPO jobs start from (it must train "
                                                            "the base model; not found: DPO jobs are refused)")
    rl_config: str = opt(DEFAULT_RL_CONFIG, "train/grpo.py profile reinforcement jobs start from (it must train the "
                                            "base model; not found: reinforcement jobs are refused)")
    python_graders: Literal["auto", "on", "off"] = opt("auto", "python graders (graders API, reinforcement jobs): auto "
                                                               "runs them sandboxed when the API listens on loopback "
                                                               "and this OS grants every isolation layer; on: also "
                                                               "beyond loopback or with fewer layers; off: refused")
    sft_overrides: dict = opt(dict, "sft keys set for every job (model, max_length, ...); YAML only")
    base_model: str | None = opt(None, "the model name jobs give (default: the sft config's model folder name)")
    models: dict = opt(dict, "OpenAI model name -> train/sft.py profile; 'default' for the other OpenAI names "
                             "(empty: every OpenAI name -> sft_config); YAML only")
    organization: str = opt("personal", "the organization part of fine-tuned model names, "
                                        "ft:<model>:<organization>:<suffix>:<id>")
    max_steps: int | None = opt(None, "cap on every job's training steps (CPU demos); unset: n_epochs decide")
    max_attempts: int = opt(3, "starts of a job (server restarts included) before it fails")
    pause_timeout_s: float = opt(120.0, "seconds a paused job's training gets to stop at a new checkpoint before "
                                        "it is killed (and pauses at its last complete one)")
    devices: list[str] | None = opt(None, "where jobs train, a job per device at once: GPUs as CUDA_VISIBLE_DEVICES "
                                          "names them (0 1), or cpu (one job on the CPU); unset: every GPU found "
                                          "(less the one the vLLM server started here uses, when there are more), "
                                          "or the CPU without one")
    max_running: int | None = opt(None, "most jobs training at once (unset: one per device; more share the devices)")
    queue_order: Literal["fifo", "shortest_first"] = opt("fifo", "the queued job that starts next: fifo (in "
                                                                 "creation order) or shortest_first (fewest steps)")
    executor: Literal["local", "ray"] = opt("local", "where jobs train: local (processes on this machine, a job per "
                                                     "device) or ray (jobs on the Ray cluster at ray_address, Ray's "
                                                     "Jobs API; data_dir and the checkout at the same paths on every "
                                                     "node: docs/team.md)")
    ray_address: str | None = opt(None, "executor ray: the Ray dashboard's address (its Jobs API), e.g. "
                                        "http://HEAD:8265")
    gpus_per_job: int = opt(1, "GPUs a job trains on, a process each (2 or more: accelerate's data parallel, "
                               "configs/accelerate/ddp_jobs.yaml; on the CPU, that many processes); executor ray: 0 "
                               "trains on a node's CPUs")
    cpus_per_job: float | None = opt(None, "executor ray: CPUs a job reserves on its node (unset: 1)")
    accelerator_type: str | None = opt(None, "executor ray: only nodes with this accelerator (Ray's "
                                             "accelerator_type:<type> resource: A100, T4, ..., or one given with "
                                             "`ray start --resources`)")
    max_file_mb: float = opt(512.0, "upload size limit in MB (413 above it)")
    result_base64: bool = opt(True, "result files base64-encoded, as OpenAI serves them")
    omp_num_threads: int | None = opt(1, "OMP_NUM_THREADS of the training process")
    api_key_env: str = opt("TUNEKIT_API_KEY", "environment variable holding the key clients must send")
    vllm_url: str | None = opt(None, "load finished adapters into this vLLM server, e.g. http://127.0.0.1:8000/v1")
    vllm_api_key_env: str = opt("TUNEKIT_API_KEY", "environment variable holding that vLLM server's key")
    vllm_urls: list[str] = opt(list, "several vLLM servers of the base model behind chat, instead of vllm_url "
                                      "(--vllm-urls URL URL ...): each request goes to the healthy one with the "
                                      "fewest in flight, adapters are loaded where requests land, a server that "
                                      "fails is left out until its /health answers again")
    start_vllm: bool = opt(True, "without vllm_url, start a vLLM server behind /v1/chat/completions (and stop it "
                                 "with the API); --no-start-vllm serves fine-tuning only")
    vllm_port: int | None = opt(None, "port of the vLLM server it starts, on 127.0.0.1 (default: a free one; "
                                      "clients only ever use `port`)")
    serve_config: str | None = opt(None, "serve.yaml whose server: and sampling: sections (dtype, max_model_len, "
                                         "block_size, ...) the vLLM server it starts uses; its model is the sft config's")
    log_level: LogLevel = opt("info", "of the server's and the job worker's log on stderr")


# ----------------------------------------------------------------------------- model names
#
# ``models:`` maps OpenAI's model names to train/sft.py profiles (YAMLs like configs/banking77/sft_cpu.yaml).
# A request for a listed name trains with its profile; ``default`` (or, without it, ``sft_config``) is
# the profile of the local base's own names and, when the map is empty or has a ``default``, of every
# other name in OPENAI_MODELS. One server fine-tunes one base model (it feeds one vLLM server), so every
# profile must name the same model_name_or_path (``sft_overrides`` applies on top of each). DPO jobs, for
# any of those names, train with ``dpo_config`` (a train/dpo.py profile), which must name it too: a dpo_config
# set to another model's profile is a UserError at start-up; the default one (the CPU demo's) on a server of
# another base model, or a dpo_config that is not found, only turns DPO jobs away (400, naming the key).

# OpenAI's fine-tunable chat models (fine-tuning guide; CreateFineTuningJobRequest.model in openapi.yaml
# lists the aliases gpt-3.5-turbo and gpt-4o-mini). babbage-002 and davinci-002 take prompt/completion
# files, which this server does not train on; it trains chat JSONL only.
OPENAI_MODELS = ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14",
                 "gpt-4.1-nano-2025-04-14", "gpt-4-0613", "gpt-3.5-turbo-0125", "gpt-3.5-turbo-1106",
                 "gpt-3.5-turbo-0613", "gpt-4o-mini", "gpt-3.5-turbo",
                 # reinforcement fine-tuning's (OpenAI's RFT guide: "o4-mini-2025-04-16, reasoning models only")
                 "o4-mini-2025-04-16", "o4-mini")
# What OpenAI's job object shows for an alias: the snapshot it resolves to (a job created with
# model="gpt-3.5-turbo" reads model="gpt-3.5-turbo-0125").
ALIASES = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
           "o4-mini": "o4-mini-2025-04-16"}
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def default_profile(cfg: FinetuneAPIConfig) -> str:
    return str((cfg.models or {}).get("default") or cfg.sft_config)


def _base_path(cfg: FinetuneAPIConfig, profile: str, where: str) -> str:
    if not Path(profile).is_file():
        raise UserError(f"{where}: {profile} not found (a train/sft.py YAML such as configs/banking77/sft_cpu.yaml)")
    sft = read_yaml(profile)
    path = str((cfg.sft_overrides or {}).get("model_name_or_path") or sft.get("model_name_or_path") or "")
    if not path:
        raise UserError(f"{where}: {profile} has no model_name_or_path")
    return path.rstrip("/") or path


def check_models(cfg: FinetuneAPIConfig) -> str:
    """The base model's model_name_or_path, after checking ``models``, ``organization`` and the profiles
    (a UserError, one line naming the key, otherwise)."""
    if not SAFE_NAME.fullmatch(cfg.organization or ""):
        raise UserError(f"organization: {cfg.organization!r}; use letters, digits, '.', '-' or '_' (it is a part "
                        "of every ft: model name)")
    if not isinstance(cfg.models, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                   for k, v in cfg.models.items()):
        raise UserError("models: a mapping of model names to train/sft.py YAML files, e.g. "
                        "{gpt-4o-mini-2024-07-18: configs/banking77/sft_cpu.yaml, default: ...}")
    base = ("models.default" if "default" in cfg.models else "sft_config", default_profile(cfg))
    path = _base_path(cfg, base[1], base[0])
    for name, profile in cfg.models.items():
        other = _base_path(cfg, profile, f"models.{name}")
        if other != path:
            raise UserError(f"models.{name}: {profile} trains {other} but {base[0]} ({base[1]}) trains {path}; one "
                            "server fine-tunes one base model (one vLLM server): give every profile the same "
                            "model_name_or_path, or run one server per base model")
    other = _dpo_base(cfg)
    if other and other != path and cfg.dpo_config != DEFAULT_DPO_CONFIG:
        raise UserError(f"dpo_config: {cfg.dpo_config} trains {other} but {base[0]} ({base[1]}) trains {path}; DPO "
                        "jobs fine-tune the server's one base model: give the DPO profile the same "
                        "model_name_or_path")
    other = _profile_base(cfg, cfg.rl_config, "rl_config")
    if other and other != path and cfg.rl_config != DEFAULT_RL_CONFIG:
        raise UserError(f"rl_config: {cfg.rl_config} trains {other} but {base[0]} ({base[1]}) trains {path}; "
                        "reinforcement jobs fine-tune the server's one base model: give the profile the same "
                        "model_name_or_path")
    return path


def _dpo_base(cfg: FinetuneAPIConfig) -> str | None:
    return _base_path(cfg, cfg.dpo_config, "dpo_config") if cfg.dpo_config and Path(cfg.dpo_config).is_file() else None


def dpo_refusal(cfg: FinetuneAPIConfig) -> str | None:
    """Why this server turns DPO jobs away (None: ``dpo_config`` is a train/dpo.py profile of its base model)."""
    other, path = _dpo_base(cfg), check_models(cfg)
    if other is None:
        return f"its dpo_config ({cfg.dpo_config}) is not found"
    if other != path:
        return f"its dpo_config ({cfg.dpo_config}) trains {other}, not this server's base model {path}"
    return None


def dpo_profile(cfg: FinetuneAPIConfig) -> str | None:
    """The train/dpo.py profile of DPO jobs; None when this server turns them away (``dpo_refusal``)."""
    return None if dpo_refusal(cfg) else str(cfg.dpo_config)


def _profile_base(cfg: FinetuneAPIConfig, profile: str | None, key: str) -> str | None:
    return _base_path(cfg, profile, key) if profile and Path(profile).is_file() else None


def rl_refusal(cfg: FinetuneAPIConfig) -> str | None:
    """Why this server turns reinforcement jobs away (None: ``rl_config`` is a train/grpo.py profile of its base)."""
    other, path = _profile_base(cfg, cfg.rl_config, "rl_config"), check_models(cfg)
    if other is None:
        return f"its rl_config ({cfg.rl_config}) is not found"
    if other != path:
        return f"its rl_config ({cfg.rl_config}) trains {other}, not this server's base model {path}"
    return None


def base_model_of(cfg: FinetuneAPIConfig) -> tuple[str, str]:
    """(name jobs use, model_name_or_path of training), after ``check_models``."""
    path = check_models(cfg)
    return cfg.base_model or Path(path).name, path


def base_names(cfg: FinetuneAPIConfig) -> list[str]:
    """Every model name that means this server's base model: the OpenAI names it fine-tunes (the map's,
    and OPENAI_MODELS where the default applies), then the local base's name and its path."""
    models = cfg.models or {}
    names = [k for k in models if k != "default"]
    if not models or "default" in models:
        names += OPENAI_MODELS
    return list(dict.fromkeys([*names, *base_model_of(cfg)]))


def profile_for(cfg: FinetuneAPIConfig, requested) -> str | None:
    """The train/sft.py profile a job for model ``requested`` trains with; None: not a name fine-tuned here."""
    models = cfg.models or {}
    if not isinstance(requested, str) or requested == "default":
        return None
    for name in (requested, ALIASES.get(requested)):
        if name in models:
            return str(models[name])
    if requested in base_names(cfg):
        return default_profile(cfg)
    return None
