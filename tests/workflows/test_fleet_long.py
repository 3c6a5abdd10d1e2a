"""Fleet workflows at length: drains and rebalances that continue as new to keep each run's
history bounded, and a drain that re-plans a chunk whose target is lost.

Recorded histories of drains and rebalances (which every later version of the workflow code
must replay) are replayed without a server in ``test_replay.py`` and recorded by
``python -m tests.workflows.record_histories``.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.fleet import _targets
from activities.models import DrainPlanInput
from catalog import Catalog, ShardState
from catalog.models import MigrationKind, MigrationOutcome, ShardInfo
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from shards.postgres import PostgresShard
from shards.postgres.bulk_import import forget_parts
from shards.postgres.replication import cleanup_stream_objects
from tests.router.conftest import router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.fleet import (
    Fleet,
    assert_drained,
    child_starts,
    make_fleet,
    run_histories,
    run_under_load,
    start_drain,
)
from tests.workflows.helpers import FAST, load_chunk, stream_objects, wait_until
from tests.workflows.procs import preload_chunk
from workflows import (
    DrainShardInput,
    DrainShardWorkflow,
    MigrateChunkInput,
    MigrateChunkWorkflow,
    RebalanceInput,
    RebalanceWorkflow,
)
from workflows.child_moves import RunLimits
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig

RESULT_TIMEOUT_S = 240
PRELOAD = 6000
"""Documents preloaded into a chunk whose move must still be copying when the test acts."""


# -- 1. continue-as-new keeps every run's history bounded --------------------------------------

MOVES_PER_RUN = 2
RUN_BOUND = 60
"""Events a drain run with at most ``MOVES_PER_RUN`` children stays under (a plan, a page of
the stored plan, phases, about a dozen events per child, and in the last run the plan's
removal; 32 to 51 seen); a drain of 8 chunks in one run took 95 before plans were paged."""


async def test_long_drain_continues_as_new_with_bounded_history(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-l0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-l1": (pg18_dsns[1], 18),
                              f"{c[:40]}-l2": (pg18_dsns[2], 18)}, chunks_per_shard=8)
    fleet_cleanup.append(fleet)
    chunks = {ch.chunk_id for ch in (await router_catalog.chunk_map(c)).chunks}
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=2, move=FAST,
        limits=RunLimits(moves_per_run=MOVES_PER_RUN)))
    result, load = await run_under_load(fleet, handle)
    # The drain completed as one drain: every chunk moved once, the checker is satisfied.
    await assert_drained(fleet, result, load, MigrationKind.MERGE_SHARDS)
    assert sorted(m.chunk_id for m in result.moves) == sorted(chunks), result.moves
    assert sorted(m.workflow_id for m in result.moves) == \
        sorted(f"{handle.id}/{ch}" for ch in chunks)
    # ... in several runs, each with a bounded history.
    runs = await run_histories(temporal_client, handle.id, handle.first_execution_run_id or "")
    assert len(runs) == result.runs >= 4, [len(r) for r in runs]
    assert all(len(r) <= RUN_BOUND for r in runs), [len(r) for r in runs]
    assert sum(len(r) for r in runs) > RUN_BOUND  # one run would have exceeded the bound
    started = [child_starts(r) for r in runs]
    assert all(len(s) <= MOVES_PER_RUN for s in started), started
    flat = [wid for s in started for wid in s]
    assert len(flat) == len(set(flat)) == len(chunks), started  # never a move started twice
    # The progress query of the last run carries the counts of every run.
    progress = await handle.query(DrainShardWorkflow.progress)
    assert (progress.phase, progress.chunks_done, progress.chunks_total, progress.runs) == \
        ("done", len(chunks), len(chunks), len(runs)), progress


async def test_long_rebalance_continues_as_new_within_its_limits(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-q0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-q1": (pg18_dsns[1], 18)}, chunks_per_shard=6)
    fleet_cleanup.append(fleet)
    for chunk in (await router_catalog.chunk_map(c)).chunks:
        load_chunk(pg18_dsns[0], c, chunk.range, 500)
    handle = await temporal_client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(collections=[c], shards=[*fleet.old, *fleet.new], tolerance=0.2,
                       max_moves=3, max_moves_per_shard=3, max_parallel=1, move=FAST,
                       limits=RunLimits(moves_per_run=1)),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    # Three moves (the global limit, kept across runs), one per run.
    assert len(result.moves) == 3 and all(m.outcome == "completed" for m in result.moves), \
        result.moves
    runs = await run_histories(temporal_client, handle.id, handle.first_execution_run_id or "")
    assert len(runs) == result.runs == 3, [len(r) for r in runs]
    assert [len(child_starts(r)) for r in runs] == [1, 1, 1]
    after = result.loads_after
    assert abs(after[fleet.old[0]] - after[fleet.new[0]]) <= 0.2 * sum(after.values()) / 2, after
    total = sum([await fleet.shards[s].count(c) for s in fleet.shards])
    assert total == 6 * 500  # nothing lost, nothing duplicated
    assert stream_objects([s.dsn for s in fleet.shards.values()], "ss_rebalance") == []


async def test_cancel_after_continue_as_new_restores_the_shard(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """A cancel reaches whichever run is current: the running move stops and the shard takes
    chunks again, as in a drain that never continued as new."""
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-x0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-x1": (pg18_dsns[1], 18)}, chunks_per_shard=4)
    fleet_cleanup.append(fleet)
    old = fleet.old[0]
    first = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=1, move={**FAST, "poll_s": 2.0},
        limits=RunLimits(moves_per_run=1)))
    handle = temporal_client.get_workflow_handle(first.id)  # the current run, whichever

    async def moving_in_a_later_run() -> bool:
        p = await handle.query(DrainShardWorkflow.progress)
        return p.runs >= 2 and p.phase == "moving" and bool(p.running)

    await wait_until(moving_in_a_later_run, timeout=120, what="a move running in run 2+")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 120)
    assert (await fleet.catalog.shard(old)).state == ShardState.ACTIVE

    async def settled() -> bool:
        return await fleet.catalog.migrations(collection=c, active_only=True) == []

    await wait_until(settled, timeout=60, what="the moves' aborts")
    cmap = await fleet.catalog.chunk_map(c)
    assert any(ch.shard_id == old for ch in cmap.chunks), "a cancelled drain moved everything"
    assert any(ch.shard_id != old for ch in cmap.chunks), "the first run moved nothing"
    assert stream_objects([s.dsn for s in fleet.shards.values()], "ss_drain") == []
    progress = await handle.query(DrainShardWorkflow.progress)
    assert progress.phase == "cancelled" and progress.running == [], progress


# -- a move already running under a child's id is awaited, not started again --------------


async def test_drain_awaits_a_move_already_running_under_its_id(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """A parent reset, or an operator, may have started the move a drain is about to start,
    under the same id: the drain waits for that move instead of failing or moving twice."""
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-w0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-w1": (pg18_dsns[1], 18)}, chunks_per_shard=2)
    fleet_cleanup.append(fleet)
    chunks = (await router_catalog.chunk_map(c)).chunks
    # The largest chunk is planned first; its copy keeps the early move running meanwhile.
    await asyncio.to_thread(preload_chunk, pg18_dsns[0], c, chunks[0], PRELOAD)
    drain_id = f"drain-{uuid.uuid4().hex[:8]}"
    early = await temporal_client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=c, chunk_id=chunks[0].chunk_id, target=fleet.new[0],
                          kind=MigrationKind.MERGE_SHARDS, **{**FAST, "part_rows": 100}),
        id=f"{drain_id}/{chunks[0].chunk_id}", task_queue=worker.task_queue)
    handle = await temporal_client.start_workflow(
        DrainShardWorkflow.run,
        DrainShardInput(shards=fleet.old, targets=fleet.new, max_parallel=1, move=FAST),
        id=drain_id, task_queue=worker.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.retired == fleet.old, result
    assert sorted((m.chunk_id, m.outcome) for m in result.moves) == \
        sorted((ch.chunk_id, "completed") for ch in chunks), result.moves
    # One move of that chunk ran: the early one, awaited by the drain.
    runs = [w async for w in temporal_client.list_workflows(f'WorkflowId = "{early.id}"')]
    assert [w.run_id for w in runs] == [early.result_run_id], runs
    records = [r for r in await fleet.catalog.migrations(collection=c)
               if r.chunk_id == chunks[0].chunk_id]
    assert len(records) == 1 and records[0].outcome == MigrationOutcome.COMPLETED, records
    assert sum([await fleet.shards[s].count(c) for s in fleet.shards]) == PRELOAD


# -- 2. a target lost during a drain: its chunk is re-planned onto another shard -------------

GIVE_UP_S = 10.0


async def test_drain_replans_a_chunk_whose_target_is_lost(
    stack: Stack, router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """The target of a running move is stopped for good: the move gives up on it
    (``TargetLost``), the drain moves that chunk, and the ones it had planned onto the lost
    shard, to the other target, and completes; nothing acknowledged is lost."""
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-t0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-t1": (pg18_dsns[1], 18),
                              f"{c[:40]}-t2": (pg18_dsns[2], 18)}, chunks_per_shard=4)
    fleet_cleanup.append(fleet)
    chunks = (await router_catalog.chunk_map(c)).chunks
    # The largest chunk moves first (bin-packing order) and copies long enough to be caught.
    await asyncio.to_thread(preload_chunk, pg18_dsns[0], c, chunks[0], PRELOAD)
    lost: str | None = None
    pg = None
    lost_mid = ""
    try:
        async with Router(CatalogRouteSource(fleet.catalog), router_settings()) as router:
            load = LoadGenerator(router, WorkloadConfig(collection=c, rate=200, workers=4,
                                                        accounts=60))
            await load.start()
            try:
                await wait_until(lambda: sum(r.outcome == "ok" for r in load.records) >= 50,
                                 what="load warm-up")
                handle = await start_drain(temporal_client, worker, DrainShardInput(
                    shards=fleet.old, targets=fleet.new, max_parallel=1,
                    move={**FAST, "part_rows": 100, "target_give_up_s": GIVE_UP_S}))

                async def copying() -> Any:
                    p = await handle.query(DrainShardWorkflow.progress)
                    if not p.running:
                        return None
                    child = temporal_client.get_workflow_handle(p.running[0])
                    try:
                        cp = await child.query(MigrateChunkWorkflow.progress)
                    except RPCError as err:
                        # The drain lists a child as soon as it starts it; the server may
                        # not know the child yet.
                        if err.status == RPCStatusCode.NOT_FOUND:
                            return None
                        raise
                    return cp if cp.phase in ("snapshot", "import") and cp.target else None

                first = await wait_until(copying, timeout=120, what="the first move copying")
                lost, lost_mid = first.target, first.migration_id
                pg = stack.instance_for_dsn(fleet.shards[lost].dsn)
                await asyncio.to_thread(pg.stop, 30)
                result = await asyncio.wait_for(handle.result(), 2 * RESULT_TIMEOUT_S)
                acked = sum(r.outcome == "ok" for r in load.records)
                await wait_until(lambda: sum(r.outcome == "ok" for r in load.records) >= acked + 50,
                                 what="writes after the drain")
            finally:
                await load.stop()
        survivor = next(s for s in fleet.new if s != lost)
        # The drain completed: the shard is retired, every chunk is on the surviving target.
        assert result.retired == fleet.old and result.lost_targets == [lost], result
        cmap = await fleet.catalog.chunk_map(c)
        assert {ch.shard_id for ch in cmap.chunks} == {survivor}, cmap
        retargeted = [m for m in result.moves if m.outcome == "retargeted"]
        assert [(m.chunk_id, m.target) for m in retargeted] == [(chunks[0].chunk_id, lost)], \
            result.moves
        assert retargeted[0].detail and "TargetLost" in retargeted[0].detail, retargeted
        completed = [m for m in result.moves if m.outcome == "completed"]
        assert sorted(m.chunk_id for m in completed) == sorted(ch.chunk_id for ch in chunks)
        assert {m.target for m in completed} == {survivor}, result.moves
        assert f"{handle.id}/{chunks[0].chunk_id}.t2" in {m.workflow_id for m in completed}
        progress = await handle.query(DrainShardWorkflow.progress)
        assert progress.chunks_done == len(chunks) and progress.chunks_failed == 0, progress
        assert progress.chunks_retargeted >= 1 and progress.lost_targets == [lost], progress
        # Nothing acknowledged was lost or duplicated (the lost shard's partial copy is not
        # the chunk's: the live shards hold it all).
        live = {sid: s for sid, s in fleet.shards.items() if sid != lost}
        stored = await collect_stored(live, c)
        preloaded = {k: v for k, v in stored.items()
                     if all(str(d.get("acct", "")).startswith("bulk-") for d in v)}
        assert sum(len(v) for v in preloaded.values()) == PRELOAD
        report = check(load.records, {k: v for k, v in stored.items() if k not in preloaded})
        assert report.client_errors == 0, report.error_samples
        assert report.ok, report
        assert await fleet.shards[fleet.old[0]].count(c) == 0
        assert stream_objects([s.dsn for s in live.values()], "ss_drain") == []
    finally:
        if pg is not None:
            await asyncio.to_thread(pg.start, 60)
        if lost is not None:
            # What the lost target kept is `shardshift doctor`'s to remove; the test removes
            # the move's stream state and import rows itself so the session's shards stay
            # clean (the collection's table and fences go with fleet_cleanup).
            dsn = fleet.shards[lost].dsn
            if lost_mid:
                await asyncio.to_thread(cleanup_stream_objects, dsn, lost_mid)
                await asyncio.to_thread(forget_parts, dsn, lost_mid)
            stale = fleet.shards[lost]
            fleet.shards[lost] = await PostgresShard(lost, dsn, max_size=4).open()
            await stale.close()


def test_targets_leave_out_lost_shards() -> None:
    """A drain's later plans never place chunks on a shard a move gave up on."""
    now = datetime.now(UTC)

    def info(sid: str) -> ShardInfo:
        return ShardInfo(shard_id=sid, address="host=x", engine="postgres", major_version=18,
                         state=ShardState.ACTIVE, registered_at=now, updated_at=now)

    old, everyone = info("old"), [info("old"), info("a"), info("b")]
    assert [t.shard_id for t in _targets(DrainPlanInput(shards=["old"]), [old], everyone,
                                         exclude=["a"])] == ["b"]
    with pytest.raises(ApplicationError, match="no shard can take"):
        _targets(DrainPlanInput(shards=["old"]), [old], everyone, exclude=["a", "b"])

