"""Take a fine-tuned model home: one merged folder, one GGUF file, or a GGUF file plus an Ollama Modelfile.

    tunekit export runs/banking77/sft_cpu --format gguf --out banking77.gguf                  # f16
    tunekit export runs/banking77/sft_cpu --format gguf --outtype q8_0 --out banking77-q8_0.gguf
    tunekit export runs/banking77/sft_cpu --format ollama --out ollama/banking77 \\
        --serve-config configs/banking77/serve.yaml     # GGUF + Modelfile; prints `ollama create ...`
    tunekit export runs/banking77/sft_cpu/checkpoint-100 --format merged --out merged/   # as train/merge.py
    tunekit export ft:SmolLM2-135M-Instruct:local:bank:ftjob-abc --format gguf --out bank.gguf

RUN_DIR is a training run (adapter_config.json, tokenizer, chat_template.jinja), one of its checkpoint-N
folders, or the ``ft:`` name of a model the local fine-tuning API recorded in runs/registry.json.

gguf: the adapter is merged into the unquantized base model in float32 (train/merge.py) and written
as one GGUF file with the ``gguf`` package (train/gguf_writer.py): the weights under llama.cpp's tensor names (Llama family,
such as SmolLM2, and Qwen2/Qwen2.5), the byte-level BPE tokenizer (vocabulary, merges, token types,
bos/eos/pad ids), the chat template the run trained with as runtimes need it (the base model's own
template when it renders the same, else the run's without its ``{% generation %}`` markers) and the
end-of-turn token ``<|im_end|>`` as eos. ``--outtype``: f16 (default), bf16, f32, or q8_0 (8-bit
blocks of 32; a matrix whose rows do not divide by 32 stays f16); 1-D tensors (norms, biases) stay
f32, as llama.cpp keeps them. llama.cpp rotates Llama's attention heads in interleaved pairs where
Hugging Face rotates halves, so Llama's q and k rows are reordered for it (transformers' GGUF loader
undoes exactly this); Qwen2 needs no reordering.

ollama: the GGUF file plus a ``Modelfile`` beside it: ``FROM ./<file>.gguf``, a Go ``TEMPLATE``
rendering the same ChatML prompt as training, the template's default system prompt (or the serve
config's ``system:``) as ``SYSTEM``, ``PARAMETER stop "<|im_end|>"`` and the sampling the serve
config pins (temperature 0 without one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.gguf_writer import END_OF_TURN, model_facts, vocabulary, write_gguf  # noqa: E402, F401 (importable here)
from tunekit.errors import UserError  # noqa: E402

FORMATS = ("merged", "gguf", "ollama")
OUTTYPES = ("f16", "bf16", "q8_0", "f32")
MERGED_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

# The Ollama template: every message as ChatML, then the assistant's turn. Ollama prepends the Modelfile's
# SYSTEM as a system message when a request starts without one (as the training template adds its default).
OLLAMA_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ the run


def resolve_run(source: str) -> Path:
    """A run directory from a path or from an ``ft:`` name recorded in runs/registry.json."""
    if source.startswith("ft:"):
        from serve import registry

        name, step = source, None
        if m := re.fullmatch(r"(.*):ckpt-step-(\d+)", source):
            name, step = m.group(1), int(m.group(2))
        for aliases in registry.load().values():
            for entry in (aliases or {}).values():
                if isinstance(entry, dict) and entry.get("model") == name and entry.get("run_dir"):
                    run = Path(entry["run_dir"])
                    return run / f"checkpoint-{step}" if step is not None else run
        raise UserError(f"{source}: not in {registry.registry_path()} (it keeps the latest model of each alias); "
                        "give the run directory instead (the local API keeps it under its data_dir: runs/<job id>)")
    run = Path(source)
    if not (run / "adapter_config.json").is_file():
        hint = " (a checkpoint-N folder inside it works too)" if run.is_dir() else ""
        raise UserError(f"{source}: no adapter_config.json; give a training run directory written by "
                        f"tunekit train{hint}, or an ft: name of the local fine-tuning API")
    return run


def training_template(run: Path, tokenizer, base: str | None = None) -> tuple[str, str]:
    """(the template the run trained with, the template runtimes get): the base model's own template when it
    renders exactly like the training one, else the training one without its ``{% generation %}`` markers."""
    from train.chat_data import GEN_MARKERS, renders_like

    for folder in (run, run.parent):
        path = folder / "chat_template.jinja"
        if path.is_file():
            trained = path.read_text(encoding="utf-8")
            break
    else:
        trained = tokenizer.chat_template
    if not trained:
        raise UserError(f"{run}: no chat_template.jinja and the tokenizer has no chat template; "
                        "retrain with tunekit train (it saves the template it trained with)")
    if base:
        try:
            from transformers import AutoTokenizer

            own = AutoTokenizer.from_pretrained(base).chat_template
        except Exception:  # the base model's folder may hold no tokenizer: the stripped template serves
            own = None
        if own and not GEN_MARKERS.search(own) and renders_like(tokenizer, own, trained):
            return trained, own
    own = GEN_MARKERS.sub("", trained)
    if own != trained and not renders_like(tokenizer, own, trained):
        raise UserError(f"{run}/chat_template.jinja: removing its {{% generation %}} markers changes what it "
                        "renders (whitespace control on the markers?); write the markers as plain "
                        "{% generation %} ... {% endgeneration %}")
    return trained, own


# ------------------------------------------------------------------------------------------------ Ollama


def chatml_default_system(tokenizer, template: str) -> str | None:
    """The system prompt the template adds when a conversation has none (None: it adds none); an error when
    the template is not ChatML as OLLAMA_TEMPLATE renders it."""
    probe = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, chat_template=template)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", text, re.S)
    system = m.group(1) if m else None
    from train.chat_data import PROBES

    for messages in [*PROBES, [{"role": "system", "content": "S"}, *probe]]:
        if tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template) != ollama_prompt(messages, system):
            raise UserError("the run's chat template is not ChatML (<|im_start|>role ... <|im_end|>), the only "
                            "template the Modelfile writes; use --format gguf (the file carries the Jinja template "
                            "for llama.cpp)")
    return system


def ollama_prompt(messages: list[dict], system: str | None = None) -> str:
    """What Ollama renders with OLLAMA_TEMPLATE: SYSTEM first unless the request has a system message."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def modelfile(gguf_name: str, system: str | None, sampling: dict, source: str) -> str:
    for text, what in ((system or "", "the system prompt"), (OLLAMA_TEMPLATE, "the template")):
        if '"""' in text:
            raise UserError(f'{what} contains """, which ends a Modelfile string; remove it')
    lines = [f"# Written by `tunekit export` from {source}.", f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines.append(f'PARAMETER stop "{END_OF_TURN}"')
    lines += [f"PARAMETER {key} {value:g}" if isinstance(value, float) else f"PARAMETER {key} {value}"
              for key, value in sampling.items()]
    return "\n".join(lines) + "\n"


def serve_sampling(config: str | None) -> tuple[dict, str | None]:
    """Ollama parameters and the system prompt from a serve config's ``sampling:`` and ``system:``."""
    if not config:
        return {"temperature": 0.0}, None
    from serve.client import load_settings

    settings = load_settings(config)
    s = settings.sampling
    params = {"temperature": float(s.temperature), "top_p": float(s.top_p)}
    if s.seed is not None:
        params["seed"] = int(s.seed)
    if s.max_tokens:
        params["num_predict"] = int(s.max_tokens)
    return params, settings.system


# ------------------------------------------------------------------------------------------------ main


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def export(source: str, fmt: str, out: Path, outtype: str | None = None, serve_config: str | None = None,
           log=print) -> Path:
    """Export a run; returns the file (gguf), the Modelfile (ollama) or the folder (merged) written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    run = resolve_run(source)
    if fmt == "merged":
        if outtype not in (None, *MERGED_DTYPES):
            raise UserError(f"--outtype {outtype}: a merged folder is {', '.join(MERGED_DTYPES)}; q8_0 is for gguf")
        from train.merge import merge

        log(f"merging {run} into its base model -> {out}")
        merge(run, out, MERGED_DTYPES.get(outtype))
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        log(f"wrote {out}/ ({human(size)})")
        return out
    outtype = outtype or "f16"
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    from transformers import AutoConfig, AutoTokenizer  # without the [train] extra: the CLI names it

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the gguf package (it reads and writes .gguf files): "
                        "pip install gguf") from None
    sampling, system = serve_sampling(serve_config) if fmt == "ollama" else ({}, None)
    if fmt == "ollama":
        if out.suffix == ".gguf" or out.is_file():
            raise UserError(f"--out {out}: --format ollama writes a folder (the .gguf file and a Modelfile)")
        path = out / f"{out.name or 'model'}-{outtype}.gguf"
    elif out.is_dir():
        path = out / f"{run.parent.name if run.name.startswith('checkpoint-') else run.name}-{outtype}.gguf"
    else:
        path = out if out.suffix == ".gguf" else out.with_name(out.name + ".gguf")

    # Everything that can refuse the run is checked before the (slow) merge: architecture, tokenizer, template.
    from train.merge import load_merged, tokenizer_dir

    base = json.loads((run / "adapter_config.json").read_text()).get("base_model_name_or_path") or "base"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(run)))
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        config = None  # load_merged names the problem
    if config is not None:
        model_facts(config)
        vocabulary(tokenizer, max(config.vocab_size, len(tokenizer)))
    _trained, template = training_template(run, tokenizer, base)
    default_system = chatml_default_system(tokenizer, template) if fmt == "ollama" else None

    log(f"merging {run} into its base model (float32)")
    t0 = time.monotonic()
    model, tokenizer = load_merged(run, "float32")
    name = f"{Path(base).name}-{run.name if not run.name.startswith('checkpoint-') else run.parent.name}"
    log(f"writing {path} ({outtype}, {model.config.model_type}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        info = write_gguf(model, tokenizer, template, tmp, outtype, name, log)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"  {info['arch']}, {info['tensors']} tensors ({'/'.join(info['types'])}), vocab {info['vocab']} "
        f"(pre-tokenizer {info['pre']}), eos {info['eos']}, chat template from {run}")
    result = path
    if fmt == "ollama":
        text = modelfile(path.name, system if system is not None else default_system, sampling, str(source))
        result = out / "Modelfile"
        result.write_text(text, encoding="utf-8")
        log(f"wrote {result}")
        log(f"run it: ollama create {out.name or 'model'} -f {result} && ollama run {out.name or 'model'}")
    log(f"wrote {path} ({human(path.stat().st_size)}, {outtype}) in {time.monotonic() - t0:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tunekit export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a training run, one of its checkpoint-N folders, or an ft: name")
    p.add_argument("--format", choices=FORMATS, default="gguf", help="merged folder, one GGUF file, or GGUF + "
                   "Ollama Modelfile (default: gguf)")
    p.add_argument("--out", required=True, type=Path,
                   help="gguf: the .gguf file (or a folder to write it in); ollama: a folder (file + "
                   "Modelfile); merged: a folder")
    p.add_argument("--outtype", choices=OUTTYPES, help="gguf/ollama: f16 (default), bf16, q8_0, f32; "
                   "merged: f32, f16, bf16 (default: the base model's dtype)")
    p.add_argument("--serve-config", help="ollama: a serve config whose sampling: and system: the Modelfile "
                   "pins (default: temperature 0 and the template's own system prompt)")
    args = p.parse_args(argv)
    export(args.run, args.format, args.out, args.outtype, args.serve_config)
    return 0


if __name__ == "__main__":
    from tunekit.errors import run_main

    sys.exit(run_main(main))
