"""The shared core: the one loopback check every server's bind refusal relies on."""

from __future__ import annotations

import pytest

from tunekit.net import is_loopback

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


def test_every_server_uses_the_one_check():
    import serve.finetune_api
    import serve.ui
    import serve.vllm_server

    assert serve.vllm_server.is_loopback is serve.finetune_api.is_loopback is serve.ui.is_loopback is is_loopback
