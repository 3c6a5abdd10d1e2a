"""Small network helpers for the local stack."""

from __future__ import annotations

import random
import socket


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """The ports the kernel hands out to outgoing connections (Linux; the IANA range
    elsewhere). A server must not pick one of those: an outgoing connection may take it between
    the check and the bind."""
    try:
        with open(path) as fh:
            lo, hi = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        lo, hi = 49152, 65535
    return range(lo, hi + 1)


def free_port_block(count: int, start: int = 20000, end: int = 60000) -> int:
    """A port ``p`` in ``[start, end)``, outside the ephemeral range, such that
    ``p .. p+count-1`` are all free."""
    ephemeral = ephemeral_ports()
    if start < ephemeral.start < end:
        end = ephemeral.start  # [start, ephemeral) is wide enough on every common setting
    if ephemeral.start <= start < ephemeral.stop:
        start = ephemeral.stop
    if end - count <= start:
        raise RuntimeError(f"no room for {count} ports in [{start}, {end}) outside the "
                           f"ephemeral range {ephemeral.start}-{ephemeral.stop - 1}")
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(start, end - count)
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")
