"""train/recipe.py: how long to train (max_steps: auto, OpenAI's auto epochs; max_minutes, a time budget that
re-plans the learning-rate schedule) and class-balanced draws of skewed labels (balance_labels)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT


def write_rows(path: Path, answers: list[str]) -> Path:
    rows = [{"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": f"w{i % 100} w{i % 7}"},
                          {"role": "assistant", "content": a}]} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, train: Path, model: Path | str = ".cache/models/SmolLM2-135M-Instruct", **overrides):
    cfg = yaml.safe_load((ROOT / "configs/banking77/sft_cpu.yaml").read_text())
    cfg.update(train_file=str(train), valid_file=None, model_name_or_path=str(model), output_dir=str(path.parent / "o"),
               max_length=64, num_threads=1, eval_strategy="no", save_strategy="no", plots=False, shared_prefix=False)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_auto_steps_are_openais_auto_epochs_at_the_profiles_batch():
    from train.recipe import auto_epochs, auto_steps

    assert [auto_epochs(n) for n in (10, 20, 81, 480, 2950, 20_000)] == [10, 5, 3, 3, 3, 1]
    assert auto_steps(480, 16) == 90 and auto_steps(81, 8) == 33 and auto_steps(2950, 8) == 1107
    assert auto_steps(100, 8, accumulation=2) == 3 * 7  # 13 batches a epoch, 7 updates
    assert auto_steps(480, 16, processes=2) == 45 and auto_steps(480, 16, epochs=1) == 30


def test_max_steps_auto_from_the_yaml_or_a_flag_is_sized_from_the_train_file(tmp_path):
    from train import sft
    from tunekit.errors import UserError

    train = write_rows(tmp_path / "train.jsonl", ["yes", "no"] * 25)  # 50 examples: 3 epochs of 4 batches of 16
    cfg = write_config(tmp_path / "auto.yaml", train, max_steps="auto", per_device_train_batch_size=16)
    script, training, _ = sft.parse(["--config", str(cfg)])
    assert script.auto_steps and training.max_steps == -1  # resolved when the run starts: the file may come later
    assert sft.resolve_steps(script, training) == {"examples": 50, "epochs": 3, "steps": 12, "epochs_from": "auto"}
    assert training.max_steps == 12
    # a profile that names its epochs keeps them: auto sizes the steps from those (6 x 4 batches)
    six = write_config(tmp_path / "six.yaml", train, max_steps="auto", per_device_train_batch_size=16,
                       num_train_epochs=6)
    script, training, _ = sft.parse(["--config", str(six)])
    assert sft.resolve_steps(script, training) == {"examples": 50, "epochs": 6, "steps": 24, "epochs_from": "profile"}
    script, training, _ = sft.parse(["--config", str(six), "--num_train_epochs", "1.5"])  # the flag wins
    assert sft.resolve_steps(script, training)["steps"] == 6
    for flags, steps in ((["--max_steps", "7"], 7), (["--max-steps=auto", "--gradient_accumulation_steps", "2"], 6)):
        script, training, _ = sft.parse(["--config", str(cfg), *flags])  # the command line wins over the YAML
        sft.resolve_steps(script, training)
        assert training.max_steps == steps
    fixed = write_config(tmp_path / "fixed.yaml", train, max_steps=60)
    script, training, _ = sft.parse(["--config", str(fixed), "--max_steps", "auto"])
    assert sft.resolve_steps(script, training)["steps"] == 21  # batch 8: 7 batches a epoch
    script, training, _ = sft.parse(["--config", str(fixed), "--max_steps", "auto", "--train_file", "nope.jsonl"])
    with pytest.raises(UserError, match="train_file: cannot read nope.jsonl"):
        sft.resolve_steps(script, training)


def test_balance_is_decided_from_the_label_distribution():
    from train.recipe import decide_balance, label_skew
    from tunekit.errors import UserError

    sensors = ["no_action"] * 336 + ["shutdown", "inspect", "reduce", "maintain"] * 36
    assert label_skew(sensors)["entropy_ratio"] == pytest.approx(0.638, abs=0.001)
    assert decide_balance("auto", sensors)[0] and not decide_balance("off", sensors)[0]
    on, why = decide_balance("auto", ["a"] * 80 + ["b"] * 20)
    assert on and why.startswith("balance_labels auto: 2 labels, the most common ('a') 80% of 100, entropy 0.72")
    assert not decide_balance("auto", ["a"] * 75 + ["b"] * 25)[0]  # 0.81 of balanced: the file's own mix
    assert not decide_balance("auto", ["positive"] * 37 + ["negative"] * 33 + ["neutral"] * 11)[0]  # app_reviews
    assert decide_balance("on", ["positive"] * 37 + ["negative"] * 33 + ["neutral"] * 11)[0]
    texts = [f"a brief number {i}" for i in range(58)]
    assert decide_balance("auto", texts) == (False, "balance_labels auto: the answers are not labels (58 distinct)")
    with pytest.raises(UserError, match="balance_labels: on, but the train file's 58 answers are not labels"):
        decide_balance("on", texts)
    with pytest.raises(UserError, match="balance_labels: 'yes'; use one of auto, on, off"):
        decide_balance("yes", sensors)


def test_the_balanced_sampler_draws_every_label_alike_and_the_same_way_twice():
    from train.recipe import balanced_sampler

    labels = ["a"] * 28 + ["b"] * 6 + ["c"] * 4 + ["d"] * 2
    sampler = balanced_sampler(labels, seed=3)
    draws = [labels[i] for _ in range(100) for i in sampler]  # 100 epochs of 40 draws
    shares = {k: v / len(draws) for k, v in Counter(draws).items()}
    assert len(draws) == 4000 and all(abs(s - 0.25) < 0.03 for s in shares.values()), shares
    assert list(balanced_sampler(labels, seed=3)) == list(balanced_sampler(labels, seed=3))
    half = balanced_sampler(labels, seed=4, strength=0.5)  # square-root balancing: a label's share ~ sqrt(count)
    sqrt = Counter(labels[i] for _ in range(100) for i in half)
    counts = {"a": 28, "b": 6, "c": 4, "d": 2}
    expected = {k: c ** 0.5 / sum(n ** 0.5 for n in counts.values()) for k, c in counts.items()}
    assert all(abs(sqrt[k] / 4000 - share) < 0.03 for k, share in expected.items()), (sqrt, expected)  # a: 0.47


def test_skewed_labels_train_on_balanced_batches_and_a_time_budget_ends_the_schedule_early(
        tiny_model_dir, tmp_path, capsys):
    """The trainer build_trainer makes: its batches draw the rare answer as often as the common one; trained
    under max_minutes with a clock at 2 s a step, it stops where 1 minute ends, the cosine schedule at 0 there."""
    from train import core, recipe, sft

    train = write_rows(tmp_path / "train.jsonl", ["yes"] * 28 + ["no"] * 4)
    cfg = write_config(tmp_path / "c.yaml", train, tiny_model_dir, max_steps=40, warmup_steps=0,
                       lr_scheduler_type="cosine", logging_steps=10, learning_rate=1e-3)
    rows = sft.load_chat_jsonl(str(train), "train_file")
    first = {}
    for mode in ("off", "auto"):
        script, training, model_args = sft.parse(["--config", str(cfg), "--balance_labels", mode])
        tok, _ = core.prepare(script, training, model_args)
        trainer = sft.build_trainer(script, training, model_args, sft.load_model(model_args, training), tok, rows)
        no = tok.convert_tokens_to_ids("no")
        answers = [int(row[row != -100][0]) == no for _ in range(10) for batch in trainer.get_train_dataloader()
                   for row in batch["labels"]]
        first[mode] = sum(answers) / len(answers)
    assert first["off"] == 4 / 32  # the file's own mix, every epoch
    assert 0.35 < first["auto"] < 0.65, first
    assert "balance_labels auto: 2 labels, the most common ('yes') 88% of 32" in capsys.readouterr().out

    budget = recipe.TimeBudget(1.0, trainer, clock=lambda: 2.0 * trainer.state.global_step)
    trainer.add_callback(budget)
    trainer.train()
    assert trainer.state.global_step == 30 and trainer.state.max_steps == 30  # 10 steps in 20 s, then 40 s left
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # planned for 40: 0.146 x lr
    assert "max_minutes 1: 2.00 s a step, so 30 steps instead of 40" in capsys.readouterr().err
