"""Preference fine-tuning (DPO) with LoRA / QLoRA on OpenAI's DPO JSONL.

    tunekit train configs/banking77/dpo_cpu.yaml
    accelerate launch train/dpo.py --config configs/banking77/dpo_cpu.yaml --max_steps 40
    accelerate launch train/dpo.py --config configs/banking77/dpo_t4.yaml --init_adapter runs/banking77/sft_t4
    python train/dpo.py --config configs/banking77/dpo_cpu.yaml --beta 0.2

The training file is OpenAI's DPO format, one object a line (what `tunekit build` writes with
``format: dpo`` and what the fine-tuning API's ``method: {"type": "dpo"}`` jobs upload)::

    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
     "non_preferred_output": [{"role": "assistant", "content": ...}]}

It becomes TRL's conversational preference rows (prompt = ``input.messages``, chosen / rejected = the two
outputs) for TRL's ``DPOTrainer`` with the sigmoid loss at ``beta`` (0.1 by default, as OpenAI's "auto").
With LoRA no second model is loaded: the reference is the base with the adapter disabled, or, with
``init_adapter`` (e.g. a supervised fine-tune), a frozen copy of that adapter, so DPO starts from and is
anchored to the fine-tune. Configuration: train/core.py's ``ScriptArguments``, TRL's ``DPOConfig`` and
``ModelConfig`` from one YAML (``method: dpo``), overridable by flags; unknown keys are errors.

The run (model loading, 4-bit on a T4 with fp32 LoRA weights, resume, pause, the adapter vLLM serves) is
train/core.py's, as for train/sft.py. metrics.jsonl holds TRL's DPO logs (``loss``, ``rewards/margins``,
``rewards/accuracies``: how often the chosen answer out-scores the rejected one, ...); plots: loss.png,
reward_margin.png, reward_accuracy.png.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # as train/sft.py: idle OpenMP threads sleep instead of spinning
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python train/dpo.py` and `accelerate launch train/dpo.py`
    sys.path.insert(0, str(ROOT))

from tunekit.errors import UserError, run_main  # noqa: E402
from train import core  # noqa: E402

PLOTS = (("loss.png", "loss", "eval_loss", "DPO loss"),
         ("reward_margin.png", "rewards/margins", "eval_rewards/margins", "reward margin (chosen - rejected)"),
         ("reward_accuracy.png", "rewards/accuracies", "eval_rewards/accuracies",
          "reward accuracy (chosen ranked first)"))
SUMMARY_KEYS = {"eval_loss_last": "eval_loss", "reward_accuracy_last": "rewards/accuracies",
                "reward_margin_last": "rewards/margins", "eval_reward_accuracy_last": "eval_rewards/accuracies",
                "eval_reward_margin_last": "eval_rewards/margins"}


@dataclass
class ScriptArguments(core.ScriptArguments):
    chat_template_path: str | None = field(default=None, metadata={
        "help": "a .jinja chat template to train with (default: the model's own, with {% generation %} markers "
                "added from train/templates/ or by TRL); saved with the adapter for the server"})


def parse(argv=None):
    from trl import DPOConfig, ModelConfig

    return core.parse((ScriptArguments, DPOConfig, ModelConfig), argv)


def check_config(script, training, model_args) -> list[str]:
    problems = core.check_config(script, training, model_args, "dpo")
    if not 0 < training.beta <= 2:
        problems.append(f"beta: {training.beta}; use a value in (0, 2] (0.1 is OpenAI's and TRL's default)")
    if training.padding_free:
        problems.append("padding_free: TRL's DPOTrainer does not support it; set padding_free: false")
    if training.precompute_ref_log_probs and script.init_adapter:
        problems.append("precompute_ref_log_probs: not with init_adapter (the reference is the adapter's copy); "
                        "set it false")
    return problems


def message(m: dict) -> dict:
    return {"role": m["role"], "content": m.get("content") or ""}


def load_preference_jsonl(path: str | None, key: str) -> list[dict]:
    """OpenAI's DPO JSONL as TRL's conversational preference rows; every problem is one error naming the key."""
    from data_prep.validate import checked_examples

    rows = []
    for ex in checked_examples(path, key, "dpo"):
        tools = ex["input"].get("tools")
        rows.append({"prompt": [message(m) for m in ex["input"]["messages"]],
                     "chosen": [message(ex["preferred_output"][0])],
                     "rejected": [message(ex["non_preferred_output"][0])],
                     **({"tools": tools} if tools else {})})
    if any("tools" in r for r in rows):
        import json

        rows = [{**r, "tools": json.dumps(r["tools"]) if "tools" in r else None} for r in rows]
    return rows


def check_lengths(rows: list[dict], tokenizer, max_length: int | None, max_fraction: float) -> dict:
    """Token lengths of prompt + chosen and prompt + rejected under the training template. TRL drops an example
    whose prompt alone fills max_length and cuts the answers of longer ones: the first is an error here (nothing
    is dropped silently), the second one too when more than ``max_fraction`` of the examples are cut."""
    import math

    import numpy as np

    def ids(messages, prompt=False):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    prompts = np.array([ids(r["prompt"], prompt=True) for r in rows])
    full = np.array([max(ids(r["prompt"] + r["chosen"]), ids(r["prompt"] + r["rejected"])) for r in rows])
    stats = {"examples": len(rows), "max": int(full.max()), "mean": round(float(full.mean()), 1),
             "total": int(sum(ids(r["prompt"] + r["chosen"]) + ids(r["prompt"] + r["rejected"]) for r in rows))}
    if max_length:
        suggest = int(2 ** math.ceil(math.log2(max(full.max(), 8))))
        if (prompts >= max_length).any():
            n = int((prompts >= max_length).sum())
            raise UserError(f"max_length: {max_length} leaves no room for the answers of {n} example(s) whose prompt "
                            f"alone is that long (longest prompt {prompts.max()} tokens), which TRL would drop; "
                            f"set max_length: {suggest}")
        over = int((full > max_length).sum())
        stats["over_max_length"] = over
        if over / len(rows) > max_fraction:
            raise UserError(f"max_length: {max_length} is shorter than {over} of {len(rows)} examples ({over / len(rows):.0%}; "
                            f"longest {full.max()} tokens), whose answers would be cut off; set max_length: {suggest}")
        if over:
            print(f"warning: {over} example(s) are longer than max_length {max_length} and will be truncated",
                  file=sys.stderr)
    return stats


def build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows=None):
    """TRL's DPOTrainer with the config's LoRA (or ``init_adapter``, then its frozen copy is the reference) and
    its trainable parameters fp32 under fp16. The API's DPO jobs and the benchmark come through here too."""
    from datasets import Dataset
    from trl import DPOTrainer

    model, peft_config = core.start_adapter(script, model_args, model)
    trainer = DPOTrainer(model=model, args=training, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
                         processing_class=tokenizer, peft_config=peft_config)
    core.fp32_trainables(trainer, training)
    return trainer


def main(argv=None) -> int:
    script, training, model_args = parse(argv)
    started = time.time()
    if core.finished(Path(training.output_dir), training):
        return 0
    problems = check_config(script, training, model_args)
    if problems:
        raise UserError("; ".join(problems))
    train_rows = load_preference_jsonl(script.train_file, "train_file")
    valid_rows = load_preference_jsonl(script.valid_file, "valid_file") if script.valid_file else None
    valid_rows = core.sample_eval(valid_rows, script, training.seed)

    tokenizer, template = core.prepare(script, training, model_args)
    lengths = check_lengths(train_rows, tokenizer, training.max_length, script.max_truncated_fraction)
    if valid_rows is None and training.eval_strategy != "no":
        training.eval_strategy = "no"

    model = core.load_model(model_args, training)
    core.check_vocabulary(model, tokenizer)
    trainer = build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows)
    return core.run(trainer, script, training, model_args, method="dpo", started=started, examples=len(train_rows),
                    lengths=lengths, tokenizer=tokenizer, template=template, plots=PLOTS, summary_keys=SUMMARY_KEYS)


if __name__ == "__main__":
    sys.exit(run_main(main))
