"""Failure paths around the commit point: faults that outlast an activity's retries.

- A cutover activity that fails for good *after* the catalog switch committed must roll the
  move forward (the catalog is the truth), never undo it.
- ``cleanup(ABORTED)`` refuses to empty a target the catalog names as the chunk's owner.
- The commit check waits for a switch still in flight instead of reading around it.
- After the commit point the move finishes its cleanup whatever fails, however often.
- Move leases live as long as the move (renewed by its activities, not its history).
- The cutover's lock connection has TCP keepalives on both ends.
- No reverse slot is made for a move without a rollback window.

Real Temporal dev server and PostgreSQL shards; failures "for good" are injected with the
``SHARDSHIFT_TEST_FAULTS`` hook (``activities/faults.py``), read by the in-process worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.cleanup import CleanupActivities
from activities.context import MoveContext
from activities.cutover import CutoverActivities, _Run
from activities.faults import ENV as FAULTS_ENV
from activities.models import CleanupInput, CutoverInput, CutoverResult, Direction, MoveSpec
from catalog import Catalog, LeaseUnavailableError
from catalog.models import Chunk, MigrationKind, MigrationOutcome
from router.hashing import khash
from shards.models import FenceState
from shards.postgres import documents as D
from shards.postgres.locks import CutoverLock
from shards.postgres.replication import migration_prefix, stream_names
from shards.postgres.schema import collection_table
from shards.postgres.stream_control import release_hold, request_hold
from shards.staging import Staging
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import load_on, pick, stream_objects, wait_until
from tests.workflows.procs import chunk_keys, count_rows, poll_progress, preload_chunk
from workflows import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow
from workload.checker import check, collect_stored

FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "part_rows": 500, "heartbeat_timeout_s": 5.0}


# -- helpers ------------------------------------------------------------------------------------


async def start(client: Client, worker: WorkerHandle, d: Deployment, moving: Chunk, target: str,
                **kw: Any) -> WorkflowHandle[MigrateChunkWorkflow, MigrateChunkResult]:
    return await client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=d.collection, chunk_id=moving.chunk_id, target=target,
                          **{**FAST, **kw}),
        id=f"fp-{d.collection}-{uuid.uuid4().hex[:6]}", task_queue=worker.task_queue,
    )


def write_docs(dsn: str, collection: str, chunk: Chunk, n: int) -> None:
    """Insert ``n`` more documents of ``chunk`` straight into its shard (new keys and ids)."""
    keys = chunk_keys(chunk, n, "more")
    with psycopg.connect(dsn) as conn:
        for i, key in enumerate(keys):
            id_text, doc_text = D.encode_for_store({"_id": f"more-{i}", "acct": key, "v": 2,
                                                    "pad": "m" * 200})
            conn.execute(sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s)").format(
                collection_table(collection)), (khash(key), id_text, doc_text))


async def activity_results(handle: WorkflowHandle[Any, Any], name: str, cls: type) -> list[Any]:
    """The decoded results of every completed ``name`` activity in a workflow's history."""
    scheduled: dict[int, str] = {}
    out = []
    conv = pydantic_data_converter.payload_converter
    async for ev in handle.fetch_history_events():
        if ev.HasField("activity_task_scheduled_event_attributes"):
            scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        if ev.HasField("activity_task_completed_event_attributes"):
            a = ev.activity_task_completed_event_attributes
            if scheduled.get(a.scheduled_event_id) == name:
                out.append(conv.from_payloads(a.result.payloads, [cls])[0])
    return out


async def activity_failures(handle: WorkflowHandle[Any, Any], name: str) -> int:
    """How many times a ``name`` activity failed for good in a workflow's history."""
    scheduled: dict[int, str] = {}
    n = 0
    async for ev in handle.fetch_history_events():
        if ev.HasField("activity_task_scheduled_event_attributes"):
            scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        if ev.HasField("activity_task_failed_event_attributes"):
            n += scheduled.get(ev.activity_task_failed_event_attributes.scheduled_event_id) == name
    return n


async def assert_completed_clean(d: Deployment, result: MigrateChunkResult, moving: Chunk,
                                 target: str, rows: int | None = None) -> None:
    """The move completed: the catalog, the fences, the rows and the leftovers agree."""
    c = d.collection
    assert result.outcome == MigrationOutcome.COMPLETED, result
    chunk = await d.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (target, moving.token + 1)
    fence = await d.shards[target].fence(c, moving.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, chunk.token)
    assert await d.shards[moving.shard_id].count(c, moving.range) == 0
    if rows is not None:
        assert await d.shards[target].count(c, moving.range) == rows
    record = await d.catalog.migration(result.migration_id)
    assert record.outcome == MigrationOutcome.COMPLETED, record
    assert await d.catalog.leases(migration_id=result.migration_id, live_only=False) == []
    dsns = [x.dsn for x in d.shards.values()]
    assert stream_objects(dsns, migration_prefix(result.migration_id)) == []


# -- defect 1: a switch that committed is rolled forward, never undone ---------------------------


async def test_cutover_failing_after_the_switch_rolls_forward(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalog switch commits, then the cutover activity fails for good. The workflow
    must learn from the catalog that the target owns the chunk and finish the move; undoing
    it would delete the acknowledged writes the target took after the switch."""
    d = deployment
    moving, target, other = pick(d)
    await asyncio.to_thread(preload_chunk, d.shards[moving.shard_id].dsn, d.collection, moving, 300)
    monkeypatch.setenv(FAULTS_ENV, f"cutover.after_switch@{d.collection}")
    async with load_on(d, moving, other, rate=200, workers=4, keys=(20, 4), warm=50) as load:
        handle = await start(temporal_client, worker, d, moving, target)
        result = await asyncio.wait_for(handle.result(), 180)
    await assert_completed_clean(d, result, moving, target)
    assert await activity_failures(handle, "migrate.cutover") == 1
    assert result.detail and "rolled forward" in result.detail, result
    report = check(load.records, await collect_stored(d.shards, d.collection))
    assert report.ok, report
    assert await d.shards[target].count(d.collection, moving.range) >= 300


async def test_abort_cleanup_refuses_to_empty_the_owner(deployment: Deployment, tmp_path: Path) -> None:
    """Defence in depth: ``cleanup(ABORTED)`` for a move whose switch committed (the catalog
    names the target) must not unfreeze the source nor demote and empty the target."""
    d = deployment
    c = d.collection
    moving, target, _ = pick(d)
    mid = f"fp-refuse-{uuid.uuid4().hex[:6]}"
    await d.catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=c,
                                       chunk_id=moving.chunk_id, source=moving.shard_id,
                                       target=target)
    spec = MoveSpec(migration_id=mid, collection=c, chunk_id=moving.chunk_id,
                    key_range=moving.range, source=moving.shard_id, target=target,
                    token=moving.token)
    src, tgt = d.shards[moving.shard_id], d.shards[target]
    await tgt.put_fence(c, moving.chunk_id, moving.range, moving.token, FenceState.RECEIVING, mid)
    await asyncio.to_thread(preload_chunk, tgt.dsn, c, moving, 50)
    await src.freeze(c, moving.chunk_id, moving.token)
    await tgt.activate(c, moving.chunk_id, moving.token + 1)
    await d.catalog.move_chunk(c, moving.chunk_id, moving.token, target, mid)

    async with Catalog(d.catalog.dsn, max_size=2) as cat:
        ctx = MoveContext(cat, Staging(str(tmp_path / "staging")))
        try:
            with pytest.raises(ApplicationError) as refused:
                await ActivityEnvironment().run(
                    CleanupActivities(ctx).cleanup,
                    CleanupInput(spec=spec, outcome=MigrationOutcome.ABORTED))
        finally:
            await ctx.close()
    assert refused.value.non_retryable, refused.value
    assert "owner" in str(refused.value), refused.value
    fence = await tgt.fence(c, moving.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, moving.token + 1)
    assert await tgt.count(c, moving.range) == 50
    fence = await src.fence(c, moving.chunk_id)
    assert fence is not None and fence.state == FenceState.FROZEN, fence


async def test_commit_check_waits_for_a_switch_in_flight(deployment: Deployment,
                                                         tmp_path: Path) -> None:
    """``_committed`` must not read around a ``move_chunk`` whose transaction is still open:
    a reply lost while the switch is in flight would otherwise read "not committed", undo the
    cutover, and then the switch would land on an emptied, demoted target."""
    d = deployment
    c = d.collection
    moving, target, _ = pick(d)
    mid = f"fp-race-{uuid.uuid4().hex[:6]}"
    await d.catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=c,
                                       chunk_id=moving.chunk_id, source=moving.shard_id,
                                       target=target)
    spec = MoveSpec(migration_id=mid, collection=c, chunk_id=moving.chunk_id,
                    key_range=moving.range, source=moving.shard_id, target=target,
                    token=moving.token)
    run = _Run(CutoverInput(spec=spec), moving.shard_id, target, moving.token)

    async with Catalog(d.catalog.dsn, max_size=2) as cat, \
            await psycopg.AsyncConnection.connect(d.catalog.dsn, autocommit=True) as gate, \
            await psycopg.AsyncConnection.connect(d.catalog.dsn, autocommit=True) as watch:
        ctx = MoveContext(cat, Staging(str(tmp_path / "staging")))
        try:
            # Hold the switch in flight: it locks the chunk and migration rows, then waits
            # for the catalog version row the gate holds.
            await gate.execute("BEGIN")
            await gate.execute("SELECT version FROM catalog.meta WHERE id = 1 FOR UPDATE")
            switch = asyncio.create_task(
                d.catalog.move_chunk(c, moving.chunk_id, moving.token, target, mid))

            async def waiting(n: int) -> bool:
                cur = await watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()")
                return (await cur.fetchone())[0] >= n

            await wait_until(lambda: waiting(1), 10, "the switch waiting on the gate")
            check_task = asyncio.create_task(CutoverActivities(ctx)._committed(run))
            # The check either waits on the switch's row lock or (the defect) answers at once.
            await wait_until(lambda: check_task.done() or waiting(2), 10, "the check to wait or answer")
            answered_early = check_task.done()
            await gate.execute("COMMIT")
            await switch
            committed = await check_task
        finally:
            await ctx.close()
    assert not answered_early, f"the check answered {committed} while the switch was in flight"
    assert committed is True


# -- defect 4: after the commit point the move always finishes its cleanup -----------------------


async def test_failures_after_commit_still_finish_the_move(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cleanup fails for good three times and ``finish`` twice (each beyond its retries):
    the move still ends completed, with no slot, publication, staging file or lease left."""
    d = deployment
    moving, target, _ = pick(d)
    await asyncio.to_thread(preload_chunk, d.shards[moving.shard_id].dsn, d.collection, moving, 200)
    monkeypatch.setenv(FAULTS_ENV, f"cleanup.start@{d.collection}*3,finish.start@{d.collection}*2,"
                                   f"set_phase.cleanup@{d.collection}*1")
    handle = await start(temporal_client, worker, d, moving, target, after_commit_retry_s=0.2)
    result = await asyncio.wait_for(handle.result(), 180)
    await assert_completed_clean(d, result, moving, target, rows=200)
    assert await activity_failures(handle, "migrate.cleanup") == 3
    assert await activity_failures(handle, "migrate.finish") == 2
    progress = await handle.query(MigrateChunkWorkflow.progress)
    assert progress.detail and "finishing the record failed (2x)" in progress.detail, progress
    assert "InjectedFault" in progress.detail, progress
    staging = Path(worker.settings.staging) / result.migration_id
    assert not staging.exists()


# -- defect 5: leases live as long as the move ---------------------------------------------------


async def test_leases_outlive_their_ttl_while_the_move_runs(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client,
) -> None:
    """A move held before its commit point (applier held: replicate, or cutover attempts
    refused admission) for three lease lifetimes still holds its leases, so a second move
    over the shard's limit is refused; the move then completes."""
    d = deployment
    moving, target, _ = pick(d)
    source = moving.shard_id
    ttl = 4.0
    await asyncio.to_thread(preload_chunk, d.shards[source].dsn, d.collection, moving, 100)
    handle = await start(temporal_client, worker, d, moving, target, lease_ttl_s=ttl,
                         max_lag_bytes=64 * 1024, verify=False, cutover_attempts=1000,
                         cutover_retry_s=0.5)
    seen = await poll_progress(handle, lambda p: p.phase == "replicate", timeout=60,
                               what="replicate")
    mid = seen.migration_id
    names = stream_names(mid, "fwd")
    tdsn = d.shards[target].dsn

    def hold() -> bool:
        try:
            request_hold(tdsn, names)
            return True
        except Exception:  # noqa: BLE001 - the applier has not written its state row yet
            return False

    await wait_until(lambda: asyncio.to_thread(hold), 60, "the applier to take a hold")
    try:
        # Lag the held stream well past admission, so the move stays in replicate.
        await asyncio.to_thread(write_docs, d.shards[source].dsn, d.collection, moving, 2000)
        held_until = time.monotonic() + 3 * ttl
        while time.monotonic() < held_until:
            leases = await d.catalog.leases(migration_id=mid)
            assert sorted(lease.shard_id for lease in leases) == sorted([source, target]), \
                f"the move's leases expired while it ran: {leases}"
            p = await handle.query(MigrateChunkWorkflow.progress)
            assert p.phase in ("replicate", "cutover") and p.outcome is None, p
            await asyncio.sleep(0.2)
        with pytest.raises(LeaseUnavailableError):
            await d.catalog.take_leases(f"fp-probe-{uuid.uuid4().hex[:6]}", [source],
                                        holder="probe", max_moves_per_shard=1)
    finally:
        await asyncio.to_thread(release_hold, tdsn, names)
    result = await asyncio.wait_for(handle.result(), 120)
    await assert_completed_clean(d, result, moving, target, rows=2100)


# -- 11a: the cutover's lock connection notices a dead peer ---------------------------------------


async def test_cutover_lock_connection_has_keepalives(deployment: Deployment) -> None:
    """The session advisory lock lives on a connection that both ends probe: the server
    frees the lock within seconds when the worker's host vanishes (server-side keepalives and
    user timeout), and the worker notices a vanished server (client-side keepalives)."""
    dsn = next(iter(deployment.shards.values())).dsn
    lock = await CutoverLock.connect(dsn, f"fp-keepalives-{uuid.uuid4().hex[:6]}")
    conn = lock.conn
    try:
        assert await lock.try_acquire()
        params = conn.info.get_parameters()
        assert params.get("keepalives") == "1", params
        assert 0 < int(params["keepalives_idle"]) <= 10, params
        server = {}
        for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                     "tcp_user_timeout"):
            cur = await conn.execute(f"SHOW {name}")
            server[name] = (await cur.fetchone())[0]
        idle = int(server["tcp_keepalives_idle"].rstrip("s"))
        interval = int(server["tcp_keepalives_interval"].rstrip("s"))
        count = int(server["tcp_keepalives_count"])
        assert 0 < idle + interval * count <= 20, server
        assert server["tcp_user_timeout"] not in ("0", "0ms"), server
    finally:
        await lock.close()


# -- 11b: no reverse slot without a rollback window ----------------------------------------------


async def test_no_reverse_stream_without_rollback_window(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client,
) -> None:
    """A move with no rollback window never creates the reverse publication and slot (a slot
    nobody reads retains WAL); one with a window still does."""
    d = deployment
    moving, target, _ = pick(d)
    await asyncio.to_thread(preload_chunk, d.shards[moving.shard_id].dsn, d.collection, moving, 50)
    dry = await (await start(temporal_client, worker, d, moving, target, rollback_window_s=0,
                             dry_run=True)).result()
    assert [s.name for s in dry.plan] == [
        "admit", "freeze_old", "wait_for_catchup", "activate_new", "switch_catalog"], dry.plan
    handle = await start(temporal_client, worker, d, moving, target, rollback_window_s=0)
    result = await asyncio.wait_for(handle.result(), 120)
    await assert_completed_clean(d, result, moving, target, rows=50)
    cuts = await activity_results(handle, "migrate.cutover", CutoverResult)
    assert cuts and cuts[-1].committed, cuts
    steps = {s.name: s.done for s in cuts[-1].steps}
    assert "create_reverse_stream" not in steps, steps
    assert steps["switch_catalog"], steps
    # The target never had a slot of the move: no restart_lsn was ever held for it there.
    rev = stream_names(result.migration_id, Direction.REVERSE.value).slot
    assert count_rows(d.shards[target].dsn,
                      "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                      (rev,)) == 0

    # With a window the step runs (the reverse stream feeds the rollback).
    back = d.initial.chunks[1]
    back_target = next(s for s in sorted(d.shards) if s != back.shard_id)
    handle = await start(temporal_client, worker, d, back, back_target, rollback_window_s=0.5)
    result = await asyncio.wait_for(handle.result(), 120)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    cuts = await activity_results(handle, "migrate.cutover", CutoverResult)
    assert {s.name: s.done for s in cuts[-1].steps}.get("create_reverse_stream") is True, cuts

