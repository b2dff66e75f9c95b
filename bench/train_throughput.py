"""Benchmark: training throughput of the project's SFT (or DPO) profile against TRL's stock recipe.

    python bench/train_throughput.py                  # CPU mode (default without CUDA): ~3.5 min on 2 cores
    python bench/train_throughput.py --no-fp32        # without the third CPU row (ours with --bf16 false)
    python bench/train_throughput.py --also 'ours+gc=--gradient_checkpointing true'   # one more row
    python bench/train_throughput.py --gpu            # T4 emulation (default with CUDA)
    python bench/train_throughput.py --method dpo --no-fp32   # the same for train/dpo.py: ~1.5 min on 2 cores

The SFT comparison is described first; ``--method dpo`` (below, "DPO") runs the same code with
train/dpo.py, the DPO profiles and TRL's DPOConfig in place of train/sft.py, the SFT profiles and
SFTConfig.

In one run, on the same model, data, number of steps and machine, it trains each recipe in its own
subprocess of ``train/sft.py``
(``python train/sft.py --config CFG --output_dir TMP --max_steps N --eval_strategy no
--save_strategy no --logging_steps 1 --plots false ...overrides``, cwd = the repository root,
``HF_HUB_OFFLINE=1``) and compares:

  ours   the project's profile as configured: configs/banking77/sft_cpu.yaml (CPU) or
         configs/banking77/sft_t4.yaml (GPU).
  stock  what TRL's documented SFT recipe does with the same model, LoRA and 4-bit settings
         (ModelConfig keys are left as the profile sets them): ``--compact_lm_head false`` (sft.py's
         only project-specific speed-up, a ScriptArguments flag) and every SFTConfig key that the
         profile sets to something other than TRL's default is reset to that default, read from
         ``trl.SFTConfig`` itself in a probe subprocess (e.g. gradient_checkpointing True, bf16 as
         SFTConfig resolves its ``None`` default, optim adamw_torch_fused, learning_rate 2e-5,
         max_length 1024; packing stays off as TRL ships it). Kept from the profile, for both:
           - assistant_only_loss true: the project requires it, so both recipes compute the same
             loss (over the assistant's tokens only);
           - per_device_train_batch_size and gradient_accumulation_steps: every step sees the same
             examples in the same order, so "the same number of steps" means the same tokens;
           - use_cpu (CPU: TRL needs it there) and fp16 (GPU: a T4 has no bf16, so a T4 user must
             set fp16 whatever recipe they follow; bf16 then resolves to False);
           - the keys this benchmark sets itself (output_dir, max_steps, logging, eval, saving).
         The output lists every key reset ("stock = ours with: ..."). In CPU mode a third row,
         ours with ``--bf16 false`` (fp32), is measured for the record (``--no-fp32`` skips it).

What is measured, per run:
  - tokens/s over the steps after the first ``--skip`` (default 2; the first steps include
    warm-up: allocator growth, first autograd graph, lazy initialisation). sft.py's metrics.jsonl has
    no timestamps, but with logging_steps 1 each line holds the cumulative ``num_tokens`` (real
    tokens, no padding) and ``tokens_per_s`` since the previous line, so each step's duration is
    its token delta / its tokens_per_s; steady tokens/s = tokens / seconds over steps skip+1..N.
    If metrics.jsonl lacks these, the summary's tokens_per_s (whole train_runtime, warm-up
    included) is used instead and the table says so. The summary's figure is shown beside it.
  - wall time of the whole subprocess (imports, tokenising the data, loading the model, training);
  - peak CPU RSS of the subprocess (os.wait4's ru_maxrss);
  - GPU mode: peak GPU memory, torch.cuda.max_memory_reserved (what the cap limits) and
    max_memory_allocated (what sft.py's summary.json reports).
Targets: ours >= 1.5x stock tokens/s, at no more than stock's peak memory (CPU: peak RSS;
GPU: peak reserved GPU memory). Missing a target does not fail the run; a failed run exits 1.
The first step's loss is shown too: with the same data, model and untrained LoRA (B = 0) both
recipes should start from the same loss.

GPU mode (``--gpu``) emulates a 16 GB T4 on a bigger GPU: a randomly initialised Qwen2 model with
Qwen2.5-1.5B's dimensions (hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 KV heads, vocab
151936, tied embeddings; written in this script, no download) is saved in fp16 to a temporary
folder with SmolLM2-135M-Instruct's tokenizer and chat template (49,152 tokens; the model keeps
Qwen's 151,936-row embedding, which sft.py allows, so the embedding and LM head cost what they cost
on the real model). Each run is ``python -c`` code that calls
``torch.cuda.set_per_process_memory_fraction`` (cap ``--gpu-mem-gib``, default 15 GiB) and then
runs train/sft.py as ``__main__`` with runpy, then records the peak GPU memory. Both recipes keep the
profile's fp16, nf4 4-bit weights, SDPA and gradient checkpointing (TRL's default too); stock swaps the
paged 8-bit AdamW for TRL's default adamw_torch_fused, and compact_lm_head false changes nothing on
CUDA, where TRL already scores only labelled positions. The cap covers PyTorch's caching
allocator only: the CUDA context and bitsandbytes' paged (managed-memory) optimizer state are outside
it, as they are outside max_memory_reserved. An H100 is not a T4: GPU tokens/s show the ratio
between the recipes, not T4 speed. GPU figures must be measured on a GPU; this script was written
on a CPU-only machine and its GPU path has not been run there.

DPO (``--method dpo``): the same runs, table and targets with ``python train/dpo.py`` (GPU mode: the
same capped child running train/dpo.py), on DPO pairs:

  data   runs/banking77/dpo_data/train.jsonl (OpenAI's DPO JSONL), built when missing with
         ``tunekit build --config configs/banking77/build_dpo.yaml`` (run as ``python -m data_prep build``,
         which is what ``tunekit build`` runs, as for the SFT data).
  ours   configs/banking77/dpo_cpu.yaml (CPU) or configs/banking77/dpo_t4.yaml (GPU).
  stock  ``--compact_lm_head false`` (DPOTrainer scores chosen and rejected answers through the same
         fused LM head as SFTTrainer, so the flag acts here too) and every DPOConfig key the profile sets
         to something other than TRL's default reset to ``trl.DPOConfig``'s default, read in the same probe
         subprocess (on CPU: gradient_checkpointing True, learning_rate 1e-6, lr_scheduler_type linear,
         warmup_steps 0, max_length 1024; on GPU also optim adamw_torch_fused, as for SFT; the output
         lists them). Kept from the profile, for both:
         per_device_train_batch_size, gradient_accumulation_steps, use_cpu, fp16, and ``beta`` and
         ``loss_type`` (the same DPO objective: sigmoid loss at beta 0.1, as TRL's defaults anyway).
  loss@1 With no init_adapter the reference is the base with the LoRA disabled and the untrained LoRA
         changes nothing (B = 0), so both recipes start from the sigmoid loss at margin 0, log 2 = 0.6931.
  tokens DPOTrainer's ``num_tokens`` counts the real tokens of every prompt+chosen and every
         prompt+rejected sequence it trains on (the reference's forward passes over them are not counted
         again), so a DPO step's "tokens" are about twice its examples' tokens and each costs a policy
         forward+backward and a reference forward: DPO tokens/s compare only with DPO runs, never with the
         SFT figures.
The DPO figures go to bench/results/train_throughput_dpo.json by default. The DPO GPU path (dpo_t4.yaml on
the T4 stand-in) has not been run on a GPU either.

Every figure goes to ``--out`` (default bench/results/train_throughput.json; with ``--method dpo``
bench/results/train_throughput_dpo.json), with the machine: CPU count, the CPU's vector flags
(train/hardware.py's cpu_flags()), the load average before and after the runs (others' work on a shared
machine makes the figures noisy; say so with ``--note``), versions and the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ".cache/models/SmolLM2-135M-Instruct"
SPEED_TARGET, MEM_TARGET = 1.5, 1.0
# SFTConfig / DPOConfig keys this benchmark sets on the command line for every run
BENCH_KEYS = {"output_dir", "max_steps", "num_train_epochs", "logging_steps", "logging_strategy", "eval_strategy",
              "eval_steps", "per_device_eval_batch_size", "save_strategy", "save_steps", "save_total_limit",
              "report_to"}
# TrainingArguments keys kept as the profile sets them in the stock recipe, for every method (module docstring)
KEEP_COMMON = {"per_device_train_batch_size", "gradient_accumulation_steps", "use_cpu", "fp16"}
# What differs between the methods: the script, its TRL config class, the profiles, the data and the keys kept
# so that both recipes optimise the same objective (SFT: the loss over the assistant's tokens; DPO: beta and the
# loss type).
METHODS = {
    "sft": {"script": "train/sft.py", "trl_config": "SFTConfig",
            "cpu_config": "configs/banking77/sft_cpu.yaml", "gpu_config": "configs/banking77/sft_t4.yaml",
            "build_config": "configs/banking77/build.yaml", "train_file": "runs/banking77/data/train.jsonl",
            "keep": KEEP_COMMON | {"assistant_only_loss"}, "same_loss": "assistant_only_loss true in both",
            "out": "bench/results/train_throughput.json"},
    "dpo": {"script": "train/dpo.py", "trl_config": "DPOConfig",
            "cpu_config": "configs/banking77/dpo_cpu.yaml", "gpu_config": "configs/banking77/dpo_t4.yaml",
            "build_config": "configs/banking77/build_dpo.yaml", "train_file": "runs/banking77/dpo_data/train.jsonl",
            "keep": KEEP_COMMON | {"beta", "loss_type"},
            "same_loss": "beta and loss_type as the profile sets them in both; untrained LoRA = reference, so "
                         "log 2 = 0.6931 expected",
            "out": "bench/results/train_throughput_dpo.json"},
}
# Qwen2.5-1.5B's dimensions (its config.json), for the T4 stand-in
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, attention_dropout=0.0,
                  initializer_range=0.02, use_sliding_window=False)

# Run in a probe subprocess (cwd = the repository root): the defaults of TRL's config class for the method
# (argv[2]: SFTConfig or DPOConfig), the bf16 value it resolves for the kept keys, versions, torch's default
# thread count, the CPU's flags and the GPU, without importing torch/TRL (or touching CUDA) in this process.
PROBE = r"""
import dataclasses, enum, json, sys, tempfile
import torch, transformers, trl, peft
from train.hardware import cpu_flags
kept, TrlConfig = json.loads(sys.argv[1]), getattr(trl, sys.argv[2])
defaults = {}
for f in dataclasses.fields(TrlConfig):
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        continue
    defaults[f.name] = v.value if isinstance(v, enum.Enum) else v
with tempfile.TemporaryDirectory() as d:
    resolved = TrlConfig(output_dir=d, report_to="none", **kept)
out = {"defaults": json.loads(json.dumps(defaults, default=str)),
       "resolved": {"bf16": resolved.bf16, "fp16": resolved.fp16,
                    "gradient_checkpointing": resolved.gradient_checkpointing},
       "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                    "peft": peft.__version__},
       "torch_default_threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "cuda_total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
                         if torch.cuda.is_available() else None}
print("PROBE " + json.dumps(out))
"""

# Run in a subprocess (GPU mode): a randomly initialised Qwen2 with Qwen2.5-1.5B's dimensions, fp16, saved
# with SmolLM2's tokenizer files. argv: out_dir, tokenizer_dir, JSON of config overrides.
BUILD_MODEL = r"""
import json, shutil, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, Qwen2Config
out, tok_dir, dims = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
config = Qwen2Config(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (tok_dir / name).exists():
        shutil.copy(tok_dir / name, out / name)
n = sum(p.numel() for p in model.parameters())
print("BUILT " + json.dumps({"parameters": n, "dir": str(out)}))
"""

# The GPU-mode child: cap this process's CUDA caching allocator, run the method's script (train/sft.py or
# train/dpo.py) as __main__, then write the peak GPU memory. argv: cap_gib, stats_path, script, then the
# script's arguments.
GPU_CHILD = r"""
import json, runpy, sys, torch
cap_gib, stats_path, script, args = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
total = torch.cuda.get_device_properties(0).total_memory
fraction = min(1.0, cap_gib * 2**30 / total)
torch.cuda.set_per_process_memory_fraction(fraction, 0)
sys.argv = [script, *args]
code = 1
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    with open(stats_path, "w") as f:
        json.dump({"cap_gib": cap_gib, "fraction": fraction, "total_gib": round(total / 2**30, 2),
                   "max_memory_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1),
                   "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}, f)
sys.exit(code)
"""


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the benchmark's own path settings must not leak into the runs
    return env


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def run_timed(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run cmd (cwd ROOT), stdout+stderr to log; wall time and peak RSS from os.wait4.

    Also samples the child's RSS every 0.2 s until the training script prints its "model ...: N trainable" line (just
    before training starts): the highest sample is the RSS before training (imports, data, model).
    """
    start = time.perf_counter()
    before_train, started_training = 0.0, False
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not started_training:
                before_train = max(before_train, rss_mb(proc.pid) or 0.0)
                started_training = " trainable of " in log.read_text(errors="replace")
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -1
                break
            time.sleep(0.2)
    proc.returncode = 0  # reaped by wait4 above; keep Popen from waiting again
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status) if status != -1 else "timeout"
    return {"rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "rss_before_training_mb": round(before_train, 1) if started_training else None,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def cli_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def probe(kept: dict, trl_config: str = "SFTConfig") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(kept), trl_config], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("PROBE ")), None)
    if out.returncode or line is None:
        sys.exit(f"error: could not read TRL's {trl_config} defaults:\n{out.stderr[-3000:]}")
    return json.loads(line[len("PROBE "):])


def stock_overrides(profile: dict, info: dict, keep: set[str]) -> tuple[list[str], dict]:
    """Flags that turn the profile into TRL's stock recipe, and {key: (ours, TRL default)} for the table.
    ``info``: the probe's answer for the method's TRL config; ``keep``: keys left as the profile sets them."""
    defaults = info["defaults"]
    args, changed = ["--compact_lm_head", "false"], {"compact_lm_head": (True, False)}
    for key, ours in profile.items():
        if key not in defaults or key in BENCH_KEYS or key in keep:
            continue
        default = info["resolved"][key] if key in info["resolved"] else defaults[key]
        if default is None:  # cannot be given on the command line; leave it and say so
            changed[key] = (ours, "None (left as configured)")
            continue
        if isinstance(default, list):  # e.g. loss_type: a list flag takes its values one by one
            ours_list = ours if isinstance(ours, list) else [ours]
            if [cli_value(v).lower() for v in ours_list] != [cli_value(v).lower() for v in default]:
                args += [f"--{key}", *map(cli_value, default)]
                changed[key] = (ours, default)
            continue
        same = (float(ours) == float(default) if isinstance(default, (int, float)) and not isinstance(default, bool)
                and isinstance(ours, (int, float)) else cli_value(ours).lower() == cli_value(default).lower())
        if not same:
            args += [f"--{key}", cli_value(default)]
            changed[key] = (ours, default)
    return args, changed


def step_times(metrics: Path) -> list[dict]:
    """Per logged step: tokens in it and its duration (token delta / tokens_per_s of that line)."""
    if not metrics.exists():
        return []
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "num_tokens" in r]
    steps, prev = [], None
    for r in recs:
        tokens = r["num_tokens"] - prev if prev is not None else r["num_tokens"]
        rate = r.get("tokens_per_s")
        steps.append({"step": r["step"], "tokens": tokens, "seconds": round(tokens / rate, 3) if rate else None,
                      "loss": r["loss"]})
        prev = r["num_tokens"]
    return steps


def measure(name: str, cmd: list[str], run_dir: Path, skip: int, timeout: float, stats: Path | None) -> dict:
    print(f"[{name}] {' '.join(cmd[:2])} ... {' '.join(cmd[cmd.index('--config'):])}", flush=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    r = {"command": cmd, **run_timed(cmd, log, timeout)}
    summary_path = run_dir / "summary.json"
    if r["rc"] != 0 or not summary_path.exists():
        r["error"] = tail(log)
        print(f"[{name}] failed (rc {r['rc']}):\n{r['error']}", file=sys.stderr, flush=True)
        return r
    summary = json.loads(summary_path.read_text())
    steps = step_times(run_dir / "metrics.jsonl")
    timed = [s for s in steps if s["step"] > skip and s["seconds"]]
    r.update(summary={k: summary.get(k) for k in ("steps", "train_tokens", "train_runtime_s", "wall_time_s",
                                                   "tokens_per_s", "peak_cpu_rss_mb", "peak_gpu_memory_mb",
                                                   "precision", "load_in_4bit", "trainable_parameters",
                                                   "total_parameters", "train_loss_first", "train_loss_last")},
             steps=steps, loss_step1=steps[0]["loss"] if steps else None)
    if timed:
        secs = sum(s["seconds"] for s in timed)
        r.update(tokens_per_s=round(sum(s["tokens"] for s in timed) / secs, 1),
                 tokens_per_s_source=f"metrics.jsonl, steps {timed[0]['step']}-{timed[-1]['step']}",
                 timed_tokens=sum(s["tokens"] for s in timed),
                 s_per_step_median=round(statistics.median(s["seconds"] for s in timed), 3))
    else:
        r.update(tokens_per_s=summary.get("tokens_per_s"), s_per_step_median=None,
                 tokens_per_s_source="summary.json (whole train_runtime, warm-up included)")
    if stats is not None and stats.exists():
        r["gpu"] = json.loads(stats.read_text())
    times = " ".join(f"{s['seconds']:.2f}" if s["seconds"] else "-" for s in steps)
    print(f"[{name}] done in {r['wall_s']} s: {r['tokens_per_s']} tokens/s; step times (s): {times}; peak RSS "
          f"{r['peak_rss_mb']:,.0f} MB ({fmt(r['rss_before_training_mb'], ',.0f')} MB before training)", flush=True)
    return r


def build_standin(folder: Path, layers: int, timeout: float) -> dict:
    dims = dict(QWEN2_1_5B, num_hidden_layers=layers)
    out = subprocess.run([sys.executable, "-c", BUILD_MODEL, str(folder), str(ROOT / TOKENIZER_DIR), json.dumps(dims)],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BUILT ")), None)
    if out.returncode or line is None:
        sys.exit(f"error: could not build the T4 stand-in model:\n{out.stderr[-3000:]}")
    return {**json.loads(line[len("BUILT "):]), "config": dims}


def fmt(v, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def table(mode: str, runs: dict, skip: int, steps: int, script: str = "train/sft.py") -> tuple[list[str], dict]:
    mem_key = "GPU peak reserved MB" if mode == "gpu" else "peak RSS MB"
    head = (f"{'run':<34} {'s/step':>7} {'tokens/s':>9} {'summary tok/s':>13} {'wall s':>7} {mem_key:>{len(mem_key)}}"
            f" {'loss@1':>7}")
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        mem = r.get("gpu", {}).get("max_memory_reserved_mb") if mode == "gpu" else r.get("peak_rss_mb")
        lines.append(f"{name:<34} {fmt(r.get('s_per_step_median'), '.2f'):>7} {fmt(r.get('tokens_per_s')):>9} "
                     f"{fmt(r.get('summary', {}).get('tokens_per_s')):>13} {fmt(r.get('wall_s')):>7} "
                     f"{fmt(mem):>{len(mem_key)}} {fmt(r.get('loss_step1'), '.4f'):>7}"
                     + ("  FAILED" if r.get("rc") != 0 else ""))
    ours, stock = runs.get("ours"), runs.get("stock")
    ratios = {}
    if ours and stock and ours.get("tokens_per_s") and stock.get("tokens_per_s"):
        speed = ours["tokens_per_s"] / stock["tokens_per_s"]
        if mode == "gpu":
            m_o, m_s = (ours.get("gpu", {}).get("max_memory_reserved_mb"), stock.get("gpu", {}).get("max_memory_reserved_mb"))
        else:
            m_o, m_s = ours.get("peak_rss_mb"), stock.get("peak_rss_mb")
        mem = m_o / m_s if m_o and m_s else None
        ratios = {"tokens_per_s": round(speed, 3), "peak_memory": round(mem, 3) if mem else None,
                  "memory_measure": "max_memory_reserved" if mode == "gpu" else "peak RSS",
                  "speed_target": SPEED_TARGET, "memory_target": MEM_TARGET,
                  "speed_met": speed >= SPEED_TARGET, "memory_met": mem is not None and mem <= MEM_TARGET}
        lines.append(f"ours / stock: tokens/s {speed:.2f}x (target >= {SPEED_TARGET}x: "
                     f"{'met' if ratios['speed_met'] else 'MISSED'}), peak memory "
                     f"{fmt(mem, '.2f')}x (target <= {MEM_TARGET:.1f}x: {'met' if ratios['memory_met'] else 'MISSED'})")
    lines.append(f"tokens/s: real (unpadded) tokens / seconds over steps {skip + 1}-{steps} from metrics.jsonl; "
                 f"summary tok/s: {Path(script).name}'s summary.json (all steps, warm-up included); s/step: median "
                 "of those steps")
    return lines, ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=sorted(METHODS), default="sft",
                    help="sft (train/sft.py, the SFT profiles) or dpo (train/dpo.py, the DPO profiles); default sft")
    dev = ap.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true", help="T4 emulation on a CUDA GPU (default when CUDA is available)")
    dev.add_argument("--cpu", action="store_true", help="CPU mode even when CUDA is available")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 8 on CPU, 20 on GPU)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s (warm-up; default 2)")
    ap.add_argument("--config", default=None, help="our profile (default: the method's CPU profile, e.g. "
                    f"{METHODS['sft']['cpu_config']}, or its T4 profile with --gpu, e.g. {METHODS['sft']['gpu_config']})")
    ap.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=None,
                    help="also run ours with --bf16 false (default: on in CPU mode, off on GPU, where a T4 runs fp16)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=FLAGS",
                    help="one more row: ours with these flags of the method's script, e.g. "
                    "'ours+gc=--gradient_checkpointing true'")
    ap.add_argument("--gpu-mem-gib", type=float, default=15.0, help="GPU memory cap per run (T4: 15 GiB)")
    ap.add_argument("--gpu-layers", type=int, default=QWEN2_1_5B["num_hidden_layers"],
                    help="layers of the T4 stand-in model (28 = Qwen2.5-1.5B; fewer for a quick check)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per run")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of deleting them")
    ap.add_argument("--note", action="append", default=[], metavar="TEXT",
                    help="a note recorded with the figures, e.g. 'shared machine: other work ran meanwhile'")
    ap.add_argument("--out", default=None, help=f"where the figures go (default: {METHODS['sft']['out']}, "
                    f"with --method dpo {METHODS['dpo']['out']})")
    args = ap.parse_args(argv)
    spec = METHODS[args.method]
    script = spec["script"]

    import importlib.util

    # find_spec does not import torch; whether CUDA works is the probe's answer (below)
    mode = "gpu" if args.gpu else "cpu" if args.cpu else None
    config = args.config
    train_file = ROOT / spec["train_file"]
    if not train_file.exists():  # `tunekit build --config ...` runs exactly this
        print(f"building the banking77 data: python -m data_prep build --config {spec['build_config']}", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep", "build", "--config", spec["build_config"]], cwd=ROOT,
                       env=child_env(), check=True)
    if importlib.util.find_spec("torch") is None:
        sys.exit("error: torch is not installed in this Python; run with .venv/bin/python")

    # Probe once with CPU-mode keys to learn whether CUDA is there, then again with the profile's keys.
    load_before = os.getloadavg()
    first = probe({"use_cpu": True}, spec["trl_config"])
    if mode is None:
        mode = "gpu" if first["cuda"] else "cpu"
    if mode == "gpu" and not first["cuda"]:
        sys.exit("error: --gpu needs a CUDA GPU; GPU figures must be measured on a GPU (run without --gpu here)")
    config = config or (spec["gpu_config"] if mode == "gpu" else spec["cpu_config"])
    profile = yaml.safe_load((ROOT / config).read_text())
    if profile.get("method", "sft") != args.method:
        sys.exit(f"error: {config} is a {profile.get('method', 'sft')} profile; run with --method "
                 f"{profile.get('method', 'sft')} or give a {args.method} profile")
    keep = spec["keep"]
    kept = {k: profile[k] for k in ("use_cpu", "fp16") if k in profile}
    info = probe(kept, spec["trl_config"]) if kept != {"use_cpu": True} else first
    steps = args.steps or (20 if mode == "gpu" else 8)
    if steps <= args.skip:
        sys.exit(f"error: --steps {steps} must be more than --skip {args.skip}")
    overrides, reset = stock_overrides(profile, info, keep)

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "processor": platform.processor() or platform.machine(), "cpu_flags": info["cpu_flags"],
               "loadavg_1_5_15_before": [round(x, 2) for x in load_before], "gpu": info["cuda"],
               "gpu_total_gib": info["cuda_total_gib"], "torch_default_threads": info["torch_default_threads"],
               **info["versions"]}
    print(f"machine: {machine['cpu_count']} CPUs (flags {' '.join(machine['cpu_flags']) or 'unknown'}; load average "
          f"{' '.join(map(str, machine['loadavg_1_5_15_before']))}), {machine['platform']}, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, trl {machine['trl']}"
          + (f", GPU {machine['gpu']}" if machine["gpu"] else ""))
    print(f"{args.method}, mode {mode}: {script}, profile {config}, {steps} steps per run, tokens/s over steps "
          f"{args.skip + 1}-{steps}")
    print(f"stock = ours with ({spec['trl_config']} defaults): "
          + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in reset.items()))
    print(f"kept for both: {', '.join(sorted(k for k in keep if k in profile))}; "
          f"num_threads {profile.get('num_threads', 'unset')} (torch's default here: {machine['torch_default_threads']})")
    notes = list(args.note)
    if args.method == "dpo":
        notes.append("DPO tokens/s count prompt+chosen and prompt+rejected tokens (DPOTrainer's num_tokens); "
                     "compare them only with DPO runs, not with SFT figures")
    if mode == "gpu":
        notes.append("GPU figures must be measured on a GPU; an H100/H200 with a memory cap is not a T4: "
                     "the ratio between the recipes is the figure, not the absolute tokens/s.")

    tmp = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    results = {"created": dt.datetime.now().isoformat(timespec="seconds"), "method": args.method, "script": script,
               "mode": mode, "machine": machine, "config": config, "train_file": spec["train_file"],
               "steps": steps, "skip_steps": args.skip, "trl_config": spec["trl_config"],
               "stock_reset": {k: {"ours": v[0], "stock": v[1]} for k, v in reset.items()},
               "stock_overrides": overrides, "kept": sorted(k for k in keep if k in profile), "runs": {}}
    try:
        common = ["--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
                  "--logging_steps", "1", "--plots", "false"]
        if mode == "gpu":
            t0 = time.perf_counter()
            model_dir = tmp / "qwen2-1.5b-random"
            built = build_standin(model_dir, args.gpu_layers, args.timeout)
            print(f"T4 stand-in: random Qwen2, {built['parameters']:,} parameters, {args.gpu_layers} layers, fp16, "
                  f"SmolLM2 tokenizer, built in {time.perf_counter() - t0:.0f} s; cap {args.gpu_mem_gib} GiB")
            results["gpu_model"] = built
            results["gpu_mem_cap_gib"] = args.gpu_mem_gib
            common += ["--model_name_or_path", str(model_dir)]
        variants = {"stock": overrides, "ours": []}
        if args.fp32 or (args.fp32 is None and mode == "cpu"):
            if mode == "gpu":
                print("--fp32 is for CPU mode (a T4 runs fp16); skipped", file=sys.stderr)
            else:
                variants["ours, fp32 (--bf16 false)"] = ["--bf16", "false"]
        for spec in args.also:
            name, _, flags = spec.partition("=")
            variants[name.strip()] = flags.split()
        failed = False
        for name, extra in variants.items():
            run_dir = tmp / f"run{len(results['runs'])}"
            script_args = ["--config", config, "--output_dir", str(run_dir), *common, *extra]
            stats = None
            if mode == "gpu":
                stats = tmp / f"{run_dir.name}.gpu.json"
                cmd = [sys.executable, "-c", GPU_CHILD, str(args.gpu_mem_gib), str(stats), script, *script_args]
            else:
                cmd = [sys.executable, script, *script_args]
            r = measure(name, cmd, run_dir, args.skip, args.timeout, stats)
            failed |= r["rc"] != 0
            results["runs"][name] = r
    finally:
        if args.keep:
            print(f"run folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    runs = results["runs"]
    results["machine"]["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    lines, ratios = table(mode, runs, args.skip, steps, script)
    results["ratios"] = ratios
    l_o, l_s = runs.get("ours", {}).get("loss_step1"), runs.get("stock", {}).get("loss_step1")
    if l_o is not None and l_s is not None:
        same = abs(l_o - l_s) <= 0.01 * max(abs(l_s), 1e-9)
        notes.append(f"first-step loss ours {l_o} vs stock {l_s}: {'same' if same else 'DIFFERENT'} loss "
                     f"({spec['same_loss']})")
    t_o = runs.get("ours", {}).get("summary", {}).get("train_tokens")
    t_s = runs.get("stock", {}).get("summary", {}).get("train_tokens")
    if t_o is not None and t_s is not None and t_o != t_s:
        notes.append(f"the runs trained on different token counts (ours {t_o}, stock {t_s})")
    results["notes"] = notes
    title = (f"train throughput ({args.method}), {mode} mode: {Path(config).name} vs TRL stock "
             f"({spec['trl_config']} defaults), {steps} steps"
             + (f", random Qwen2 {args.gpu_layers}-layer (Qwen2.5-1.5B dims), cap {args.gpu_mem_gib} GiB"
                if mode == "gpu" else ""))
    print("\n" + title)
    print("\n".join(lines))
    print(f"machine: {machine['cpu_count']} CPUs, flags {' '.join(machine['cpu_flags']) or 'unknown'}; load average "
          f"(1/5/15 min) before {machine['loadavg_1_5_15_before']}, after {machine['loadavg_1_5_15_after']}")
    for n in notes:
        print("note: " + n)
    out = Path(args.out or ROOT / spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"figures written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
