"""Reinforcement fine-tuning (GRPO) with OpenAI's graders as the reward, LoRA / QLoRA, on OpenAI's RFT JSONL.

    tunekit train configs/banking77/grpo_cpu.yaml
    accelerate launch train/grpo.py --config configs/banking77/grpo_cpu.yaml --init_adapter runs/demo/sft
    accelerate launch train/grpo.py --config configs/banking77/grpo_t4.yaml --num_generations 8
    python train/grpo.py --config configs/banking77/grpo_cpu.yaml --grader '{"type": "string_check", ...}'

The training file is OpenAI's reinforcement format (``data_prep/reinforcement.py``; ``python -m
data_prep.reinforcement`` makes it from chat JSONL): ``{"messages": [... ending with the user's turn],
<fields>}``, the fields being the grader's ``item``. For each prompt TRL's ``GRPOTrainer`` samples
``num_generations`` completions (``temperature``, at most ``max_completion_length`` tokens); each is graded
with ``serve.graders.grade(grader, {"output_text": completion}, item)`` -- the same grader implementation
as the graders API -- and the policy moves toward the completions that score above their group's mean.
``beta`` > 0 adds a KL penalty to a reference (the base with the adapter disabled, or with ``init_adapter`` a
frozen copy of that adapter); 0.0 (TRL's default) loads none.

The grader (``grader:`` in the YAML, an OpenAI grader object; or JSON text / a .json or .yaml file on the
command line) is validated before anything loads: a bad one is one line naming ``grader.<param>``, and so is a
``{{ item.x }}`` that a line of the data lacks. Grading errors (a python grader raising, output that is not
JSON for ``sample.output_json``, a model grader's server failing) give that completion reward 0, as OpenAI's
do; they are counted (metrics.jsonl ``grader_error_rate``, summary.json ``grader_errors`` per flag) and the
first of each kind is printed, never a crash. A server error at start-up (checked with one probe grade)
is a one-line error instead. Completions are graded on ``grader_workers`` threads (a python grader is one
sandboxed process per completion, serve/graders/sandbox.py). Model graders (score_model, label_model) ask
the backend of ``grader_config`` (a serve.yaml: the local vLLM server or OpenAI, ``LLM_BACKEND`` and
``grader_backend`` override) through serve/client.py, keys from the environment or .env as for every command.

The run (model loading, 4-bit on a T4 with fp32 LoRA weights, resume, pause, the adapter vLLM serves) is
train/core.py's, as for train/sft.py and train/dpo.py. metrics.jsonl holds TRL's GRPO logs: ``reward`` (mean
over the step's completions), ``reward_std``, ``rewards/grader/mean``, ``frac_reward_zero_std`` (groups
that teach nothing), ``completions/mean_length``, ``completions/clipped_ratio``, ``entropy``, ``kl`` (beta >
0), ``loss``, and ``eval_reward`` / ``eval_reward_std`` when evaluation runs; plus ``grader_error_rate``,
``grader_s`` (seconds grading) and, for a multi grader, ``sub_rewards/<name>``. Plots: reward.png (mean and
spread), completion_length.png.
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
if str(ROOT) not in sys.path:  # `python train/grpo.py` and `accelerate launch train/grpo.py`
    sys.path.insert(0, str(ROOT))

from tunekit.errors import UserError, run_main  # noqa: E402
from train import core  # noqa: E402

PLOTS = (("completion_length.png", "completions/mean_length", "eval_completions/mean_length",
          "completion length (tokens)"),)
SMOOTH = 10  # reward.png's rolling mean, in logged steps
SUMMARY_KEYS = {"reward_last": "reward", "reward_std_last": "reward_std", "eval_reward_last": "eval_reward",
                "eval_reward_std_last": "eval_reward_std", "completion_length_last": "completions/mean_length",
                "frac_reward_zero_std_last": "frac_reward_zero_std"}


@dataclass
class ScriptArguments(core.ScriptArguments):
    grader: dict | str | None = field(default=None, metadata={
        "help": "the OpenAI grader object that scores each completion (string_check, text_similarity, python, "
                "score_model, multi), inline in the YAML; on the command line JSON text or a .json/.yaml file"})
    grader_config: str | None = field(default=None, metadata={
        "help": "model graders only: the serve.yaml whose backend answers them (the local vLLM server or OpenAI; "
                "default: serve/client.py's defaults, LLM_BACKEND)"})
    grader_backend: str | None = field(default=None, metadata={
        "help": "model graders only: local or openai, over grader_config's backend and LLM_BACKEND"})
    grader_workers: int = field(default=8, metadata={
        "help": "completions graded at once (threads; a python grader runs one sandboxed process per completion)"})
    grader_timeout_s: float = field(default=30.0, metadata={
        "help": "a python grader's wall-clock limit per completion, in seconds (reward 0 past it)"})
    chat_template_path: str | None = field(default=None, metadata={
        "help": "a .jinja chat template to train with (default: the model's own, with {% generation %} markers "
                "added from train/templates/ or by TRL); saved with the adapter for the server"})


def parse(argv=None):
    from trl import GRPOConfig, ModelConfig

    return core.parse((ScriptArguments, GRPOConfig, ModelConfig), argv)


def check_config(script, training, model_args) -> list[str]:
    import torch

    problems = core.check_config(script, training, model_args, "reinforcement")
    if training.beta < 0:
        problems.append(f"beta: {training.beta}; use 0.0 (no reference model, TRL's default) or a small positive "
                        "KL weight such as 0.04")
    if training.temperature <= 0:
        problems.append(f"temperature: {training.temperature}; GRPO samples its completions, use a value > 0 "
                        "(1.0 is TRL's default)")
    if not training.max_completion_length or training.max_completion_length < 1:
        problems.append("max_completion_length: set the longest completion in tokens, e.g. 64")
    if training.use_vllm and not torch.cuda.is_available():
        problems.append("use_vllm: TRL's vLLM generation needs a CUDA GPU; set use_vllm: false on a CPU")
    if script.grader_workers < 1:
        problems.append(f"grader_workers: {script.grader_workers}; use 1 or more")
    if script.grader_backend not in (None, "local", "openai"):
        problems.append(f"grader_backend: {script.grader_backend!r}; use local or openai")
    return problems


# ----------------------------------------------------------------------------- the grader as TRL's reward


def load_grader(value, problems: list[str]) -> dict | None:
    """The config's grader as a dict, checked with serve.graders.validate (what the graders API accepts); a bad
    one is a problem naming ``grader.<param>``."""
    import yaml

    from serve.graders import GraderInvalid, validate

    if value is None:
        problems.append("grader: required; give an OpenAI grader object, e.g. {type: string_check, name: label, "
                        "input: '{{ sample.output_json.category }}', reference: '{{ item.category }}', operation: eq}")
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            if not Path(text).is_file():
                problems.append(f"grader: {text!r} is neither a grader object (JSON) nor a file holding one")
                return None
            text = Path(text).read_text(encoding="utf-8")
        try:
            value = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            problems.append(f"grader: not a JSON/YAML object ({str(e).splitlines()[0]})")
            return None
    try:
        return validate(value)
    except GraderInvalid as e:
        problems.append(f"{e.param}: {e.message}")
        return None


def uses_model(grader: dict) -> bool:
    """Does grading call a model (score_model, label_model, or text_similarity's cosine embeddings)?"""
    if grader.get("type") in ("score_model", "label_model"):
        return True
    if grader.get("type") == "text_similarity":
        return grader.get("evaluation_metric") == "cosine"
    subs = grader.get("graders") if grader.get("type") == "multi" else None
    subs = [subs] if isinstance(subs, dict) and "type" in subs else \
        list(subs.values()) if isinstance(subs, dict) else subs or []
    return any(uses_model(g) for g in subs if isinstance(g, dict))


class GraderReward:
    """TRL's reward function: each completion graded against its line's item with ``serve.graders.grade``,
    ``grader_workers`` at a time; errors score 0 and are counted, the first of each kind printed."""

    def __init__(self, grader: dict, script):
        from collections import Counter
        from concurrent.futures import ThreadPoolExecutor

        self.__name__ = "grader"  # TRL's metric names: rewards/grader/mean, rewards/grader/std
        self.grader, self.timeout_s, self.client = grader, script.grader_timeout_s, None
        if uses_model(grader):
            from serve.client import load_backend

            self.client = load_backend(script.grader_config, script.grader_backend).client()
        workers = script.grader_workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="grader") if workers > 1 else None
        self.calls, self.failed, self.seconds, self.errors, self.shown = 0, 0, 0.0, Counter(), set()

    def grade(self, text: str, item: dict):
        from serve.graders import grade

        return grade(self.grader, {"output_text": text}, item, client=self.client, timeout_s=self.timeout_s)

    def __call__(self, prompts, completions, item, log_metric=None, log_extra=None, **kwargs) -> list[float]:
        import json

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        items = [json.loads(x) for x in item]
        started = time.perf_counter()
        results = list((self.pool.map if self.pool else map)(self.grade, texts, items))
        elapsed = time.perf_counter() - started
        failed = [r for r in results if not r.ok]
        self.calls, self.failed, self.seconds = self.calls + len(results), self.failed + len(failed), \
            self.seconds + elapsed
        for r in failed:
            for flag in (f for f, on in r.errors.items() if on is True):
                self.errors[flag] += 1
                if flag not in self.shown:
                    self.shown.add(flag)
                    print(f"\nwarning: grader error {flag}: {error_detail(r)} (that completion scores 0; "
                          "metrics.jsonl counts them in grader_error_rate)", file=sys.stderr, flush=True)
        if log_extra is not None:  # columns of the completions table (log_completions: true)
            log_extra("item", list(item))
            log_extra("grader_errors", [",".join(f for f, on in r.errors.items() if on is True) for r in results])
        if log_metric is not None:
            log_metric("grader_error_rate", len(failed) / len(results))
            log_metric("grader_s", elapsed)
            for name in sorted({k for r in results for k in r.sub_rewards}):
                log_metric(f"sub_rewards/{name}", sum(r.sub_rewards.get(name, 0.0) for r in results) / len(results))
        return [float(r.reward) for r in results]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def error_detail(result) -> str:
    for key in ("python_grader_runtime_error_details", "python_grader_server_error_type",
                "model_grader_server_error_details"):
        if result.errors.get(key):
            return str(result.errors[key]).splitlines()[-1][:300]
    return str(result.scores.get("error", "no details"))[:300]


def probe(reward: GraderReward, item: dict) -> None:
    """One grade of an empty answer before the model loads: a grader server that fails is one line now."""
    result = reward.grade("", item)
    if result.errors.get("model_grader_server_error"):
        raise UserError(f"grader: the model grader's server failed ({error_detail(result)}); start it (tunekit "
                        "serve --config ...) or point grader_config / grader_backend at one that answers")
    if result.errors.get("python_grader_server_error"):
        raise UserError(f"grader: the python grader's sandbox could not run ({error_detail(result)})")


def plot_reward(run_dir: Path) -> list[str]:
    """reward.png: the mean reward per step with its spread (± the std over the step's completions), and the
    evaluations' mean reward as points."""
    import json

    from matplotlib.figure import Figure

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["reward"], r.get("reward_std") or 0.0) for r in recs if "reward" in r]
    evals = [(r["step"], r["eval_reward"], r.get("eval_reward_std") or 0.0) for r in recs if "eval_reward" in r]
    if not train and not evals:
        return []
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        steps, mean, std = zip(*train)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color="#4C72B0", alpha=0.2, label="± std over the step's completions")
        ax.plot(steps, mean, color="#4C72B0", alpha=0.6 if len(mean) > SMOOTH else 1.0, label="train: mean reward")
        if len(mean) > SMOOTH:  # a step's mean is over few completions: the trend is the rolling mean
            rolling = [sum(mean[max(0, i - SMOOTH + 1):i + 1]) / len(mean[max(0, i - SMOOTH + 1):i + 1])
                       for i in range(len(mean))]
            ax.plot(steps, rolling, color="#1B3A6B", linewidth=2, label=f"train: mean of the last {SMOOTH} steps")
    if evals:
        ax.errorbar(*zip(*[(s, m) for s, m, _ in evals]), yerr=[e for _, _, e in evals], fmt="o-", color="#DD8452",
                    capsize=3, label="valid: mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(f"{run_dir.name}: grader reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward.png")
    return [str(run_dir / "reward.png")]


def add_grader_summary(run_dir: Path, reward: GraderReward, training, plotted: list[str]) -> None:
    """summary.json: the grader, the sampling settings, the first logged reward and the grading errors."""
    import json

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward"] for r in recs if "reward" in r]
    summary.update({
        "grader": {"type": reward.grader.get("type"), "name": reward.grader.get("name")},
        "num_generations": training.num_generations, "max_completion_length": training.max_completion_length,
        "temperature": training.temperature, "beta": training.beta, "loss_type": training.loss_type,
        "reward_first": rewards[0] if rewards else None,
        # a step's mean is over few completions: the means of the first and last SMOOTH logged steps too
        "reward_first_steps_mean": round(sum(rewards[:SMOOTH]) / len(rewards[:SMOOTH]), 4) if rewards else None,
        "reward_last_steps_mean": round(sum(rewards[-SMOOTH:]) / len(rewards[-SMOOTH:]), 4) if rewards else None,
        "grader_calls": reward.calls, "grader_errors": dict(reward.errors),
        "grader_error_rate": round(reward.failed / reward.calls, 4) if reward.calls else None,
        "grader_s_total": round(reward.seconds, 1)})
    if plotted:
        summary["plots"] = sorted(set(summary.get("plots") or []) | set(plotted))
    path.write_text(json.dumps(summary, indent=2) + "\n")


# ----------------------------------------------------------------------------- data


def load_prompts(path: str | None, key: str) -> tuple[list[dict], list[dict]]:
    """OpenAI's RFT JSONL as (TRL's conversational prompt rows with the item as JSON text, the items)."""
    import json

    from data_prep.reinforcement import item_of
    from data_prep.validate import checked_examples

    rows, items = [], []
    for i, ex in enumerate(checked_examples(path, key, "reinforcement"), 1):
        if ex.get("tools"):
            raise UserError(f"{key}: {path} example {i} has tools; train/grpo.py trains text answers (TRL's "
                            "GRPOTrainer renders one tool list for every prompt); remove the tools from the file")
        item = item_of(ex)
        rows.append({"prompt": [{"role": m["role"] if m["role"] != "developer" else "system",
                                 "content": m.get("content") or ""} for m in ex["messages"]],
                     "item": json.dumps(item, ensure_ascii=False)})
        items.append(item)
    return rows, items


def check_items(grader: dict, items: list[dict], key: str, path: str) -> None:
    """Every ``{{ item.x }}`` the grader reads is in every line (else each completion would score 0)."""
    from serve.graders.templates import item_paths, missing_item_path

    wanted = item_paths(grader)
    for i, item in enumerate(items, 1):
        if missing := missing_item_path(wanted, item):
            fields = ", ".join(item) or "none"
            raise UserError(f"grader: {{{{ {missing} }}}} is not in {key} {path} example {i} (its fields: "
                            f"{fields}); every line needs the fields the grader reads")


def check_lengths(rows: list[dict], tokenizer, max_completion_length: int) -> dict:
    """Prompt lengths under the training template (GRPO does not cut prompts): for the log and summary."""
    import numpy as np

    def ids(messages):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)

    prompts = np.array([ids(r["prompt"]) for r in rows])
    return {"examples": len(rows), "max": int(prompts.max()) + max_completion_length,
            "mean_prompt": round(float(prompts.mean()), 1), "max_prompt": int(prompts.max()),
            "total": int(prompts.sum())}


def build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows, reward):
    """TRL's GRPOTrainer with the grader as its reward function, the config's LoRA (or ``init_adapter``) and its
    trainable parameters fp32 under fp16."""
    from datasets import Dataset
    from trl import GRPOTrainer

    model, peft_config = core.start_adapter(script, model_args, model)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=training,
                          train_dataset=Dataset.from_list(train_rows),
                          eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
                          processing_class=tokenizer, peft_config=peft_config)
    core.fp32_trainables(trainer, training)
    return trainer


def main(argv=None) -> int:
    script, training, model_args = parse(argv)
    started = time.time()
    run_dir = Path(training.output_dir)
    if core.finished(run_dir, training):
        return 0
    problems = check_config(script, training, model_args)
    grader = load_grader(script.grader, problems)
    if problems:
        raise UserError("; ".join(problems))
    train_rows, items = load_prompts(script.train_file, "train_file")
    check_items(grader, items, "train_file", script.train_file)
    valid_rows = None
    if script.valid_file:
        valid_rows, valid_items = load_prompts(script.valid_file, "valid_file")
        check_items(grader, valid_items, "valid_file", script.valid_file)
    valid_rows = core.sample_eval(valid_rows, script, training.seed)
    reward = GraderReward(grader, script)
    probe(reward, items[0])  # a grader server that is down is one line now, not a run of zero rewards

    tokenizer, template = core.prepare(script, training, model_args)
    lengths = check_lengths(train_rows, tokenizer, training.max_completion_length)
    if valid_rows is None and training.eval_strategy != "no":
        training.eval_strategy = "no"

    model = core.load_model(model_args, training)
    core.check_vocabulary(model, tokenizer)
    trainer = build_trainer(script, training, model_args, model, tokenizer, train_rows, valid_rows, reward)
    prompts_per_step = training.generation_batch_size // training.num_generations
    if trainer.is_world_process_zero():
        print(f"grader {grader.get('type')} {grader.get('name')!r}: {training.num_generations} completions per "
              f"prompt, {prompts_per_step} prompt(s) per generation batch of {training.generation_batch_size}, "
              f"at most {training.max_completion_length} tokens each, temperature {training.temperature}, beta "
              f"{training.beta}; prompts {lengths['mean_prompt']} tokens on average, longest {lengths['max_prompt']}",
              flush=True)
    rc = core.run(trainer, script, training, model_args, method="reinforcement", started=started,
                  examples=len(train_rows), lengths=lengths, tokenizer=tokenizer, template=template, plots=PLOTS,
                  summary_keys=SUMMARY_KEYS)
    reward.close()
    if trainer.is_world_process_zero() and (run_dir / "summary.json").is_file() \
            and not (run_dir / core.PAUSED_FILE).exists():
        plotted = plot_reward(run_dir) if script.plots else []
        add_grader_summary(run_dir, reward, training, plotted)
    return rc


if __name__ == "__main__":
    sys.exit(run_main(main))
