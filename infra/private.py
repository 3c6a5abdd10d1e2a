"""Private stacks for tests and benchmarks: own state directory, free ports, torn down after.

A private stack never touches one a user is running: its state lives in a fresh directory
under /tmp (the unprivileged server user must be able to traverse it) and its ports are picked
free at start-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.net import free_port_block
from infra.stack import Stack
from settings import InfraSettings


def new_state_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def private_settings(shards: int, pg15_shards: int = 0) -> InfraSettings:
    """Infra settings on free ports, headless Temporal."""
    base = free_port_block(shards + pg15_shards + 1)
    temporal = free_port_block(2)
    return InfraSettings(shards=shards, pg15_shards=pg15_shards, base_port=base,
                         temporal_port=temporal, ui_port=temporal + 1, headless=True)


@contextmanager
def private_stack(
    shards: int = 2, *, pg15_shards: int = 0, prefix: str = "shardshift-bench-"
) -> Iterator[Stack]:
    """A running private stack, stopped and removed on exit (also on errors)."""
    state = new_state_dir(prefix)
    stack = Stack(state, private_settings(shards, pg15_shards))
    try:
        stack.up()
        yield stack
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)
