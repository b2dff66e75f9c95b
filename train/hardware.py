"""What the CPU can do, for choices that depend on it (training precision, the CPU server's dtype)."""

from __future__ import annotations

import sys
from pathlib import Path


def cpu_flags() -> list[str]:
    """The CPU's vector flags that decide training speed here (for the figures' machine notes)."""
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return sorted(f for f in set(line.split(":", 1)[1].split()) if f in wanted)


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    far slower than fp32 (73x for one matmul on an AVX2-only EPYC: bench/cpu_kernels.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: do not guess
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_report() -> dict:
    """The CUDA device as torch sees it: name, compute capability, memory, driver, torch and CUDA versions."""
    import subprocess

    import torch

    report = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "cuda_available": torch.cuda.is_available()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        report["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        report["driver"] = None
    if report["cuda_available"]:
        from train.precision import gpu_has_bf16

        props = torch.cuda.get_device_properties(0)
        report.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                      memory_gib=round(props.total_memory / 2**30, 1), bf16=gpu_has_bf16(),
                      arch_list=torch.cuda.get_arch_list())
    return report


def main(argv=None) -> int:
    """python -m train.hardware [--require-cuda]: print the GPU, its compute capability, driver, torch and CUDA."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.hardware", description=main.__doc__)
    p.add_argument("--require-cuda", action="store_true", help="exit 1 with the likely fix when CUDA is unusable")
    args = p.parse_args(argv)
    r = gpu_report()
    print(f"python {r['python']}, torch {r['torch']} (CUDA {r['torch_cuda']}), driver {r['driver']}")
    if r["cuda_available"]:
        print(f"GPU {r['gpu']}: compute capability {r['compute_capability']}, {r['memory_gib']} GiB, "
              f"bf16 {'yes' if r['bf16'] else 'no (fp16 only: the T4 profile)'}")
        sm = "sm_" + r["compute_capability"].replace(".", "")
        if r["arch_list"] and sm not in r["arch_list"] and not any(a.startswith("compute_") for a in r["arch_list"]):
            print(f"error: this torch build has no kernels for {sm} (it has {', '.join(r['arch_list'])}); "
                  "install the pinned torch==2.13.0 from PyPI", file=sys.stderr)
            return 1
        return 0
    if args.require_cuda:
        why = ("torch is a CPU build" if r["torch_cuda"] is None else
               "no NVIDIA driver answers (nvidia-smi)" if r["driver"] is None else
               f"the driver {r['driver']} is too old for CUDA {r['torch_cuda']} or no GPU is attached")
        print(f"error: CUDA is not usable: {why}. On Colab: Runtime > Change runtime type > T4 GPU, then run "
              "the install cell again", file=sys.stderr)
        return 1
    print("no CUDA GPU: training and serving run on the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
