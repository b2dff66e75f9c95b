"""The ``tunekit`` command: every stage of the workflow as a subcommand.

    tunekit --help
    tunekit build --config configs/banking77/build.yaml
    tunekit validate runs/banking77/data/train.jsonl
    tunekit stats runs/banking77/data/train.jsonl --epochs 3
    tunekit train configs/banking77/sft_cpu.yaml --max-steps 100       # accelerate launch train/sft.py
    tunekit train configs/banking77/dpo_cpu.yaml                       # method: dpo -> train/dpo.py
    tunekit train configs/banking77/sft_t4.yaml --accelerate-config configs/accelerate/ddp.yaml
    tunekit serve --config configs/banking77/serve.yaml
    tunekit compare --config configs/banking77/compare.yaml --start-server
    tunekit demo                                                       # from any directory

Each subcommand is the module it names (``tunekit serve`` is ``python -m serve.vllm_server``, which
keeps working); ``tunekit SUBCOMMAND --help`` shows its flags. Training flags are TRL's keys, in
either spelling (``--max-steps`` or ``--max_steps``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from tunekit.errors import UserError, run_main

# subcommand -> (module whose main(argv) runs it, argv prefix, one line of help)
COMMANDS: dict[str, tuple[str, list[str], str]] = {
    "build": ("data_prep.__main__", ["build"], "CSV/TSV/JSONL/Parquet -> chat JSONL train/valid split + report"),
    "validate": ("data_prep.__main__", ["validate"], "check chat JSONL against OpenAI's fine-tuning rules"),
    "stats": ("data_prep.__main__", ["stats"], "token counts, epochs and the OpenAI training cost of a file"),
    "train": ("tunekit.cli", [], "LoRA/QLoRA fine-tuning (sft, dpo or grpo, by the config's method): accelerate launch train/<method>.py --config CONFIG"),
    "merge": ("train.merge", [], "merge a LoRA adapter into its base model (one plain model folder)"),
    "export": ("train.export", [], "a run as a merged folder, one GGUF file, or GGUF + Ollama Modelfile (laptops)"),
    "hardware": ("train.hardware", [], "the GPU, its compute capability, driver and torch CUDA version"),
    "serve": ("serve.vllm_server", [], "vLLM's OpenAI-compatible server with the base model and adapters"),
    "adapters": ("serve.adapters", [], "list, load and unload adapters on a running server"),
    "chat": ("serve.chat", [], "one chat request to a model on either backend"),
    "compare": ("serve.compare", [], "base vs fine-tuned vs a baseline on held-out data: metrics, report, plots"),
    "distil": ("serve.distil", [], "a model's answers to a prompt set as chat JSONL (keep an ft: model before it retires)"),
    "ui": ("serve.ui", [], "the Gradio app: chat with and compare models"),
    "jobs": ("train.jobs.cli", [], "fine-tuning jobs on OpenAI or the local API: create, follow, list, cancel"),
    "api": ("serve.finetune_api", [], "OpenAI's fine-tuning API, served locally"),
    "demo": ("tunekit.demo", [], "the whole workflow on the embedded example, from any directory (make demo)"),
}

TRAIN_DIR = Path(__file__).resolve().parent.parent / "train"
SFT_SCRIPT = TRAIN_DIR / "sft.py"
# a training config's `method:` key -> the script that trains it (train/core.py's METHODS)
SCRIPTS = {"sft": SFT_SCRIPT, "dpo": TRAIN_DIR / "dpo.py", "reinforcement": TRAIN_DIR / "grpo.py"}
# accelerate's flags for one process with no config file (they also silence its warnings)
SINGLE_PROCESS = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def script_for(config: str | Path, overrides: list[str] = ()) -> Path:
    """The script of a training config: its ``method`` key (a ``--method`` flag wins), sft when it has none (or
    when the file is missing: the script then says so)."""
    from tunekit.config import read_yaml

    method = (read_yaml(config).get("method") if Path(config).is_file() else None) or "sft"
    for i, arg in enumerate(overrides):
        if arg == "--method" and i + 1 < len(overrides):
            method = overrides[i + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    if method not in SCRIPTS:
        raise UserError(f"{config}: method: {method!r}; use one of {', '.join(SCRIPTS)} (train/<method>.py)")
    return SCRIPTS[method]


def accelerate_command(config: str | Path, overrides: list[str] = (), accelerate_config: str | None = None,
                       quiet: bool = True, num_processes: int | None = None) -> list[str]:
    """``accelerate launch [--config_file F [--num_processes N] | one process] train/<method>.py --config CONFIG
    OVERRIDES``, the script picked by the config's ``method`` key (train/sft.py without one)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if quiet:
        launch.append("--quiet")
    launch += ["--config_file", accelerate_config] if accelerate_config else SINGLE_PROCESS
    launch += ["--num_processes", str(num_processes)] if accelerate_config and num_processes else []
    return [*launch, str(script_for(config, overrides)), "--config", str(config), *overrides]


def train(argv: list[str]) -> int:
    """tunekit train CONFIG [--accelerate-config FILE] [TRL/sft.py flags ...]"""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tunekit train CONFIG [--accelerate-config FILE] [overrides ...]\n\n"
              "Runs `accelerate launch train/<method>.py --config CONFIG [overrides]` from any directory, the\n"
              "script picked by the config's `method:` key (sft: train/sft.py, the default; dpo: train/dpo.py); one process\n"
              "unless --accelerate-config names an accelerate config (configs/accelerate/ddp.yaml, fsdp.yaml).\n"
              "Overrides are the config's keys as flags (--max-steps 100, --learning-rate 5e-4); the full list:\n"
              "  python train/sft.py --help   (python train/dpo.py --help)")
        return 0
    import importlib.util

    for module in ("accelerate", "trl", "peft", "torch"):
        if importlib.util.find_spec(module) is None:
            raise missing_extra(ModuleNotFoundError(name=module))
    config, rest = argv[0], list(argv[1:])
    accelerate_config = None
    for flag in ("--accelerate-config", "--accelerate_config"):
        if flag in rest:
            i = rest.index(flag)
            if i + 1 >= len(rest):
                raise UserError(f"{flag}: expected an accelerate config file, e.g. configs/accelerate/ddp.yaml")
            accelerate_config = rest[i + 1]
            del rest[i:i + 2]
    if not Path(config).is_file():
        raise UserError(f"{config}: config file not found (e.g. configs/banking77/sft_cpu.yaml)")
    if accelerate_config and not Path(accelerate_config).is_file():
        raise UserError(f"--accelerate-config: {accelerate_config} not found")
    cmd = accelerate_command(config, rest, accelerate_config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SFT_SCRIPT.parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)  # accelerate takes over this process: signals and the exit status are its own
    return 1  # not reached


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_m, _p, text) in COMMANDS.items()]
    return ("usage: tunekit SUBCOMMAND [flags]   (tunekit SUBCOMMAND --help for its flags)\n\n"
            "Fine-tune chat models on your own data, on OpenAI or locally, with one workflow.\n\n"
            "subcommands:\n" + "\n".join(lines))


# a missing import -> the extra that installs it (the base install is the OpenAI path, without torch)
EXTRAS = {"torch": "train", "transformers": "train", "tokenizers": "train", "peft": "train", "trl": "train",
          "datasets": "train", "accelerate": "train", "gguf": "train",
          "fastapi": "serve", "uvicorn": "serve", "multipart": "serve",
          "rapidfuzz": "serve", "sacrebleu": "serve", "nltk": "serve", "rouge_score": "serve",
          "gradio": "ui", "bitsandbytes": "gpu", "vllm": "gpu"}


def missing_extra(e: ModuleNotFoundError) -> UserError | None:
    extra = EXTRAS.get((e.name or "").split(".")[0])
    if extra is None:
        return None
    return UserError(f"this command needs {e.name}, which the base install leaves out; "
                     f"pip install \"tunekit-ft[{extra}]\" (from a checkout: pip install -e \".[{extra}]\")")


def run(main, argv: list[str] | None) -> int:
    """Call a command's main(argv) through the one wrapper; a missing extra is a UserError naming it."""
    def with_extras(args):
        try:
            return main(args)
        except ModuleNotFoundError as e:
            raise (missing_extra(e) or e) from None

    return run_main(with_extras, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: tunekit {name}: no such subcommand; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":
        return run(train, rest)
    module, prefix, _help = COMMANDS[name]
    return run(lambda args: importlib.import_module(module).main(args), [*prefix, *rest])


if __name__ == "__main__":
    sys.exit(main())
