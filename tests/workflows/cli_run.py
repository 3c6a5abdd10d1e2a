"""Run the ``shardshift`` command line as a separate process against the session stack, as an
operator would: its exit code, stdout and stderr."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from infra import Stack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Ran:
    code: int
    out: str
    err: str


def cli_env(stack: Stack, task_queue: str | None = None) -> dict[str, str]:
    env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
           "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
           "SHARDSHIFT_STATE_DIR": str(stack.state_dir),
           "PYTHONPATH": ROOT}
    if task_queue is not None:
        env["SHARDSHIFT_TEMPORAL__TASK_QUEUE"] = task_queue
    return env


async def shardshift(env: dict[str, str], *args: str, timeout: float = 120.0) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # a timeout, or the test cancelled: leave no process behind
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())
