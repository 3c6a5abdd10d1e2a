"""The CLI's Temporal side: a client from settings, the Web UI link, whether a worker polls a
task queue, watching a workflow (Ctrl-C detaches; ``shardshift watch ID`` re-attaches)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import CancelledError, TemporalError

from cli.common import CliError
from infra import Stack
from infra.temporal_client import connect
from settings import Settings


async def client(settings: Settings) -> Any:
    try:
        return await connect(settings.temporal, telemetry_settings=settings.telemetry)
    except Exception as exc:  # a connection failure becomes one line
        raise CliError(
            f"cannot reach Temporal at {settings.temporal.address} "
            f"(namespace {settings.temporal.namespace}): {exc} "
            "(local stack: ./dev shardshift infra up)"
        ) from exc


POLLER_FRESH = timedelta(minutes=2)
"""A poller last seen longer ago than this is a worker gone (a live one polls at least every
minute or so)."""


async def workers(client: Any, task_queue: str) -> int:
    """How many workers poll ``task_queue`` for workflow tasks now (Temporal's pollers seen
    within ``POLLER_FRESH``)."""
    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    ))
    fresh = datetime.now(UTC) - POLLER_FRESH
    return sum(1 for p in resp.pollers
               if not p.HasField("last_access_time")
               or p.last_access_time.ToDatetime(tzinfo=UTC) >= fresh)


def no_worker_message(task_queue: str) -> str:
    return (f"no worker polls task queue {task_queue!r}: nothing runs until one does "
            f"(start one: shardshift worker"
            + (f" with SHARDSHIFT_TEMPORAL__TASK_QUEUE={task_queue}" if task_queue != "shardshift"
               else "") + ")")


async def ensure_worker(client: Any, task_queue: str, *, required: bool) -> bool:
    """Whether a worker polls ``task_queue``. Without one: ``required`` raises ``CliError``
    (the command would wait for nothing), else a warning goes to stderr."""
    if await workers(client, task_queue):
        return True
    if required:
        raise CliError(no_worker_message(task_queue))
    print(f"shardshift: warning: {no_worker_message(task_queue)}", file=sys.stderr)
    return False


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
    workflow's result (raises its failure). Before watching, a workflow that still runs is
    checked for a worker on its task queue (a warning on stderr if there is none). Ctrl-C
    detaches: the workflow keeps running, and stderr says how to re-attach.
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    # Ctrl-C sets this (in the main thread): every wait below ends on it, even one inside
    # the SDK that would swallow asyncio.run's cancellation. (The process that then hung now
    # and then on its way out was the SDK's runtime torn down at exit: see
    # infra.temporal_client.outlive_interpreter.)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        own_sigint = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        own_sigint = False
    stop = asyncio.ensure_future(interrupted.wait())
    await _warn_without_worker(handle)
    result = asyncio.ensure_future(handle.result())
    start = time.monotonic()
    last_phase, last_print = None, 0.0
    try:
        while True:
            finished = result.done()
            query_task = asyncio.ensure_future(handle.query(query))
            await asyncio.wait([query_task, stop], return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set():
                query_task.cancel()
                raise asyncio.CancelledError
            try:
                p = query_task.result()
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
            await asyncio.wait([result, stop], timeout=interval,
                               return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set():
                raise asyncio.CancelledError
    except asyncio.CancelledError:  # Ctrl-C (ours, or asyncio.run cancelling the main task)
        if tty:
            out.write("\n")
            out.flush()
            tty = False
        print(f"detached from {handle.id}: it keeps running (re-attach: shardshift watch "
              f"{handle.id}; stop it: shardshift cancel {handle.id})", file=sys.stderr)
        if interrupted.is_set():
            raise KeyboardInterrupt from None  # exit 130, as asyncio.run's own Ctrl-C does
        raise
    finally:
        if own_sigint:
            loop.remove_signal_handler(signal.SIGINT)
        stop.cancel()
        if tty:
            out.write("\n")
            out.flush()
        if not result.done():
            result.cancel()
    return result.result()


async def _warn_without_worker(handle: Any) -> None:
    try:
        desc = await handle.describe()
        if desc.status is not None and desc.status.name == "RUNNING" and desc.task_queue:
            # (a handle has no public accessor for its client; the SDK keeps it as ``_client``)
            await ensure_worker(handle._client, desc.task_queue, required=False)
    except Exception:  # noqa: BLE001 - only a hint: the watch itself reports real failures
        return


async def watch_or_report(handle: Any, query: Any, fmt: Callable[[Any, float], str],
                          what: str) -> Any | None:
    """``watch`` to the end; a failed workflow is reported (its innermost cause) as None."""
    try:
        return await watch(handle, query, fmt)
    except WorkflowFailureError as exc:
        if isinstance(exc.cause, CancelledError):
            print(f"{what} was cancelled", file=sys.stderr)
            return None
        cause = exc.cause
        while isinstance(cause, TemporalError) and cause.cause is not None:
            cause = cause.cause
        print(f"{what} failed: {cause or exc}", file=sys.stderr)
        return None
