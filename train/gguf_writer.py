"""The GGUF file of a merged model, as llama.cpp and Ollama read it: ``write_gguf`` (``train/export.py`` calls it).

The weights go under llama.cpp's tensor names (Llama family, such as SmolLM2, and Qwen2/Qwen2.5). Llama's q and
k rows are reordered for llama.cpp's interleaved RoPE pairs (``rope_pairs``). The byte-level BPE tokenizer is
written with its vocabulary, merges, token types and bos/eos/pad ids, the chat template the run trained with,
and ``<|im_end|>`` as eos. ``model_facts`` refuses what GGUF export does not write, before the merge costs
minutes. The options and the whole export are in train/export.py's docstring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunekit.errors import UserError

ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # config.model_type -> gguf.MODEL_ARCH member
END_OF_TURN = "<|im_end|>"


# ------------------------------------------------------------------------------------------------ tokenizer


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how this byte-level tokenizer splits text before BPE
    (transformers' GGUF loader rebuilds the gpt2, qwen2 and llama-bpe splits from it)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"  # GPT-2's split (SmolLM2's tokenizer as the demo's model folder has it)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM2's release tokenizer: each digit on its own, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as known
        except ImportError:
            from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

            known = {"qwen2": PRETOKENIZE_REGEX}
        for name in ("qwen2", "llama-bpe", *known):
            if known.get(name) == pattern:
                return name
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one GGUF export knows "
                    "(GPT-2's, SmolLM2's, Qwen2's or Llama 3's split); export with --format merged")


def vocabulary(tokenizer, n_vocab: int) -> dict:
    """Tokens, token types, merges and llama.cpp's pre-tokenizer name of a byte-level BPE tokenizer."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or (spec.get("decoder") or {}).get(
        "type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise UserError(f"the tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}); GGUF "
                        "export writes byte-level BPE tokenizers (SmolLM2, Qwen2/2.5, Llama 3); use --format merged")
    tokens: list[str | None] = [None] * n_vocab
    types = [TokenType.UNUSED] * n_vocab
    entries = [(text, i, TokenType.NORMAL) for text, i in model["vocab"].items()]
    entries += [(t["content"], t["id"], TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
                for t in spec.get("added_tokens", [])]
    for text, i, kind in entries:
        if i >= n_vocab:
            raise UserError(f"the tokenizer's token {text!r} has id {i}, beyond the model's vocab_size {n_vocab}")
        tokens[i], types[i] = text, kind
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # rows the tokenizer never uses
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "pre": pre_tokenizer_name(spec)}


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


# ------------------------------------------------------------------------------------------------ tensors


def rope_pairs(w, n_head: int):
    """Reorder a Llama q/k projection's rows (or bias) per head from Hugging Face's rotary layout (the
    first half of a head's dimensions rotates with the second half) to llama.cpp's (dimension 2i with 2i+1).
    transformers' GGUF loader (``LlamaTensorProcessor``) applies the inverse on load."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_facts(config) -> dict:
    """The hyperparameters GGUF stores, checked: an architecture or a RoPE variant it cannot write is an error."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"the base model is {config.model_type!r}; GGUF export writes {', '.join(ARCHITECTURES)} "
                        "(SmolLM2, Llama, Qwen2/Qwen2.5); use --format merged for any other")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"the base model uses {rope.get('rope_type') or rope.get('type')} RoPE scaling, which GGUF "
                        "export does not write; use --format merged")
    if getattr(config, "use_sliding_window", False):
        raise UserError("the base model uses sliding-window attention, which GGUF export does not write; "
                        "use --format merged")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"the base model's activation is {config.hidden_act}; GGUF's {config.model_type} is silu")
    heads = config.num_attention_heads
    return {"arch": arch, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "ffn": config.intermediate_size, "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None)
            or heads, "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "context": config.max_position_embeddings, "eps": config.rms_norm_eps,
            "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
            "vocab": config.vocab_size}


def tensor_plan(model, facts: dict, outtype: str) -> list[tuple[str, str, object]]:
    """(GGUF name, state-dict name, GGML type) of every tensor to write, in state-dict order."""
    from gguf import MODEL_ARCH, GGMLQuantizationType as Q, get_tensor_name_map

    names = get_tensor_name_map(getattr(MODEL_ARCH, facts["arch"]), facts["layers"])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    wide = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    plan = []
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # a tied lm_head is the embedding: llama.cpp and transformers both reuse token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"the merged model's tensor {key} has no GGUF name for {facts['arch'].lower()}; "
                            "use --format merged")
        qtype = Q.F32 if tensor.dim() == 1 else wide
        if qtype == Q.Q8_0 and tensor.shape[-1] % 32:
            qtype = Q.F16  # q8_0 packs blocks of 32 along a row
        plan.append((name, key, qtype))
    return plan


def tensor_data(name: str, tensor, qtype, facts: dict):
    """The tensor as the bytes GGUF stores (numpy), Llama's q/k rows reordered for llama.cpp's RoPE."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = tensor.detach().to("cpu").float().numpy()
    if facts["arch"] == "LLAMA" and (".attn_q." in name or ".attn_k." in name):
        data = rope_pairs(data, facts["heads"] if ".attn_q." in name else facts["kv_heads"])
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data), qtype)  # bf16 and q8_0: uint8 blocks


def write_gguf(model, tokenizer, template: str, path: Path, outtype: str, name: str, log=print) -> dict:
    """Write the merged model, its tokenizer and chat template as one GGUF file; returns what was written."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q, LlamaFileType

    facts = model_facts(model.config)
    vocab = vocabulary(tokenizer, facts["vocab"])
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in template else None
    eos = eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"the tokenizer has no {END_OF_TURN} and no eos token; runtimes would never stop")
    plan = tensor_plan(model, facts, outtype)
    state = model.state_dict()

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, facts["arch"])])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description("a LoRA adapter merged into its base model by tunekit export")
    writer.add_context_length(facts["context"])
    writer.add_embedding_length(facts["hidden"])
    writer.add_block_count(facts["layers"])
    writer.add_feed_forward_length(facts["ffn"])
    writer.add_head_count(facts["heads"])
    writer.add_head_count_kv(facts["kv_heads"])
    writer.add_rope_dimension_count(facts["head_dim"])
    if facts["head_dim"] != facts["hidden"] // facts["heads"]:
        writer.add_key_length(facts["head_dim"])
        writer.add_value_length(facts["head_dim"])
    writer.add_rope_freq_base(float(facts["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(facts["eps"]))
    writer.add_vocab_size(facts["vocab"])
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(eos)
    if isinstance(eot, int) and eot == eos:
        writer.add_eot_token_id(eot)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)

    # Tensor infos first, then the data one tensor at a time: memory stays at the merged model's.
    for gguf_name, key, qtype in plan:
        shape = tuple(state[key].shape)
        if qtype == Q.F32 or qtype == Q.F16:
            itemsize = 4 if qtype == Q.F32 else 2
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16),
                                   int(np.prod(shape)) * itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    start, step = time.monotonic(), max(1, len(plan) // 10)
    for i, (gguf_name, key, qtype) in enumerate(plan, 1):
        writer.write_tensor_data(tensor_data(gguf_name, state[key], qtype, facts))
        if i % step == 0 or i == len(plan):
            log(f"  tensors {i}/{len(plan)} ({time.monotonic() - start:.0f} s)")
    writer.close()
    kinds = sorted({q.name for _n, _k, q in plan})
    return {"arch": facts["arch"].lower(), "tensors": len(plan), "types": kinds, "vocab": facts["vocab"],
            "eos": tokenizer.convert_ids_to_tokens(eos), "pre": vocab["pre"]}
