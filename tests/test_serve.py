"""The local vLLM server (real, CPU) with a real adapter, and the client interface over both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml

from conftest import ROOT, SMOL_SYSTEM, SMOL_TOY, free_port, run_cli

QUESTIONS = [q for q, _ in SMOL_TOY[:6]]


def messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": q}]


def cli(server, *args, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=server.env(**(env_extra or {})))


@pytest.fixture(scope="module")
def backend(vllm_server):
    from serve.client import load_backend

    os.environ["TUNEKIT_API_KEY"] = vllm_server.api_key
    return load_backend(vllm_server.config, "local")


def test_cli_prints_url_and_models(vllm_server):
    # the session server starts with the base model only; its adapter is added while it runs (conftest)
    assert vllm_server.base_url in vllm_server.output
    assert "models: smol-base\n" in vllm_server.output


def test_models_lists_base_and_adapter(vllm_server, openapi_validate):
    resp = httpx.get(vllm_server.base_url + "/models", headers={"Authorization": f"Bearer {vllm_server.api_key}"})
    body = resp.json()
    openapi_validate(body, "ListModelsResponse")
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {"smol-base", "finetuned"}
    assert ids["finetuned"]["parent"] == "smol-base"


def test_adapter_answers_differ_from_base(backend, openapi_validate):
    client = backend.client()
    answers = {}
    for alias in ("base", "finetuned"):
        out = []
        for q in QUESTIONS:
            reply = client.chat.completions.create(model=backend.resolve(alias), messages=messages(q),
                                                   **backend.sampling_kwargs())
            openapi_validate(reply.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
            out.append(reply.choices[0].message.content.strip())
        answers[alias] = out
    expected = [a for _, a in SMOL_TOY[:6]]
    # the adapter learnt the code words; the base model never says them
    assert sum(a == e for a, e in zip(answers["finetuned"], expected)) >= 5, answers
    assert not any(a in ("ALPHA", "BRAVO") for a in answers["base"]), answers


def test_streaming_matches_plain_answer(backend, openapi_validate):
    client = backend.client()
    kwargs = backend.sampling_kwargs()
    plain = client.chat.completions.create(model="finetuned", messages=messages("code red 3"), **kwargs)
    chunks = list(client.chat.completions.create(model="finetuned", messages=messages("code red 3"), stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    for c in chunks:
        openapi_validate(c.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_cli_streams(vllm_server):
    proc = cli(vllm_server, "-m", "serve.chat", "--config", str(vllm_server.config), "--model", "finetuned",
               "--stream", "code red 5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ALPHA"
    assert "local finetuned" in proc.stderr and "out tokens" in proc.stderr


def test_json_schema_output(backend):
    schema = {"type": "object", "properties": {"category": {"type": "string", "enum": ["card", "transfer"]},
                                               "urgent": {"type": "boolean"}},
              "required": ["category", "urgent"], "additionalProperties": False}
    reply = backend.client().chat.completions.create(
        model=backend.resolve("base"), max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "My card was stolen! Classify this message."}],
        response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema, "strict": True}})
    import jsonschema

    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_server_template_tokenises_like_training(vllm_server, smol_adapter):
    """What vLLM renders for a conversation is token for token what train/sft.py trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_adapter)
    training_template = (smol_adapter / "chat_template.jinja").read_text()
    conv = messages("code red 7") + [{"role": "assistant", "content": "ALPHA"}]
    headers = {"Authorization": f"Bearer {vllm_server.api_key}"}
    root = vllm_server.base_url.removesuffix("/v1")
    for msgs, gen in ((conv, False), (conv[:2], True)):
        served = httpx.post(root + "/tokenize", headers=headers, json={
            "model": "finetuned", "messages": msgs, "add_generation_prompt": gen,
            "continue_final_message": False, "add_special_tokens": False}).json()
        trained = tok.apply_chat_template(msgs, chat_template=training_template, tokenize=True,
                                          add_generation_prompt=gen, return_dict=True)["input_ids"]
        assert served["tokens"] == trained


def test_runtime_adapter_add_and_remove(vllm_server, smol_adapter):
    base = ["-m", "serve.adapters", "--config", str(vllm_server.config)]
    added = cli(vllm_server, *base, "add", "second", str(smol_adapter))
    assert added.returncode == 0, added.stderr
    listed = cli(vllm_server, *base, "list")
    assert "second  (adapter on smol-base)" in listed.stdout
    asked = cli(vllm_server, "-m", "serve.chat", "--config", str(vllm_server.config), "--model", "second", "code blue 2")
    assert asked.stdout.strip() == "BRAVO", asked.stderr
    removed = cli(vllm_server, *base, "remove", "second")
    assert removed.returncode == 0, removed.stderr
    assert "second" not in cli(vllm_server, *base, "list").stdout
    gone = cli(vllm_server, "-m", "serve.chat", "--config", str(vllm_server.config), "--model", "second", "code blue 2")
    assert gone.returncode == 2 and "'second' is not served by the local backend" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_add_refuses_a_folder_without_adapter(vllm_server, tmp_path):
    proc = cli(vllm_server, "-m", "serve.adapters", "--config", str(vllm_server.config), "add", "x", str(tmp_path))
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr


@pytest.mark.parametrize("case", ["wrong key", "unknown model", "too long", "no server"])
def test_user_errors_are_one_clear_line(vllm_server, case, tmp_path):
    args = ["-m", "serve.chat", "--config", str(vllm_server.config)]
    env, text, expect = {}, "code red 1", ""
    if case == "wrong key":
        env, expect = {"TUNEKIT_API_KEY": "not-the-key"}, "refused the API key: set TUNEKIT_API_KEY"
    elif case == "unknown model":
        args += ["--model", "nope"]
        expect = "'nope' is not served by the local backend"
    elif case == "too long":
        text, expect = "word " * 2000, "request too long"
    else:
        cfg = yaml.safe_load(vllm_server.config.read_text())
        cfg["server"]["port"] = free_port()
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        args = ["-m", "serve.chat", "--config", str(tmp_path / "c.yaml")]
        expect = "no server answers at http://127.0.0.1:"
    proc = cli(vllm_server, *args, text, env_extra=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr


def test_same_code_switches_backend_by_one_flag(vllm_server, tmp_path, monkeypatch):
    """The openai backend is just another OpenAI-protocol base URL: point it at the local server."""
    import openai

    from serve.client import load_backend

    cfg = yaml.safe_load(vllm_server.config.read_text())
    cfg["openai"] = {"base_url": vllm_server.base_url, "base_model": "smol-base",
                     "models": {"finetuned": "finetuned"}, "api_key_env": "OTHER_KEY"}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("OTHER_KEY", vllm_server.api_key)

    def ask(backend_name: str | None):
        backend = load_backend(path, backend_name)
        reply = backend.client().chat.completions.create(model=backend.resolve("finetuned"),
                                                         messages=messages("code red 9"), **backend.sampling_kwargs())
        return backend, reply

    local, a = ask("local")
    remote, b = ask("openai")
    assert (local.name, remote.name) == ("local", "openai")
    assert type(a) is type(b) is openai.types.chat.ChatCompletion
    assert a.choices[0].message.content == b.choices[0].message.content == "ALPHA"
    monkeypatch.setenv("LLM_BACKEND", "openai")
    assert load_backend(path).name == "openai"  # the environment flips it too
    assert load_backend(path, "local").name == "local"  # and the flag wins over the environment
    monkeypatch.setenv("OTHER_KEY", "wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        ask("openai")
    assert "refused the API key: set OTHER_KEY" in str(remote.explain(e.value))


def test_openai_aliases_and_registry(tmp_path, monkeypatch):
    from serve import registry
    from serve.client import load_backend

    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backend = load_backend(None, "openai")
    assert backend.resolve("base") == "gpt-4o-mini-2024-07-18"
    with pytest.raises(Exception, match="no fine-tuned OpenAI model yet"):
        backend.resolve("finetuned")
    registry.record_model("openai", "finetuned", "ft:gpt-4o-mini-2024-07-18:acme:bank:abc123", job_id="ftjob-1")
    assert backend.resolve("finetuned") == "ft:gpt-4o-mini-2024-07-18:acme:bank:abc123"
    monkeypatch.setenv("LLM_BACKEND", "bogus")
    with pytest.raises(Exception, match="LLM_BACKEND: 'bogus' is not a backend"):
        load_backend(None)


def test_dotenv_supplies_keys(tmp_path, monkeypatch):
    from serve.client import load_backend

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("# keys\nOPENAI_API_KEY='sk-from-dotenv'\n")
    assert load_backend(None, "openai").api_key == "sk-from-dotenv"


def test_non_loopback_without_key_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TUNEKIT_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "serve.vllm_server", "--host", "0.0.0.0", "--port",
                           str(free_port())], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "server.host: 0.0.0.0 is reachable from other machines; set an API key" in proc.stderr


def test_bad_adapter_flag_and_missing_model():
    proc = run_cli("-m", "serve.vllm_server", "--adapter", "finetuned")
    assert proc.returncode == 2 and "expected NAME=RUN_DIR" in proc.stderr
    proc = run_cli("-m", "serve.vllm_server", "--model", "./no/such/model", "--port", str(free_port()))
    assert proc.returncode == 2 and "server.model: ./no/such/model not found" in proc.stderr


def test_cpu_block_size_must_be_a_multiple_of_32(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"model": str(ROOT / ".cache/models/SmolLM2-135M-Instruct"),
                                              "block_size": 16, "port": free_port(), "device": "cpu"}}))
    proc = run_cli("-m", "serve.vllm_server", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "server.block_size: 16; vLLM's CPU attention takes multiples of 32" in proc.stderr
