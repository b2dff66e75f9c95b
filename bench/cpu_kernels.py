"""CPU kernels behind two serving/training choices: fp32 vs bf16 matmuls, and vLLM's CPU LoRA ops
against the plugin in serve/vllm_cpu_lora (one matmul per adapter instead of a weight copy per token).

    .venv-vllm/bin/python bench/cpu_kernels.py        # the vLLM venv (make serve-setup) has torch and vLLM

Prints the figures and writes bench/results/cpu_kernels.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "serve/vllm_cpu_lora"))


def timed(fn, repeat: int = 10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> int:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    out = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}}

    # 1. A projection of SmolLM2-135M over a batch of 2,048 tokens, fp32 against bf16.
    a, w = torch.randn(2048, 576), torch.randn(576, 1536)
    fp32 = timed(lambda: a @ w)
    a16, w16 = a.bfloat16(), w.bfloat16()
    bf16 = timed(lambda: a16 @ w16, repeat=3)
    out["matmul_2048x576x1536"] = {"fp32_ms": round(fp32 * 1e3, 2), "bf16_ms": round(bf16 * 1e3, 2),
                                   "bf16_over_fp32": round(bf16 / fp32, 1)}
    print(f"matmul 2048x576 @ 576x1536: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms "
          f"({bf16 / fp32:.1f}x fp32) on {out['machine']['cpu_capability']}")

    # 2. LoRA expand (rank 16 -> 1,536) over a 1,900-token prefill, one adapter for every token.
    try:
        import vllm.lora.ops.torch_ops.lora_ops as vllm_ops
    except ImportError:
        print("vLLM not importable here: run with .venv-vllm/bin/python for the LoRA figures")
    else:
        import tunekit_vllm_cpu_lora as plugin

        tokens, rank, width, slots = 1900, 16, 1536, 4
        h, b = torch.randn(tokens, rank), torch.randn(slots, 1, width, rank)
        idx = torch.zeros(tokens, dtype=torch.long)
        y = torch.zeros(tokens, width)
        ref = timed(lambda: vllm_ops.bgmv_expand(h, b, y, idx, True), repeat=5)
        new = timed(lambda: plugin.bgmv_expand(h, b, y, idx, True), repeat=20)
        out["lora_expand_1900_tokens"] = {"vllm_ms": round(ref * 1e3, 2), "plugin_ms": round(new * 1e3, 3),
                                          "speedup": round(ref / new, 1)}
        print(f"LoRA expand, {tokens} tokens, rank {rank} -> {width}: vLLM's CPU op {ref * 1e3:.1f} ms, "
              f"plugin {new * 1e3:.2f} ms ({ref / new:.0f}x)")
    path = ROOT / "bench/results/cpu_kernels.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
