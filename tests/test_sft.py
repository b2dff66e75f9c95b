"""train/sft.py on a tiny random Llama (CPU), launched the way users launch it: accelerate launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TOY

ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--quiet", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def write_config(path: Path, model: Path, data: Path, out: Path, **overrides) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/banking77/sft_cpu.yaml").read_text())
    cfg.update(train_file=str(data / "train.jsonl"), valid_file=str(data / "valid.jsonl"),
               model_name_or_path=str(model), output_dir=str(out), max_length=64, num_threads=1,
               per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2,
               warmup_steps=0, lr_scheduler_type="constant", max_steps=60, logging_steps=5,
               eval_steps=30, save_steps=30, lora_r=16, lora_alpha=32)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def sft_main(*argv: str) -> int:
    """train/sft.py's main() in this process, through the wrapper its command line uses (exit status, one line)."""
    import train.sft as sft
    from tunekit.errors import run_main

    return run_main(sft.main, list(argv))


def launch(config: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*ACCELERATE, str(ROOT / "train/sft.py"), "--config", str(config), *extra],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


TUNEKIT = Path(sys.executable).parent / "tunekit"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, toy_data) -> Path:
    """One real accelerate-launched run, shared by the checks below. It is launched as `tunekit train` from
    another directory, with kebab-case flags that override the config (60 steps logged every 5, where the
    config says 40 logged every step), so it is also test_tunekit_train_runs_from_any_directory's run: one
    launch (~25 s of imports on 2 cores) instead of two."""
    d = tmp_path_factory.mktemp("run")
    cfg = write_config(d / "cfg.yaml", tiny_model_dir, toy_data, d / "out", max_steps=40, logging_steps=1)
    work = d / "elsewhere"
    work.mkdir()
    proc = subprocess.run([str(TUNEKIT), "train", str(cfg), "--max-steps", "60", "--logging-steps", "5"], cwd=work,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d / "out"


def test_run_directory_holds_everything(trained):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "chat_template.jinja", "run_config.yaml", "metrics.jsonl", "summary.json", "loss.png",
                 "accuracy.png"):
        assert (trained / name).exists(), name
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["train_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["peak_cpu_rss_mb"] > 0 and summary["adapter_rank"] == 16
    recs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert all({"learning_rate", "mean_token_accuracy", "num_tokens"} <= set(r) for r in train)
    assert any("tokens_per_s" in r for r in train)
    assert [r["step"] for r in recs if "eval_loss" in r] == [30, 60]


def test_loss_falls(trained):
    recs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses


def test_adapter_is_servable(trained):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save") and cfg["r"] == 16
    names = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _generate(run_dir: Path, messages: list[dict], max_new_tokens: int = 20) -> tuple[str, bool]:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    stopped = tok.eos_token_id in new and len(new) < max_new_tokens
    return tok.decode(new, skip_special_tokens=True).strip(), stopped


def test_adapter_loads_generates_and_stops_by_itself(trained):
    right = 0
    for q, a in TOY:
        answer, stopped = _generate(trained, [{"role": "system", "content": "the"}, {"role": "user", "content": q}])
        assert stopped, f"no end-of-turn before max_new_tokens for {q!r}: {answer!r}"
        right += answer == a
    assert right >= 7


def test_saved_template_renders_like_the_models_own(trained, tiny_model_dir):
    from transformers import AutoTokenizer

    from train.sft import GEN_MARKERS

    served = AutoTokenizer.from_pretrained(trained)
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert GEN_MARKERS.search(served.chat_template)
    convos = [[{"role": "user", "content": "w1 w2"}],
              [{"role": "system", "content": "the"}, {"role": "user", "content": "w1"},
               {"role": "assistant", "content": "yes"}, {"role": "user", "content": "w2\nw3"}]]
    for msgs in convos:
        for gen in (True, False):
            assert served.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                base.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert served.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"] == \
                base.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]


def tiny_parts(tiny_model_dir, toy_data, n_rows: int, varied: bool = False):
    """The tiny model's tokenizer with its training template, the first ``n_rows`` toy rows (the second
    one's question made longer when ``varied``, so that a padded batch pads) and the model arguments
    load_model reads."""
    from transformers import AutoTokenizer

    from train.sft import load_chat_jsonl, resolve_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = resolve_chat_template(tok, None)
    rows = load_chat_jsonl(str(toy_data / "train.jsonl"), "train_file")[:n_rows]
    if varied:
        rows[1]["messages"][1]["content"] = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    model_args = type("M", (), {"dtype": "float32", "load_in_4bit": False, "load_in_8bit": False,
                                "model_name_or_path": str(tiny_model_dir), "model_revision": "main",
                                "attn_implementation": "sdpa"})()
    return tok, rows, model_args


def test_only_assistant_tokens_carry_labels(tiny_model_dir, toy_data, tmp_path):
    """The collated batch of a rendered example: labels only on the reply and its end-of-turn."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from train.sft import load_model

    tok, rows, model_args = tiny_parts(tiny_model_dir, toy_data, 2)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True,
                     max_length=64, report_to="none")
    trainer = SFTTrainer(model=load_model(model_args, args), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained_tokens = [tok.convert_ids_to_tokens(i) for i, l in zip(ids, labels) if l != -100]
    assert trained_tokens == ["yes", "<|im_end|>"]


def test_padding_free_batch_has_the_padded_batchs_loss(tiny_model_dir, toy_data, tmp_path):
    """padding_free concatenates the batch into one row with no attention mask; under sdpa the examples
    must still not see each other (transformers masks them apart by position_ids), so the loss and the
    gradients are the padded batch's, while no padding token is computed."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from train.sft import load_model

    tok, rows, model_args = tiny_parts(tiny_model_dir, toy_data, 3, varied=True)
    results = {}
    for padding_free in (False, True):
        args = SFTConfig(output_dir=str(tmp_path / str(padding_free)), use_cpu=True, bf16=False,
                         assistant_only_loss=True, padding_free=padding_free,
                         max_length=None if padding_free else 64, report_to="none")
        trainer = SFTTrainer(model=load_model(model_args, args), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grad = next(p.grad for n, p in trainer.model.named_parameters() if "q_proj" in n and p.requires_grad)
        results[padding_free] = (batch["input_ids"].shape, loss.item(), grad.clone())
    (padded_shape, padded_loss, padded_grad), (free_shape, free_loss, free_grad) = results[False], results[True]
    assert padded_shape[0] == 3 and free_shape[0] == 1 and free_shape[1] < padded_shape[0] * padded_shape[1]
    assert free_loss == pytest.approx(padded_loss, rel=1e-5)
    torch.testing.assert_close(free_grad, padded_grad, rtol=1e-4, atol=1e-6)


def test_shared_prefix_once_per_batch_gives_the_plain_batchs_loss_and_gradients(tiny_model_dir, toy_data, tmp_path):
    """shared_prefix: the system message every row starts with runs once, its keys/values repeated across
    the batch; TRL's own loss (fused LM head) and the LoRA gradients must be those of the plain batch."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from train.shared_prefix import enable, shared_prefix_length
    from train.sft import load_model

    tok, rows, model_args = tiny_parts(tiny_model_dir, toy_data, 3, varied=True)
    results = {}
    for shared in (False, True):
        args = SFTConfig(output_dir=str(tmp_path / str(shared)), use_cpu=True, bf16=False, assistant_only_loss=True,
                         max_length=64, report_to="none")
        torch.manual_seed(0)  # the same LoRA initialisation both times
        trainer = SFTTrainer(model=load_model(model_args, args), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=LoraConfig(r=8, target_modules="all-linear",
                                                                          init_lora_weights=False))
        decoder = trainer.model.get_base_model().base_model
        if shared:
            enable(decoder, min_tokens=1)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[shared] = (loss.item(), grads, getattr(decoder, "shared_prefix_tokens", None))
    n = shared_prefix_length(batch["input_ids"], batch["attention_mask"])
    assert n >= 4 and results[True][2] == n and results[False][2] is None  # the shared path ran, on the prefix
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_shared_prefix_length_stops_at_padding_and_leaves_a_position():
    import torch

    from train.shared_prefix import shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert shared_prefix_length(ids, mask) == 3
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert shared_prefix_length(same, torch.ones_like(same)) == 2  # one position left for the rest pass
    left_padded = torch.tensor([[0, 5, 6], [5, 6, 7]])
    assert shared_prefix_length(left_padded, torch.tensor([[0, 1, 1], [1, 1, 1]])) == 0


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_checkpoint(tiny_model_dir, toy_data, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", max_steps=40,
                       save_steps=10, eval_strategy="no", logging_steps=1)
    proc = subprocess.Popen([*ACCELERATE, str(ROOT / "train/sft.py"), "--config", str(cfg)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "out/checkpoint-20/trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out/summary.json").exists()
    again = launch(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    state = json.loads((tmp_path / "out/checkpoint-40/trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, 41))
    metrics = [json.loads(line)["step"] for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)]
    assert metrics == list(range(1, 41))
    assert json.loads((tmp_path / "out/summary.json").read_text())["resumed_from"].endswith("checkpoint-20") or \
        json.loads((tmp_path / "out/summary.json").read_text())["resumed_from"].endswith("checkpoint-30")


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [
    ({"train_file": "nope.jsonl"}, "train_file: nope.jsonl not found"),
    ({"bf16": True, "use_cpu": False}, "bf16: this machine has no GPU with bf16"),
    ({"fp16": True, "bf16": False}, "fp16: mixed precision fp16 needs a CUDA GPU"),
    ({"max_length": 8}, "max_length: 8 is shorter than"),
    ({"lora_r": 128}, "lora_r: 128 is above max_server_lora_rank 64"),
    ({"lora_modules_to_save": ["lm_head"]}, "lora_modules_to_save: vLLM refuses"),
    ({"padding_free": True, "attn_implementation": "flex_attention"}, "padding_free: needs attn_implementation"),
    ({"padding_free": True, "max_length": 8, "max_truncated_fraction": 1.0},
     "padding_free: 32 train example(s) are longer than max_length 8"),
])
def test_bad_config_fails_fast_naming_the_key(overrides, expected, tiny_model_dir, toy_data, tmp_path, capsys):
    """In-process through the script's own wrapper (a process per case cost ~15 s of imports each;
    the command line itself is covered by the accelerate-launch case below)."""
    import train.sft as sft
    from tunekit.errors import run_main

    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", **overrides)
    assert run_main(sft.main, ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_bf16_is_kept_only_where_the_cpu_has_it(native_bf16, monkeypatch, capsys):
    """bf16 autocast on a CPU without AVX512-BF16/AMX is emulated (far slower than fp32): fp32 instead, said aloud."""
    import train.sft as sft

    script, training, model = sft.parse(["--config", str(ROOT / "configs/banking77/sft_cpu.yaml")])
    assert training.bf16 and training.mixed_precision == "bf16"
    monkeypatch.setattr("train.core.cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert sft.check_config(script, training, model) == []
    assert training.bf16 is native_bf16
    assert training.mixed_precision == ("bf16" if native_bf16 else "no")
    assert ("training in fp32 instead" in capsys.readouterr().err) is not native_bf16


@pytest.mark.slow
def test_bad_config_under_accelerate_launch_is_one_line_too(tiny_model_dir, toy_data, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", lora_r=128)
    proc = launch(cfg)
    assert proc.returncode != 0 and "error: lora_r: 128 is above max_server_lora_rank" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_malformed_dataset_is_named_with_its_line(tiny_model_dir, toy_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((toy_data / "train.jsonl").read_text() + '{"messages": [{"role": "user"}]}\nnot json\n')
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", train_file=str(bad))
    proc = subprocess.run([sys.executable, str(ROOT / "train/sft.py"), "--config", str(cfg)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{bad}:33: message_missing_key" in proc.stderr
    assert f"{bad}:34: invalid_json" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_is_an_error(tiny_model_dir, toy_data, tmp_path, capsys):
    """In-process through the script's wrapper, as test_bad_config_fails_fast_naming_the_key (the script's own
    exit status 2 is test_malformed_dataset_is_named_with_its_line's)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", learning_rat=0.1)
    assert sft_main("--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "Traceback" not in err


def test_every_config_yaml_parses_against_its_dataclasses():
    from data_prep.build import BuildConfig
    from tunekit.config import load_config
    from train.sft import parse

    seen = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        if path.parent.name == "accelerate":
            assert first.startswith("# accelerate launch --config_file configs/accelerate/"), path
            assert yaml.safe_load(path.read_text())["distributed_type"] in ("MULTI_GPU", "FSDP")
        elif path.name == "build.yaml":
            assert first == f"# python -m data_prep build --config {path.relative_to(ROOT)}", path
            load_config(BuildConfig, path)
        elif path.name.startswith("sft_"):
            assert first.startswith("# accelerate launch") and str(path.relative_to(ROOT)) in first, path
            script, training, model = parse(["--config", str(path)])
            assert training.assistant_only_loss and model.use_peft
            if path.name == "sft_t4.yaml":
                assert training.fp16 and not training.bf16 and model.load_in_4bit
                assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
                assert model.attn_implementation == "sdpa" and training.optim == "paged_adamw_8bit"
                assert training.gradient_checkpointing and model.lora_target_modules == "all-linear"
        else:
            continue
        seen += 1
    assert seen >= 9
    from tunekit.constants import PRICES_FILE

    assert yaml.safe_load(PRICES_FILE.read_text())["training"]["gpt-4o-mini-2024-07-18"] == 3.0


def test_merge_gives_the_same_model_as_base_plus_adapter(trained, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    proc = subprocess.run([sys.executable, "-m", "train.merge", str(trained), "--out", str(tmp_path / "merged")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[2, 5, 210, 3, 2, 6]])
    with torch.no_grad():
        a = AutoPeftModelForCausalLM.from_pretrained(trained).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not (tmp_path / "merged/adapter_config.json").exists()
    bad = subprocess.run([sys.executable, "-m", "train.merge", str(tmp_path), "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_finished_run_is_kept_but_not_mistaken_for_another_step_count(tiny_model_dir, toy_data, tmp_path, capsys):
    """A finished output_dir is reused as is for the same max_steps, and refused (not silently reused) for others."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"steps": 40}))
    (out / "adapter_config.json").write_text("{}")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, out, max_steps=40)
    # in-process through the script's wrapper (two processes cost ~40 s of imports; the decision is main()'s)
    assert sft_main("--config", str(cfg)) == 0
    printed = capsys.readouterr()
    assert "already holds a finished run" in printed.out, printed.err[-2000:]
    assert sft_main("--config", str(cfg), "--max_steps", "60") == 2
    err = capsys.readouterr().err
    assert "holds a finished run of 40 steps and this one asks for max_steps 60" in err
    assert "Traceback" not in err
    assert json.loads((out / "summary.json").read_text()) == {"steps": 40}  # kept as it was


# ----------------------------------------------------------------------------- the T4 path on this CPU


def t4_profile(tiny_model_dir, toy_data, tmp_path, *extra):
    """configs/banking77/sft_t4.yaml as train/sft.py parses it, pointed at the tiny model and toy data."""
    import train.sft as sft

    return sft.parse(["--config", str(ROOT / "configs/banking77/sft_t4.yaml"), "--model_name_or_path",
                      str(tiny_model_dir), "--train_file", str(toy_data / "train.jsonl"), "--valid_file",
                      str(toy_data / "valid.jsonl"), "--output_dir", str(tmp_path / "out"), *extra])


def test_t4_profile_trains_fp32_lora_weights_on_a_4bit_model(tiny_model_dir, toy_data, tmp_path):
    """TRL casts a quantized model's trainable parameters to bf16, which fp16's GradScaler refuses at the
    first optimizer step; the trainer train/sft.py builds holds them in fp32."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoTokenizer

    import train.sft as sft

    script, training, model_args = t4_profile(tiny_model_dir, toy_data, tmp_path)
    assert training.fp16 and not training.bf16 and model_args.load_in_4bit and model_args.dtype == "float16"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = sft.resolve_chat_template(tok, None)
    training.chat_template_path = None
    rows = sft.load_chat_jsonl(str(toy_data / "train.jsonl"), "train_file")
    model = sft.load_model(model_args, training)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the T4 profile loads the base in 4-bit"
    trainer = sft.build_trainer(script, training, model_args, model, tok, rows, rows[:8])
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    assert trainer.optimizer is None  # cast before the optimizer exists: it will hold the fp32 parameters


def mock_gpu(monkeypatch, name: str, capability: tuple[int, int]):
    """A CUDA device as torch reports it; is_bf16_supported() counts emulation, so it is True on a T4 too."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda device=None: name)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)


BF16 = {"training": {"bf16": True, "fp16": False}, "model": {"dtype": "bfloat16",
                                                           "bnb_4bit_compute_dtype": "bfloat16"}}


@pytest.mark.parametrize("key, expected", [
    ("bf16", "bf16: Tesla T4 (compute capability 7.5) has no bf16 (it needs compute capability 8.0"),
    ("dtype", "dtype: Tesla T4 (compute capability 7.5) has no bf16; set dtype: float16"),
    ("bnb_4bit_compute_dtype", "bnb_4bit_compute_dtype: Tesla T4 (compute capability 7.5) has no bf16; set "
                               "bnb_4bit_compute_dtype: float16"),
])
def test_bf16_is_refused_on_a_turing_gpu_naming_the_key(key, expected, tiny_model_dir, toy_data, tmp_path,
                                                        monkeypatch):
    """On a T4, torch.cuda.is_bf16_supported() says True (emulation counts): the check reads the capability."""
    import train.sft as sft

    script, training, model_args = t4_profile(tiny_model_dir, toy_data, tmp_path)  # parsed before the mock
    for section, obj in (("training", training), ("model", model_args)):
        for name, value in BF16[section].items():
            if name == key or (key == "bf16" and name == "fp16"):
                setattr(obj, name, value)
    mock_gpu(monkeypatch, "Tesla T4", (7, 5))
    problems = sft.check_config(script, training, model_args)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_t4_profile_passes_on_a_turing_gpu_and_bf16_on_ampere(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    import train.sft as sft

    t4 = t4_profile(tiny_model_dir, toy_data, tmp_path)
    ampere_bf16 = t4_profile(tiny_model_dir, toy_data, tmp_path)
    for section, obj in zip(("training", "model"), ampere_bf16[1:]):
        for name, value in BF16[section].items():
            setattr(obj, name, value)
    mock_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert sft.check_config(*t4) == []
    assert len(sft.check_config(*ampere_bf16)) == 3
    mock_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    assert sft.check_config(*ampere_bf16) == []


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_the_cause(tiny_model_dir, toy_data, tmp_path, capsys):
    """A real run (2 steps of the tiny model), in-process through the script's wrapper: a process would add
    ~20 s of imports to a second of training."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, toy_data, tmp_path / "out", learning_rate=1e30,
                       logging_steps=1, max_steps=10, eval_strategy="no", save_steps=100)
    rc = sft_main("--config", str(cfg))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line and "training loss is 0.0 with a non-finite entropy of the logits at step 2" in line[0], line
    assert "likely a learning rate far too high" in line[0] and "lower learning_rate" in line[0], line
    assert "Traceback" not in err and not (tmp_path / "out/summary.json").exists()


def test_hardware_report_stops_without_cuda_naming_the_fix():
    """What the notebook runs after its install: on this CPU-only torch it must stop, saying why."""
    proc = subprocess.run([sys.executable, "-m", "train.hardware", "--require-cuda"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "torch 2.13.0" in proc.stdout
    assert proc.stderr.startswith("error: CUDA is not usable: torch is a CPU build") and "T4 GPU" in proc.stderr
    assert subprocess.run([sys.executable, "-m", "train.hardware"], cwd=ROOT, env=env(), capture_output=True,
                          timeout=120).returncode == 0


def test_tunekit_train_runs_from_any_directory_with_kebab_case_flags(trained):
    """`trained` is `tunekit train CFG --max-steps 60 --logging-steps 5` run from another directory; its config
    says 40 steps, logged every step."""
    cfg = yaml.safe_load((trained.parent / "cfg.yaml").read_text())
    assert (cfg["max_steps"], cfg["logging_steps"]) == (40, 1)
    assert json.loads((trained / "summary.json").read_text())["steps"] == 60
    run_config = yaml.safe_load((trained / "run_config.yaml").read_text())["training"]
    assert (run_config["max_steps"], run_config["logging_steps"]) == (60, 5)
    assert not list((trained.parent / "elsewhere").iterdir())  # nothing written where it ran from
