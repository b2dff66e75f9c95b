"""Merge a LoRA adapter into its base model, for users who want one plain model folder.

    python -m train.merge runs/banking77/sft_cpu --out runs/banking77/merged
    python -m train.merge runs/banking77/sft_t4 --out merged --dtype float16

The base model is read from the adapter's ``adapter_config.json`` and loaded unquantized (merging
into 4-bit weights would round the adapter away), the adapter is folded into its weights, and the
result is saved with the run's tokenizer and chat template. ``tunekit export RUN --format merged``
does the same; ``--format gguf`` / ``ollama`` write one GGUF file from the same merge (train/export.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunekit.errors import UserError  # noqa: E402


def tokenizer_dir(run_dir: Path) -> Path:
    """Where the run's tokenizer is: the run directory, or for a checkpoint-N folder without one, its run."""
    if not (run_dir / "tokenizer_config.json").is_file() and (run_dir.parent / "tokenizer_config.json").is_file():
        return run_dir.parent
    return run_dir


def load_merged(run_dir: Path, dtype: str | None = None):
    """(the base model with the adapter of ``run_dir`` folded in, the run's tokenizer)."""
    cfg_path = run_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: no adapter_config.json; give a run directory written by train/sft.py "
                        "(or one of its checkpoint-N folders)")
    base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(run_dir), dtype=torch_dtype)
    except OSError as e:
        raise UserError(f"{cfg_path}: cannot load the base model {base} ({str(e).splitlines()[0]})") from None
    return model.merge_and_unload(), AutoTokenizer.from_pretrained(str(tokenizer_dir(run_dir)))


def merge(run_dir: Path, out: Path, dtype: str | None = None) -> Path:
    merged, tokenizer = load_merged(run_dir, dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run directory (adapter + tokenizer)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the base model's dtype")
    args = p.parse_args(argv)
    try:
        out = merge(Path(args.run_dir), Path(args.out), args.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.run_dir} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
