"""Shared fixtures: run commands like a user does, and a tiny chat tokenizer built offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# SmolLM2-135M-Instruct's own chat template (as its GGUF ships it): the tiny test tokenizer uses it,
# so the tests exercise the real template and its training version in train/templates/.
CHATML = (ROOT / "train/templates/smollm2.jinja").read_text(encoding="utf-8")


# Fixtures that start a server, a training run or an install: a test that uses one is `slow` (left
# out of `make test-fast`) without saying so itself.
SLOW_FIXTURES = {"vllm_server", "smol_adapter", "server", "seed_job", "trained", "base_venv", "ui", "browser", "page",
                 "backend", "toy_compare"}
# Modules whose every test starts vLLM or runs a notebook (helpers there start their own).
SLOW_MODULES = {"test_vllm_cpu_lora", "test_notebook", "test_compare", "test_serve", "test_ui", "test_finetune_api",
                "test_openai_ft"}


# Modules with a test that uses the session's vLLM server. Under pytest-xdist (`make test` runs two
# workers) they run on one worker, so one server serves them all; every other module runs whole on
# one worker, so its module-scoped fixtures (a training run, an API server) are built once. (xdist's
# own --dist loadgroup cannot do this with pytest 9: the group it writes into a test's id is lost.)
VLLM_SERVER_MODULES = {"test_compare", "test_compare_logprobs", "test_distil", "test_finetune_api_chat", "test_serve",
                       "test_ui", "test_use_cases", "test_finetune_api_multi_vllm"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class OneServer(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "vllm_server" if Path(module).stem in VLLM_SERVER_MODULES else module

    return OneServer(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "vllm_server" in fixtures and item.module.__name__ not in VLLM_SERVER_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses vllm_server: add {item.module.__name__} to "
                                    "VLLM_SERVER_MODULES in tests/conftest.py (one server per test run)")


def ctrl_c_able() -> None:
    """``preexec_fn`` for a child a test sends Ctrl-C (SIGINT): a shell that started the tests in the
    background (``cmd &``) leaves SIGINT ignored, a child inherits that, and Python then installs no
    KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would; returns the finished process (text output)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with a ChatML template, saved like a hub model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n"]
    words += [f"w{i}" for i in range(200)] + "the a card is my where hello yes no positive negative".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token=None)
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama with the tiny ChatML tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False, initializer_range=0.3)
    # a large init range: LoRA leaves lm_head frozen, and with the default 0.02 its logits could
    # never move far from uniform after the final RMSNorm
    out = tmp_path_factory.mktemp("tiny_llama") / "tiny-llama"  # the fine-tuning API's tests name it so
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


TOY = [("w1 w2", "yes"), ("w3 w4", "no"), ("w5 w6", "yes"), ("w7 w8", "no"), ("w9 w10", "yes"),
       ("w11 w12", "no"), ("w13 w14", "yes"), ("w15 w16", "no")]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """Chat JSONL of a yes/no toy task (train: the 8 pairs x 4, valid: the 8 pairs)."""
    import json

    d = tmp_path_factory.mktemp("toy_data")
    rows = [{"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in TOY]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


# ---------------------------------------------------------------------------------------------
# Serving: one real vLLM CPU server per test session, with a LoRA adapter from a real training run
# of the demo's base model (SmolLM2-135M-Instruct, made by `make model`).

SMOL = ROOT / ".cache/models/SmolLM2-135M-Instruct"
SERVE_KEY = "test-secret-key-5f1c"  # the key the session's server requires
SMOL_TOY = [(f"code {'red' if i % 2 else 'blue'} {i}", "ALPHA" if i % 2 else "BRAVO") for i in range(1, 17)]
SMOL_SYSTEM = "Answer with the code word."


def free_port() -> int:
    from tunekit.net import free_port as pick

    return pick()


def chat_rows(pairs, system=SMOL_SYSTEM) -> list[dict]:
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smol_adapter(tmp_path_factory) -> Path:
    """A real accelerate-launched LoRA run of SmolLM2-135M-Instruct on a toy code-word task (~1 min)."""
    import yaml

    assert (SMOL / "config.json").is_file(), f"{SMOL} missing: run `make model` (make test does)"
    d = tmp_path_factory.mktemp("smol_run")
    write_jsonl(d / "train.jsonl", chat_rows(SMOL_TOY) * 2)
    write_jsonl(d / "valid.jsonl", chat_rows(SMOL_TOY[:8]))
    cfg = yaml.safe_load((ROOT / "configs/banking77/sft_cpu.yaml").read_text())
    cfg.update(train_file=str(d / "train.jsonl"), valid_file=str(d / "valid.jsonl"), model_name_or_path=str(SMOL),
               output_dir=str(d / "out"), max_length=64, num_threads=2, per_device_train_batch_size=8,
               per_device_eval_batch_size=8, learning_rate=3e-3, warmup_steps=0, lr_scheduler_type="constant",
               max_steps=10, logging_steps=5, eval_steps=10, save_steps=10, lora_r=8, lora_alpha=16)
    (d / "sft.yaml").write_text(yaml.safe_dump(cfg))
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--quiet", "--num_processes", "1",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*accelerate, str(ROOT / "train/sft.py"), "--config", str(d / "sft.yaml")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d / "out"


class RunningServer:
    """The session's vLLM server, started the way users start it: `python -m serve.vllm_server`."""

    def __init__(self, config: Path, port: int, proc: subprocess.Popen, log: Path):
        self.config, self.port, self.proc, self.log = config, port, proc, log
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.api_key = SERVE_KEY
        self.base_model = "smol-base"
        self.output = ""

    def env(self, **extra) -> dict:
        return {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": SERVE_KEY, **extra}


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, request):
    """Starts the CLI with the base model, trains `smol_adapter` meanwhile (both take about a minute
    on 2 cores), waits for the ready line, then adds the adapter as `finetuned` the way users add one
    to a running server (`tunekit adapters add`). At the end: SIGTERM, and nothing may be left."""
    import signal
    import time

    import yaml

    d = tmp_path_factory.mktemp("serve")
    port = free_port()
    config = d / "serve.yaml"
    serve = {
        "backend": "local", "system": SMOL_SYSTEM,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0},
        "server": {"model": str(SMOL), "served_model_name": "smol-base", "adapters": {},
                   "port": port, "max_model_len": 512, "startup_timeout_s": 600},
        "openai": {"base_model": "gpt-4o-mini-2024-07-18"},
    }
    config.write_text(yaml.safe_dump(serve))
    log = d / "vllm.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": SERVE_KEY}
    out = open(d / "cli.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve.vllm_server", "--config", str(config), "--quiet",
                             "--log", str(log)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        adapter = request.getfixturevalue("smol_adapter")
    except BaseException:
        proc.kill()
        raise
    deadline = time.monotonic() + 660
    while "ready in" not in (d / "cli.out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("vLLM server did not start:\n" + (d / "cli.out").read_text()[-3000:]
                        + (log.read_text()[-3000:] if log.exists() else ""))
        time.sleep(1)
    added = subprocess.run([sys.executable, "-m", "serve.adapters", "--config", str(config), "add", "finetuned",
                            str(adapter)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stdout + added.stderr
    serve["server"]["adapters"] = {"finetuned": str(adapter)}  # what the server now serves
    config.write_text(yaml.safe_dump(serve))
    server = RunningServer(config, port, proc, log)
    server.output = (d / "cli.out").read_text()
    yield server

    # Clean stop on SIGTERM: the CLI exits 0, no vLLM process of this server is left, the port is free.
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=90)
    out.close()
    import socket

    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                 if _safe_read(p).find(f"--port\0{port}\0") >= 0]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT are fine
        s.bind(("127.0.0.1", port))  # raises if a socket is left listening
    assert rc == 0, (d / "cli.out").read_text()[-2000:]
    assert not leftovers, f"processes left after SIGTERM: {leftovers}"
    assert SERVE_KEY not in log.read_text() + (d / "cli.out").read_text(), "the API key leaked into a log"


def _safe_read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# OpenAI's API description: response bodies are validated against its component schemas.

# The schemas the tests use, vendored from OpenAI's openapi.yaml (tests/data/openai-openapi/extract.py).
OPENAPI = ROOT / "tests/data/openai-openapi/schemas.yaml"


@pytest.fixture(scope="session")
def openapi_spec() -> dict:
    import yaml

    assert OPENAPI.is_file(), f"{OPENAPI} missing (regenerate with tests/data/openai-openapi/extract.py)"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(OPENAPI.read_text(encoding="utf-8"), Loader=loader)


@pytest.fixture(scope="session")
def openapi_validate(openapi_spec):
    """validate(body, "CreateChatCompletionResponse") raises jsonschema.ValidationError on a mismatch."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    def nullable_to_type(node):
        """OpenAPI's `nullable: true` as JSON Schema: null joins the type (and the enum)."""
        if isinstance(node, dict):
            if node.get("nullable") is True:
                if isinstance(node.get("type"), str):
                    node["type"] = [node["type"], "null"]
                if isinstance(node.get("enum"), list) and None not in node["enum"]:
                    node["enum"] = [*node["enum"], None]
            for v in node.values():
                nullable_to_type(v)
        elif isinstance(node, list):
            for v in node:
                nullable_to_type(v)

    import copy

    spec = copy.deepcopy(openapi_spec)
    nullable_to_type(spec)
    registry = Registry().with_resource("urn:openapi", Resource(contents=spec, specification=DRAFT202012))

    def validate(body, name: str) -> None:
        """Optional fields sent as null where the schema has no null (vLLM does so, e.g.
        message.annotations) count as absent; everything else must match, required fields included."""
        import copy

        assert name in openapi_spec["components"]["schemas"], name
        validator = jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{name}"},
                                                    registry=registry)
        nulls = {tuple(e.absolute_path) for e in validator.iter_errors(body) if e.instance is None and e.absolute_path}
        body = copy.deepcopy(body)
        for path in nulls:
            parent = body
            for key in path[:-1]:
                parent = parent[key]
            parent.pop(path[-1], None)
        validator.validate(body)  # a removed field that was required fails here

    return validate
