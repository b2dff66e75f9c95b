"""The command lines serve.vllm_server builds, checked by vLLM's own argument parser (no server started).

The CPU build in .venv-vllm ships the same parser and engine arguments as the CUDA build of the same
version, so a flag or value vLLM 0.32 does not take fails here, not on a Colab T4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from tunekit.errors import UserError
from serve.client import load_settings
from serve.vllm_server import CPU_VENV_PYTHON, VLLMServer, check_with_vllm, is_degenerate

SERVE_CONFIGS = sorted((ROOT / "configs").glob("*/serve*.yaml"))


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]}))
    return tmp_path


def settings_for(config: Path, adapter_dir: Path, **server):
    """A serve config as the launcher reads it, with its adapters replaced by one that exists here."""
    settings = load_settings(config, backend="local")
    settings.server.adapters = {name: str(adapter_dir) for name in settings.server.adapters} or {
        "finetuned": str(adapter_dir)}
    settings.server.max_model_len_from, settings.server.max_model_len = None, 512  # no hub tokenizer offline
    for key, value in server.items():
        setattr(settings.server, key, value)
    return settings


@pytest.mark.slow
def test_every_serve_config_and_its_fallbacks_parse_with_vllms_own_parser(adapter_dir):
    assert len(SERVE_CONFIGS) >= 3
    assert len({c.parent.name for c in SERVE_CONFIGS}) >= 6  # every use case's, not only banking77's
    t4_path = ROOT / "configs/banking77/serve_t4.yaml"
    cases = [(c, {}) for c in SERVE_CONFIGS]
    cases += [(t4_path, {"enforce_eager": True}), (t4_path, {"dtype": "float32"})]
    commands = [VLLMServer(settings_for(path, adapter_dir, **kw)).command()[0] for path, kw in cases]
    engines = check_with_vllm(commands, str(CPU_VENV_PYTHON))
    got = dict(zip([f"{p.parent.name}/{p.name}{kw}" for p, kw in cases], engines))
    assert all(v["enable_lora"] for v in got.values())
    t4 = got["banking77/serve_t4.yaml{}"]
    assert t4["model"] == "Qwen/Qwen2.5-1.5B-Instruct" and t4["dtype"] == "half" and t4["quantization"] is None
    assert t4["enable_lora"] and t4["max_lora_rank"] == 16 and t4["gpu_memory_utilization"] == 0.85
    assert not t4["enforce_eager"] and got["banking77/serve_t4.yaml{'enforce_eager': True}"]["enforce_eager"] is True
    assert got["banking77/serve_t4.yaml{'dtype': 'float32'}"]["dtype"] == "float32"
    assert got["banking77/serve_cards.yaml{}"]["block_size"] == 32  # the CPU server's block (README)


@pytest.mark.slow
def test_a_value_vllm_refuses_fails_here_with_vllms_message(adapter_dir):
    cmd = VLLMServer(settings_for(ROOT / "configs/banking77/serve_t4.yaml", adapter_dir,
                                  extra_args=["--max-lora-rank", "24"])).command()[0]
    with pytest.raises(UserError, match="vLLM refuses the command line: .*max-lora-rank.*24"):
        check_with_vllm([cmd], str(CPU_VENV_PYTHON))


def test_bitsandbytes_quantization_is_refused_with_the_alternative(adapter_dir):
    server = VLLMServer(settings_for(ROOT / "configs/banking77/serve_t4.yaml", adapter_dir,
                                     quantization="bitsandbytes"))
    with pytest.raises(UserError, match=r"server.quantization: vLLM 0.32 has no bitsandbytes quantization; remove "
                                        r"the key to serve the 16-bit base"):
        server.command()


@pytest.mark.parametrize("model, preset, expected", [
    ("Qwen/Qwen2.5-1.5B-Instruct", None, None),  # a hub id downloads on first use
    ("Qwen/Qwen2.5-1.5B-Instruct", "1", "1"),  # the user's choice is kept
    (".cache/models/SmolLM2-135M-Instruct", None, "1"),  # a local folder never waits on the hub
    (".cache/models/SmolLM2-135M-Instruct", "0", "0"),
])
def test_hf_hub_offline_is_set_only_for_local_models_and_only_when_unset(model, preset, expected, adapter_dir,
                                                                         monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if preset is not None:
        monkeypatch.setenv("HF_HUB_OFFLINE", preset)
    settings = settings_for(ROOT / "configs/banking77/serve_t4.yaml", adapter_dir, model=str(ROOT / model)
                            if model.startswith(".") else model)
    _cmd, env = VLLMServer(settings).command()
    assert env.get("HF_HUB_OFFLINE") == expected


@pytest.mark.parametrize("answer, degenerate", [
    ("!!!!!!!!!!!!!!!!", True), ("", True), ("  \n", True), ("aaaa", True),
    ("Hello! How can I help?", False), ("!!", False), ("{\"category\": \"card_arrival\"}", False),
])
def test_degenerate_answers_are_recognised(answer, degenerate):
    assert is_degenerate(answer) is degenerate


def test_a_degenerate_smoke_answer_is_logged_with_the_fallbacks(adapter_dir, monkeypatch, caplog):
    import httpx

    import serve.vllm_server as vs

    answers = iter(["!!!!!!!!!!!!!!!!", "Hello there."])

    def post(url, json, headers, timeout):
        assert url.endswith("/chat/completions") and json["model"] == "smollm2-135m-instruct"
        return httpx.Response(200, request=httpx.Request("POST", url),
                              json={"choices": [{"message": {"content": next(answers)}}]})

    monkeypatch.setattr(vs.httpx, "post", post)
    server = VLLMServer(settings_for(ROOT / "configs/banking77/serve_cards.yaml", adapter_dir))
    with caplog.at_level("WARNING", logger="serve.vllm_server"):
        assert server.smoke_test() == "!!!!!!!!!!!!!!!!"
        assert server.smoke_test() == "Hello there."
    [warning] = caplog.records
    assert warning.name == "serve.vllm_server" and "degenerate" in warning.getMessage()
    assert "server.dtype: float32" in warning.getMessage() and "server.enforce_eager: true" in warning.getMessage()


def test_the_launcher_takes_a_log_level(capsys):
    from serve.vllm_server import main

    with pytest.raises(SystemExit):
        main(["--log-level", "loud"])
    assert "--log-level: invalid choice: 'loud'" in capsys.readouterr().err
