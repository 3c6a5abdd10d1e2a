"""Helpers for fault tests: a worker as a separate OS process (so it can be SIGKILLed) and which
worker runs an activity, a fast bulk load of one chunk, polling of a workflow's ``progress``
query, and *gates* that hold a move at a known point so a fault lands there every time."""

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
from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from activities.replicate import HOLD_LAG_ENV
from catalog.models import Chunk
from router.hashing import khash
from settings import REPO_ROOT, Settings
from shards.postgres import documents as D
from shards.postgres.schema import collection_table
from shards.postgres.stream_control import ensure_apply_schema
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

    def __init__(self, settings: Settings, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = dict(extra_env or {})
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
        if s.staging_shared is not None:
            env["SHARDSHIFT_STAGING_SHARED"] = str(s.staging_shared).lower()
        env.update(self.extra_env)
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

    def runs(self, identity: str) -> bool:
        """Whether a Temporal worker identity is this process's (the SDK's ``pid@host``)."""
        return self.proc is not None and identity.startswith(f"{self.proc.pid}@")

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
    from temporalio.api.enums.v1 import EventType

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


# -- which worker runs what ----------------------------------------------------------------------


async def activity_pollers(client: Client, task_queue: str) -> set[str]:
    """Identities of the workers polling ``task_queue`` for activities."""
    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY))
    return {p.identity for p in resp.pollers}


async def wait_polling(client: Client, task_queue: str, workers: list[WorkerProcess],
                       timeout: float = 120.0) -> None:
    """Until every worker process polls ``task_queue`` for activities (start-up done)."""
    deadline = time.monotonic() + timeout
    while True:
        polling = await activity_pollers(client, task_queue)
        if all(any(w.runs(i) for i in polling) for w in workers):
            return
        dead = [w.log_tail() for w in workers if not w.alive()]
        assert not dead, f"a worker exited: {dead}"
        assert time.monotonic() < deadline, f"workers not polling in {timeout}s: {polling}"
        await asyncio.sleep(0.1)


async def running_activity(handle: WorkflowHandle[Any, Any], activity_type: str) -> str | None:
    """Identity of the worker running the workflow's ``activity_type`` now, if one does."""
    desc = await handle.describe()
    for pa in desc.raw_description.pending_activities:
        if pa.activity_type.name == activity_type \
                and pa.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
            return pa.last_worker_identity or None
    return None


async def worker_running(handle: WorkflowHandle[Any, Any], activity_type: str,
                         workers: list[WorkerProcess], timeout: float = 30.0) -> WorkerProcess:
    """The worker process running ``activity_type`` of the workflow (waits for it to start)."""
    deadline = time.monotonic() + timeout
    while True:
        identity = await running_activity(handle, activity_type)
        if identity is not None:
            found = [w for w in workers if w.runs(identity)]
            assert found, f"{activity_type} runs on {identity}, none of ours"
            return found[0]
        assert time.monotonic() < deadline, f"{activity_type} not running in {timeout}s"
        await asyncio.sleep(0.02)


async def activity_runs(handle: WorkflowHandle[Any, Any], activity_type: str
                        ) -> list[tuple[int, str]]:
    """(attempt, worker identity) of every recorded start of ``activity_type`` in the run's
    history (a retried activity's start is recorded with its last attempt)."""
    names: dict[int, str] = {}
    out: list[tuple[int, str]] = []
    async for ev in handle.fetch_history_events():
        if ev.HasField("activity_task_scheduled_event_attributes"):
            names[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        if ev.HasField("activity_task_started_event_attributes"):
            a = ev.activity_task_started_event_attributes
            if names.get(a.scheduled_event_id) == activity_type:
                out.append((a.attempt, a.identity))
    return out


# -- gates: a move held at a known point -------------------------------------------------------


class Gate:
    """A transaction on one server that holds a move at a known point until ``release``
    (idempotent; also on leaving the ``async with``)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            try:
                await self.conn.execute("COMMIT")
            finally:
                await self.conn.close()

    async def __aenter__(self) -> Gate:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def import_gate(target_dsn: str) -> Gate:
    """Hold the importer between parts: its next part's progress row cannot be written."""
    conn = await psycopg.AsyncConnection.connect(target_dsn, autocommit=True)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE shardshift.import_parts IN SHARE ROW EXCLUSIVE MODE")
    return Gate(conn)


async def freeze_marker_gate(target_dsn: str) -> Gate:
    """Hold a move's applier at the cutover's freeze marker: the marker cannot be recorded
    (``shardshift.stream_markers`` is locked against inserts), so the cutover freezes the
    source and waits for a catch-up that cannot come (up to ``catchup_timeout_s``).

    Taken before the move starts, it lands every time: nothing of a move changes the
    source's fence while it streams but the cutover's freeze, so every earlier batch applies
    (the lag stays small) and the first marker is the freeze's. The target keeps serving."""
    def schema() -> None:
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            ensure_apply_schema(conn)

    await asyncio.to_thread(schema)
    conn = await psycopg.AsyncConnection.connect(target_dsn, autocommit=True)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE shardshift.stream_markers IN SHARE ROW EXCLUSIVE MODE")
    return Gate(conn)


async def snapshot_gate(source_dsn: str) -> Gate:
    """Hold a move in its snapshot phase: a transaction with an xid on the source, so the
    snapshot's replication slot cannot reach its consistent point (a logical slot's creation
    waits for the transactions running when it started). Taken before the move starts."""
    conn = await psycopg.AsyncConnection.connect(source_dsn, autocommit=True)
    await conn.execute("BEGIN")
    await conn.execute("SELECT pg_current_xact_id()")
    return Gate(conn)


async def wait_slot_creation_waiting(source_dsn: str, timeout: float = 120.0) -> None:
    """Until a walsender on the source waits for a transaction (a slot being created behind
    :func:`snapshot_gate`)."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(source_dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
                " AND wait_event = 'transactionid'")
            row = await cur.fetchone()
            if row and row[0]:
                return
            assert time.monotonic() < deadline, f"no slot creation waiting in {timeout}s"
            await asyncio.sleep(0.01)


class LagHold:
    """The ``SHARDSHIFT_TEST_HOLD_LAG`` test hook for worker *processes*: while the file
    lists the collection, no worker started with :attr:`env` lets the move leave its lag wait
    (replicate, or the cutover's wait before each attempt)."""

    def __init__(self, path: Path, collection: str) -> None:
        self.path = path
        self.collection = collection

    @property
    def env(self) -> dict[str, str]:
        return {HOLD_LAG_ENV: f"@{self.path}"}

    def hold(self) -> LagHold:
        self.path.write_text(self.collection + "\n")
        return self

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
