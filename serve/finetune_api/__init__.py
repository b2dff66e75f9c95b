"""OpenAI's fine-tuning API, served locally: files and fine-tuning jobs that train with train/sft.py
(supervised), train/dpo.py (DPO) or train/grpo.py (reinforcement), and chat with the models they make, all on
one port.

    python -m serve.finetune_api --config configs/banking77/finetune_api.yaml
    python -m serve.finetune_api --port 8100 --data-dir runs/finetune_api --sft-config configs/banking77/sft_cpu.yaml

Any OpenAI client works against it with ``base_url="http://127.0.0.1:8100/v1"`` (OPENAI_BASE_URL) and
the key below (OPENAI_API_KEY); nothing else in a fine-tuning script changes:

    client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=..., validation_file=..., model="gpt-4o-mini-2024-07-18",
                                         hyperparameters={"n_epochs": 3}, suffix="bank", seed=42)
    client.fine_tuning.jobs.create(training_file=<DPO JSONL>, model=job.fine_tuned_model,
                                   method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}})
    client.fine_tuning.jobs.create(training_file=<RFT JSONL>, validation_file=..., model="o4-mini-2025-04-16",
                                   method={"type": "reinforcement", "reinforcement": {"grader": {...},
                                           "hyperparameters": {"compute_multiplier": 1.0, "eval_interval": 5}}})
    client.fine_tuning.jobs.retrieve(job.id); client.fine_tuning.jobs.list_events(job.id)
    client.fine_tuning.jobs.pause(job.id); client.fine_tuning.jobs.resume(job.id)
    client.chat.completions.create(model=job.fine_tuned_model, messages=[...], stream=True)

Endpoints: /v1/files (upload, list, retrieve, content, delete), /v1/fine_tuning/jobs (create, list,
retrieve, cancel, pause, resume, events, checkpoints), /v1/models (list, retrieve), /v1/chat/completions and
/v1/completions (streaming too). Jobs run one per device at once (``devices``: each GPU, pinned with
CUDA_VISIBLE_DEVICES, less vLLM's; one on a CPU; ``max_running``, ``queue_order``: ``slots.py``):
validating_files -> queued -> running -> succeeded | failed | cancelled (paused and back to queued on
request), each as ``accelerate launch train/<sft|dpo|grpo>.py`` on a profile (``hyperparameters.py``: OpenAI's
"auto" rules and what each value means locally). The methods, locally:

- ``supervised`` (the default, and the deprecated top-level ``hyperparameters``): train/sft.py, TRL's
  SFTTrainer with LoRA, on chat JSONL, with the profile that ``models:`` maps the requested OpenAI model to;
- ``dpo``: train/dpo.py, TRL's DPOTrainer (sigmoid loss at ``beta``; the reference is the model with the
  adapter disabled, or a frozen copy of the adapter it starts from), on OpenAI's DPO JSONL as uploaded,
  with the ``dpo_config`` profile;
- ``reinforcement``: train/grpo.py, TRL's GRPOTrainer with LoRA: for each prompt of OpenAI's RFT JSONL it
  samples ``num_generations`` answers (``compute_multiplier``), grades each with the job's grader
  (``serve.graders``, checked at creation as the graders API checks it; python graders sandboxed, see
  ``python_graders``) and moves the adapter toward those above their group's mean, with the ``rl_config``
  profile; its events carry OpenAI's RFT metrics (``train_mean_reward``, ``full_valid_mean_reward``).

Any method may start from an ``ft:`` model this server made (a succeeded job's or a checkpoint's): the
run trains on from that adapter, as OpenAI runs DPO on a supervised fine-tune. A succeeded job's
``fine_tuned_model`` has OpenAI's shape ``ft:<model>:<organization>:<suffix>:<id>`` (``<model>`` the base
snapshot): the adapter is recorded in runs/registry.json (the client's ``finetuned`` alias) and loaded into
the vLLM server. Pause stops a running job's training at a new checkpoint; resume goes on from there.
State lives in SQLite under ``data_dir``: a restart loses no file or job, a job that was running resumes
from its last checkpoint, and a paused one stays paused.

Chat: the models are the base model (by its OpenAI names and its own), every succeeded job's
``fine_tuned_model`` and every checkpoint's ``fine_tuned_model_checkpoint``; requests are forwarded to
a vLLM server (``proxy.py``), which loads each adapter on first use. That server is ``vllm_url`` if
set; otherwise the command starts one itself on 127.0.0.1 (``vllm_port``, default a free port;
``serve_config`` for its dtype, context length, ...) in the background and stops it with the API
(Ctrl-C, SIGTERM; a killed API takes it along). Chat answers 503 until it is ready, or naming why it
is not; ``--no-start-vllm`` serves fine-tuning only.

The API key is ``--api-key`` or the environment variable TUNEKIT_API_KEY (or a .env file); it is
required to listen on any address other than loopback, and never logged. The vLLM server gets the
key in ``vllm_api_key_env`` (by default the same variable). The log (stderr, ``--log-level``, default
info) has one line per request and each job's steps; internal errors and failed training runs with
their tracebacks; vLLM's own output goes to ``<data_dir>/vllm.log``.

The package: ``config`` (the YAML keys and flags), ``cli`` (``main``, and ``LocalVLLM``: the vLLM server
it starts), ``routes`` (the FastAPI app), ``middleware`` (key check, request log, error envelope),
``models`` (request and response models), ``service`` (request logic), ``checks`` (request checks with
OpenAI's codes), ``errors`` (``APIError``), ``hyperparameters`` (OpenAI's rules onto the local profile),
``integrations`` (wandb), ``validation`` (training files, OpenAI's codes), ``store`` (SQLite),
``worker`` (the job queue, training processes, pause), ``slots`` (its devices and queue order), ``metrics``
(the training scripts' output in OpenAI's shapes), ``proxy`` (the models and the forwarding of chat to vLLM).
"""

from __future__ import annotations

from importlib import import_module

from tunekit.net import is_loopback

from .cli import main, parser
from .config import FinetuneAPIConfig, base_model_of, load_dotenv

# Names that import the web framework or the openai SDK, loaded on first use: the config and the
# command line stay importable without them (``tunekit api`` then names the extra to install).
LAZY = {"create_app": "routes", "APIError": "service", "PURPOSES": "service", "Service": "service",
        "safe_filename": "service", "envelope": "models", "Store": "store", "new_id": "store", "Worker": "worker",
        "TERMINAL": "worker", "Proxy": "proxy", "Upstream": "proxy"}

__all__ = ["FinetuneAPIConfig", "base_model_of", "is_loopback", "load_dotenv", "main", "parser", *LAZY]


def __getattr__(name: str):
    if name in LAZY:
        return getattr(import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
