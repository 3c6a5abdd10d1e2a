"""Helpers for fault tests: a worker as a separate OS process (so it can be SIGKILLed), a
fast bulk load of one chunk, and polling of a workflow's ``progress`` query."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError

from catalog.models import Chunk
from router.hashing import khash
from settings import REPO_ROOT, Settings
from shards.postgres import documents as D
from shards.postgres.schema import collection_table
from workflows import MigrateChunkWorkflow
from workflows.migrate_chunk import Progress
from workload.generator import keys_in

PHASES = ["starting", "registered", "snapshot", "import", "replicate", "verify", "cutover",
          "rollback_window", "cleanup", "done"]


def phase_index(phase: str | None) -> int:
    """Position of a phase in the forward order (aborting, aborted and None sort last)."""
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


class WorkerProcess:
    """``python worker.py`` on the settings' task queue, in its own process group."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSHIFT_")}
        env.update({
            "SHARDSHIFT_CATALOG_DSN": s.catalog_dsn or "",
            "SHARDSHIFT_STAGING_URL": s.staging,
            "SHARDSHIFT_TEMPORAL__ADDRESS": s.temporal.address,
            "SHARDSHIFT_TEMPORAL__TASK_QUEUE": s.temporal.task_queue,
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self) -> WorkerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "worker.py"], cwd=REPO_ROOT, env=self.env(),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, no goodbye: running activities stop mid-flight, nothing is cleaned up."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it does not exit in time (for finally)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


async def query_progress(handle: WorkflowHandle[Any, Any], timeout: float = 5.0) -> Progress | None:
    """The workflow's ``progress``, or None when no worker answered in time."""
    try:
        return await asyncio.wait_for(handle.query(MigrateChunkWorkflow.progress), timeout)
    except (TimeoutError, RPCError):
        return None


async def poll_progress(
    handle: WorkflowHandle[Any, Any],
    predicate: Callable[[Progress], bool],
    *,
    timeout: float = 60.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Progress:
    """Query ``progress`` until ``predicate`` holds (a deadline, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    last: Progress | None = None
    while True:
        p = await query_progress(handle, timeout=max(0.5, deadline - time.monotonic()))
        if p is not None:
            last = p
            if predicate(p):
                return p
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s; last progress: {last}")
        await asyncio.sleep(interval)


def chunk_keys(chunk: Chunk, n: int, prefix: str) -> list[str]:
    """``n`` distinct shard-key values inside ``chunk``'s range (spread over its khashes)."""
    out = keys_in(chunk.range, n, prefix)
    assert len(out) == n, "chunk range too narrow"
    return out


def preload_chunk(dsn: str, collection: str, chunk: Chunk, n: int, *, shard_key: str = "acct",
                  pad: int = 200) -> int:
    """COPY ``n`` documents of ``chunk`` straight into its shard (before any move starts)."""
    keys = chunk_keys(chunk, n, "bulk")
    query = psycopg.sql.SQL("COPY {} (khash, id, doc) FROM STDIN").format(
        collection_table(collection))
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, cur.copy(query) as copy:
        for i, key in enumerate(keys):
            id_text, doc_text = D.encode_for_store(
                {"_id": f"bulk-{i}", shard_key: key, "v": 1, "pad": "b" * pad})
            copy.write_row((khash(key), id_text, doc_text))
    return n


def count_rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0


async def timeline(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The workflow's history as "seconds-since-start event (activity)" lines (diagnostics)."""
    from temporalio.api.enums.v1 import EventType  # noqa: PLC0415

    lines: list[str] = []
    names: dict[int, str] = {}
    t0: float | None = None
    async for ev in handle.fetch_history_events():
        t = ev.event_time.ToDatetime().timestamp()
        t0 = t if t0 is None else t0
        kind = EventType.Name(ev.event_type).removeprefix("EVENT_TYPE_")
        what = ""
        if ev.HasField("activity_task_scheduled_event_attributes"):
            names[ev.event_id] = what = ev.activity_task_scheduled_event_attributes.activity_type.name
        for attr in ("activity_task_started_event_attributes", "activity_task_completed_event_attributes",
                     "activity_task_failed_event_attributes", "activity_task_timed_out_event_attributes"):
            if ev.HasField(attr):
                a = getattr(ev, attr)
                what = names.get(a.scheduled_event_id, "?")
                if attr.startswith("activity_task_started"):
                    what += f" attempt={a.attempt}"
                if attr.startswith("activity_task_timed_out"):
                    what += f" {a.failure.message}"
        if ev.HasField("workflow_task_timed_out_event_attributes"):
            what = str(ev.workflow_task_timed_out_event_attributes.timeout_type)
        lines.append(f"{t - t0:8.3f} {kind} {what}")
    return lines
