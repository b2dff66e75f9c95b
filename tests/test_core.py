"""The shared core: the one loopback check every server's bind refusal relies on."""

from __future__ import annotations

import pytest

from tunekit.net import free_port, is_loopback

LOOPBACK = ["localhost", "LocalHost", "localhost.", "127.0.0.1", "127.0.0.2", "127.255.255.254", " 127.0.0.1 ",
            "::1", "[::1]", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "[::ffff:7f00:1]"]
NOT_LOOPBACK = ["127.evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "evil-localhost", "0.0.0.0", "::",
                "", "192.168.1.10", "10.0.0.1", "8.8.8.8", "2001:db8::1", "::ffff:10.0.0.1", "fe80::1%lo",
                "127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1", "128.0.0.1", "[::]", "example.com"]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_addresses_are_recognised(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_everything_else_is_reachable_and_needs_a_key(host):
    assert not is_loopback(host)


def test_free_ports_come_from_below_the_ephemeral_range():
    """bind(0) ports are drawn from the range outgoing connections use, so one chosen early can be
    taken by the time a server binds it (it happened to the notebook's UI port while vLLM ran)."""
    import socket
    from pathlib import Path

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports
    assert len(ports) > 1  # random, so two callers rarely collide
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when handed out
        s.listen()
        assert free_port() != port  # and never one that is in use


def test_every_server_uses_the_one_check():
    import serve.finetune_api
    import serve.ui
    import serve.vllm_server

    assert serve.vllm_server.is_loopback is serve.finetune_api.is_loopback is serve.ui.is_loopback is is_loopback


# ----------------------------------------------------------------------------- typed config loading


def config_class(path):
    """The dataclass a config file of configs/ is read into, by its name."""
    import importlib

    name = path.name
    for prefix, (module, cls) in {"build": ("data_prep.build", "BuildConfig"), "serve": ("serve.client", "Settings"),
                                  "compare": ("serve.compare", "CompareConfig"),
                                  "openai": ("train.jobs.create", "OpenAIJobConfig"),
                                  "finetune_api": ("serve.finetune_api", "FinetuneAPIConfig")}.items():
        if name.startswith(prefix):
            return getattr(importlib.import_module(module), cls)
    return None


def test_every_config_file_passes_the_type_checks():
    from conftest import ROOT
    from tunekit.config import load_config

    checked = 0
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        cls = config_class(path)
        if cls is not None:
            load_config(cls, path)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("text, message", [
    ("server:\n  port: '8000'\n", "server.port is the text '8000'; write it as a whole number, without quotes"),
    ("sampling:\n  temperature: '0.5'\n", "sampling.temperature is the text '0.5'; write it as a number"),
    ("server:\n  adapters: [a, b]\n", "server.adapters is a list; it must be a mapping (key: value per line)"),
    ("server:\n  adapters:\n    finetuned: [runs/x]\n", "server.adapters.finetuned is a list; it must be text"),
    ("server:\n  enforce_eager: 'yes'\n", "server.enforce_eager is 'yes' (text); write true or false"),
    ("max_retries: 2.5\n", "max_retries is 2.5 (a number); it must be a whole number"),
    ("server:\n  extra_args: --enforce-eager\n", "server.extra_args is '--enforce-eager' (text); it must be a list"),
    ("server:\n  port:\n", "server.port is empty; give a value or remove the key"),
    ("server: [1, 2]\n", "server must be a mapping of ServerConfig keys"),
])
def test_a_wrong_type_in_yaml_is_one_line_naming_file_and_key(text, message, tmp_path):
    from serve.client import Settings
    from tunekit.config import load_config
    from tunekit.errors import UserError

    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(Settings, path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_wrong_type_from_the_command_line_is_one_line_too(tmp_path):
    from conftest import run_cli

    path = tmp_path / "build.yaml"
    path.write_text("input: x.csv\nout: out\nsample: '100'\n")
    proc = run_cli("-m", "data_prep", "build", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {path}: sample is the text '100'; write it as a whole number, without quotes")


def test_dotenv_fills_only_what_the_environment_lacks(tmp_path, monkeypatch):
    from tunekit.config import load_dotenv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TK_SET", "from-env")
    monkeypatch.delenv("TK_QUOTED", raising=False)
    monkeypatch.delenv("TK_PLAIN", raising=False)
    (tmp_path / ".env").write_text("# keys\nexport TK_QUOTED='a b # c'\nTK_PLAIN=x # note\nTK_SET=from-file\n")
    load_dotenv()
    import os

    assert (os.environ["TK_QUOTED"], os.environ["TK_PLAIN"], os.environ["TK_SET"]) == ("a b # c", "x", "from-env")


def test_build_flags_are_generated_from_the_config_fields():
    """Every key of a build config is a flag (but the nested `keep`), and a flag given overrides the YAML."""
    import dataclasses

    from data_prep.__main__ import parser
    from data_prep.build import BuildConfig
    from tunekit.config import flag_overrides

    args = parser().parse_args(["build", "--valid_fraction", "0.3", "--no-clean", "--fillna", "a=b", "c=d",
                                "--dropna", "x", "y", "--unicode-form", "NFKC", "--sample", "5"])
    assert set(args.config_flags) == {f.name for f in dataclasses.fields(BuildConfig)} - {"keep"}
    given = {k: v for k, v in flag_overrides(args, args.config_flags).items() if v is not None}
    assert given == {"valid_fraction": 0.3, "clean": False, "fillna": {"a": "b", "c": "d"}, "dropna": ["x", "y"],
                     "unicode_form": "NFKC", "sample": 5}
