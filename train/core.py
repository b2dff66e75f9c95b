"""The training core every method's script runs on (train/sft.py, train/dpo.py).

A method script reads its config, turns its data into the rows its TRL trainer takes, builds that
trainer, and hands it to ``run``. Everything else is here, once:

- ``ScriptArguments``: the keys every method shares (data files, ``init_adapter``, threads, the LoRA
  rank the server allows, ``lora_last_layers``, plots); a method adds its own in a subclass.
- ``parse``: TRL's parser over (script arguments, the method's TRL config, ``ModelConfig``), with a
  config mistake as one line naming the key.
- ``check_config``: precision (fp16 on a T4, bf16 only where the hardware has it), LoRA settings vLLM
  would refuse, the config's ``method`` key.
- ``prepare``: threads, the compact LM head on CPU, tokenizer and the training chat template.
- ``load_model`` (4-bit on a GPU, or on a CPU with the AVX512-BF16 repacking turned off), ``lora_config``
  (``lora_last_layers``) and ``start_adapter`` (``init_adapter``: continue from an adapter this project
  trained, e.g. DPO on top of a supervised fine-tune).
- ``run``: the non-finite-loss guard, metrics.jsonl, pause on
  request, resume after a kill, the adapter, tokenizer and template saved for vLLM, summary.json and plots.

Pausing (the fine-tuning API's ``jobs.pause``): when ``<output_dir>/pause_requested`` exists, the run saves
a checkpoint at the end of the current step, writes ``<output_dir>/paused.json`` (``{"step", "checkpoint"}``)
and exits with status 0 without a summary; started again, it resumes from that checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from tunekit.constants import VLLM_LORA_RANKS
from tunekit.errors import UserError
from train.hardware import cpu_has_bf16
from train.precision import FiniteLossGuard, keep_trainable_fp32, precision_problems

# a config's `method` -> the script in train/ that trains it (tunekit/cli.py's SCRIPTS)
METHODS = {"sft": "sft.py", "dpo": "dpo.py", "reinforcement": "grpo.py"}
PAUSE_FILE, PAUSED_FILE = "pause_requested", "paused.json"


@dataclass
class ScriptArguments:
    """Keys every method's script takes (train/sft.py and train/dpo.py add their own)."""

    method: str = field(default="sft", metadata={
        "help": "the training method, which picks the script `tunekit train` runs: sft (train/sft.py), dpo "
                "(train/dpo.py) or reinforcement (train/grpo.py)"})
    train_file: str = field(default="", metadata={"help": "training JSONL from `tunekit build`"})
    valid_file: str | None = field(default=None, metadata={"help": "JSONL for evaluation (optional)"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "a LoRA adapter folder (a run directory or one of its checkpoint-N) to continue training from, "
                "e.g. DPO on top of a supervised fine-tune; its rank and targets replace the lora_* keys"})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    max_server_lora_rank: int = field(default=64, metadata={
        "help": "largest LoRA rank the serving side allows (vLLM --max-lora-rank); bigger ranks are refused"})
    max_truncated_fraction: float = field(default=0.05, metadata={
        "help": "fail before training when more examples than this are longer than max_length"})
    max_eval_examples: int | None = field(default=256, metadata={
        "help": "evaluate on a seeded sample of this many valid examples (all of them when null)"})
    plots: bool = field(default=True, metadata={"help": "write the run's plots (loss.png, ...)"})
    lora_last_layers: int | None = field(default=None, metadata={
        "help": "LoRA only on the last N decoder layers (all of them when null or when the model has fewer): "
                "the backward pass then stops N layers down, which makes steps faster"})
    compact_lm_head: bool = field(default=True, metadata={
        "help": "on CPU, run the LM head only where labels are (the trained tokens), as TRL does on CUDA"})


# ----------------------------------------------------------------------------- config


def parse(types: tuple, argv=None):
    """(script arguments, the method's TRL config, ModelConfig) from --config YAML and flags."""
    from trl import TrlParser

    try:
        return TrlParser(types).parse_args_and_config(argv)
    except ValueError as e:  # unknown YAML keys, or TrainingArguments refusing a precision
        msg = str(e).splitlines()[0]
        if "bf16" in msg:
            msg = ("bf16: this machine has no GPU with bf16 (T4s have none); set bf16: false, and "
                   "fp16: true on a T4 or use_cpu: true on a CPU")
        elif "fp16" in msg:
            msg = "fp16: mixed precision fp16 needs a CUDA GPU; on CPU set fp16: false and use_cpu: true"
        raise UserError(f"config: {msg}") from None


def check_config(script, training, model_args, method: str) -> list[str]:
    """Problems every method's run would hit, found before the model is loaded."""
    import torch

    problems = precision_problems(training, model_args)
    if script.method != method:
        problems.append(f"method: {script.method!r} is trained by train/{METHODS[script.method]}, not this "
                        f"script (train/{METHODS[method]}); run `tunekit train CONFIG`, which picks the script from "
                        "method"
                        if script.method in METHODS else
                        f"method: {script.method!r}; use one of {', '.join(METHODS)}")
    if (model_args.attn_implementation or "").startswith("flash_attention") and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(0)
        if major < 8:
            problems.append("attn_implementation: FlashAttention needs an Ampere or newer GPU; use sdpa on a T4")
    if script.init_adapter:
        if not (Path(script.init_adapter) / "adapter_config.json").is_file():
            problems.append(f"init_adapter: {script.init_adapter} holds no adapter_config.json; give a run directory "
                            "of a finished run, or one of its checkpoint-N folders")
    elif model_args.use_peft:
        if model_args.lora_modules_to_save:
            problems.append("lora_modules_to_save: vLLM refuses adapters with modules_to_save; remove it")
        if model_args.lora_r > script.max_server_lora_rank:
            problems.append(f"lora_r: {model_args.lora_r} is above max_server_lora_rank "
                            f"{script.max_server_lora_rank}; the server would refuse the adapter")
        if script.lora_last_layers is not None and script.lora_last_layers < 1:
            problems.append(f"lora_last_layers: {script.lora_last_layers}; use a number of layers >= 1, or null "
                            "for all of them")
        if model_args.lora_r not in VLLM_LORA_RANKS:
            problems.append(f"lora_r: vLLM serves ranks {', '.join(map(str, VLLM_LORA_RANKS))}; "
                            f"{model_args.lora_r} would be refused")
    if training.bf16 and not torch.cuda.is_available() and not cpu_has_bf16():
        # bf16 on a CPU is a speed choice only (autocast over fp32 weights), and emulated bf16 is slow
        print("note: bf16: this CPU has no AVX512-BF16/AMX (bf16 would be emulated, far slower than fp32); "
              "training in fp32 instead", file=sys.stderr, flush=True)
        training.bf16 = False
        training.mixed_precision = "no"
    return problems


def finished(run_dir: Path, training) -> bool:
    """Is ``run_dir`` a finished run of this length? (A finished run of another length is an error.)"""
    if not ((run_dir / "summary.json").exists() and (run_dir / "adapter_config.json").exists()):
        return False
    done = json.loads((run_dir / "summary.json").read_text()).get("steps")
    if training.max_steps > 0 and done is not None and done != training.max_steps:
        raise UserError(f"output_dir: {run_dir} holds a finished run of {done} steps and this one asks for "
                        f"max_steps {training.max_steps}; remove the folder (rm -r {run_dir}) or set another "
                        "output_dir")
    print(f"{run_dir} already holds a finished run (summary.json); remove it or set another output_dir "
          "to train again", flush=True)
    return True


def sample_eval(rows: list[dict] | None, script, seed: int) -> list[dict] | None:
    if rows and script.max_eval_examples and len(rows) > script.max_eval_examples:
        import random

        return random.Random(seed).sample(rows, script.max_eval_examples)
    return rows


# ----------------------------------------------------------------------------- tokenizer and model


def prepare(script, training, model_args):
    """Threads, the compact LM head, and (tokenizer, training chat template) with the template set on it."""
    import torch
    from transformers import AutoTokenizer

    from train.chat_data import resolve_chat_template

    if script.num_threads:
        torch.set_num_threads(script.num_threads)
    if script.compact_lm_head:
        # TRL's fused LM head scores only the positions that carry labels on CUDA, but every
        # position elsewhere; on CPU that is most of a step's time for a 49k-token vocabulary.
        import trl.trainer.utils as trl_utils

        on_gpu = trl_utils._use_triton
        if not getattr(on_gpu, "tunekit_compact", False):
            compact = lambda device: device.type == "cpu" or on_gpu(device)  # noqa: E731
            compact.tunekit_compact = True
            trl_utils._use_triton = compact
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except OSError as e:
        raise UserError(f"model_name_or_path: cannot load {model_args.model_name_or_path} "
                        f"({str(e).splitlines()[0]}); for the default model run `make model`") from None
    # SFTConfig has chat_template_path; for the other methods it is a script argument
    holder = training if hasattr(training, "chat_template_path") else script
    template = resolve_chat_template(tokenizer, holder.chat_template_path)
    tokenizer.chat_template = template
    holder.chat_template_path = None  # applied above; TRL must not swap it again
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def load_model(model_args, training):
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    quant = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
        attn_implementation=model_args.attn_implementation, quantization_config=quant,
        device_map={"": "cpu"} if training.use_cpu or not torch.cuda.is_available() else None)
    if quant is not None and not torch.cuda.is_available():
        # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights for inference on the first no-grad
        # forward (evaluation), after which every training step fails; keep the training layout.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    return model


def check_vocabulary(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"model_name_or_path: the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.get_input_embeddings().num_embeddings} embeddings; added tokens would need "
                        "new embeddings, which vLLM refuses in an adapter")


def lora_config(script, model_args, model):
    """The LoRA of the config (None without use_peft), on the last ``lora_last_layers`` layers only."""
    import torch
    from trl import get_peft_config

    peft_config = get_peft_config(model_args)
    n_layers = model.config.num_hidden_layers
    if peft_config is not None and script.lora_last_layers and script.lora_last_layers < n_layers:
        if peft_config.target_modules in ("all-linear", ["all-linear"]):
            # PEFT takes layers_to_transform only with named modules: name every linear but the head
            peft_config.target_modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
        peft_config.layers_to_transform = list(range(n_layers - script.lora_last_layers, n_layers))
    return peft_config


def start_adapter(script, model_args, model):
    """(model, peft_config) for the trainer: the model with ``init_adapter`` loaded trainable (and no new
    LoRA), or the plain model and the config's LoRA."""
    if not script.init_adapter:
        return model, lora_config(script, model_args, model)
    from peft import PeftModel

    cfg = json.loads((Path(script.init_adapter) / "adapter_config.json").read_text())
    base = str(cfg.get("base_model_name_or_path") or "")
    if base and Path(base).name != Path(str(model_args.model_name_or_path)).name:
        raise UserError(f"init_adapter: {script.init_adapter} was trained on {base}, not on "
                        f"{model_args.model_name_or_path}; set model_name_or_path: {base}")
    return PeftModel.from_pretrained(model, script.init_adapter, is_trainable=True), None


def fp32_trainables(trainer, training) -> None:
    """TRL's trainers cast a quantized model's trainable parameters to bf16; fp16 mixed precision needs them
    fp32 (the GradScaler refuses bf16 gradients). Call it after building the trainer: the optimizer is built
    in train(), after this."""
    if training.fp16:
        keep_trainable_fp32(trainer.model)


# ----------------------------------------------------------------------------- the run


class PauseOnRequest(TrainerCallback):
    """A step that ends with ``<run_dir>/pause_requested`` present saves a checkpoint and stops the run. With
    several processes they agree first (a process that stopped alone would leave the others waiting)."""

    def __init__(self, run_dir: Path, accelerator=None):
        self.path, self.step, self.accelerator = run_dir / PAUSE_FILE, None, accelerator

    def requested(self) -> bool:
        here = self.path.exists()
        if self.accelerator is None or self.accelerator.num_processes < 2:
            return here
        import torch

        flag = torch.tensor([float(here)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self.requested():
            control.should_save = control.should_training_stop = True
            self.step = state.global_step
        return control


class TokenCount(TrainerCallback):
    """Keeps TRL's count of trained tokens across a resume: each checkpoint records it (``tokens.json``), and a
    resumed run starts counting from it (TRL's own counter starts at 0 in every process)."""

    FILE = "tokens.json"

    def __init__(self, trainer, resume: Path | None):
        self.trainer = trainer
        saved = resume / self.FILE if resume else None
        if saved is not None and saved.is_file() and hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = json.loads(saved.read_text())["num_tokens"]

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir() and hasattr(self.trainer, "_total_train_tokens"):
            (ckpt / self.FILE).write_text(json.dumps({"num_tokens": int(self.trainer._total_train_tokens)}) + "\n")


def pick_precision(training) -> str:
    return "fp16" if training.fp16 else "bf16" if training.bf16 else "fp32"


def run(trainer, script, training, model_args, *, method: str, started: float, examples: int, lengths: dict,
        tokenizer, template: str, plots: list[tuple[str, str, str, str]], summary_keys: dict[str, str]) -> int:
    """Train ``trainer`` in ``training.output_dir`` to the end (or a pause), then write the adapter, tokenizer,
    template, summary.json and plots. ``summary_keys``: summary name -> metrics key of its last value."""
    import torch

    from train.run_log import RunLog, last_complete_checkpoint, peak_rss_mb, plot_metrics

    run_dir = Path(training.output_dir)
    precision = pick_precision(training)
    trainer.add_callback(FiniteLossGuard(precision))
    resume = last_complete_checkpoint(run_dir) if run_dir.exists() else None
    trainer.add_callback(RunLog(run_dir, int(resume.name.split("-")[1]) if resume else 0))
    trainer.add_callback(TokenCount(trainer, resume))
    pause = PauseOnRequest(run_dir, trainer.accelerator)
    trainer.add_callback(pause)
    (run_dir / PAUSED_FILE).unlink(missing_ok=True)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    world = trainer.accelerator.num_processes
    effective_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * world
    if trainer.is_world_process_zero():
        import yaml

        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"method": method, "script": asdict(script), "model": asdict(model_args),
                    "training": dict(training.to_dict())}
        (run_dir / "run_config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)),
                                                                sort_keys=False))
        print(f"{method} on {model_args.model_name_or_path}"
              + (f" from the adapter {script.init_adapter}" if script.init_adapter else "")
              + f": {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); effective "
              f"batch {effective_batch} ({training.per_device_train_batch_size} x "
              f"{training.gradient_accumulation_steps} accumulation x {world} process(es)); {examples} train "
              f"examples, {lengths['total']:,} tokens, longest {lengths['max']}; threads {torch.get_num_threads()}"
              + (f"; resuming from {resume}" if resume else ""), flush=True)

    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if pause.step is not None:
        if trainer.is_world_process_zero():
            ckpt = last_complete_checkpoint(run_dir)
            (run_dir / PAUSED_FILE).write_text(json.dumps({"step": pause.step, "checkpoint": str(ckpt)}) + "\n")
            print(f"paused at step {pause.step} ({ckpt}); start it again to resume", flush=True)
        return 0
    trainer.save_model(str(run_dir))
    if not trainer.is_world_process_zero():
        return 0
    tokenizer.save_pretrained(str(run_dir))
    (run_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    adapter = check_adapter(run_dir, script.max_server_lora_rank) if model_args.use_peft or script.init_adapter else {}

    wall = time.time() - started
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_recs = [r for r in recs if "loss" in r]
    tokens = max((r.get("num_tokens", 0) for r in recs), default=0)
    train_s = result.metrics.get("train_runtime", wall)
    last = {name: next((r[key] for r in reversed(recs) if key in r), None) for name, key in summary_keys.items()}
    summary = {
        "method": method, "model": model_args.model_name_or_path, "run_dir": str(run_dir),
        "init_adapter": script.init_adapter,
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "train_examples": examples, "effective_batch_size": effective_batch,
        "trainable_parameters": trainable, "total_parameters": total,
        "train_tokens": tokens, "train_runtime_s": round(train_s, 1), "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens / train_s, 1) if train_s else None,
        "train_loss_first": train_recs[0]["loss"] if train_recs else None,
        "train_loss_last": train_recs[-1]["loss"] if train_recs else None,
        **last,
        "peak_cpu_rss_mb": peak_rss_mb(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "precision": precision,
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()
                                    if p.requires_grad}),
        "load_in_4bit": model_args.load_in_4bit, "lora_r": adapter.get("adapter_rank"),
        "resumed_from": str(resume) if resume else None, **adapter,
    }
    if script.plots:
        summary["plots"] = plot_metrics(run_dir, plots)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: {summary['steps']} steps in {summary['train_runtime_s']} s, {summary['tokens_per_s']} tokens/s, "
          f"loss {summary['train_loss_first']} -> {summary['train_loss_last']}, peak RSS "
          f"{summary['peak_cpu_rss_mb']} MB; adapter and tokenizer in {run_dir}", flush=True)
    return 0


def check_adapter(run_dir: Path, max_rank: int) -> dict:
    """The adapter must be one vLLM serves: no modules_to_save and a rank it allows."""
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    problems = []
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']}")
    if cfg.get("r", 0) > max_rank:
        problems.append(f"r={cfg['r']} > max_server_lora_rank {max_rank}")
    if problems:
        raise UserError(f"{run_dir}/adapter_config.json: the server would refuse this adapter: {', '.join(problems)}")
    return {"adapter_rank": cfg.get("r"), "adapter_target_modules": cfg.get("target_modules"),
            "base_model": cfg.get("base_model_name_or_path")}
