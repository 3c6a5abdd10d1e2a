"""The life cycle of ``MigrateChunkWorkflow`` around the happy path: empty chunks, rollback,
cancellation in every phase, concurrent moves, dry runs, bad input and replay determinism.

Real Temporal dev server and PostgreSQL shards from the session stack; no mocks. One worker
serves the whole module (a worker's graceful shutdown costs seconds, so not one per test).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.service import RPCError
from temporalio.worker import Replayer

from catalog.models import Chunk, MigrationOutcome
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import Settings, TemporalSettings
from shards.models import FenceState
from shards.postgres.replication import migration_prefix, stream_names
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment, router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import (
    failure_chain,
    load_chunk,
    other_shard,
    start_worker_move,
    stream_objects,
    wait_until,
)
from worker import run_worker
from workflows import MigrateChunkWorkflow
from workflows.migrate_chunk import Progress
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig, keys_in

HISTORIES = Path(__file__).parent / "histories"
RECORDED = HISTORIES / "migrate_chunk_completed.json"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def lc_worker(stack: Stack, temporal_client: Client) -> AsyncIterator[WorkerHandle]:
    """One in-process worker on a fresh task queue for the whole module."""
    staging = str(owned_state_dir("staging"))
    settings = Settings(
        catalog_dsn=stack.catalog_dsn, staging_url=staging,
        temporal=TemporalSettings(address=stack.temporal.address,
                                  task_queue=f"lifecycle-{uuid.uuid4().hex[:8]}"),
    )
    stop = asyncio.Event()

    async def run() -> None:
        # The worker's start-up ``ensure_schema`` can lose a serialization conflict against
        # the first test's deployment (it runs concurrently: this fixture is module-scoped);
        # ``Catalog.ensure_schema`` does not retry such a conflict. Start it again.
        for attempt in range(5):
            try:
                return await run_worker(settings, stop=stop, client=temporal_client)
            except psycopg.errors.SerializationFailure:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.05)

    task = asyncio.create_task(run())
    handle = WorkerHandle(settings, task, stop)
    try:
        yield handle
    finally:
        if not task.done():
            await handle.shutdown()
        shutil.rmtree(staging, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------------


async def wait_progress(handle: WorkflowHandle[Any, Any], pred: Callable[[Progress], bool],
                        timeout: float = 60.0, what: str = "progress") -> Progress:
    async def probe() -> Progress | None:
        p = await handle.query(MigrateChunkWorkflow.progress)
        return p if pred(p) else None

    return await wait_until(probe, timeout, what)


def prefix_of(d: Deployment, kind: str = "lc") -> str:
    """Name prefix of every replication object of this test's moves (workflow ids start with
    ``<kind>-<collection>``), so one test's leftovers never fail another test."""
    return "ss_" + re.sub(r"[^a-z0-9_]", "_", f"{kind}-{d.collection}".lower())[:32]


def dsns(d: Deployment) -> list[str]:
    return [s.dsn for s in d.shards.values()]


async def assert_untouched(d: Deployment, before: Chunk, target: str) -> None:
    """The chunk is where it was, served by its source at its token; the target has nothing."""
    c = d.collection
    chunk = await d.catalog.chunk(c, before.chunk_id)
    assert (chunk.shard_id, chunk.token) == (before.shard_id, before.token)
    fence = await d.shards[before.shard_id].fence(c, before.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, before.token)
    assert await d.shards[target].fence(c, before.chunk_id) is None
    assert await d.shards[target].count(c, before.range) == 0


async def unfinished_activities(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Activities the workflow scheduled but had not seen finish when it closed."""
    scheduled: dict[int, str] = {}
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled[event.event_id] = \
                event.activity_task_scheduled_event_attributes.activity_type.name
        for kind in ("completed", "failed", "timed_out", "canceled"):
            field = f"activity_task_{kind}_event_attributes"
            if event.HasField(field):
                scheduled.pop(getattr(event, field).scheduled_event_id, None)
    return sorted(scheduled.values())


async def after_cancel(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Activities scheduled from the workflow's cancel request on (a diagnostic)."""
    out, cancelled = [], False
    async for event in handle.fetch_history_events():
        cancelled = cancelled or event.HasField(
            "workflow_execution_cancel_requested_event_attributes")
        if cancelled and event.HasField("activity_task_scheduled_event_attributes"):
            out.append(event.activity_task_scheduled_event_attributes.activity_type.name)
    return out


def ok_count(load: LoadGenerator) -> int:
    return sum(r.outcome == "ok" for r in load.records)


# -- 1. an empty chunk --------------------------------------------------------------------------


async def test_move_empty_chunk(deployment: Deployment, lc_worker: WorkerHandle,
                                temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = other_shard(deployment, moving.shard_id)
    assert await deployment.shards[moving.shard_id].count(c, moving.range) == 0
    handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target)
    result = await handle.result()
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert result.documents == 0
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (target, moving.token + 1)
    fence = await deployment.shards[target].fence(c, moving.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, moving.token + 1)
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []
    assert await deployment.catalog.leases(migration_id=result.migration_id) == []
    record = await deployment.catalog.migration(result.migration_id)
    assert record.outcome == MigrationOutcome.COMPLETED


# -- 2. rollback ----------------------------------------------------------------------------------


async def test_rollback_under_load(deployment: Deployment, lc_worker: WorkerHandle,
                                   temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    source = moving.shard_id
    target = other_shard(deployment, source)
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(
            collection=c, rate=200, workers=4, only_keys=keys_in(moving.range, 20),
        ))
        await load.start()
        try:
            await wait_until(lambda: ok_count(load) >= 50, what="load warm-up")
            handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target,
                                      rollback_window_s=60)
            # Outside the window the validator refuses the update (nothing is recorded).
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await handle.execute_update(MigrateChunkWorkflow.rollback)
            cause = refused.value.cause
            assert isinstance(cause, ApplicationError), cause
            assert "only possible during the rollback window" in str(cause)

            await wait_progress(handle, lambda p: p.rollback_open, what="rollback window")
            chunk = await deployment.catalog.chunk(c, moving.chunk_id)
            assert (chunk.shard_id, chunk.token) == (target, moving.token + 1)
            # Writes reach the target during the window; they must stream back.
            acked = ok_count(load)
            await wait_until(lambda: ok_count(load) >= acked + 50, what="writes on the target")
            assert await handle.execute_update(MigrateChunkWorkflow.rollback) == "rollback requested"
            result = await handle.result()
            acked = ok_count(load)
            await wait_until(lambda: ok_count(load) >= acked + 50, what="writes after rollback")
        finally:
            await load.stop()
    assert result.outcome == MigrationOutcome.ROLLED_BACK, result
    assert result.rollback_pause_ms is not None
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (source, moving.token + 2)
    fence = await deployment.shards[source].fence(c, moving.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, moving.token + 2)
    report = check(load.records, await collect_stored(deployment.shards, c))
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    assert await deployment.shards[target].count(c, moving.range) == 0
    assert await deployment.shards[target].fence(c, moving.chunk_id) is None
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []
    assert await deployment.catalog.leases(migration_id=result.migration_id) == []
    # After the window (here: the workflow has finished) the server refuses the update.
    with pytest.raises(RPCError, match="already completed"):
        await handle.execute_update(MigrateChunkWorkflow.rollback)


# -- 3. cancel before the commit point ------------------------------------------------------------

PHASES = ["snapshot", "import", "replicate", "verify"]
ORDER = ["starting", "registered", *PHASES, "cutover", "rollback_window", "cleanup", "done"]


@pytest.mark.parametrize("phase", PHASES)
async def test_cancel_before_commit(phase: str, deployment: Deployment, lc_worker: WorkerHandle,
                                    temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    source = moving.shard_id
    target = other_shard(deployment, source)
    docs = load_chunk(deployment.shards[source].dsn, c, moving.range, 20_000)
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(
            collection=c, rate=150, workers=3, only_keys=keys_in(moving.range, 12),
        ))
        await load.start()
        try:
            await wait_until(lambda: ok_count(load) >= 20, what="load warm-up")
            # Tiny parts and a slow lag poll stretch every phase before the cutover.
            handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target,
                                      part_rows=100, poll_s=1.0, verify_buckets=4096)
            seen = await wait_progress(
                handle, lambda p: p.phase in ORDER and ORDER.index(p.phase) >= ORDER.index(phase),
                what=f"phase {phase}")
            assert ORDER.index(seen.phase) < ORDER.index("cutover"), (
                f"the move raced past {phase} to {seen.phase} before it could be cancelled")
            await handle.cancel()
            try:
                late = await handle.result()
            except WorkflowFailureError as exc:
                assert isinstance(exc.cause, CancelledError), failure_chain(exc)
            else:
                # A cancel that reaches an activity which then completes anyway (seen once
                # with verify) must still abort: ``_raise_if_cancelled`` checks before each phase.
                pytest.fail(f"cancelled in {seen.phase} (before the commit point) but the move "
                            f"finished as {late.outcome}; activities after the cancel request: "
                            f"{await after_cancel(handle)}")
            acked = ok_count(load)
            await wait_until(lambda: ok_count(load) >= acked + 30, what="writes after the abort")
        finally:
            await load.stop()
    mid = seen.migration_id
    # The abort waited for every activity it had started: none outlives the workflow (an
    # orphaned export or import would keep writing after the abort's cleanup).
    assert await unfinished_activities(handle) == []
    await assert_untouched(deployment, moving, target)
    assert stream_objects(dsns(deployment), migration_prefix(mid)) == []
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []
    record = await deployment.catalog.migration(mid)
    assert record.outcome == MigrationOutcome.ABORTED, record
    assert await deployment.catalog.leases(migration_id=mid) == []
    report = check(load.records, await collect_stored(deployment.shards, c))
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    # The bulk documents are all still on the source.
    assert await deployment.shards[source].count(c, moving.range) >= docs
    progress = await handle.query(MigrateChunkWorkflow.progress)
    assert progress.outcome == MigrationOutcome.ABORTED.value
    # Nothing of the move kept running after the abort: no staged parts reappeared, the
    # target stayed empty, no slot came back.
    staging = Staging(lc_worker.settings.staging)
    assert staging.parts(mid) == [], "staged parts written after the abort's cleanup"
    assert await deployment.shards[target].count(c, moving.range) == 0
    assert await deployment.shards[target].fence(c, moving.chunk_id) is None
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []


async def drop_slot(dsn: str, slot: str) -> None:
    """Drop a replication slot behind a move's back, cutting off its walsender first."""
    def attempt() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            except psycopg.errors.ObjectInUse:
                return False  # the applier reconnected meanwhile: cut it off again
            return True

    await wait_until(lambda: asyncio.to_thread(attempt), what=f"dropping {slot}")


# -- 3b. the stream's slot is lost before the commit point -----------------------------------------


async def test_slot_lost_aborts_the_move(deployment: Deployment, lc_worker: WorkerHandle,
                                         temporal_client: Client) -> None:
    """A slot dropped behind the move's back (an operator, a failover) loses the changes it
    kept: the move must fail for good and abort cleanly, not retry its applier forever."""
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    source = moving.shard_id
    target = other_shard(deployment, source)
    load_chunk(deployment.shards[source].dsn, c, moving.range, 20_000)
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(
            collection=c, rate=150, workers=3, only_keys=keys_in(moving.range, 12),
        ))
        await load.start()
        try:
            await wait_until(lambda: ok_count(load) >= 20, what="load warm-up")
            handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target,
                                      part_rows=100)
            # Once the snapshot is taken its walsender lets go of the slot: drop it.
            seen = await wait_progress(
                handle, lambda p: p.phase in ORDER and ORDER.index(p.phase) >= ORDER.index("import"),
                what="the import phase")
            await drop_slot(deployment.shards[source].dsn,
                            stream_names(seen.migration_id, "fwd").slot)
            dropped_in = (await handle.query(MigrateChunkWorkflow.progress)).phase
            assert ORDER.index(dropped_in) < ORDER.index("cutover"), dropped_in
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(handle.result(), 120)
            acked = ok_count(load)
            await wait_until(lambda: ok_count(load) >= acked + 30, what="writes after the abort")
        finally:
            await load.stop()
    chain = failure_chain(failed.value)
    app = next((e for e in chain if isinstance(e, ApplicationError)), None)
    assert app is not None and app.non_retryable and "does not exist" in str(app), chain
    mid = seen.migration_id
    record = await deployment.catalog.migration(mid)
    assert record.outcome == MigrationOutcome.ABORTED, record
    assert "slot" in (record.detail or ""), record
    assert await unfinished_activities(handle) == []
    await assert_untouched(deployment, moving, target)
    assert stream_objects(dsns(deployment), migration_prefix(mid)) == []
    assert await deployment.catalog.leases(migration_id=mid) == []
    report = check(load.records, await collect_stored(deployment.shards, c))
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report


# -- 4. cancel after the commit point ------------------------------------------------------------


async def test_cancel_in_rollback_window_completes(deployment: Deployment, lc_worker: WorkerHandle,
                                                   temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    source = moving.shard_id
    target = other_shard(deployment, source)
    load_chunk(deployment.shards[source].dsn, c, moving.range, 500)
    handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target,
                              rollback_window_s=60)
    await wait_progress(handle, lambda p: p.rollback_open, what="rollback window")
    await handle.cancel()
    result = await handle.result()  # past the commit point a cancel finishes the move
    assert result.outcome == MigrationOutcome.COMPLETED, result
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (target, moving.token + 1)
    assert await deployment.shards[source].count(c, moving.range) == 0
    assert await deployment.shards[target].count(c, moving.range) == 500
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []
    assert await deployment.catalog.leases(migration_id=result.migration_id) == []
    assert (await deployment.catalog.migration(result.migration_id)).outcome == \
        MigrationOutcome.COMPLETED


async def test_reverse_slot_lost_closes_the_window(deployment: Deployment,
                                                   lc_worker: WorkerHandle,
                                                   temporal_client: Client) -> None:
    """Losing the reverse stream makes a rollback impossible, not the move: the window closes
    early, the move completes and says why."""
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    source = moving.shard_id
    target = other_shard(deployment, source)
    load_chunk(deployment.shards[source].dsn, c, moving.range, 500)
    handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target,
                              rollback_window_s=600)
    seen = await wait_progress(handle, lambda p: p.rollback_open, what="rollback window")
    await drop_slot(deployment.shards[target].dsn, stream_names(seen.migration_id, "rev").slot)
    result = await asyncio.wait_for(handle.result(), 120)  # long before the window's end
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert result.detail and "reverse stream failed" in result.detail, result
    assert "does not exist" in result.detail, result
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (target, moving.token + 1)
    assert await deployment.shards[target].count(c, moving.range) == 500
    assert await deployment.shards[source].count(c, moving.range) == 0
    assert stream_objects(dsns(deployment), migration_prefix(result.migration_id)) == []
    progress = await handle.query(MigrateChunkWorkflow.progress)
    assert not progress.rollback_open and progress.detail == result.detail


# -- 5. concurrent moves --------------------------------------------------------------------------


async def test_two_chunks_at_once_same_chunk_refused(deployment: Deployment,
                                                     lc_worker: WorkerHandle,
                                                     temporal_client: Client) -> None:
    c = deployment.collection
    a, b = deployment.initial.chunks[0], deployment.initial.chunks[1]
    assert a.shard_id != b.shard_id
    load_chunk(deployment.shards[a.shard_id].dsn, c, a.range, 300)
    load_chunk(deployment.shards[b.shard_id].dsn, c, b.range, 300)
    ta = other_shard(deployment, a.shard_id, b.shard_id)
    tb = a.shard_id
    ha = await start_worker_move(temporal_client, lc_worker, c, a.chunk_id, ta)
    hb = await start_worker_move(temporal_client, lc_worker, c, b.chunk_id, tb)
    # Once the first is registered, a second move of the same chunk is refused.
    await wait_progress(ha, lambda p: p.phase not in ("starting", "registered"), what="registered")
    dup = await start_worker_move(temporal_client, lc_worker, c, a.chunk_id, b.shard_id)
    with pytest.raises(WorkflowFailureError) as failed:
        await dup.result()
    chain = failure_chain(failed.value)
    app = next((e for e in chain if isinstance(e, ApplicationError)), None)
    assert app is not None and app.non_retryable, chain
    assert "already moving" in str(app), app
    ra, rb = await asyncio.gather(ha.result(), hb.result())
    assert ra.outcome == rb.outcome == MigrationOutcome.COMPLETED, (ra, rb)
    assert (await deployment.catalog.chunk(c, a.chunk_id)).shard_id == ta
    assert (await deployment.catalog.chunk(c, b.chunk_id)).shard_id == tb
    assert await deployment.shards[ta].count(c, a.range) == 300
    assert await deployment.shards[tb].count(c, b.range) == 300
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []
    assert await deployment.catalog.migrations(collection=c, active_only=True) == []


# -- 6. dry run -----------------------------------------------------------------------------------


async def test_dry_run_changes_nothing(deployment: Deployment, lc_worker: WorkerHandle,
                                       temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = other_shard(deployment, moving.shard_id)
    fences_before = {s: await e.fences(c) for s, e in deployment.shards.items()}
    # With a rollback window, so the plan includes the reverse stream (without one it is left
    # out: tests/workflows/test_failure_paths.py).
    handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target, dry_run=True,
                              rollback_window_s=60)
    result = await handle.result()
    assert [s.name for s in result.plan] == [
        "admit", "create_reverse_stream", "freeze_old", "wait_for_catchup", "activate_new",
        "switch_catalog",
    ]
    assert not any(s.done for s in result.plan)
    assert f"{moving.shard_id}@{moving.token} -> {target}@{moving.token + 1}" in \
        result.plan[-1].description
    await assert_untouched(deployment, moving, target)
    assert {s: await e.fences(c) for s, e in deployment.shards.items()} == fences_before
    assert await deployment.catalog.migrations(collection=c) == []
    assert stream_objects(dsns(deployment), prefix_of(deployment)) == []


# -- 7. bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["collection", "chunk", "target", "same_shard"])
async def test_bad_input_fails_fast(case: str, deployment: Deployment, lc_worker: WorkerHandle,
                                    temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = other_shard(deployment, moving.shard_id)
    collection, chunk_id, to = c, moving.chunk_id, target
    expect = {"collection": "nosuch", "chunk": "999999", "target": "nosuch",
              "same_shard": "already on"}[case]
    if case == "collection":
        collection = "nosuch_collection"
    elif case == "chunk":
        chunk_id = 999_999_999
    elif case == "target":
        to = "nosuch-shard"
    else:
        to = moving.shard_id
    started = time.monotonic()
    handle = await start_worker_move(temporal_client, lc_worker, collection, chunk_id, to)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert time.monotonic() - started < 10, "bad input must fail fast, not retry"
    chain = failure_chain(failed.value)
    assert any(isinstance(e, ActivityError) for e in chain), chain
    app = next((e for e in chain if isinstance(e, ApplicationError)), None)
    assert app is not None and app.non_retryable, chain
    assert expect in str(app).lower(), app
    await assert_untouched(deployment, moving, target)
    assert await deployment.catalog.migrations(collection=c, active_only=True) == []
    assert await deployment.shards[target].fence(c, moving.chunk_id) is None


# -- 8. replay ------------------------------------------------------------------------------------


async def test_replay_is_deterministic(deployment: Deployment, lc_worker: WorkerHandle,
                                       temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = other_shard(deployment, moving.shard_id)
    load_chunk(deployment.shards[moving.shard_id].dsn, c, moving.range, 200)
    handle = await start_worker_move(temporal_client, lc_worker, c, moving.chunk_id, target)
    result = await handle.result()
    assert result.outcome == MigrationOutcome.COMPLETED, result
    history = await handle.fetch_history()
    replayer = Replayer(workflows=[MigrateChunkWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
    # Committed histories (this file's earlier recording among them) replay without a server
    # in tests/workflows/test_replay.py; this test never writes one.
    recorded = WorkflowHistory.from_json("recorded-move", RECORDED.read_text())
    await replayer.replay_workflow(recorded)
