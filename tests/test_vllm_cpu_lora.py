"""The vLLM CPU LoRA plugin (serve/vllm_cpu_lora) gives vLLM's own results, and is what vLLM loads."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from conftest import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"

CHECK = textwrap.dedent("""
    import torch
    import vllm.lora.ops.torch_ops.lora_ops as ref
    import tunekit_vllm_cpu_lora as new

    torch.manual_seed(0)
    T, IN, R, OUT, L = 300, 64, 8, 96, 3
    x, h = torch.randn(T, IN), torch.randn(T, R)
    A, B = torch.randn(L, 1, R, IN), torch.randn(L, 1, OUT, R)
    mixed = torch.randint(0, L, (T,))
    for idx in (mixed, torch.full((T,), 1)):
        y1, y2 = torch.zeros(T, R), torch.zeros(T, R)
        ref.bgmv_shrink(x, A, y1, idx, 0.5); new.bgmv_shrink(x, A, y2, idx, 0.5)
        assert torch.allclose(y1, y2, atol=1e-4), "shrink"
        base = torch.randn(T, OUT)
        y1, y2 = base.clone(), base.clone()
        ref.bgmv_expand(h, B, y1, idx, True); new.bgmv_expand(h, B, y2, idx, True)
        assert torch.allclose(y1, y2, atol=1e-4), "expand"
        wide = torch.randn(T, OUT + 40)
        y1, y2 = wide.clone(), wide.clone()
        ref.bgmv_expand_slice(h, B, y1, idx, 20, OUT, False); new.bgmv_expand_slice(h, B, y2, idx, 20, OUT, False)
        assert torch.allclose(y1, y2, atol=1e-4), "expand_slice"
    # tokens without an adapter (-1) get no LoRA term
    idx = mixed.clone(); idx[:7] = -1
    y = torch.ones(T, OUT)
    new.bgmv_expand(h, B, y, idx, True)
    assert torch.equal(y[:7], torch.ones(7, OUT))
    # the entry point vLLM loads in every process swaps the ops the CPU punica wrapper calls
    from importlib.metadata import entry_points
    assert "tunekit_cpu_lora" in {e.name for e in entry_points(group="vllm.general_plugins")}
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    assert punica_cpu.bgmv_expand is new.bgmv_expand and ref.bgmv_shrink is new.bgmv_shrink
    print("ok")
""")


def test_plugin_matches_vllms_cpu_lora_ops_and_is_registered():
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} missing: run `make serve-setup` (make test does)")
    proc = subprocess.run([str(VLLM_PYTHON), "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
