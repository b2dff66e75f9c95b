"""bench/gpu_check.py on a CPU machine: what runs without a GPU (the GPU stages need one; see its docstring)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

SCRIPT = ROOT / "bench/gpu_check.py"
CUDA_STUBS = """
import torch
torch.cuda.set_per_process_memory_fraction = lambda *a, **k: None
torch.cuda.get_device_properties = lambda i: type("Props", (), {"total_memory": 140 * 2**30})()
torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a: 2**20
"""


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def test_help_shows_the_command_and_the_offline_recipe():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("python bench/gpu_check.py --out results/", "pip download --no-deps", "trl==1.16.0",
                 "bitsandbytes==0.50.2", "pip install --no-index --no-deps wheels/*.whl", "RECORD",
                 "--steps", "--skip-stock", "--skip-serve", "--skip-dpo", "--memory-gib", "--out",
                 "4b. ours, DPO", "dpo_t4.yaml", "5b. stock, DPO", "not yet measured on a GPU"):
        assert text in proc.stdout, text


def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env=env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA is not available"), proc.stderr
    assert "NVIDIA GPU" in lines[0]
    assert proc.stdout == "" and not out.exists()


def test_qwen_config_is_qwen2_5_1_5b(gc):
    cfg = gc.qwen_config()
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == ("qwen2", 1536, 8960, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (12, 2, 151936)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps) == (32768, 1e-6)
    assert cfg.rope_parameters["rope_theta"] == 1000000.0  # transformers 5 keeps rope_theta in rope_parameters
    assert cfg.tie_word_embeddings and cfg.hidden_act == "silu"
    n = gc.count_parameters(cfg)  # meta device: no 1.5B weights in memory
    assert 1.53e9 < n < 1.55e9, n  # Qwen2.5-1.5B: 1.54B with tied embeddings
    assert n == 1_543_714_304


def test_conversations_are_valid_chat_jsonl_of_banking77_length(gc, tmp_path):
    from transformers import AutoTokenizer

    from data_prep.validate import check_example

    rows = gc.make_conversations(700)
    assert len(rows) == 700 and rows == gc.make_conversations(700)  # seeded
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for line in path.read_text().splitlines():
        assert check_example(json.loads(line)) == []
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]

    # the tokenizer as sft.py and vLLM load it from a qwen2 model folder: a Qwen2Tokenizer, same ids
    tok = gc.build_tokenizer()
    gc.qwen_config().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(loaded).__name__ == "Qwen2Tokenizer" and len(loaded) == len(tok) < 151936
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token is not None
    lengths = gc.chat_lengths(loaded, rows)
    assert 60 <= min(lengths) and max(lengths) <= 150, (min(lengths), max(lengths))
    assert lengths == gc.chat_lengths(tok, rows)
    # one token per word: the user's words are its tokens
    text = rows[0]["messages"][1]["content"]
    assert len(loaded(text, add_special_tokens=False)["input_ids"]) == len(text.split())
    # assistant_only_loss needs a mask over every answer with the training template sft.py picks
    template = (ROOT / "train/templates/smollm2_training.jinja").read_text()
    for r in rows[:50]:
        out = loaded.apply_chat_template(r["messages"], chat_template=template, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        answer = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert loaded.decode(answer) == r["messages"][2]["content"] + "<|im_end|>"


def test_preference_pairs_are_valid_dpo_jsonl_from_the_conversations(gc, tmp_path):
    from data_prep.preference import check_preference_example
    from train.dpo import load_preference_jsonl

    rows = gc.make_conversations(700)
    pairs = gc.make_preference_pairs(rows)
    assert len(pairs) == 700 and pairs == gc.make_preference_pairs(rows)  # seeded
    answers = {r["messages"][-1]["content"] for r in rows}
    for r, pair in zip(rows, pairs):
        assert check_preference_example(pair) == []
        assert pair["input"]["messages"] == r["messages"][:-1]  # system + user: the chat without its answer
        assert pair["preferred_output"] == [r["messages"][-1]]
        [other] = pair["non_preferred_output"]
        assert other["role"] == "assistant" and other["content"] in answers and other["content"] != r["messages"][-1]["content"]
    assert len({p["non_preferred_output"][0]["content"] for p in pairs}) > 300  # many different other answers
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    loaded = load_preference_jsonl(str(path), "train_file")  # what train/dpo.py trains on
    assert len(loaded) == 700 and [m["role"] for m in loaded[0]["prompt"]] == ["system", "user"]
    assert loaded[0]["chosen"][0]["content"] == rows[0]["messages"][2]["content"]


def test_dpo_configs_ours_is_the_t4_dpo_profile_and_stock_is_dpoconfig_defaults(gc, tmp_path):
    from train import dpo

    profile = yaml.safe_load((ROOT / "configs/banking77/dpo_t4.yaml").read_text())
    ours, stock = gc.dpo_configs(tmp_path / "d.jsonl", tmp_path / "m", tmp_path, 20, bnb=True)
    for key in ("method", "fp16", "bf16", "dtype", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                "lora_r", "lora_alpha", "lora_target_modules", "gradient_checkpointing", "optim", "beta", "loss_type",
                "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "learning_rate",
                "attn_implementation"):
        assert ours[key] == profile[key], key
    assert (ours["method"], ours["fp16"], ours["bf16"], ours["optim"]) == ("dpo", True, False, "paged_adamw_8bit")
    assert ours["max_steps"] == 20 and ours["logging_steps"] == 1 and ours["valid_file"] is None
    assert (stock["method"], stock["fp16"], stock["bf16"], stock["load_in_4bit"]) == ("dpo", True, False, True)
    assert stock["lora_r"] == 16 and stock["lora_target_modules"] == "all-linear"
    for key in ("optim", "gradient_checkpointing", "gradient_accumulation_steps", "per_device_train_batch_size",
                "learning_rate", "max_length", "beta", "loss_type", "lora_alpha"):
        assert key not in stock, key  # TRL's default
    assert len({ours["output_dir"], stock["output_dir"], *(c["output_dir"] for c in gc.train_configs(
        tmp_path / "t.jsonl", tmp_path / "m", tmp_path, 20, bnb=True))}) == 4
    # what train/dpo.py makes of them (fp16 needs CUDA to parse: the CPU's stand-in)
    resolved = {}
    for name, cfg in (("ours", ours), ("stock", stock)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "fp16": False, "use_cpu": True}))
        script, training, model_args = dpo.parse(["--config", str(tmp_path / f"{name}.yaml")])
        assert script.method == "dpo" and training.max_steps == 20 and model_args.lora_r == 16
        resolved[name] = training
    t = resolved["stock"]
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing) == (8, 1, True)
    assert str(getattr(t.optim, "value", t.optim)) == "adamw_torch_fused"
    assert (t.learning_rate, t.max_length, t.beta, t.loss_type) == (1e-6, 1024, 0.1, ["sigmoid"])
    t = resolved["ours"]
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (8, 4, 5e-5)
    ours16, stock16 = gc.dpo_configs(tmp_path / "d.jsonl", tmp_path / "m", tmp_path, 20, bnb=False)
    assert (ours16["load_in_4bit"], ours16["optim"], stock16["load_in_4bit"]) == (False, "adamw_torch", False)


def test_train_configs_ours_is_the_t4_profile_and_stock_is_trl_defaults(gc, tmp_path):
    profile = yaml.safe_load((ROOT / "configs/banking77/sft_t4.yaml").read_text())
    ours, stock = gc.train_configs(tmp_path / "t.jsonl", tmp_path / "m", tmp_path, 20, bnb=True)
    for key in ("fp16", "bf16", "dtype", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "lora_r",
                "lora_alpha", "lora_target_modules", "gradient_checkpointing", "optim", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "attn_implementation"):
        assert ours[key] == profile[key], key
    assert (ours["fp16"], ours["bf16"], ours["dtype"], ours["optim"]) == (True, False, "float16", "paged_adamw_8bit")
    assert ours["max_steps"] == 20 and ours["logging_steps"] == 1 and ours["valid_file"] is None
    assert (stock["fp16"], stock["bf16"], stock["load_in_4bit"], stock["per_device_train_batch_size"]) == (True, False, True, 16)
    assert stock["lora_r"] == 16 and stock["lora_target_modules"] == "all-linear"
    for key in ("optim", "gradient_checkpointing", "gradient_accumulation_steps", "learning_rate", "max_length"):
        assert key not in stock, key  # TRL's default
    assert ours["output_dir"] != stock["output_dir"]
    ours16, stock16 = gc.train_configs(tmp_path / "t.jsonl", tmp_path / "m", tmp_path, 20, bnb=False)
    assert (ours16["load_in_4bit"], ours16["optim"], stock16["load_in_4bit"]) == (False, "adamw_torch", False)


def test_steady_tokens_per_s_and_run_checks(gc):
    recs = [{"step": s, "loss": 2.0, "num_tokens": 100.0 * s, **({"tokens_per_s": 50.0} if s > 1 else {})}
            for s in range(1, 6)] + [{"step": 5, "train_loss": 2.0}]
    assert gc.steady_tokens_per_s(recs) == 50.0
    good = {"rc": 0, "summary": {"steps": 5, "trainable_dtypes": ["float32"]}, "losses": [2.0, 1.9],
            "probe": {"trainable_dtypes": {"torch.float32": 10}, "optimizer_dtypes": ["torch.float32"],
                      "bf16_parameters": 0, "mixed_precision": "fp16", "attn_implementation": "sdpa",
                      "bnb_4bit_layers": 196}}
    assert all(ok for _, ok, _ in gc.run_checks(good, 5, want_4bit=True))
    failing = {
        "losses finite": {**good, "losses": [2.0, math.nan]},
        "trainable fp32": {**good, "probe": {**good["probe"], "trainable_dtypes": {"torch.bfloat16": 10}}},
        "no bf16": {**good, "probe": {**good["probe"], "mixed_precision": "bf16"}},
        "finished": {**good, "rc": 1},
        "4-bit": {**good, "probe": {**good["probe"], "bnb_4bit_layers": 0}},
    }
    for name, run in failing.items():
        assert [n for n, ok, _ in gc.run_checks(run, 5, want_4bit=True) if not ok] == [name], name
    # DPO: the same checks plus a finite reward margin at every logged step
    dpo = {**good, "margins": [0.0, 0.03]}
    names = [n for n, _, _ in gc.run_checks(dpo, 5, want_4bit=True, dpo=True)]
    assert names == [n for n, _, _ in gc.run_checks(good, 5, want_4bit=True)] + ["reward margin finite"]
    assert all(ok for _, ok, _ in gc.run_checks(dpo, 5, want_4bit=True, dpo=True))
    for margins in ([], [0.0, math.inf], [math.nan]):
        assert [n for n, ok, _ in gc.run_checks({**dpo, "margins": margins}, 5, want_4bit=True, dpo=True)
                if not ok] == ["reward margin finite"], margins
    assert [n for n, ok, _ in gc.run_checks({**dpo, "losses": [math.nan]}, 5, True, dpo=True) if not ok] == ["losses finite"]


@pytest.mark.slow
def test_serving_settings_parse_with_vllms_own_parser(gc, tmp_path):
    from serve.vllm_server import CPU_VENV_PYTHON, VLLMServer, check_with_vllm

    if not CPU_VENV_PYTHON.exists():
        pytest.skip(f"{CPU_VENV_PYTHON} missing (make serve-setup)")
    gc.qwen_config().save_pretrained(tmp_path / "m")
    (tmp_path / "a").mkdir()
    (tmp_path / "a/adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]}))
    settings = gc.serve_settings(tmp_path / "m", tmp_path / "a", cap_gib=15.0, total_gib=139.8)
    cmd, _env = VLLMServer(settings).command()
    [engine] = check_with_vllm([cmd], str(CPU_VENV_PYTHON))
    assert engine["dtype"] == "half" and engine["enable_lora"] and engine["max_lora_rank"] == 16
    assert engine["enforce_eager"] is False and engine["quantization"] is None and engine["max_model_len"] == 512
    assert engine["gpu_memory_utilization"] == round(15.0 / 139.8, 3)
    assert "--enforce-eager" not in cmd and "--lora-modules" in cmd


@pytest.fixture(scope="module")
def tiny_model(gc, tmp_path_factory):
    """A 2-layer version of the random Qwen2 with the script's tokenizer, on CPU."""
    path = tmp_path_factory.mktemp("gpu_check") / "m"
    gc.build_model_dir(path, "cpu", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    return path


def cpu_stand_in(cfg: dict, batch: int = 4) -> dict:
    # one thread: the child imports torch before the script can ask for OMP_WAIT_POLICY=PASSIVE, and two
    # spinning OpenMP threads on 2 cores crawl as soon as anything else runs (2 steps: 27 s, against 3 s)
    return {**cfg, "fp16": False, "use_cpu": True, "per_device_train_batch_size": batch, "num_threads": 1}


@pytest.mark.slow
def test_the_model_folder_and_data_train_through_sft_py(gc, tiny_model, tmp_path, monkeypatch):
    """The GPU path on a CPU: a 2-layer version of the random Qwen2, the generated data, both configs with fp16
    off, through the script's own child process (CUDA calls stubbed) and the real train/sft.py."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gc.make_conversations(700)))
    ours, stock = gc.train_configs(tmp_path / "train.jsonl", tiny_model, tmp_path, 2, bnb=False)
    monkeypatch.setattr(gc, "CHILD", CUDA_STUBS + gc.CHILD)
    for name, cfg in (("ours", ours), ("stock", stock)):
        r = gc.run_training(gc.SFT_SCRIPT, name, cpu_stand_in(cfg), tmp_path, tmp_path, 15.0, timeout=600)
        assert r["rc"] == 0, "\n".join(r["log_tail"])
        checks = {n: (ok, d) for n, ok, d in gc.run_checks(r, 2, want_4bit=False)}
        assert checks["finished"][0] and checks["losses finite"][0] and checks["sdpa"][0], checks
        assert checks["trainable fp32"] == (True, "torch.float32"), checks
        assert r["probe"]["trainer"] == "SFTTrainer" and r["summary"]["method"] == "sft" and r["margins"] == []
        assert r["probe"]["bf16_parameters"] == 0 and r["probe"]["mixed_precision"] == "no"  # fp16 needs CUDA
        assert len(r["losses"]) == 2 and r["steady_tokens_per_s"] is None  # no step after the 2 warm-up ones
        assert (tmp_path / name / "adapter_config.json").exists()
    assert r["probe"]["optim"] == "adamw_torch_fused" and r["probe"]["gradient_checkpointing"] is True  # TRL's


@pytest.mark.slow
def test_the_preference_pairs_train_through_dpo_py(gc, tiny_model, tmp_path, monkeypatch):
    """Stage 4b on a CPU: the pairs made from the chats and ours (dpo_t4.yaml) with fp16 off, through the same
    child process and probe (CUDA calls stubbed) and the real train/dpo.py. (Stage 5b's stock config goes the
    same way; what train/dpo.py makes of it is checked above, which saves a second ~12 s child here.)"""
    pairs = gc.make_preference_pairs(gc.make_conversations(700))[:48]  # 2 steps take 16 (batch 2 x 4 accumulated)
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ours, _ = gc.dpo_configs(tmp_path / "dpo.jsonl", tiny_model, tmp_path, 2, bnb=False)
    monkeypatch.setattr(gc, "CHILD", CUDA_STUBS + gc.CHILD)
    r = gc.run_training(gc.DPO_SCRIPT, "ours-dpo", cpu_stand_in(ours, 2), tmp_path, tmp_path, 15.0, timeout=600)
    assert r["rc"] == 0, "\n".join(r["log_tail"])
    assert r["script"] == "train/dpo.py" and r["probe"]["trainer"] == "DPOTrainer"
    checks = {n: (ok, d) for n, ok, d in gc.run_checks(r, 2, want_4bit=False, dpo=True)}
    assert list(checks) == ["finished", "losses finite", "trainable fp32", "no bf16", "sdpa", "reward margin finite"]
    # "no bf16" also wants fp16 mixed precision, which needs CUDA: on the CPU only that part fails
    assert [n for n, (ok, _) in checks.items() if not ok] == ["no bf16"], checks
    assert checks["no bf16"][1] == "0 bf16 parameters, mixed precision no", checks
    assert checks["trainable fp32"] == (True, "torch.float32"), checks
    assert checks["reward margin finite"][1].startswith("2 logged"), checks
    assert len(r["losses"]) == 2 and len(r["margins"]) == 2 and all(math.isfinite(m) for m in r["margins"])
    s = r["summary"]
    assert s["method"] == "dpo" and s["steps"] == 2 and s["trainable_dtypes"] == ["float32"]
    assert s["train_tokens"] > 0 and s["tokens_per_s"] > 0 and math.isfinite(s["reward_margin_last"])
    assert (tmp_path / "ours-dpo/adapter_config.json").exists()
    p = r["probe"]
    assert "max_memory_allocated_mb" in p and p["bf16_parameters"] == 0  # the table's peak memory (stubbed here)
    assert (p["optim"], p["batch_size"], p["gradient_accumulation_steps"], p["gradient_checkpointing"]) == (
        "adamw_torch", 2, 4, True)  # the profile's accumulation and checkpointing (optim: no bitsandbytes here)
