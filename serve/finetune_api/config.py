"""The server's configuration: the YAML keys (and long flags) of ``python -m serve.finetune_api``.

Precedence as everywhere in tunekit (``tunekit.config.load_config``): these defaults < the YAML file
given with ``--config`` < flags on the command line. This module imports no web framework, so the
config loads on the base install (train/openai_ft.py and the tests read it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from tunekit.config import read_yaml, load_dotenv  # noqa: F401 (re-exported)
from tunekit.errors import UserError

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


@dataclass
class FinetuneAPIConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    data_dir: str = "runs/finetune_api"  # SQLite state, uploaded files, one run directory per job
    sft_config: str = "configs/banking77/sft_cpu.yaml"  # the training config jobs start from
    sft_overrides: dict = field(default_factory=dict)  # sft keys set for every job (model, max_length, ...)
    base_model: str | None = None  # the `model` jobs name (default: folder name of model_name_or_path)
    max_steps: int | None = None  # cap on a job's steps (CPU demos); null: the job's n_epochs decide
    max_attempts: int = 3  # starts of a job (server restarts included) before it fails
    max_file_mb: float = 512.0  # upload size limit (413 above it)
    result_base64: bool = True  # result files base64-encoded, as OpenAI serves them
    omp_num_threads: int | None = 1  # OMP_NUM_THREADS of the training process
    api_key_env: str = "TUNEKIT_API_KEY"
    vllm_url: str | None = None  # e.g. http://127.0.0.1:8000/v1: load finished adapters there
    vllm_api_key_env: str = "TUNEKIT_API_KEY"
    log_level: LogLevel = "info"  # of the server and the job worker (--log-level)


def base_model_of(cfg: FinetuneAPIConfig) -> tuple[str, str]:
    """(name jobs use, model_name_or_path of training)."""
    sft = read_yaml(cfg.sft_config)
    path = str((cfg.sft_overrides or {}).get("model_name_or_path") or sft.get("model_name_or_path") or "")
    if not path:
        raise UserError(f"{cfg.sft_config}: model_name_or_path is missing")
    return cfg.base_model or Path(path.rstrip("/")).name, path
