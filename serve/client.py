"""One client interface over OpenAI and the local vLLM server; one flag chooses.

    from serve.client import load_backend
    backend = load_backend("configs/banking77/serve.yaml")          # backend: local | openai
    client = backend.client()                                       # an openai.OpenAI
    reply = client.chat.completions.create(model=backend.resolve("finetuned"), messages=[...],
                                           **backend.sampling_kwargs())

The backend is ``backend:`` in the config, overridden by the environment variable LLM_BACKEND,
overridden by an explicit ``backend=`` (the ``--backend`` flag of every command). Aliases:

    alias        openai                                   local
    base         openai.base_model (gpt-4o-mini-2024-07-18) server.served_model_name (the base model)
    finetuned    openai.models.finetuned, else the id     the adapter named ``finetuned`` in
                 ``tunekit jobs follow`` recorded          server.adapters, else runs/registry.json
    NAME         openai.models.NAME                        the adapter NAME

API keys come from the environment or a ``.env`` file in the working directory (OPENAI_API_KEY
for OpenAI, TUNEKIT_API_KEY for the local server; the variable names are config keys). Errors a
user can cause come out of :func:`explain` as a one-line :class:`UserError` naming the fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.config import load_config, load_dotenv
from tunekit.errors import UserError

from . import registry

BACKENDS = ("openai", "local")
DEFAULT_OPENAI_BASE = DEFAULT_OPENAI_MODEL


@dataclass
class ServerConfig:
    """The local vLLM server (``python -m serve.vllm_server``)."""

    model: str = ".cache/models/SmolLM2-135M-Instruct"  # folder or hub id of the base model
    served_model_name: str | None = None  # the name clients use for the base model (default: folder name)
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> training run directory
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # a T4 has no bf16: "half"; "float32" if fp16 overflows (twice the memory)
    max_model_len: int | None = None  # default: the longest example of max_model_len_from + max_tokens
    max_model_len_from: str | None = None  # chat JSONL whose longest example sizes the context
    gpu_memory_utilization: float = 0.90
    tensor_parallel_size: int = 1  # GPUs to shard the model over
    quantization: str | None = None  # a vLLM --quantization method for a pre-quantized checkpoint (not bitsandbytes)
    enforce_eager: bool = False  # no CUDA graphs / torch.compile: the fallback when Triton fails on a T4 (slower)
    max_lora_rank: int | None = None  # default: the largest adapter rank, rounded up to what vLLM allows
    max_loras: int = 4  # adapters batched together
    chat_template: str | None = None  # default: chat_template.jinja saved in the first adapter's run dir
    api_key_env: str = "TUNEKIT_API_KEY"  # variable holding the key clients must send
    python: str | None = None  # interpreter with vLLM (default: .venv-vllm/bin/python, else this one)
    cpu_kvcache_gb: int = 1  # CPU only: GiB of KV cache
    block_size: int | None = None  # KV-cache block in tokens; default vLLM's on a GPU, 32 on the CPU (see README)
    startup_timeout_s: int = 900
    smoke_test: bool = True  # after start-up, one chat request; warns when the answer is degenerate ("!!!!")
    extra_args: list[str] = field(default_factory=list)  # passed through to vLLM


@dataclass
class OpenAIConfig:
    base_url: str | None = None  # default: https://api.openai.com/v1
    base_model: str = DEFAULT_OPENAI_BASE
    models: dict[str, str] = field(default_factory=dict)  # alias -> model id (e.g. finetuned: ft:gpt-4o-mini...)
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class Sampling:
    """Pinned sampling: comparisons must not depend on a model's generation_config."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = 0


@dataclass
class Settings:
    backend: str = "local"
    system: str | None = None  # default system message for serve.chat and the UI (the use case's prompt)
    server: ServerConfig = field(default_factory=ServerConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    sampling: Sampling = field(default_factory=Sampling)
    timeout_s: float = 120.0
    max_retries: int = 3

    @property
    def local_base_url(self) -> str:
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.server.port}/v1"

    def local_api_key(self) -> str | None:
        load_dotenv()
        return os.environ.get(self.server.api_key_env) or None

    def served_base_name(self) -> str:
        return self.server.served_model_name or Path(self.server.model.rstrip("/")).name


def load_settings(config: str | Path | None = None, backend: str | None = None) -> Settings:
    """Settings from a serve.yaml (or defaults), the backend chosen by flag > LLM_BACKEND > config."""
    settings = load_config(Settings, config)
    load_dotenv()
    chosen = backend or os.environ.get("LLM_BACKEND") or settings.backend
    if chosen not in BACKENDS:
        source = "--backend" if backend else "LLM_BACKEND" if os.environ.get("LLM_BACKEND") else f"{config}: backend"
        raise UserError(f"{source}: {chosen!r} is not a backend; use one of {', '.join(BACKENDS)}")
    settings.backend = chosen
    return settings


@dataclass
class Backend:
    """A configured endpoint: OpenAI or the local server, with its aliases and pinned sampling."""

    name: str
    base_url: str | None
    api_key: str | None
    settings: Settings

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(**self._client_kwargs(kwargs))

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(**self._client_kwargs(kwargs))

    def _client_kwargs(self, extra: dict) -> dict:
        key = self.api_key
        if not key:
            if self.name == "openai":
                raise UserError(f"no OpenAI API key: set {self.settings.openai.api_key_env} in the environment "
                                "or in a .env file")
            key = "no-key"  # the local server without --api-key accepts anything
        return {"base_url": self.base_url, "api_key": key, "timeout": self.settings.timeout_s,
                "max_retries": self.settings.max_retries, **extra}

    def aliases(self) -> dict[str, str]:
        """Every alias this backend knows, with the model id it stands for."""
        s = self.settings
        if self.name == "openai":
            out = {"base": s.openai.base_model}
            entry = registry.lookup("openai", "finetuned")
            if entry:
                out["finetuned"] = entry
            out.update(s.openai.models)
            return out
        out = {"base": s.served_base_name()}
        for alias, entry in registry.load().get("local", {}).items():
            if isinstance(entry, dict) and entry.get("model"):
                out[alias] = entry["model"]
        out.update({name: name for name in s.server.adapters})
        return out

    def resolve(self, model: str) -> str:
        """An alias (base, finetuned, an adapter name) or a model id -> the id to send."""
        aliases = self.aliases()
        if model in aliases:
            return aliases[model]
        if model == "finetuned":
            if self.name == "openai":
                raise UserError("no fine-tuned OpenAI model yet: run `tunekit jobs create --config ...` "
                                "and `follow JOB_ID` until it succeeds, or set openai.models.finetuned in the config")
            raise UserError("no local adapter named 'finetuned': add `finetuned: RUN_DIR` under server.adapters in "
                            "the config, or `tunekit adapters add finetuned RUN_DIR`")
        return model

    def sampling_kwargs(self, **overrides) -> dict:
        out = {k: v for k, v in asdict(self.settings.sampling).items() if v is not None}
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out

    def explain(self, exc: Exception, model: str | None = None) -> UserError:
        return explain(exc, self, model)


def load_backend(config: str | Path | None = None, backend: str | None = None) -> Backend:
    settings = load_settings(config, backend)
    if settings.backend == "openai":
        return Backend("openai", settings.openai.base_url, os.environ.get(settings.openai.api_key_env), settings)
    return Backend("local", settings.local_base_url, settings.local_api_key(), settings)


def explain(exc: Exception, backend: Backend, model: str | None = None) -> UserError:
    """One clear line for the errors a user can cause, the same for both backends."""
    import openai

    where = backend.base_url or "https://api.openai.com/v1"
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return UserError(f"{where}: no answer within {backend.settings.timeout_s:g} s; raise timeout_s in the config "
                         "or lower max_tokens")
    if isinstance(exc, openai.APIConnectionError):
        if backend.name == "local":
            return UserError(f"no server answers at {where}; start it with "
                             "`tunekit serve --config configs/<use_case>/serve.yaml`")
        return UserError(f"cannot reach {where}: check the network or openai.base_url")
    if isinstance(exc, openai.AuthenticationError):
        var = backend.settings.openai.api_key_env if backend.name == "openai" else backend.settings.server.api_key_env
        return UserError(f"{where} refused the API key: set {var} (environment or .env) to the right key")
    message = _server_message(exc)
    if isinstance(exc, openai.NotFoundError) or "does not exist" in message:
        known = ", ".join(f"{a}={m}" if a != m else a for a, m in backend.aliases().items())
        return UserError(f"model {model!r} is not served by the {backend.name} backend ({message}); "
                         f"known aliases: {known}")
    if isinstance(exc, openai.BadRequestError) and ("context" in message.lower() or "too long" in message.lower()
                                                    or "maximum" in message.lower()):
        return UserError(f"request too long for {model!r}: {message}; shorten the prompt or lower max_tokens")
    if isinstance(exc, openai.RateLimitError):
        return UserError(f"{where}: rate limited after {backend.settings.max_retries} retries ({message}); "
                         "lower the concurrency or raise max_retries")
    if isinstance(exc, openai.APIStatusError):
        return UserError(f"{where} answered {exc.status_code}: {message}")
    return UserError(f"{type(exc).__name__}: {exc}")


def _server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", exc))
