"""train/grpo.py on the tiny random Llama (CPU): OpenAI's RFT JSONL in, completions graded by serve.graders (the
graders API's implementation) as GRPO's reward, rewards logged, an adapter out; a python grader; a bad grader is
one line; pause and resume; `tunekit train` picks the script from `method: reinforcement`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TOY

TUNEKIT = Path(sys.executable).parent / "tunekit"
# a dense reward the random tiny model earns some of from the start: is "yes" (or "no") among the words
CONTAINS = {"type": "string_check", "name": "has answer", "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}", "operation": "like"}
PYTHON = {"type": "python", "name": "words",
          "source": "def grade(sample, item):\n    words = sample['output_text'].split()\n"
                    "    return words.count(item['answer']) / max(1, len(words))\n"}


def prompt(q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q}], "answer": a,
            "id": q}


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rl_data")
    (d / "train.jsonl").write_text("".join(json.dumps(prompt(q, a)) + "\n" for q, a in TOY * 2))
    (d / "valid.jsonl").write_text("".join(json.dumps(prompt(q, a)) + "\n" for q, a in TOY))
    return d


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def write_config(path: Path, model: Path, data: Path, out: Path, **overrides) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/banking77/grpo_cpu.yaml").read_text())
    cfg.update(train_file=str(data / "train.jsonl"), valid_file=str(data / "valid.jsonl"), model_name_or_path=str(model),
               output_dir=str(out), num_threads=1, grader=CONTAINS, num_generations=4, per_device_train_batch_size=8,
               max_completion_length=6, per_device_eval_batch_size=8, num_generations_eval=4, max_eval_examples=4,
               learning_rate=5e-3, warmup_steps=0, lr_scheduler_type="constant", max_steps=8, logging_steps=1,
               eval_steps=8, save_steps=4, lora_r=16, lora_alpha=32, log_completions=True)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def grpo_main(*argv: str) -> int:
    import train.grpo as grpo
    from tunekit.errors import run_main

    return run_main(grpo.main, list(argv))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model_dir, rl_data) -> Path:
    """One real run as users start it: `tunekit train CONFIG` picks train/grpo.py from `method: reinforcement`."""
    d = tmp_path_factory.mktemp("grpo_run")
    cfg = write_config(d / "grpo.yaml", tiny_model_dir, rl_data, d / "out")
    proc = subprocess.run([str(TUNEKIT), "train", str(cfg)], cwd=d, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d / "out"


def test_run_directory_metrics_and_summary(grpo_run):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "summary.json", "reward.png", "completion_length.png"):
        assert (grpo_run / name).exists(), name
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["method"] == "reinforcement" and summary["steps"] == 8 and summary["train_tokens"] > 0
    assert summary["adapter_rank"] == 16 and summary["trainable_dtypes"] == ["float32"]
    assert summary["grader"] == {"type": "string_check", "name": "has answer"}
    assert summary["grader_calls"] == 8 * 8 + 4 * 4 and summary["grader_errors"] == {}  # 8 steps x 8, 4 x 4 eval
    train = [r for r in records(grpo_run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"reward", "reward_std", "rewards/grader/mean", "completions/mean_length", "grader_error_rate",
                "grader_s", "frac_reward_zero_std"} <= set(r), sorted(r)
        assert 0.0 <= r["reward"] <= 1.0 and r["reward"] == pytest.approx(r["rewards/grader/mean"])
        assert r["grader_error_rate"] == 0.0
    evals = [r for r in records(grpo_run) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [8] and 0.0 <= evals[0]["eval_reward"] <= 1.0
    assert summary["reward_first"] == train[0]["reward"] and summary["reward_last"] == train[-1]["reward"]
    assert summary["reward_last_steps_mean"] == pytest.approx(sum(r["reward"] for r in train) / 8, abs=1e-4)
    assert summary["eval_reward_last"] == evals[0]["eval_reward"]


def test_every_logged_completion_got_the_graders_reward_for_its_own_item(grpo_run):
    """The completions table (log_completions): each completion's reward is serve.graders.grade's for its text and
    the item of its own line (so the items reach the reward function in the right order)."""
    import pandas as pd

    from serve.graders import grade

    table = pd.read_parquet(sorted((grpo_run / "completions").glob("*.parquet"))[-1])
    assert len(table) == 8
    for _, row in table.iterrows():
        item = json.loads(row["item"])
        assert item["id"] in row["prompt"][-1]["content"]  # the item of this prompt's line
        text = row["completion"][-1]["content"]
        assert row["grader"] == grade(CONTAINS, {"output_text": text}, item).reward


def test_a_python_grader_is_the_reward(tmp_path, tiny_model_dir, rl_data):
    """Two steps with OpenAI's python grader (run in serve.graders' sandbox, one process per completion)."""
    cfg = write_config(tmp_path / "py.yaml", tiny_model_dir, rl_data, tmp_path / "out", grader=PYTHON, max_steps=2,
                       eval_strategy="no", save_steps=100, log_completions=False)
    assert grpo_main("--config", str(cfg)) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["grader"]["type"] == "python" and summary["grader_calls"] == 16 and summary["grader_errors"] == {}
    train = [r for r in records(tmp_path / "out") if "loss" in r]
    assert len(train) == 2 and all(0.0 <= r["reward"] <= 1.0 and r["grader_error_rate"] == 0.0 for r in train)


def test_grader_errors_score_zero_and_are_counted_not_raised(tmp_path, tiny_model_dir, rl_data, capsys):
    """A python grader that raises on some answers: those completions score 0, the run goes on, and the errors
    are counted per OpenAI flag (metrics.jsonl grader_error_rate, summary.json grader_errors)."""
    flaky = {"type": "python", "name": "flaky", "source": "def grade(sample, item):\n"
             "    if item['answer'] == 'no':\n        raise ValueError('cannot grade ' + item['id'])\n    return 1.0\n"}
    cfg = write_config(tmp_path / "e.yaml", tiny_model_dir, rl_data, tmp_path / "out", grader=flaky, max_steps=2,
                       eval_strategy="no", save_steps=100, log_completions=False)
    assert grpo_main("--config", str(cfg)) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    errors = summary["grader_errors"]
    assert set(errors) == {"python_grader_runtime_error"} and summary["grader_calls"] == 16
    train = [r for r in records(tmp_path / "out") if "loss" in r]
    # half the prompts are "no": their completions error (reward 0), the others score 1
    assert sum(r["grader_error_rate"] for r in train) / 2 == pytest.approx(errors["python_grader_runtime_error"] / 16)
    assert all(r["reward"] == pytest.approx(1 - r["grader_error_rate"]) for r in train)
    err = capsys.readouterr().err
    assert err.count("warning: grader error python_grader_runtime_error: ValueError: cannot grade") == 1


def test_bad_graders_and_settings_are_one_line_naming_the_key(tmp_path, tiny_model_dir, rl_data, toy_data, capsys):
    cases = [
        ({"grader": {**CONTAINS, "operation": "equals"}}, "grader.operation: "),
        ({"grader": {"type": "multi", "name": "m", "graders": {"a": CONTAINS}, "calculate_output": "a +"}},
         "grader.calculate_output: "),
        ({"grader": {**PYTHON, "source": "def nope(:"}}, "grader.source: "),
        ({"grader": {**CONTAINS, "reference": "{{ item.label }}"}}, "grader: {{ item.label }} is not in train_file"),
        ({"grader": None}, "grader: required"),
        ({"train_file": str(toy_data / "train.jsonl")}, "train_file: "),  # a supervised (chat) file
        ({"method": "dpo"}, "method: 'dpo' is trained by train/dpo.py, not this script (train/grpo.py)"),
        ({"temperature": 0.0}, "temperature: 0.0"),
        ({"num_generations": 3}, "config: "),  # the batch of 8 completions is no whole number of groups
        ({"grader_backend": "azure"}, "grader_backend: 'azure'"),
    ]
    for i, (overrides, expected) in enumerate(cases):
        cfg = write_config(tmp_path / f"c{i}.yaml", tiny_model_dir, rl_data, tmp_path / f"o{i}", **overrides)
        assert grpo_main("--config", str(cfg)) == 2, overrides
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (overrides, err)
        assert not (tmp_path / f"o{i}").exists()
    # a grader on the command line: JSON text, or a file
    (tmp_path / "g.json").write_text(json.dumps({**CONTAINS, "type": "string_check_v2"}))
    cfg = write_config(tmp_path / "f.yaml", tiny_model_dir, rl_data, tmp_path / "of")
    assert grpo_main("--config", str(cfg), "--grader", str(tmp_path / "g.json")) == 2
    assert "grader.type: Invalid value for 'grader.type'" in capsys.readouterr().err


def test_pause_and_resume_reach_the_same_final_step(tmp_path, tiny_model_dir, rl_data):
    cfg = write_config(tmp_path / "p.yaml", tiny_model_dir, rl_data, tmp_path / "out", max_steps=4, eval_strategy="no",
                       save_steps=100, log_completions=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pause_requested").touch()
    assert grpo_main("--config", str(cfg)) == 0
    paused = json.loads((out / "paused.json").read_text())
    assert paused["step"] == 1 and paused["checkpoint"].endswith("checkpoint-1") and not (out / "summary.json").exists()
    (out / "pause_requested").unlink()
    assert grpo_main("--config", str(cfg)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-1") and summary["reward_last"] is not None
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    assert not (out / "paused.json").exists()


def test_tunekit_train_picks_train_grpo_from_the_method_key(tmp_path):
    from tunekit.cli import accelerate_command

    (tmp_path / "r.yaml").write_text("method: reinforcement\n")
    assert accelerate_command(tmp_path / "r.yaml")[-3].endswith("train/grpo.py")
    assert accelerate_command(ROOT / "configs/banking77/grpo_t4.yaml")[-3].endswith("train/grpo.py")


def test_every_grpo_profile_parses_and_passes_its_checks():
    import train.grpo as grpo

    for name in ("grpo_cpu", "grpo_t4"):
        script, training, model_args = grpo.parse(["--config", str(ROOT / f"configs/banking77/{name}.yaml")])
        assert script.method == "reinforcement" and script.grader["type"] == "string_check"
        assert training.generation_batch_size % training.num_generations == 0
        assert (training.fp16, training.bf16, model_args.load_in_4bit) == \
            ((True, False, True) if name == "grpo_t4" else (False, True, False))
    script, training, model_args = grpo.parse(["--config", str(ROOT / "configs/banking77/grpo_cpu.yaml")])
    problems = grpo.check_config(script, training, model_args)
    assert problems == [] and grpo.load_grader(script.grader, problems) == script.grader and problems == []
    assert model_args.model_name_or_path == ".cache/models/SmolLM2-135M-Instruct"  # the API's default base


def test_t4_profile_trains_fp32_lora_weights_on_a_4bit_model(tiny_model_dir, rl_data, tmp_path):
    """TRL's GRPOTrainer casts a quantized model's trainable parameters to bf16 (as SFTTrainer does), which fp16's
    GradScaler refuses; the trainer train/grpo.py builds holds them in fp32, LoRA weights only."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoTokenizer

    import train.grpo as grpo
    from train.chat_data import resolve_chat_template

    script, training, model_args = grpo.parse([
        "--config", str(ROOT / "configs/banking77/grpo_t4.yaml"), "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(rl_data / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
        "--gradient_checkpointing", "false", "--optim", "adamw_torch", "--grader", json.dumps(CONTAINS),
        "--eval_strategy", "no"])
    assert training.fp16 and not training.bf16 and model_args.load_in_4bit and model_args.dtype == "float16"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = resolve_chat_template(tok, None)
    rows, _ = grpo.load_prompts(str(rl_data / "train.jsonl"), "train_file")
    model = grpo.core.load_model(model_args, training)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    reward = grpo.GraderReward(grpo.load_grader(script.grader, []), script)
    trainer = grpo.build_trainer(script, training, model_args, model, tok, rows, None, reward)
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    assert trainer.optimizer is None
