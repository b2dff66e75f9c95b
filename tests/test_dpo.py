"""train/dpo.py on the tiny random Llama (CPU): OpenAI's DPO JSONL in, an adapter that prefers the preferred
answers out; DPO on top of a supervised adapter; pause and resume; the T4 profile's dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TOY

OTHER = {"yes": "no", "no": "yes"}
TUNEKIT = Path(sys.executable).parent / "tunekit"


def pair(q: str, a: str) -> dict:
    return {"input": {"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [{"role": "assistant", "content": OTHER[a]}]}


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pref_data")
    (d / "train.jsonl").write_text("".join(json.dumps(pair(q, a)) + "\n" for q, a in TOY * 4))
    (d / "valid.jsonl").write_text("".join(json.dumps(pair(q, a)) + "\n" for q, a in TOY))
    return d


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def write_config(path: Path, model: Path, data: Path, out: Path, **overrides) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/banking77/dpo_cpu.yaml").read_text())
    cfg.update(train_file=str(data / "train.jsonl"), valid_file=str(data / "valid.jsonl"), model_name_or_path=str(model),
               output_dir=str(out), max_length=64, num_threads=1, per_device_train_batch_size=8,
               per_device_eval_batch_size=8, learning_rate=5e-3, warmup_steps=0, lr_scheduler_type="constant",
               max_steps=20, logging_steps=5, eval_steps=10, save_steps=10, lora_r=16, lora_alpha=32)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def dpo_main(*argv: str) -> int:
    import train.dpo as dpo
    from tunekit.errors import run_main

    return run_main(dpo.main, list(argv))


def preference_rate(model_dir: Path, adapter: Path | None, rows: list[tuple[str, str]]) -> float:
    """How often the model gives the preferred answer a higher log-probability than the other one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    def logp(q: str, a: str) -> float:
        prompt = [{"role": "system", "content": "the"}, {"role": "user", "content": q}]
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": a}], tokenize=True,
                                       return_dict=True)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits.log_softmax(-1)[0, :-1]
        return float(sum(logits[i, full[i + 1]] for i in range(len(p) - 1, len(full) - 1)))

    return sum(logp(q, a) > logp(q, OTHER[a]) for q, a in rows) / len(rows)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, pref_data) -> Path:
    """One real run as users start it: `tunekit train CONFIG` picks train/dpo.py from `method: dpo`."""
    d = tmp_path_factory.mktemp("dpo_run")
    cfg = write_config(d / "dpo.yaml", tiny_model_dir, pref_data, d / "out")
    proc = subprocess.run([str(TUNEKIT), "train", str(cfg)], cwd=d, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d / "out"


def test_run_directory_and_metrics(dpo_run):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "summary.json", "loss.png", "reward_margin.png",
                 "reward_accuracy.png"):
        assert (dpo_run / name).exists(), name
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == 20 and summary["train_tokens"] > 0
    assert summary["adapter_rank"] == 16 and summary["trainable_dtypes"] == ["float32"]
    recs = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert all({"rewards/margins", "rewards/accuracies", "num_tokens"} <= set(r) for r in train)
    assert [r["step"] for r in recs if "eval_loss" in r] == [10, 20]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and train[-1]["rewards/margins"] > 0
    assert summary["eval_reward_accuracy_last"] == 1.0


def test_dpo_makes_the_model_prefer_the_preferred_answers(dpo_run, tiny_model_dir):
    before = preference_rate(tiny_model_dir, None, TOY)
    after = preference_rate(tiny_model_dir, dpo_run, TOY)
    assert after == 1.0 and before < 1.0, (before, after)


def test_dpo_on_top_of_an_adapter_starts_from_it_and_is_anchored_to_it(dpo_run, tmp_path, tiny_model_dir,
                                                                        pref_data):
    """With init_adapter, the policy starts as that adapter and the reference is its frozen copy: the first
    step's loss is -log sigmoid(0) = ln 2 (a fresh LoRA against the base would give the same, so the adapter
    here is an already-trained one, whose rewards against the base would not be 0)."""
    cfg = write_config(tmp_path / "dpo.yaml", tiny_model_dir, pref_data, tmp_path / "out", max_steps=4,
                       logging_steps=1, eval_strategy="no", save_steps=4, init_adapter=str(dpo_run),
                       learning_rate=1e-3)
    assert dpo_main("--config", str(cfg)) == 0
    recs = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    first = next(r for r in recs if "loss" in r)
    assert first["step"] == 1 and abs(first["loss"] - 0.693147) < 1e-3, first
    assert abs(first["rewards/margins"]) < 1e-3
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["init_adapter"] == str(dpo_run) and summary["adapter_rank"] == 16
    # the adapter it wrote is trained further, not a copy of the one it started from
    from safetensors.torch import load_file

    start, end = load_file(dpo_run / "adapter_model.safetensors"), load_file(tmp_path / "out/adapter_model.safetensors")
    assert start.keys() == end.keys() and any(not (start[k] == end[k]).all() for k in start)


def test_pause_at_a_fresh_checkpoint_then_resume_to_the_same_final_step(tmp_path, tiny_model_dir, pref_data):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "dpo.yaml", tiny_model_dir, pref_data, out, max_steps=6, logging_steps=1,
                       eval_strategy="no", save_steps=100)
    out.mkdir()
    (out / "pause_requested").touch()
    assert dpo_main("--config", str(cfg)) == 0
    paused = json.loads((out / "paused.json").read_text())
    assert paused["step"] == 1 and paused["checkpoint"].endswith("checkpoint-1") and not (out / "summary.json").exists()
    (out / "pause_requested").unlink()
    assert dpo_main("--config", str(cfg)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-1")
    plain = write_config(tmp_path / "plain.yaml", tiny_model_dir, pref_data, tmp_path / "plain", max_steps=6,
                         logging_steps=1, eval_strategy="no", save_steps=100)
    assert dpo_main("--config", str(plain)) == 0  # the tokens trained count the steps before the pause too
    assert summary["train_tokens"] == json.loads((tmp_path / "plain/summary.json").read_text())["train_tokens"] > 0
    assert not (out / "paused.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_files_and_settings_are_one_line_naming_the_key(tmp_path, tiny_model_dir, pref_data, toy_data, capsys):
    cases = [
        ({"train_file": str(toy_data / "train.jsonl")}, "train_file: "),  # a supervised (messages) file
        ({"beta": 0.0}, "beta: 0.0; use a value in (0, 2]"),
        ({"max_length": 8}, "max_length: 8 leaves no room for the answers"),
        ({"method": "sft"}, "method: 'sft' is trained by train/sft.py"),
        ({"init_adapter": str(tmp_path)}, "init_adapter: "),
    ]
    for i, (overrides, expected) in enumerate(cases):
        cfg = write_config(tmp_path / f"c{i}.yaml", tiny_model_dir, pref_data, tmp_path / f"o{i}", **overrides)
        assert dpo_main("--config", str(cfg)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (overrides, err)
        if "train_file" in overrides:
            assert f"{toy_data / 'train.jsonl'}:1:" in err[0] and "tunekit validate --method dpo" in err[0]


def test_tunekit_train_picks_the_script_from_the_method_key(tmp_path):
    from tunekit.cli import accelerate_command
    from tunekit.errors import UserError

    (tmp_path / "a.yaml").write_text("method: dpo\n")
    (tmp_path / "b.yaml").write_text("learning_rate: 1.0e-4\n")
    (tmp_path / "c.yaml").write_text("method: ppo\n")
    assert accelerate_command(tmp_path / "a.yaml")[-3].endswith("train/dpo.py")
    assert accelerate_command(tmp_path / "b.yaml")[-3].endswith("train/sft.py")
    assert accelerate_command(tmp_path / "b.yaml", ["--method", "dpo"])[-5].endswith("train/dpo.py")
    with pytest.raises(UserError, match="method: 'ppo'; use one of sft, dpo"):
        accelerate_command(tmp_path / "c.yaml")


def test_every_dpo_profile_parses_and_passes_its_checks():
    import train.dpo as dpo

    for name in ("dpo_cpu", "dpo_t4"):
        script, training, model_args = dpo.parse(["--config", str(ROOT / f"configs/banking77/{name}.yaml")])
        assert script.method == "dpo" and training.beta == 0.1 and training.loss_type == ["sigmoid"]
        assert (training.fp16, training.bf16) == ((True, False) if name == "dpo_t4" else (False, True))
    script, training, model_args = dpo.parse(["--config", str(ROOT / "configs/banking77/dpo_cpu.yaml")])
    assert dpo.check_config(script, training, model_args) == []


def test_t4_profile_trains_fp32_lora_weights_on_a_4bit_model(tiny_model_dir, pref_data, tmp_path):
    """TRL's DPOTrainer casts a quantized model's trainable parameters to bf16 (as SFTTrainer does), which
    fp16's GradScaler refuses; the trainer train/dpo.py builds holds them in fp32, LoRA weights only."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoTokenizer

    import train.dpo as dpo
    from train.chat_data import resolve_chat_template

    script, training, model_args = dpo.parse([
        "--config", str(ROOT / "configs/banking77/dpo_t4.yaml"), "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(pref_data / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
        "--gradient_checkpointing", "false", "--optim", "adamw_torch"])
    assert training.fp16 and not training.bf16 and model_args.load_in_4bit and model_args.dtype == "float16"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = resolve_chat_template(tok, None)
    training.chat_template_path = None
    rows = dpo.load_preference_jsonl(str(pref_data / "train.jsonl"), "train_file")
    model = dpo.core.load_model(model_args, training)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainer = dpo.build_trainer(script, training, model_args, model, tok, rows, rows[:8])
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    assert trainer.optimizer is None
