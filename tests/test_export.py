"""tunekit export (train/export.py): a LoRA run as one GGUF file (and an Ollama Modelfile), checked by loading
the file back with transformers' GGUF loader: the same logits as the merged model, the same prompt token ids
as training, <|im_end|> as eos.

The runs are built here, not trained: a tiny random Llama / Qwen2 with a small byte-level BPE tokenizer, and
a PEFT LoRA adapter on every linear layer with random (non-zero) B matrices, saved as train/sft.py saves a
run (adapter, tokenizer, the training chat template with {% generation %} markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING_TEMPLATE = (ROOT / "train/templates/smollm2_training.jinja").read_text(encoding="utf-8")
OWN_TEMPLATE = (ROOT / "train/templates/smollm2.jinja").read_text(encoding="utf-8")
SMOL = ROOT / ".cache/models/SmolLM2-135M-Instruct"
CORPUS = ["Hello there, how are you today? I am fine: 42 apples and 7 pears, 2026-12-05.",
          "a\nb {\"x\": 1} two lines émoji 😀 café", "system user assistant Be brief. Hi Hello! What is my balance?",
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, 42 apples?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "a\nb 2026 émoji 😀"}],
]


def bpe_tokenizer(kind: str):
    """A byte-level BPE tokenizer trained on CORPUS: GPT-2's split ("gpt2", as the demo's SmolLM2 folder has it)
    or Qwen2's ("qwen2"), with ChatML special tokens and the training template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=320, show_progress=False, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "gpt2":
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
    else:
        model = json.loads(bpe.to_str())["model"]
        tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", unk_token=None)
        tok.add_tokens([AddedToken("<|im_start|>", special=True)], special_tokens=True)
    tok.chat_template = TRAINING_TEMPLATE
    return tok


def make_run(root: Path, arch: str) -> Path:
    """A base model folder and a LoRA run on it (random B, so merging changes every targeted weight)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = bpe_tokenizer("gpt2" if arch == "llama" else "qwen2")
    dims = dict(vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # 5 unused rows
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = (LlamaConfig(**dims, bos_token_id=tok.bos_token_id, tie_word_embeddings=True) if arch == "llama"
              else Qwen2Config(**dims, bos_token_id=None, tie_word_embeddings=False))
    torch.manual_seed(0)
    base, run = root / "base", root / "run"
    model = AutoModelForCausalLM.from_config(config)
    if arch == "qwen2":  # q/k/v biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(base)
    tok.chat_template = OWN_TEMPLATE  # the base model's own template; the run saves its training version
    tok.save_pretrained(base)
    tok.chat_template = TRAINING_TEMPLATE
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft.save_pretrained(run)
    tok.save_pretrained(run)  # tokenizer + chat_template.jinja (the training template), as train/sft.py saves them
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def merged(llama_run):
    from train.merge import load_merged

    return load_merged(llama_run, "float32")


def logits(model, tokenizer, messages):
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                        chat_template=TRAINING_TEMPLATE)
    with torch.no_grad():
        return model(**ids).logits[0]


def load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def check_tokenizer(gguf_tok, train_tok):
    """The file's tokenizer and template render every conversation to the training token ids; eos <|im_end|>."""
    assert gguf_tok.chat_template == OWN_TEMPLATE  # the model's own template: no {% generation %} markers
    assert gguf_tok.eos_token == "<|im_end|>"
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert (gguf_tok.apply_chat_template(messages, add_generation_prompt=prompt)["input_ids"]
                    == train_tok.apply_chat_template(messages, add_generation_prompt=prompt,
                                                     chat_template=TRAINING_TEMPLATE)["input_ids"])


# max |logit difference| / max |logit| allowed, per output type
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}  # measured: 0, 1.4e-3, 1.1e-2, 3.0e-2


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_gguf_loads_back_with_the_merged_logits(llama_run, merged, outtype, tmp_path):
    import torch
    from gguf import GGUFReader

    from train.export import export

    path = export(str(llama_run), "gguf", tmp_path / f"m-{outtype}", outtype, log=lambda *_: None)
    assert path == tmp_path / f"m-{outtype}.gguf" and path.is_file()
    model, tokenizer = load_gguf(path)
    ref_model, train_tok = merged
    for messages in CONVERSATIONS:
        ref, out = logits(ref_model, train_tok, messages), logits(model, train_tok, messages)
        error = ((out - ref).abs().max() / ref.abs().max()).item()
        assert error <= TOLERANCE[outtype], (outtype, error)
        assert torch.equal(out[-1].argmax(), ref[-1].argmax())
    check_tokenizer(tokenizer, train_tok)
    assert model.config.tie_word_embeddings  # no output.weight written for a tied lm_head
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == train_tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert len(fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size  # padded to the model's rows


def test_qwen2_gguf_loads_back_with_the_merged_logits(tmp_path):
    """Qwen2: untied lm_head (output.weight), q/k/v biases, Qwen2's pre-tokenizer, no bos."""
    from train.export import export
    from train.merge import load_merged

    run = make_run(tmp_path, "qwen2")
    path = export(str(run), "gguf", tmp_path / "q.gguf", "f32", log=lambda *_: None)
    model, tokenizer = load_gguf(path)
    ref_model, train_tok = load_merged(run, "float32")
    for messages in CONVERSATIONS:
        ref, out = logits(ref_model, train_tok, messages), logits(model, train_tok, messages)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE["f32"]
    check_tokenizer(tokenizer, train_tok)
    assert not model.config.tie_word_embeddings and tokenizer.bos_token is None


@pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="make model builds the demo's SmolLM2 folder")
def test_the_demo_tokenizer_round_trips(tmp_path):
    """SmolLM2-135M-Instruct's own tokenizer (49,152 tokens, 48,900 merges) with a tiny model under it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from train.export import write_gguf

    tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    info = write_gguf(model, tok, OWN_TEMPLATE, tmp_path / "smol.gguf", "f16", "smol", log=lambda *_: None)
    assert info["pre"] == "gpt2" and info["eos"] == "<|im_end|>"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smol.gguf")
    assert back.chat_template == OWN_TEMPLATE
    for messages in CONVERSATIONS:
        assert back.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == tok.apply_chat_template(
            messages, add_generation_prompt=True, chat_template=OWN_TEMPLATE)["input_ids"]
    text = "Transfer 1,234.56 EUR to card 4242 on 2026-12-05 — ok? 😀\n\n  indented"
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def render_modelfile_template(template: str, messages: list[dict]) -> str:
    """The Modelfile's Go template rendered by hand: its `range .Messages` body once per message, then the rest."""
    m = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S)
    assert m, template
    body, tail = m.groups()
    return "".join(body.replace("{{ .Role }}", x["role"]).replace("{{ .Content }}", x["content"])
                   for x in messages) + tail


def test_ollama_modelfile_renders_the_training_prompt(llama_run, merged, tmp_path, capsys):
    from tunekit.cli import main

    serve = tmp_path / "serve.yaml"
    serve.write_text("system: Answer with the code word.\nsampling: {temperature: 0.0, top_p: 1.0, max_tokens: 16, "
                     "seed: 0}\n")
    out = tmp_path / "bank"
    assert main(["export", str(llama_run), "--format", "ollama", "--out", str(out), "--outtype", "q8_0",
                 "--serve-config", str(serve)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create bank -f {out / 'Modelfile'}" in printed
    assert re.search(r"wrote .*bank-q8_0\.gguf \([\d.]+ MB, q8_0\)", printed.splitlines()[-1])
    text = (out / "Modelfile").read_text()
    template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                "{{ end }}<|im_start|>assistant\n")
    assert text == (f"# Written by `tunekit export` from {llama_run}.\n"
                    "FROM ./bank-q8_0.gguf\n"
                    f'TEMPLATE """{template}"""\n'
                    'SYSTEM """Answer with the code word."""\n'
                    'PARAMETER stop "<|im_end|>"\n'
                    "PARAMETER temperature 0\nPARAMETER top_p 1\nPARAMETER seed 0\nPARAMETER num_predict 16\n")
    assert (out / "bank-q8_0.gguf").is_file()

    _model, train_tok = merged
    system = {"role": "system", "content": "Answer with the code word."}
    for messages in CONVERSATIONS:  # Ollama puts SYSTEM first when a request has no system message
        sent = messages if messages[0]["role"] == "system" else [system, *messages]
        assert render_modelfile_template(template, sent) == train_tok.apply_chat_template(
            sent, tokenize=False, add_generation_prompt=True, chat_template=TRAINING_TEMPLATE)

    # without a serve config: temperature 0, and the template's own default system prompt as SYSTEM
    from train.export import export

    modelfile = export(str(llama_run), "ollama", tmp_path / "plain", "f16", log=lambda *_: None)
    text = modelfile.read_text()
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert f'SYSTEM """{default}"""' in text and "PARAMETER temperature 0\n" in text and "top_p" not in text
    user = CONVERSATIONS[0]
    assert render_modelfile_template(template, [{"role": "system", "content": default}, *user]) == \
        train_tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, chat_template=TRAINING_TEMPLATE)


def test_errors_are_one_line(llama_run, tmp_path, capsys):
    from transformers import GPT2Config

    from train.export import model_facts
    from tunekit.cli import main
    from tunekit.errors import UserError

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter_config.json" in err
    assert main(["export", str(llama_run), "--format", "merged", "--outtype", "q8_0", "--out", str(tmp_path / "m")]) == 2
    assert "q8_0 is for gguf" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"'gpt2'; GGUF export writes llama, qwen2"):
        model_facts(GPT2Config())


def test_ft_names_and_checkpoints_resolve_through_the_registry(llama_run, tmp_path, monkeypatch):
    import shutil

    from serve import registry
    from train.export import export, resolve_run
    from tunekit.errors import UserError

    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    name = "ft:base:local:bank:ftjob-abc123"
    registry.record_model("local", "finetuned", name, job_id="ftjob-abc123", run_dir=str(llama_run))
    assert resolve_run(name) == llama_run
    assert resolve_run(name + ":ckpt-step-5") == llama_run / "checkpoint-5"
    with pytest.raises(UserError, match="not in .*registry.json"):
        resolve_run("ft:base:local:other:ftjob-zzz")

    # a checkpoint folder holds the adapter; its tokenizer may sit in the run above it
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    ckpt = run / "checkpoint-5"
    ckpt.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / f, ckpt / f)
    out = export(str(ckpt), "merged", tmp_path / "merged", log=lambda *_: None)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
