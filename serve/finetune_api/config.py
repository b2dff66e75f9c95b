"""The server's configuration: the YAML keys (and long flags) of ``python -m serve.finetune_api``.

Precedence as everywhere in tunekit (``tunekit.config.load_config``): these defaults < the YAML file
given with ``--config`` < flags on the command line. This module imports no web framework, so the
config loads on the base install (train/jobs and the tests read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunekit.config import load_dotenv, opt, read_yaml  # noqa: F401 (load_dotenv: re-exported)
from tunekit.errors import UserError
from tunekit.logs import LOG_LEVELS, LogLevel  # noqa: F401 (re-exported)


@dataclass
class FinetuneAPIConfig:
    host: str = opt("127.0.0.1", "address to listen on (others need an API key)")
    port: int = opt(8100, "port")
    data_dir: str = opt("runs/finetune_api", "SQLite state, uploaded files, one run directory per job")
    sft_config: str = opt("configs/banking77/sft_cpu.yaml", "train/sft.py config jobs start from")
    sft_overrides: dict = opt(dict, "sft keys set for every job (model, max_length, ...); YAML only")
    base_model: str | None = opt(None, "the model name jobs give (default: the sft config's model folder name)")
    max_steps: int | None = opt(None, "cap on every job's training steps (CPU demos); unset: n_epochs decide")
    max_attempts: int = opt(3, "starts of a job (server restarts included) before it fails")
    max_file_mb: float = opt(512.0, "upload size limit in MB (413 above it)")
    result_base64: bool = opt(True, "result files base64-encoded, as OpenAI serves them")
    omp_num_threads: int | None = opt(1, "OMP_NUM_THREADS of the training process")
    api_key_env: str = opt("TUNEKIT_API_KEY", "environment variable holding the key clients must send")
    vllm_url: str | None = opt(None, "load finished adapters into this vLLM server, e.g. http://127.0.0.1:8000/v1")
    vllm_api_key_env: str = opt("TUNEKIT_API_KEY", "environment variable holding that vLLM server's key")
    log_level: LogLevel = opt("info", "of the server's and the job worker's log on stderr")


def base_model_of(cfg: FinetuneAPIConfig) -> tuple[str, str]:
    """(name jobs use, model_name_or_path of training)."""
    sft = read_yaml(cfg.sft_config)
    path = str((cfg.sft_overrides or {}).get("model_name_or_path") or sft.get("model_name_or_path") or "")
    if not path:
        raise UserError(f"{cfg.sft_config}: model_name_or_path is missing")
    return cfg.base_model or Path(path.rstrip("/")).name, path
