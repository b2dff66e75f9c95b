"""Supervised fine-tuning (LoRA / QLoRA) of a chat model on data_prep's chat JSONL.

    accelerate launch train/sft.py --config configs/banking77/sft_cpu.yaml
    accelerate launch train/sft.py --config configs/banking77/sft_t4.yaml --max_steps 200
    accelerate launch --config_file configs/accelerate/ddp.yaml train/sft.py --config configs/banking77/sft_t4.yaml
    python train/sft.py --config configs/banking77/sft_cpu.yaml --learning_rate 5e-4

Configuration: three dataclasses read by TRL's parser from one YAML file, overridable by flags:
``ScriptArguments`` (below), TRL's ``SFTConfig`` (training) and ``ModelConfig`` (model, LoRA,
4-bit). Unknown keys are errors.

What the run directory (``output_dir``) holds when it ends: the LoRA adapter, the tokenizer with
the chat template used for training (the one the server must use), ``run_config.yaml`` (resolved
configuration), ``metrics.jsonl`` (one line per logging step and evaluation), ``summary.json``
(tokens, wall time, tokens/s, peak memory) and ``loss.png`` / ``accuracy.png``.
A run that was killed resumes from its last complete checkpoint when started again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run as a script (not imported: the importer's environment is its own), before torch loads OpenMP: threads
# that wait for work sleep instead of spinning. Spinning (the default) burns the cores the other threads of
# a step are waiting for as soon as anything else runs there (another training run, a vLLM server): 4
# SmolLM2 steps on 2 threads of a 2-core machine beside another job took 99.5 s, against 12.7 s with
# PASSIVE (11 s on 1 thread). OMP_WAIT_POLICY=ACTIVE in the environment has the spinning back.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python train/sft.py` and `accelerate launch train/sft.py`
    sys.path.insert(0, str(ROOT))

from tunekit.constants import VLLM_LORA_RANKS  # noqa: E402
from tunekit.errors import UserError, run_main  # noqa: E402
from train.hardware import cpu_has_bf16  # noqa: E402
from train.precision import FiniteLossGuard, keep_trainable_fp32, precision_problems  # noqa: E402
# moved to train/chat_data.py and train/run_log.py; importable from here as before
from train.chat_data import (  # noqa: E402, F401
    GEN_MARKERS, PROBES, TEMPLATES, check_lengths, load_chat_jsonl, renders_like, resolve_chat_template)
from train.run_log import RunLog, last_complete_checkpoint, peak_rss_mb, plot_metrics  # noqa: E402


@dataclass
class ScriptArguments:
    train_file: str = field(default="", metadata={"help": "chat JSONL from `python -m data_prep build`"})
    valid_file: str | None = field(default=None, metadata={"help": "chat JSONL for evaluation (optional)"})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    max_server_lora_rank: int = field(default=64, metadata={
        "help": "largest LoRA rank the serving side allows (vLLM --max-lora-rank); bigger ranks are refused"})
    max_truncated_fraction: float = field(default=0.05, metadata={
        "help": "fail before training when more examples than this are longer than max_length"})
    max_eval_examples: int | None = field(default=256, metadata={
        "help": "evaluate on a seeded sample of this many valid examples (all of them when null)"})
    plots: bool = field(default=True, metadata={"help": "write loss.png and accuracy.png"})
    lora_last_layers: int | None = field(default=None, metadata={
        "help": "LoRA only on the last N decoder layers (all of them when null or when the model has fewer): "
                "the backward pass then stops N layers down, which makes steps faster"})
    compact_lm_head: bool = field(default=True, metadata={
        "help": "on CPU, run the LM head only where labels are (the assistant's tokens), as TRL does on CUDA"})
    shared_prefix: bool = field(default=False, metadata={
        "help": "compute the prompt prefix every example of a batch shares (the system message) once per batch "
                "instead of once per example: the same loss and gradients, less work (train/shared_prefix.py)"})


# ----------------------------------------------------------------------------- checks before loading

# attention implementations that keep the examples of a padding-free (concatenated) batch apart
PADDING_FREE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_config(script, training, model_args) -> list[str]:
    """Problems that would waste a run, found before the model is loaded."""
    import torch

    problems = precision_problems(training, model_args)
    cuda = torch.cuda.is_available()
    if (model_args.attn_implementation or "").startswith("flash_attention") and cuda:
        major, _ = torch.cuda.get_device_capability(0)
        if major < 8:
            problems.append("attn_implementation: FlashAttention needs an Ampere or newer GPU; use sdpa on a T4")
    if training.padding_free and (model_args.attn_implementation or "sdpa") not in PADDING_FREE_ATTENTION:
        # sdpa and eager too: with no attention mask and a past-free forward (training), transformers reads
        # the sequence boundaries off position_ids and masks each example off from the others
        problems.append(f"padding_free: needs attn_implementation {' or '.join(PADDING_FREE_ATTENTION)}; "
                        f"set padding_free: false to use {model_args.attn_implementation}")
    if model_args.use_peft:
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
    if training.bf16 and not cuda and not cpu_has_bf16():
        # bf16 on a CPU is a speed choice only (autocast over fp32 weights), and emulated bf16 is slow
        print("note: bf16: this CPU has no AVX512-BF16/AMX (bf16 would be emulated, far slower than fp32); "
              "training in fp32 instead", file=sys.stderr, flush=True)
        training.bf16 = False
        training.mixed_precision = "no"
    if not training.assistant_only_loss:
        problems.append("assistant_only_loss: must be true so that the loss covers only the assistant's "
                        "tokens (and its end-of-turn token)")
    return problems


# ----------------------------------------------------------------------------- the run


def parse(argv=None):
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as e:  # unknown YAML keys, or TrainingArguments refusing a precision
        msg = str(e).splitlines()[0]
        if "bf16" in msg:
            msg = ("bf16: this machine has no GPU with bf16 (T4s have none); set bf16: false, and "
                   "fp16: true on a T4 or use_cpu: true on a CPU")
        elif "fp16" in msg:
            msg = "fp16: mixed precision fp16 needs a CUDA GPU; on CPU set fp16: false and use_cpu: true"
        raise UserError(f"config: {msg}") from None


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


def build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows=None):
    """TRL's SFTTrainer with the LoRA of the config, its trainable parameters fp32 under fp16, and the
    non-finite-loss guard. Every path that trains (this script, the fine-tuning API's jobs, the notebook,
    bench/gpu_check.py) comes through here."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    peft_config = get_peft_config(model_args)
    n_layers = model.config.num_hidden_layers
    if peft_config is not None and script.lora_last_layers and script.lora_last_layers < n_layers:
        if peft_config.target_modules in ("all-linear", ["all-linear"]):
            # PEFT takes layers_to_transform only with named modules: name every linear but the head
            peft_config.target_modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
        peft_config.layers_to_transform = list(range(n_layers - script.lora_last_layers, n_layers))
    trainer = SFTTrainer(model=model, args=training, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
                         processing_class=tokenizer, peft_config=peft_config)
    if script.shared_prefix:
        from train.shared_prefix import enable

        inner = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        enable(inner.base_model)  # the decoder, which TRL's fused LM head calls for the hidden states
    if training.fp16:
        # TRL casts a quantized model's trainable parameters to bf16; fp16 mixed precision needs them fp32
        # (the GradScaler refuses bf16 gradients). The optimizer is built in train(), after this.
        keep_trainable_fp32(trainer.model)
    trainer.add_callback(FiniteLossGuard("fp16" if training.fp16 else "bf16" if training.bf16 else "fp32"))
    return trainer


def main(argv=None) -> int:
    script, training, model_args = parse(argv)
    started = time.time()
    run_dir = Path(training.output_dir)

    if (run_dir / "summary.json").exists() and (run_dir / "adapter_config.json").exists():
        done = json.loads((run_dir / "summary.json").read_text()).get("steps")
        if training.max_steps > 0 and done is not None and done != training.max_steps:
            raise UserError(f"output_dir: {run_dir} holds a finished run of {done} steps and this one asks for "
                            f"max_steps {training.max_steps}; remove the folder (rm -r {run_dir}) or set another "
                            "output_dir")
        print(f"{run_dir} already holds a finished run (summary.json); remove it or set another output_dir "
              "to train again", flush=True)
        return 0
    # Checks that cost seconds, before the model costs minutes.
    problems = check_config(script, training, model_args)
    if problems:
        raise UserError("; ".join(problems))
    train_rows = load_chat_jsonl(script.train_file, "train_file")
    valid_rows = load_chat_jsonl(script.valid_file, "valid_file") if script.valid_file else None
    if valid_rows and script.max_eval_examples and len(valid_rows) > script.max_eval_examples:
        import random

        valid_rows = random.Random(training.seed).sample(valid_rows, script.max_eval_examples)

    import torch
    from transformers import AutoTokenizer

    if script.num_threads:
        torch.set_num_threads(script.num_threads)
    if script.compact_lm_head:
        # TRL's fused LM head scores only the positions that carry labels on CUDA, but every
        # position elsewhere; on CPU that is most of a step's time for a 49k-token vocabulary.
        import trl.trainer.utils as trl_utils

        on_gpu = trl_utils._use_triton
        trl_utils._use_triton = lambda device: device.type == "cpu" or on_gpu(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except OSError as e:
        raise UserError(f"model_name_or_path: cannot load {model_args.model_name_or_path} "
                        f"({str(e).splitlines()[0]}); for the default model run `make model`") from None
    template = resolve_chat_template(tokenizer, training.chat_template_path)
    tokenizer.chat_template = template
    training.chat_template_path = None  # applied above; TRL must not swap it again
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = check_lengths(train_rows, tokenizer, template, training.max_length, script.max_truncated_fraction)
    if training.padding_free and not training.packing and training.max_length:
        # TRL concatenates a padding-free batch without truncating it, and refuses a max_length for it
        if lengths.get("over_max_length"):
            raise UserError(f"padding_free: {lengths['over_max_length']} train example(s) are longer than "
                            f"max_length {training.max_length} (longest {lengths['max']}), and padding-free "
                            f"batches are not truncated; set max_length: {lengths['max']} or padding_free: false")
        training.max_length = None  # every example fits: the same batches, untruncated
    if valid_rows is None and training.eval_strategy != "no":
        training.eval_strategy = "no"

    resume = last_complete_checkpoint(run_dir) if run_dir.exists() else None
    model = load_model(model_args, training)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"model_name_or_path: the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.get_input_embeddings().num_embeddings} embeddings; added tokens would need "
                        "new embeddings, which vLLM refuses in an adapter")
    trainer = build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows)
    resume_step = int(resume.name.split("-")[1]) if resume else 0
    trainer.add_callback(RunLog(run_dir, resume_step))
    precision = "fp16" if training.fp16 else "bf16" if training.bf16 else "fp32"

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    world = trainer.accelerator.num_processes
    effective_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * world
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"script": asdict(script), "model": asdict(model_args),
                    "training": {k: v for k, v in training.to_dict().items()}}
        import yaml

        (run_dir / "run_config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)),
                                                                sort_keys=False))
        print(f"model {model_args.model_name_or_path}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%); effective batch {effective_batch} "
              f"({training.per_device_train_batch_size} x {training.gradient_accumulation_steps} accumulation "
              f"x {world} process(es)); {lengths['examples']} train examples, {lengths['total']:,} tokens, "
              f"longest {lengths['max']}; threads {torch.get_num_threads()}"
              + (f"; resuming from {resume}" if resume else ""), flush=True)

    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(run_dir))
    if not trainer.is_world_process_zero():
        return 0
    tokenizer.save_pretrained(str(run_dir))
    (run_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    adapter = check_adapter(run_dir, script.max_server_lora_rank) if model_args.use_peft else {}

    wall = time.time() - started
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train_recs = [r for r in recs if "loss" in r]
    eval_recs = [r for r in recs if "eval_loss" in r]
    tokens = max((r.get("num_tokens", 0) for r in recs), default=0)
    train_s = result.metrics.get("train_runtime", wall)
    summary = {
        "model": model_args.model_name_or_path, "run_dir": str(run_dir),
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "train_examples": len(train_rows), "effective_batch_size": effective_batch,
        "trainable_parameters": trainable, "total_parameters": total,
        "train_tokens": tokens, "train_runtime_s": round(train_s, 1), "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens / train_s, 1) if train_s else None,
        "train_loss_first": train_recs[0]["loss"] if train_recs else None,
        "train_loss_last": train_recs[-1]["loss"] if train_recs else None,
        "eval_loss_last": eval_recs[-1]["eval_loss"] if eval_recs else None,
        "eval_mean_token_accuracy_last": eval_recs[-1].get("eval_mean_token_accuracy") if eval_recs else None,
        "peak_cpu_rss_mb": peak_rss_mb(),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "precision": precision,
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()
                                    if p.requires_grad}),
        "load_in_4bit": model_args.load_in_4bit, "lora_r": model_args.lora_r if model_args.use_peft else None,
        "resumed_from": str(resume) if resume else None, **adapter,
    }
    if script.plots:
        summary["plots"] = plot_metrics(run_dir)
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


if __name__ == "__main__":
    sys.exit(run_main(main))
