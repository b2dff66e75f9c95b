"""What the CPU can do, for choices that depend on it (training precision, the CPU server's dtype)."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    far slower than fp32 (73x for one matmul on an AVX2-only EPYC: bench/cpu_kernels.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: do not guess
    return "avx512_bf16" in flags or "amx_bf16" in flags
