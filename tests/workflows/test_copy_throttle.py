"""The bulk copy's throttle: its rate arithmetic (pure), and a real export that waits while
the source is busy and goes on when it is not; and a whole move with the throttle on a busy
source (its stream's apply throttle must not hold up the cutover)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from temporalio.client import Client, WorkflowHandle

from activities.replicate import HOLD_LAG_ENV
from catalog.models import MigrationOutcome
from infra.stack import Stack
from settings import as_role
from shards.models import KeyRange
from shards.postgres.snapshot import export_chunk
from shards.postgres.throttle import CopyThrottle, ThrottleSettings
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import load_chunk, other_shard, start_worker_move, wait_until
from workflows import MigrateChunkWorkflow


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False


def test_rate_limit_paces_the_average() -> None:
    clock = FakeClock()
    t = CopyThrottle(ThrottleSettings(rows_per_s=1000, bytes_per_s=1_000_000), clock=clock,
                     sleep=clock.sleep)
    t.after(500, 10)           # 500 rows at t=0: half a second ahead of the rows limit
    assert clock.slept == [0.5]
    clock.now += 2.0           # a slow batch: the average is under both limits
    t.after(1000, 10)
    assert clock.slept == [0.5]
    t.after(100, 3_999_980)    # the bytes limit binds: 4 MB in all needs 4 s, 2.5 s passed
    assert clock.slept == [0.5, pytest.approx(1.5)]
    assert t.waited_s == pytest.approx(2.0)


def test_no_limits_never_wait() -> None:
    clock = FakeClock()
    t = CopyThrottle(ThrottleSettings(), clock=clock, sleep=clock.sleep)
    t.after(10**9, 10**12)
    assert clock.slept == [] and not ThrottleSettings().enabled


@pytest.fixture
def staging() -> Iterator[Staging]:
    path = owned_state_dir("staging")
    try:
        yield Staging(str(path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_export_waits_while_the_source_is_busy(deployment: Deployment,
                                                     staging: Staging) -> None:
    d = deployment
    chunk = d.initial.chunks[0]
    dsn = d.shards[chunk.shard_id].dsn
    rows = await asyncio.to_thread(load_chunk, dsn, d.collection, chunk.range, 300)
    seen: list[str | None] = []
    progress: list[int] = []
    stop = threading.Event()
    throttle = CopyThrottle(ThrottleSettings(max_active=0, check_s=0.1), source_dsn=dsn,
                            stop=stop, on_wait=seen.append)
    busy = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                 application_name="a-busy-client")
    sleeper = asyncio.create_task(busy.execute("SELECT pg_sleep(600)"))
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = export_chunk(dsn, d.collection, chunk.range, staging, f"thr-{d.collection}",
                                     target_part_rows=100, throttle=throttle,
                                     progress=lambda p: progress.append(p.rows_done))

    worker = asyncio.create_task(asyncio.to_thread(run))
    try:
        await wait_until(lambda: throttle.load_waits >= 3, what="the copy to wait for the source")
        assert seen and seen[0] is not None and "1 active sessions" in seen[0], seen
        assert progress == [] and not worker.done()  # nothing read while the source is busy
        busy.cancel()                                 # the busy client's statement ends
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeper
        await asyncio.wait_for(worker, 60)
    finally:
        stop.set()
        await busy.close()
        await asyncio.gather(worker, return_exceptions=True)
    assert box["result"].rows_exported == rows
    assert seen[-1] is None  # it said when it ran again


def chunk_docs(dsn: str, collection: str, rng: KeyRange) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            sql.SQL("SELECT khash, id, doc::text FROM docs.{} WHERE khash >= %s AND"
                    " (%s::bigint IS NULL OR khash < %s) ORDER BY khash, id"
                    ).format(sql.Identifier(collection)),
            (rng.lo, rng.sql_hi, rng.sql_hi)).fetchall()


async def test_a_throttled_move_on_a_busy_source_still_cuts_over(
        deployment: Deployment, worker: WorkerHandle, temporal_client: Client, stack: Stack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The move's throttle pauses its stream while the source is busy, but never the
    cutover's catch-up: with the source busy from the replicate phase to the end, the move
    verifies, cuts over and loses nothing."""
    d = deployment
    chunk = d.initial.chunks[0]
    dsn = d.shards[chunk.shard_id].dsn
    target = other_shard(d, chunk.shard_id)
    await asyncio.to_thread(load_chunk, dsn, d.collection, chunk.range, 200)
    monkeypatch.setenv(HOLD_LAG_ENV, d.collection)  # stay in replicate until the source is busy
    handle = await start_worker_move(
        temporal_client, worker, d.collection, chunk.chunk_id, target,
        copy_throttle=ThrottleSettings(max_active=1, check_s=0.1))
    await wait_until(lambda: _phase(handle), timeout=60, what="the replicate phase")
    busy = [await psycopg.AsyncConnection.connect(
        as_role(dsn, stack.role_name("router")), autocommit=True,
        application_name="a-busy-client") for _ in range(2)]
    sleepers = [asyncio.create_task(c.execute("SELECT pg_sleep(600)")) for c in busy]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:  # changes the stream must carry
            conn.execute(sql.SQL("UPDATE docs.{} SET doc = jsonb_set(doc, '{{v}}', '-1')"
                                 " WHERE khash >= %s").format(sql.Identifier(d.collection)),
                         (chunk.range.lo,))
        expected = await asyncio.to_thread(chunk_docs, dsn, d.collection, chunk.range)
        monkeypatch.delenv(HOLD_LAG_ENV)
        result = await asyncio.wait_for(handle.result(), 120)
        assert not any(s.done() for s in sleepers)  # busy all along
    finally:
        for c in busy:
            c.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
        for c in busy:
            await c.close()
    assert result.outcome == MigrationOutcome.COMPLETED and result.verified, result
    got = await asyncio.to_thread(chunk_docs, d.shards[target].dsn, d.collection, chunk.range)
    assert got == expected and len(got) >= 100
    # The forward stream got the throttle; the reverse stream (none here) would not.
    inputs = [json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)
              async for e in handle.fetch_history_events()
              if e.activity_task_scheduled_event_attributes.activity_type.name
              == "migrate.replicate"]
    assert inputs and all(i["throttle"]["max_active"] == 1 for i in inputs), inputs


async def _phase(handle: WorkflowHandle[Any, Any]) -> bool:
    progress = await handle.query(MigrateChunkWorkflow.progress)
    return bool(progress.phase == "replicate")
