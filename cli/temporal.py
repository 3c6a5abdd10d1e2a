"""The CLI's Temporal side: a client from settings, the Web UI link, watching a workflow."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from temporalio.client import WorkflowFailureError
from temporalio.exceptions import TemporalError

from cli.common import CliError
from infra import Stack
from settings import Settings
from worker import connect


async def client(settings: Settings) -> Any:
    try:
        return await connect(settings.temporal, telemetry_settings=settings.telemetry)
    except Exception as exc:  # a connection failure becomes one line
        raise CliError(
            f"cannot reach Temporal at {settings.temporal.address} "
            f"(namespace {settings.temporal.namespace}): {exc} "
            "(local stack: ./dev shardshift infra up)"
        ) from exc


def ui_url(settings: Settings, wf_id: str) -> str | None:
    if not settings.temporal.address.startswith(("127.0.0.1:", "localhost:")):
        return None
    try:
        ui_port = Stack.from_settings(settings).temporal.ui_port
    except Exception:  # noqa: BLE001 - best effort
        ui_port = settings.infra.ui_port
    return f"http://127.0.0.1:{ui_port}/namespaces/{settings.temporal.namespace}/workflows/{wf_id}"


async def watch(handle: Any, query: Any, fmt: Callable[[Any, float], str], *,
                interval: float = 0.5, out: IO[str] | None = None,
                tty: bool | None = None) -> Any:
    """Poll a progress query every ``interval`` seconds until the workflow ends.

    On a terminal the line is redrawn in place; otherwise a plain line is printed whenever
    the phase changes (and every 5 s), and once more with the final state. Returns the
    workflow's result (raises its failure).
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    result = asyncio.ensure_future(handle.result())
    start = time.monotonic()
    last_phase, last_print = None, 0.0
    try:
        while True:
            finished = result.done()
            try:
                p = await handle.query(query)
            except Exception:  # noqa: BLE001 - not started yet, or already closed
                p = None
            now = time.monotonic()
            if p is not None:
                line = fmt(p, now - start)
                if tty:
                    out.write("\r\x1b[2K" + line)
                    out.flush()
                elif finished or p.phase != last_phase or now - last_print >= 5.0:
                    out.write(line + "\n")
                    out.flush()
                    last_phase, last_print = p.phase, now
            if finished:
                break  # the line above is the final state
            await asyncio.wait([result], timeout=interval)
    finally:
        if tty:
            out.write("\n")
            out.flush()
        if not result.done():
            result.cancel()
    return result.result()


async def watch_or_report(handle: Any, query: Any, fmt: Callable[[Any, float], str],
                          what: str) -> Any | None:
    """``watch`` to the end; a failed workflow is reported (its innermost cause) as None."""
    try:
        return await watch(handle, query, fmt)
    except WorkflowFailureError as exc:
        cause = exc.cause
        while isinstance(cause, TemporalError) and cause.cause is not None:
            cause = cause.cause
        print(f"{what} failed: {cause or exc}", file=sys.stderr)
        return None
