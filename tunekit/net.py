"""The one loopback check: which bind addresses only this machine can reach.

A server bound to anything else must require a key (the vLLM server, the fine-tuning API) or a
login (the UI). The check is strict: ``localhost`` and addresses that parse as loopback IPv4
(127.0.0.0/8), IPv6 (``::1``) or IPv4-mapped IPv6 (``::ffff:127.0.0.1``) count; anything else,
including names that merely start with ``127.`` (``127.evil.example``), shorthand spellings the
resolver might still map somewhere (``127.1``, ``0x7f.0.0.1``), ``0.0.0.0``, ``::`` and the empty
string (every interface), does not.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    h = (host or "").strip().lower()
    if h.startswith("[") and h.endswith("]"):  # a bracketed IPv6 literal, as in URLs
        h = h[1:-1]
    if h in ("localhost", "localhost."):
        return True
    if "%" in h:  # a zone index (fe80::1%eth0) is a link, not loopback
        return False
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on, picked *below* the kernel's ephemeral range.

    ``bind(0)`` hands out a port from the ephemeral range, the same range every outgoing connection
    and every ``bind(0)`` inside vLLM (ZMQ, its RPC sockets) draws from; a port chosen that way and
    used minutes later can already be taken. A random port under that range is only ever taken by
    an explicit bind. Falls back to ``bind(0)`` when the range cannot be read or is exhausted.
    """
    import random
    import socket
    from pathlib import Path

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pool = range(max(1024, low - 12000), low)
    for port in random.SystemRandom().sample(pool, min(200, len(pool))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
