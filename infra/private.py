"""Private stacks for tests and benchmarks: own state directory, free ports.

A private stack never touches one a user is running: its state lives in a fresh directory
under /tmp (the unprivileged server user must be able to traverse it) and its ports are picked
free at start-up. A running, provisioned private stack torn down after use is
``catalog.local_stack.private_stack`` (provisioning needs the layers above ``infra``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from infra.net import free_port_block
from settings import InfraSettings


def new_state_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def private_settings(shards: int, pg15_shards: int = 0,
                     standbys: tuple[str, ...] = ()) -> InfraSettings:
    """Infra settings on free ports, headless Temporal (``standbys``: servers that get a
    streaming standby)."""
    base = free_port_block(shards + pg15_shards + 1)
    temporal = free_port_block(2)
    return InfraSettings(shards=shards, pg15_shards=pg15_shards, base_port=base,
                         temporal_port=temporal, ui_port=temporal + 1, headless=True,
                         standbys=standbys)
