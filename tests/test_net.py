"""Ports the local stack picks: never one the kernel may hand to an outgoing connection."""

from __future__ import annotations

from pathlib import Path

from infra.net import ephemeral_ports, free_port_block


def test_free_ports_avoid_the_ephemeral_range() -> None:
    ephemeral = ephemeral_ports()
    for _ in range(50):
        base = free_port_block(4)
        assert all(port not in ephemeral for port in range(base, base + 4)), base


def test_ephemeral_range_is_read_from_the_kernel_setting(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert ephemeral_ports(str(setting)) == range(40000, 50001)
    assert ephemeral_ports(str(tmp_path / "missing")) == range(49152, 65536)
