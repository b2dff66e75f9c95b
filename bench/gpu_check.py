"""GPU check of the T4 training path: train/sft.py's and train/dpo.py's T4 profiles on any NVIDIA GPU, emulating a T4.

    python bench/gpu_check.py --out results/      # no network; exit 0 = everything that ran passed
    python bench/gpu_check.py --skip-serve --steps 10 --out results/     # all four training runs (~10 min budget)
    python bench/gpu_check.py --skip-stock --skip-serve --skip-dpo --steps 10       # the quickest useful run

How long the default run takes (20 steps a run, all four training runs, vLLM): not yet measured on a GPU.
Before the DPO legs this docstring gave ~5-8 min; each DPO leg adds a child process, a 4-bit load of the
model and its steps (ours: 32 pairs a step, 8 x 4 accumulated; stock: 8 pairs a step). The
``--skip-serve --steps 10`` line is the one meant for a ~10 minute device budget on an H100: also not yet
measured on a GPU.

Stages, one printed line each (every figure goes to the JSON of ``--out``, a .json path or a folder;
the runs' logs to gpu_check_logs/ beside it):
  1. device: GPU, compute capability, driver, torch and its CUDA; exit 2 without CUDA.
  2. T4 emulation: fp16 only (no bf16 anywhere: both recipes set fp16, and no parameter may be bf16), a
     ``--memory-gib`` cap per process (torch.cuda.set_per_process_memory_fraction), SDPA. Kernels are
     still this GPU's: precision and memory are checked, not T4 speed or Turing kernels.
  3. a random Qwen2 of Qwen2.5-1.5B-Instruct's shape (1.54B parameters, fp16), a small BPE tokenizer
     with a ChatML template, 700 random chats of 66-149 tokens.
  4. ours: train/sft.py with configs/banking77/sft_t4.yaml: finite losses, fp32 trainable parameters
     (model, optimizer, summary.json), no bf16, fp16 mixed precision, SDPA, 4-bit layers.
  4b. ours, DPO: train/dpo.py with configs/banking77/dpo_t4.yaml on 700 preference pairs (OpenAI's DPO
     JSONL) made from the chats: prompt = the chat without its answer, preferred = that answer,
     non-preferred = another chat's answer. The checks of 4, plus a finite reward margin
     (metrics.jsonl's rewards/margins) at every logged step.
  5. stock: TRL's defaults plus fp16 (QLoRA r16 all-linear, batch 16, no accumulation); tokens/s and
     peak GPU memory of both side by side (out of memory there is a finding, not a failure).
  5b. stock, DPO: TRL's DPOConfig defaults plus fp16 with the same QLoRA (what `trl dpo` runs: batch 8, no
     accumulation, gradient checkpointing on, which DPOConfig defaults to, beta 0.1 sigmoid, learning rate
     1e-6, max_length 1024), through train/dpo.py as 5 goes through train/sft.py; tokens/s and peak GPU
     memory beside 4b's (out of memory a finding, not a failure). DPO tokens/s count TRL's num_tokens
     (prompt + chosen and prompt + rejected), so compare them with each other, not with SFT's.
  6. vLLM where importable: the adapter of 4 on the fp16 base under the cap, one chat request, the backend.
All four training runs go through the same capped child process and probe (runpy of the script as
__main__); ours run before the stock recipes. ``--skip-stock`` skips 5 and 5b, ``--skip-dpo`` 4b and 5b.

Offline install (a GPU machine with torch, transformers, peft and accelerate, but no trl, bitsandbytes,
vllm or network). On a Linux x86-64 machine with network, PY = the GPU machine's Python (e.g. 3.12):

    pip download --no-deps --only-binary=:all: --python-version PY --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d wheels \\
        trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 \\
        python-dateutil==4.0.0 tzdata==2026.6 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0

(trl 1.16 covers DPO too: train/dpo.py needs nothing more than train/sft.py. trl 1.16 needs datasets,
pandas, pyarrow besides what transformers/peft/accelerate bring; datasets
needs dill, multiprocess, xxhash; pandas needs python-dateutil, which needs tzdata; versions as in
requirements/constraints.txt. On the GPU machine this script names whatever is still missing.) Then:

    pip install --no-index --no-deps wheels/*.whl
    python bench/gpu_check.py --out results/

The wheels come to ~110 MB (pyarrow 55, bitsandbytes 43). The bitsandbytes wheel holds one library per
CUDA version; trimmed to the one for the GPU machine's torch.version.cuda (12.8 ->
libbitsandbytes_cuda128.so; stage 1 prints the name) it is 7 MB. A wheel is a zip; with ``pip install wheel``:

    python -m wheel unpack wheels/bitsandbytes-0.50.2-*.whl -d bnb && rm wheels/bitsandbytes-0.50.2-*.whl
    find bnb/bitsandbytes-0.50.2/bitsandbytes -name 'libbitsandbytes_*.so' \\
        ! -name libbitsandbytes_cuda128.so ! -name libbitsandbytes_cpu.so -delete
    python -m wheel pack bnb/bitsandbytes-0.50.2 -d wheels        # writes a new RECORD

Without the wheel tool: unzip it, delete the same files, and copy bitsandbytes/ and
bitsandbytes-0.50.2.dist-info/ into the GPU machine's site-packages (pip cannot install an unpacked
wheel folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
T4_PROFILE = ROOT / "configs/banking77/sft_t4.yaml"
DPO_PROFILE = ROOT / "configs/banking77/dpo_t4.yaml"
SFT_SCRIPT, DPO_SCRIPT = "train/sft.py", "train/dpo.py"
CHATML = ROOT / "train/templates/smollm2.jinja"
# Qwen2.5-1.5B-Instruct's config.json
QWEN2_5_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
                    initializer_range=0.02, use_sliding_window=False)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES][::5]  # 2,000 made-up words, one token each
# what trl 1.16, sft.py and dpo.py need beyond torch, transformers, peft and accelerate
NEEDED = ["trl", "bitsandbytes", "datasets", "pyarrow", "pandas", "python-dateutil", "tzdata", "dill",
          "multiprocess", "xxhash", "fsspec", "psutil", "jinja2", "pyyaml"]

# A training process: cap the CUDA allocator, answer torch.cuda.is_bf16_supported() as a T4 does (True
# counting emulation, False for native bf16), record what the trainer trains in (any transformers Trainer:
# SFTTrainer, DPOTrainer), run the training script as __main__, write the peak GPU memory.
# argv: cap_gib, stats_path, the script (train/sft.py, train/dpo.py), then the script's arguments.
CHILD = r"""
import collections, json, runpy, sys, torch
cap_gib, stats_path, script, args = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
torch.cuda.is_bf16_supported = lambda including_emulation=True: including_emulation  # a T4's answers
stats = {}
def dump():
    stats.update(max_memory_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                 max_memory_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    with open(stats_path, "w") as f:
        json.dump(stats, f)
import transformers
from transformers import TrainerCallback
class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        dtypes = collections.Counter()
        for p in (p for p in model.parameters() if p.requires_grad):
            dtypes[str(p.dtype)] += p.numel()
        stats.update(trainable_dtypes=dtypes,
                     optimizer_dtypes=sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"]}),
                     bf16_parameters=sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16),
                     attn_implementation=getattr(model.config, "_attn_implementation", None),
                     bnb_4bit_layers=sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules()),
                     bnb_compute_dtypes=sorted({str(m.compute_dtype) for m in model.modules()
                                                if type(m).__module__.startswith("bitsandbytes")
                                                and getattr(m, "compute_dtype", None) is not None}))
        dump()
train = transformers.Trainer.train  # neither TRL trainer overrides it
def probed_train(self, *a, **k):
    stats.update(trainer=type(self).__name__, mixed_precision=str(self.accelerator.mixed_precision),
                 optim=str(getattr(self.args.optim, "value", self.args.optim)),
                 batch_size=self.args.per_device_train_batch_size,
                 gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                 gradient_checkpointing=bool(self.args.gradient_checkpointing))
    self.add_callback(Probe())
    return train(self, *a, **k)
transformers.Trainer.train = probed_train
sys.argv = [script, *args]
code = 1
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    dump()
sys.exit(code)
"""


def qwen_config(**extra):
    """transformers.Qwen2Config with Qwen2.5-1.5B-Instruct's dimensions (no download)."""
    from transformers import Qwen2Config

    return Qwen2Config(**{**QWEN2_5_1_5B, **extra})


def count_parameters(config) -> int:
    """Parameters of a causal LM built from ``config`` on the meta device (no memory; tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def build_tokenizer():
    """A byte-level BPE tokenizer trained here on WORDS, with SmolLM2's ChatML template. A Qwen2Tokenizer,
    since AutoTokenizer loads the tokenizer of any qwen2 model folder as one, whatever tokenizer_config says."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = ["system", "user", "assistant", *WORDS]
    bpe.train_from_iterator([" ".join(words), "\n".join(words)],  # every word with and without a space before
                            trainers.BpeTrainer(vocab_size=50_000, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe_model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                         eos_token="<|im_end|>")
    tok.add_tokens([AddedToken("<|im_start|>", special=True)], special_tokens=True)
    tok.chat_template = CHATML.read_text(encoding="utf-8")
    return tok


def make_conversations(n: int = 700, seed: int = 0) -> list[dict]:
    """Random banking77-sized chats: a fixed 36-word system prompt, a 12-90 word question and a 3-8 word
    answer (66-149 tokens with the ChatML markers)."""
    rng = random.Random(seed)
    system = " ".join(rng.choices(WORDS, k=36))
    return [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(12, 90)))},
                          {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))}]}
            for _ in range(n)]


def make_preference_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """OpenAI's DPO JSONL rows from chats: prompt = the chat without its last (assistant) turn, preferred = that
    turn, non-preferred = the answer of another, randomly chosen chat (never the same text)."""
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        answer = r["messages"][-1]
        other = answer
        while other["content"] == answer["content"]:
            other = rows[(i + rng.randrange(1, len(rows))) % len(rows)]["messages"][-1]
        pairs.append({"input": {"messages": r["messages"][:-1]}, "preferred_output": [dict(answer)],
                      "non_preferred_output": [dict(other)]})
    return pairs


def chat_lengths(tok, rows: list[dict]) -> list[int]:
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def build_model_dir(model_dir: Path, device: str = "cuda", **dims) -> tuple[int, object]:
    """Save a random fp16 Qwen2 (Qwen2.5-1.5B's shape unless ``dims`` say otherwise) and the tokenizer as a
    model folder that train/sft.py and vLLM load; returns (parameters, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    config = qwen_config(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16, attn_implementation="sdpa")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters()), tok


def device_report() -> dict | str:
    """The GPU and versions (train.hardware's report, plus what this check needs), or a one-line reason why
    there is no CUDA."""
    import torch
    from importlib.metadata import PackageNotFoundError, version

    from train.hardware import gpu_report

    report = gpu_report()
    if not report["cuda_available"]:
        if report["torch_cuda"] is None:
            return (f"CUDA is not available: torch {torch.__version__} is a CPU-only build; this check needs an "
                    "NVIDIA GPU and a CUDA build of torch")
        return (f"CUDA is not available: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no NVIDIA GPU "
                f"or driver (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")

    def installed(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    versions = {d: installed(d) for d in ["transformers", "peft", "accelerate", "vllm", *NEEDED]}
    cuda = report["torch_cuda"]
    return {"gpu": report["gpu"], "capability": report["compute_capability"], "driver": report["driver"] or "unknown",
            "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2),
            "torch": report["torch"], "torch_cuda": cuda,
            "bnb_library": f"libbitsandbytes_cuda{cuda.replace('.', '')}.so", "versions": versions}


def train_configs(train_file: Path, model_dir: Path, work: Path, steps: int, bnb: bool) -> tuple[dict, dict]:
    """sft.py configs: ours = the T4 profile as it is; stock = TRL's defaults plus what a T4 needs (fp16, no
    bf16, float16, sdpa), QLoRA r16 all-linear, batch 16, no accumulation. Both on the same model and data."""
    profile = yaml.safe_load(T4_PROFILE.read_text())
    common = dict(train_file=str(train_file), valid_file=None, model_name_or_path=str(model_dir), max_steps=steps,
                  eval_strategy="no", save_strategy="no", logging_steps=1, plots=False, report_to="none", seed=42)
    ours = {**profile, **common, "output_dir": str(work / "ours")}
    if not bnb:
        ours.update(load_in_4bit=False, optim="adamw_torch")
    stock = {k: profile[k] for k in ("dtype", "attn_implementation", "use_peft", "lora_r", "lora_target_modules",
                                      "assistant_only_loss")}  # sft.py refuses assistant_only_loss false
    stock.update(common, output_dir=str(work / "stock"), fp16=True, bf16=False, load_in_4bit=bnb,
                 per_device_train_batch_size=16)
    return ours, stock


def dpo_configs(train_file: Path, model_dir: Path, work: Path, steps: int, bnb: bool) -> tuple[dict, dict]:
    """dpo.py configs: ours = the T4 DPO profile as it is; stock = TRL's DPOConfig defaults plus what a T4 needs
    (fp16, no bf16, float16, sdpa) and the same QLoRA r16 all-linear: batch 8, no accumulation, gradient
    checkpointing (DPOConfig's default), learning rate 1e-6, max_length 1024, beta 0.1. Same model and pairs."""
    profile = yaml.safe_load(DPO_PROFILE.read_text())
    common = dict(train_file=str(train_file), valid_file=None, model_name_or_path=str(model_dir), max_steps=steps,
                  eval_strategy="no", save_strategy="no", logging_steps=1, plots=False, report_to="none", seed=42)
    ours = {**profile, **common, "output_dir": str(work / "ours-dpo")}
    if not bnb:
        ours.update(load_in_4bit=False, optim="adamw_torch")
    stock = {k: profile[k] for k in ("method", "dtype", "attn_implementation", "use_peft", "lora_r",
                                      "lora_target_modules")}
    stock.update(common, output_dir=str(work / "stock-dpo"), fp16=True, bf16=False, load_in_4bit=bnb)
    return ours, stock


def run_training(script: str, name: str, cfg: dict, work: Path, logs: Path, cap_gib: float,
                 timeout: float = 300) -> dict:
    """``script`` (train/sft.py, train/dpo.py) in a capped child process: exit code, summary.json, losses, DPO
    reward margins, the child's probe."""
    config, stats, log = work / f"{name}.yaml", work / f"{name}.stats.json", logs / f"{name}.log"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with log.open("w") as f:
        try:
            rc = subprocess.run([sys.executable, "-c", CHILD, str(cap_gib), str(stats), script, "--config", str(config)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    run_dir = Path(cfg["output_dir"])
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    text = log.read_text(errors="replace")
    return {"script": script, "rc": rc, "wall_s": round(time.monotonic() - t0, 1), "log": str(log), "run_dir": str(run_dir),
            "summary": json.loads(summary.read_text()) if summary.exists() else {},
            "probe": json.loads(stats.read_text()) if stats.exists() else {},
            "losses": [r["loss"] for r in recs if "loss" in r],
            "margins": [r["rewards/margins"] for r in recs if "rewards/margins" in r],
            "steady_tokens_per_s": steady_tokens_per_s(recs),
            "oom": "OutOfMemoryError" in text or "CUDA out of memory" in text,
            "log_tail": text.splitlines()[-15:] if rc != 0 else []}


def steady_tokens_per_s(recs: list[dict], skip: int = 2) -> float | None:
    """Tokens/s after the first ``skip`` steps (warm-up), from metrics.jsonl's cumulative num_tokens."""
    prev, tokens, seconds = None, 0, 0.0
    for r in (r for r in recs if "loss" in r and "num_tokens" in r):
        if prev is not None and r["step"] > skip and r.get("tokens_per_s"):
            tokens, seconds = tokens + r["num_tokens"] - prev, seconds + (r["num_tokens"] - prev) / r["tokens_per_s"]
        prev = r["num_tokens"]
    return round(tokens / seconds, 1) if seconds else None


def run_checks(r: dict, steps: int, want_4bit: bool, dpo: bool = False) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for one training run; ``dpo``: also a finite reward margin at every logged step."""
    p, s, losses = r["probe"], r["summary"], r["losses"]
    dtypes = set(p.get("trainable_dtypes", {})) | set(p.get("optimizer_dtypes", []))
    dtypes |= {f"torch.{d}" for d in s.get("trainable_dtypes", [])}
    checks = [("finished", r["rc"] == 0 and s.get("steps") == steps, f"rc {r['rc']}, {s.get('steps')}/{steps} steps"),
              ("losses finite", bool(losses) and all(math.isfinite(x) for x in losses),
               f"{len(losses)} logged" + (f", {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "")),
              ("trainable fp32", dtypes == {"torch.float32"}, ", ".join(sorted(dtypes)) or "not recorded"),
              ("no bf16", p.get("bf16_parameters") == 0 and p.get("mixed_precision") == "fp16"
               and "torch.bfloat16" not in p.get("bnb_compute_dtypes", []),
               f"{p.get('bf16_parameters')} bf16 parameters, mixed precision {p.get('mixed_precision')}"
               + (f", 4-bit compute {'/'.join(p['bnb_compute_dtypes'])}" if p.get("bnb_compute_dtypes") else "")),
              ("sdpa", p.get("attn_implementation") == "sdpa", str(p.get("attn_implementation")))]
    if want_4bit:
        checks.append(("4-bit", (p.get("bnb_4bit_layers") or 0) > 0, f"{p.get('bnb_4bit_layers')} bitsandbytes layers"))
    if dpo:
        margins = r.get("margins") or []
        checks.append(("reward margin finite", bool(margins) and all(math.isfinite(x) for x in margins),
                       f"{len(margins)} logged" + (f", {margins[0]:.4f} -> {margins[-1]:.4f}" if margins else "")))
    return checks


def serve_settings(model_dir: Path, adapter: Path, cap_gib: float, total_gib: float, port: int = 8000):
    """The T4 serving setup under the cap: the adapter as "gpucheck" on the fp16 base, CUDA graphs on."""
    from serve.client import ServerConfig, Settings

    return Settings(server=ServerConfig(
        model=str(model_dir), adapters={"gpucheck": str(adapter)}, port=port, device="cuda", dtype="half",
        gpu_memory_utilization=round(min(0.95, cap_gib / total_gib), 3), enforce_eager=False, max_model_len=512,
        startup_timeout_s=300, smoke_test=False))


def serve_check(model_dir: Path, adapter: Path, cap_gib: float, total_gib: float, logs: Path) -> dict:
    """vLLM through serve.vllm_server.VLLMServer: one chat request to the adapter, the attention backend."""
    import httpx

    from serve.vllm_server import VLLMServer

    from tunekit.net import free_port

    port = free_port()
    settings = serve_settings(model_dir, adapter, cap_gib, total_gib, port)
    t0, log = time.monotonic(), logs / "vllm.log"
    with VLLMServer(settings, log_path=log) as server:
        started = round(time.monotonic() - t0, 1)
        body = {"model": "gpucheck", "max_tokens": 16, "temperature": 0.0,
                "messages": make_conversations(1, seed=1)[0]["messages"][:2]}
        resp = httpx.post(server.base_url + "/chat/completions", json=body, timeout=120)
        resp.raise_for_status()
        answer = resp.json()["choices"][0]["message"]["content"]
    lines = re.findall(r"Using [^\n]*?backend[^\n]*", log.read_text(errors="replace"))
    return {"startup_s": started, "answer": answer, "attention_backend": list(dict.fromkeys(lines))[:3],
            "gpu_memory_utilization": settings.server.gpu_memory_utilization, "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu_check.json"),
                    help="the JSON of all figures, or a folder for gpu_check.json (logs: gpu_check_logs/ beside it)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training run (default 20)")
    ap.add_argument("--skip-stock", action="store_true", help="do not train TRL's stock recipes (stages 5 and 5b)")
    ap.add_argument("--skip-dpo", action="store_true", help="do not train DPO, ours or stock (stages 4b and 5b)")
    ap.add_argument("--skip-serve", action="store_true", help="do not start vLLM (stage 6)")
    ap.add_argument("--memory-gib", type=float, default=15.0, help="GPU memory cap per process (a T4: 15 GiB)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "gpu_check.json"

    # one GPU, like a T4 (the Trainer would use every visible one)
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    dev = device_report()
    if isinstance(dev, str):
        print(f"error: {dev}", file=sys.stderr)
        return 2
    import torch

    from train.precision import gpu_has_bf16

    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], "device": dev, "checks": []}
    checks = results["checks"]
    logs = out.parent / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[1/6] device: {dev['gpu']}, compute capability {dev['capability']}, driver {dev['driver']}, "
          f"{dev['total_gib']} GiB; torch {dev['torch']}, CUDA {dev['torch_cuda']} (bitsandbytes loads "
          f"{dev['bnb_library']})", flush=True)

    fraction = min(1.0, args.memory_gib / dev["total_gib"])
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    results["emulation"] = {"cap_gib": args.memory_gib, "fraction": round(fraction, 4), "precision": "fp16",
                            "attn_implementation": "sdpa", "gpu_has_bf16": gpu_has_bf16()}
    print(f"[2/6] T4 emulation: cap {args.memory_gib} GiB of {dev['total_gib']} (fraction {fraction:.3f}) per process, "
          f"fp16 only (this GPU has native bf16: {gpu_has_bf16()}; not used), sdpa", flush=True)

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        t0, model_dir, train_file = time.monotonic(), work / "qwen2.5-1.5b-random", work / "train.jsonl"
        dpo_file = work / "dpo_train.jsonl"
        n_params, tok = build_model_dir(model_dir, "cuda")
        torch.cuda.empty_cache()
        rows = make_conversations(700)
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        pairs = make_preference_pairs(rows)
        dpo_file.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        lengths = chat_lengths(tok, rows)
        results["model"] = {"parameters": n_params, "dir": str(model_dir), "tokenizer_tokens": len(tok),
                            "conversations": len(rows), "tokens_min": min(lengths), "tokens_max": max(lengths),
                            "tokens_mean": round(sum(lengths) / len(lengths), 1), "preference_pairs": len(pairs),
                            "build_s": round(time.monotonic() - t0, 1)}
        print(f"[3/6] model: random Qwen2 of Qwen2.5-1.5B's shape, {n_params:,} parameters, fp16; BPE tokenizer of "
              f"{len(tok)} tokens, ChatML; {len(rows)} conversations of {min(lengths)}-{max(lengths)} tokens, "
              f"{len(pairs)} preference pairs from them ({results['model']['build_s']} s)", flush=True)

        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            absent = [d for d in NEEDED if dev["versions"].get(d) is None]
            print(f"[4/6] {' and '.join(missing)} not importable: training not checked (missing here: "
                  f"{', '.join(absent)}; install them offline as `python bench/gpu_check.py --help` shows)", flush=True)
            checks.append({"name": "training", "ok": False, "detail": f"{', '.join(missing)} not importable"})
            return finish(results, out)
        bnb = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True).returncode == 0
        if not bnb:
            print("bitsandbytes not importable: 16-bit LoRA instead of QLoRA", flush=True)
        ours, stock = train_configs(train_file, model_dir, work, args.steps, bnb)
        dpo_ours, dpo_stock = dpo_configs(dpo_file, model_dir, work, args.steps, bnb)
        runs = results["runs"] = {}
        r = runs["ours"] = run_training(SFT_SCRIPT, "ours", ours, work, logs, args.memory_gib)
        found = run_checks(r, args.steps, want_4bit=bnb)
        checks += [{"name": f"ours: {n}", "ok": ok, "detail": d} for n, ok, d in found]
        print(f"[4/6] ours ({T4_PROFILE.name}, {'QLoRA nf4' if bnb else '16-bit LoRA'}, optim {r['probe'].get('optim')}): "
              + "; ".join(f"{n} {'ok' if ok else 'FAILED'} ({d})" for n, ok, d in found), flush=True)
        show_tail(r)

        if args.skip_dpo:
            print("[4b/6] ours, DPO: skipped (--skip-dpo)", flush=True)
        else:
            dpo_run = runs["ours-dpo"] = run_training(DPO_SCRIPT, "ours-dpo", dpo_ours, work, logs, args.memory_gib)
            found = run_checks(dpo_run, args.steps, want_4bit=bnb, dpo=True)
            checks += [{"name": f"ours DPO: {n}", "ok": ok, "detail": x} for n, ok, x in found]
            print(f"[4b/6] ours, DPO ({DPO_PROFILE.name}, {'QLoRA nf4' if bnb else '16-bit LoRA'}, optim "
                  f"{dpo_run['probe'].get('optim')}, beta {dpo_ours.get('beta')}): "
                  + "; ".join(f"{n} {'ok' if ok else 'FAILED'} ({x})" for n, ok, x in found), flush=True)
            show_tail(dpo_run)

        if args.skip_stock:
            print("[5/6] stock: skipped (--skip-stock)", flush=True)
        else:
            s = runs["stock"] = run_training(SFT_SCRIPT, "stock", stock, work, logs, args.memory_gib)
            stock_check("stock", "[5/6] stock (TRL defaults + fp16", s, checks, args.memory_gib)
        if args.skip_stock or args.skip_dpo:
            print(f"[5b/6] stock, DPO: skipped ({'--skip-stock' if args.skip_stock else '--skip-dpo'})", flush=True)
        else:
            s = runs["stock-dpo"] = run_training(DPO_SCRIPT, "stock-dpo", dpo_stock, work, logs, args.memory_gib)
            stock_check("stock DPO", "[5b/6] stock, DPO (TRL's DPOConfig defaults + fp16", s, checks, args.memory_gib,
                        dpo=True)
        print(f"      {'run':<9} {'tokens/s':>9} {'steady tok/s':>12} {'peak alloc GiB':>14} {'peak reserved GiB':>17} "
              f"{'loss first -> last':>20} {'margin first -> last':>20}")
        for name, x in runs.items():
            p = x["probe"]
            loss = f"{x['losses'][0]:.4f} -> {x['losses'][-1]:.4f}" if x["losses"] else "-"
            margin = f"{x['margins'][0]:.4f} -> {x['margins'][-1]:.4f}" if x["margins"] else "-"
            print(f"      {name:<9} {x['summary'].get('tokens_per_s', '-')!s:>9} {x['steady_tokens_per_s'] or '-'!s:>12} "
                  f"{p.get('max_memory_allocated_mb', 0) / 1024:>14.2f} {p.get('max_memory_reserved_mb', 0) / 1024:>17.2f} "
                  f"{loss:>20} {margin:>20}", flush=True)

        if args.skip_serve:
            print("[6/6] serving: skipped (--skip-serve)", flush=True)
        elif importlib.util.find_spec("vllm") is None:
            print("[6/6] vllm not importable: serving not checked", flush=True)
        elif r["rc"] != 0:
            print("[6/6] serving not checked: ours did not train an adapter", flush=True)
        else:
            try:
                v = results["serve"] = serve_check(model_dir, Path(r["run_dir"]), args.memory_gib, dev["total_gib"], logs)
                checks.append({"name": "serve", "ok": True, "detail": f"answer {v['answer']!r}"})
                print(f"[6/6] vLLM: ready in {v['startup_s']} s, answer {v['answer']!r}; attention: "
                      f"{'; '.join(v['attention_backend']) or 'no backend line in its log'}", flush=True)
            except Exception as e:  # UserError from VLLMServer (its log's tail included), HTTP errors
                checks.append({"name": "serve", "ok": False, "detail": str(e).splitlines()[0]})
                print(f"[6/6] vLLM FAILED: {str(e)[:3000]}", flush=True)
        return finish(results, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stock_check(name: str, label: str, s: dict, checks: list, cap_gib: float, dpo: bool = False) -> None:
    """A stock recipe's one check and line: it finished with finite losses (and reward margins), or ran out of
    memory under the cap, which is a finding about the recipe, not a failure."""
    values = s["losses"] + (s["margins"] if dpo else [])
    ok = (s["rc"] == 0 and bool(s["losses"]) and (bool(s["margins"]) or not dpo)
          and all(math.isfinite(x) for x in values))
    checks.append({"name": f"{name}: finished, losses{' and reward margins' if dpo else ''} finite", "ok": ok or s["oom"],
                   "detail": f"rc {s['rc']}" + (f"; out of memory under {cap_gib} GiB" if s["oom"] else "")})
    state = "ok" if ok else f"OUT OF MEMORY under {cap_gib} GiB" if s["oom"] else f"FAILED (rc {s['rc']})"
    print(f"{label}, optim {s['probe'].get('optim')}, batch {s['probe'].get('batch_size')}, gradient checkpointing "
          f"{s['probe'].get('gradient_checkpointing')}): {state}", flush=True)
    show_tail(s)


def show_tail(run: dict) -> None:
    if run["log_tail"]:
        print("\n".join(f"      | {line}" for line in run["log_tail"]) + f"\n      (log: {run['log']})", file=sys.stderr)


def finish(results: dict, out: Path) -> int:
    failed = [c["name"] for c in results["checks"] if not c["ok"]]
    results["passed"] = not failed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"result: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}; figures in {out}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
