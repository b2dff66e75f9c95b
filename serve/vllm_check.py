"""vLLM's own argument parser on the launcher's command lines: a flag or value vLLM refuses fails
here, before a server starts (``tunekit serve --check``; the tests run it on every serve config).

The CPU build (``.venv-vllm``) and the CUDA build of one vLLM version share the parser and the engine
arguments, so a check on a CPU machine holds for a GPU one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from tunekit.errors import UserError

# Run by vLLM's interpreter: parse each command line with vLLM's own argument parser and engine
# arguments (the CPU and CUDA builds of one version share them), print what vLLM would use.
VLLM_ARG_CHECK = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.load(sys.stdin):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    e = AsyncEngineArgs.from_cli_args(args)
    out.append({k: getattr(e, k) for k in ("model", "dtype", "quantization", "enforce_eager", "enable_lora",
                                           "max_lora_rank", "max_loras", "max_model_len", "block_size",
                                           "gpu_memory_utilization", "tensor_parallel_size")})
print("VLLM_ARGS " + json.dumps(out, default=str))
"""


def check_with_vllm(commands: list[list[str]], python: str) -> list[dict]:
    """Parse vLLM command lines (``[python, "-m", module, *args]``) with vLLM's own parser, starting nothing.

    Returns the engine arguments vLLM would use for each; a flag or value vLLM refuses is a UserError
    with vLLM's own message."""
    argvs = [cmd[3:] for cmd in commands]
    # HF_HUB_OFFLINE=1 makes the engine arguments resolve a hub id to a local snapshot; parsing needs neither
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cuda" if has_cuda() else "cpu")}
    proc = subprocess.run([python, "-c", VLLM_ARG_CHECK], input=json.dumps(argvs), capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_ARGS ")]
    if proc.returncode or not lines:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()[-3:]
        raise UserError(f"vLLM refuses the command line: {' '.join(errors[-2:]).strip()}")
    return json.loads(lines[-1].removeprefix("VLLM_ARGS "))


def has_cuda() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
