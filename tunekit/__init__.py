"""tunekit: the shared core (errors, typed configs, network checks) and the `tunekit` command."""

import logging

# bitsandbytes (imported by peft and by transformers' Trainer) logs "Failed to load CPU gemm_4bit_forward from
# kernels-community: No module named 'kernels'" at import on every CPU with AVX512-BF16, then uses its own CPU
# kernels. It is that logger's only message; every tunekit process (the command, python -m ..., train/sft.py and
# train/dpo.py) imports this package before bitsandbytes loads, and so does `import train...` (train/__init__.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
