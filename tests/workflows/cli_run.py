"""Run the ``shardshift`` command line against the session stack, as an operator would: its exit
code, stdout and stderr; as a separate process (``shardshift``) or in this one
(``shardshift_in_process``, for long matrices of inputs)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import threading
import traceback
from dataclasses import dataclass

import cli
from infra import Stack
from settings import get_settings

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


_in_process = threading.Lock()


def _main_in_process(env: dict[str, str], args: tuple[str, ...]) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with _in_process:
        saved = dict(os.environ)
        os.environ.update(env)
        get_settings.cache_clear()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(list(args))
                except SystemExit as exc:  # argparse: usage errors and --help
                    code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - what the process would die of: a trace, exit 1
                    traceback.print_exc()
                    code = 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()
    return Ran(code, out.getvalue(), err.getvalue())


async def shardshift_in_process(env: dict[str, str], *args: str) -> Ran:
    """``cli.main(args)`` in this process, with ``env`` as its environment: what a
    ``shardshift`` process would print and exit with, without starting Python again. Commands
    run one at a time (on a thread of their own: each runs its own event loop); the process
    path itself is proven by ``shardshift``."""
    return await asyncio.to_thread(_main_in_process, env, args)
