"""Supervised fine-tuning (LoRA / QLoRA) of a chat model on data_prep's chat JSONL.

    accelerate launch train/sft.py --config configs/banking77/sft_cpu.yaml
    accelerate launch train/sft.py --config configs/banking77/sft_t4.yaml --max_steps 200
    accelerate launch --config_file configs/accelerate/ddp.yaml train/sft.py --config configs/banking77/sft_t4.yaml
    python train/sft.py --config configs/banking77/sft_cpu.yaml --learning_rate 5e-4

Configuration: three dataclasses read by TRL's parser from one YAML file, overridable by flags:
``ScriptArguments`` (below: the shared keys of train/core.py plus sft's own), TRL's ``SFTConfig``
(training) and ``ModelConfig`` (model, LoRA, 4-bit). Unknown keys are errors. The run itself (model
loading, precision, LoRA, resume, pause, the run directory's records) is train/core.py's, shared with
train/dpo.py.

What the run directory (``output_dir``) holds when it ends: the LoRA adapter, the tokenizer with
the chat template used for training (the one the server must use), ``run_config.yaml`` (resolved
configuration), ``metrics.jsonl`` (one line per logging step and evaluation), ``summary.json``
(tokens, wall time, tokens/s, peak memory) and ``loss.png`` / ``accuracy.png``.
A run that was killed resumes from its last complete checkpoint when started again.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

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

from tunekit.errors import UserError, run_main  # noqa: E402
from train import core, recipe  # noqa: E402
from train.core import check_adapter, load_model  # noqa: E402, F401 (importable from here as before)
# moved to train/chat_data.py and train/run_log.py; importable from here as before
from train.chat_data import (  # noqa: E402, F401
    GEN_MARKERS, PROBES, TEMPLATES, check_lengths, load_chat_jsonl, renders_like, resolve_chat_template)
from train.run_log import SFT_PLOTS, RunLog, last_complete_checkpoint, peak_rss_mb, plot_metrics  # noqa: E402, F401


@dataclass
class ScriptArguments(core.ScriptArguments):
    shared_prefix: bool = field(default=False, metadata={
        "help": "compute the prompt prefix every example of a batch shares (the system message) once per batch "
                "instead of once per example: the same loss and gradients, less work (train/shared_prefix.py)"})
    balance_labels: str = field(default="auto", metadata={
        "help": "auto | on | off: class-balanced draws of the examples when their answers are labels; auto: only "
                "when the labels are skewed (train/recipe.py)"})
    balance_strength: float = field(default=1.0, metadata={
        "help": "with balanced draws, each example weighs 1 / its label's count to this power: 1 every label alike, "
                "0.5 square-root balancing (between the file's mix and alike)"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "time budget of the training loop: after a few steps, max_steps is lowered to what fits "
                "(train/recipe.py); max_steps: auto sizes the run from the train file instead"})


# ----------------------------------------------------------------------------- checks before loading

BALANCE_COLUMN = "balance_label"  # the example's label for class-balanced draws (dropped before the model)

# attention implementations that keep the examples of a padding-free (concatenated) batch apart
PADDING_FREE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_config(script, training, model_args) -> list[str]:
    """Problems that would waste a run, found before the model is loaded."""
    problems = core.check_config(script, training, model_args, "sft")
    if training.padding_free and (model_args.attn_implementation or "sdpa") not in PADDING_FREE_ATTENTION:
        # sdpa and eager too: with no attention mask and a past-free forward (training), transformers reads
        # the sequence boundaries off position_ids and masks each example off from the others
        problems.append(f"padding_free: needs attn_implementation {' or '.join(PADDING_FREE_ATTENTION)}; "
                        f"set padding_free: false to use {model_args.attn_implementation}")
    if script.balance_labels not in recipe.BALANCE_MODES:
        problems.append(f"balance_labels: {script.balance_labels!r}; use one of {', '.join(recipe.BALANCE_MODES)}")
    if script.balance_strength < 0:
        problems.append(f"balance_strength: {script.balance_strength}; use 1 (every label alike), 0.5 (square-root "
                        "balancing) or another number >= 0")
    if script.max_minutes is not None and script.max_minutes <= 0:
        problems.append(f"max_minutes: {script.max_minutes}; use a positive number of minutes, or null for no budget")
    if not training.assistant_only_loss:
        problems.append("assistant_only_loss: must be true so that the loss covers only the assistant's "
                        "tokens (and its end-of-turn token)")
    return problems


# ----------------------------------------------------------------------------- the run


def parse(argv=None):
    """(script, training, model) config; with ``max_steps: auto`` (YAML or flag) ``script.auto_steps`` is True and
    ``training.max_steps`` -1 until ``resolve_steps`` sizes the run from the train file (train/recipe.py)."""
    from trl import ModelConfig, SFTConfig

    argv, auto = recipe.take_auto(sys.argv[1:] if argv is None else argv)
    script, training, model_args = core.parse((ScriptArguments, SFTConfig, ModelConfig), argv)
    script.auto_steps = auto
    # the profile's own epochs, when it names them; None: OpenAI's auto epochs
    script.auto_epochs = training.num_train_epochs if auto and recipe.names_epochs(argv) else None
    return script, training, model_args


def resolve_steps(script, training) -> dict | None:
    """``max_steps: auto``: the steps of the profile's ``num_train_epochs`` (when it sets one) or of OpenAI's
    "auto" epochs for the train file's examples, at this batch (train/recipe.py), set on ``training``; what was
    resolved, or None without auto."""
    if not getattr(script, "auto_steps", False):
        return None
    n = recipe.count_examples(script.train_file)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    given = getattr(script, "auto_epochs", None)
    epochs = given or recipe.auto_epochs(n)
    training.max_steps = recipe.auto_steps(n, training.per_device_train_batch_size,
                                           training.gradient_accumulation_steps, processes, epochs=epochs)
    script.auto_steps = False  # resolved
    return {"examples": n, "epochs": epochs, "steps": training.max_steps, "epochs_from": "profile" if given else "auto"}


def build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows=None):
    """TRL's SFTTrainer with the LoRA of the config (or ``init_adapter``), its trainable parameters fp32 under
    fp16, and the shared-prefix batches. Every path that trains supervised (this script, the fine-tuning API's
    jobs, the notebook, bench/gpu_check.py) comes through here; ``core.run`` adds the guard and the records."""
    from datasets import Dataset
    from trl import SFTTrainer

    model, peft_config = core.start_adapter(script, model_args, model)
    labels = recipe.answer_labels(train_rows)
    balance, why = recipe.decide_balance(getattr(script, "balance_labels", "off"), labels)
    if balance:  # the label travels through TRL's preparation (which may drop examples) as a column
        train_rows = [{**r, BALANCE_COLUMN: label} for r, label in zip(train_rows, labels)]
    trainer = SFTTrainer(model=model, args=training, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
                         processing_class=tokenizer, peft_config=peft_config)
    if getattr(script, "balance_labels", "off") != "off":
        print(why, flush=True)
    if balance:
        sampler = recipe.balanced_sampler(list(trainer.train_dataset[BALANCE_COLUMN]),
                                          training.data_seed or training.seed, getattr(script, "balance_strength", 1.0))
        trainer._get_train_sampler = lambda train_dataset=None: sampler
    if script.shared_prefix:
        from train.shared_prefix import enable

        inner = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        enable(inner.base_model)  # the decoder, which TRL's fused LM head calls for the hidden states
    core.fp32_trainables(trainer, training)
    return trainer


def main(argv=None, callbacks=()) -> int:
    """``callbacks``: more TrainerCallbacks for the run (bench/long_run.py's step meter)."""
    script, training, model_args = parse(argv)
    started = time.time()
    auto = resolve_steps(script, training)
    # a run cut short by max_minutes finished with fewer steps than it planned: not a run of another length
    if core.finished(Path(training.output_dir), SimpleNamespace(max_steps=0) if script.max_minutes else training):
        return 0
    if auto:
        print(f"max_steps auto: {auto['examples']} train examples -> {auto['epochs']:g} epochs "
              f"({'num_train_epochs' if auto['epochs_from'] == 'profile' else 'auto'}) -> {auto['steps']} steps "
              f"at batch {training.per_device_train_batch_size} x {training.gradient_accumulation_steps} "
              "(train/recipe.py)", flush=True)
    # Checks that cost seconds, before the model costs minutes.
    problems = check_config(script, training, model_args)
    if problems:
        raise UserError("; ".join(problems))
    train_rows = load_chat_jsonl(script.train_file, "train_file")
    valid_rows = load_chat_jsonl(script.valid_file, "valid_file") if script.valid_file else None
    valid_rows = core.sample_eval(valid_rows, script, training.seed)

    tokenizer, template = core.prepare(script, training, model_args)
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

    model = load_model(model_args, training)
    core.check_vocabulary(model, tokenizer)
    trainer = build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows)
    if script.max_minutes:
        trainer.add_callback(recipe.TimeBudget(script.max_minutes, trainer))
    for callback in callbacks:
        trainer.add_callback(callback)
    return core.run(trainer, script, training, model_args, method="sft", started=started, examples=len(train_rows),
                    lengths=lengths, tokenizer=tokenizer, template=template, plots=SFT_PLOTS,
                    summary_keys={"eval_loss_last": "eval_loss",
                                  "eval_mean_token_accuracy_last": "eval_mean_token_accuracy"})


if __name__ == "__main__":
    sys.exit(run_main(main))
