"""A drain of 10,000 chunks stays inside Temporal's limits: every run's history is bounded in
events and bytes, and no payload grows with the plan (kept in the catalog, read in pages).

The chunks are empty and their moves are catalog-only (``tests/workflows/catalog_moves.py``,
registered as ``MigrateChunkWorkflow`` on this test's worker), so the drain's own workflow and
activities (plan, pages, continue-as-new, finish) run for real on the session's PostgreSQL and
Temporal servers at a scale a real move could not reach in a test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from activities import MoveContext, all_activities
from catalog import Catalog, ShardState
from settings import Settings
from shards.staging import Staging
from tests.workflows.catalog_moves import CatalogMoveActivities, CatalogOnlyMove
from tests.workflows.fleet import Fleet, child_starts, make_fleet, run_histories
from tests.workflows.helpers import wait_until
from workflows import DrainShardInput, DrainShardWorkflow
from workflows.child_moves import RunLimits

CHUNKS = 10_000
EVENT_BYTES_MAX = 128 * 1024
"""The largest single history event (so the largest payload) of any run: far below Temporal's
512 KB warning and 2 MB limit, and independent of the plan's length."""
RUN_EVENTS_MAX = 12_000
"""Events of one run (Temporal's limit: 50k); a run starts at most ``moves_per_run`` (500)
children of about a dozen events each."""
RUN_BYTES_MAX = 8 * 1024 * 1024
"""Bytes of one run's history (Temporal's limit: 50 MB)."""


@asynccontextmanager
async def catalog_move_worker(settings: Settings, client: Client, catalog: Catalog,
                              moves: CatalogMoveActivities) -> AsyncIterator[str]:
    """A worker running the real fleet workflows and activities, whose child moves are
    catalog-only; yields its task queue."""
    ctx = MoveContext(catalog, Staging(settings.staging), db=settings.db)
    queue = settings.temporal.task_queue
    try:
        async with Worker(client, task_queue=queue,
                          workflows=[DrainShardWorkflow, CatalogOnlyMove],
                          activities=[*all_activities(ctx), moves.move],
                          max_concurrent_activities=64, max_concurrent_local_activities=64):
            yield queue
    finally:
        await ctx.close()


async def tables_on_targets(fleet: Fleet) -> None:
    """The collection's (empty) table on every target: a catalog-only move copies nothing,
    and the drain's later plans measure the chunks that arrived there."""
    cmap = await fleet.catalog.chunk_map(fleet.collection)
    for sid in fleet.new:
        await fleet.shards[sid].ensure_schema()
        await fleet.shards[sid].create_collection(fleet.collection, cmap.collection.indexes)


def history_figures(runs: list[list[Any]]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "events": [len(r) for r in runs],
        "run_bytes": [sum(e.ByteSize() for e in r) for r in runs],
        "largest_event_bytes": max(e.ByteSize() for r in runs for e in r),
    }


RUNS = 2
MOVES_PER_RUN = 5
"""Enough runs to cross continue-as-new with the plan's cursor carried (and few moves per run:
every catalog-only move is three serialized catalog changes; the suite waits for them)."""


@pytest.mark.timeout(900)
async def test_drain_of_ten_thousand_chunks_stays_within_history_limits(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker_settings: Settings, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """A drain of 10,000 chunks plans them all, then moves them run after run: its first
    ``RUNS`` runs are watched (every catalog-only move is three serialized catalog changes,
    too many for a test to wait for all of them), then it is cancelled."""
    c = collection_name
    old = f"{c[:40]}-k0"
    fleet = await make_fleet(router_catalog, c, {old: (pg18_dsns[0], 18)},
                             {f"{c[:40]}-k1": (pg18_dsns[1], 18),
                              f"{c[:40]}-k2": (pg18_dsns[2], 18)}, chunks_per_shard=CHUNKS)
    fleet_cleanup.append(fleet)
    await tables_on_targets(fleet)
    async with catalog_move_worker(worker_settings, temporal_client, router_catalog,
                                   CatalogMoveActivities(router_catalog)) as queue:
        handle = await temporal_client.start_workflow(
            DrainShardWorkflow.run,
            DrainShardInput(shards=[old], targets=fleet.new, max_parallel=8,
                            limits=RunLimits(moves_per_run=MOVES_PER_RUN)),
            id=f"drain-{uuid.uuid4().hex[:8]}", task_queue=queue)
        plan_id = f"{handle.id}@{handle.first_execution_run_id}"
        current = temporal_client.get_workflow_handle(handle.id)

        async def runs_done() -> Any:
            p = await current.query(DrainShardWorkflow.progress)
            return p if p.runs > RUNS else None

        progress = await wait_until(runs_done, timeout=1500, what=f"{RUNS} runs of the drain")
        # The whole plan is in the catalog, and the runs moved its first moves in plan order.
        stored = await router_catalog.plan_page(plan_id, 1, 0, 2000)
        assert progress.chunks_total == CHUNKS, progress
        assert len(stored) == 2000
        last = await router_catalog.plan_page(plan_id, 1, CHUNKS - 1, 10)
        assert len(last) == 1  # the 10,000th move, and no more
        await current.cancel()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(current.result(), 300)
    # Cancelled: the shard takes chunks again, and the stored plan is gone with the drain.
    assert (await router_catalog.shard(old)).state == ShardState.ACTIVE
    assert await router_catalog.plan_page(plan_id, 1, 0, 10) == []
    runs = await run_histories(temporal_client, handle.id, handle.first_execution_run_id or "")
    figures = history_figures(runs)
    print(f"drain of {CHUNKS} chunks, first {len(runs)} runs: {figures}")
    started = [wid for r in runs for wid in child_starts(r)]
    assert len(started) == len(set(started)), figures  # never a move started twice
    assert len(runs) > RUNS
    assert all(len(child_starts(r)) <= MOVES_PER_RUN for r in runs), figures
    # Each run stays bounded, and no event (no payload: the plan, a page, the input carried
    # across continue-as-new) grows with the plan: 10,000 moves are about 1.7 MB.
    assert max(figures["events"]) <= RUN_EVENTS_MAX, figures
    assert max(figures["run_bytes"]) <= RUN_BYTES_MAX, figures
    assert figures["largest_event_bytes"] <= EVENT_BYTES_MAX, figures
    moved = {ch.chunk_id for ch in (await router_catalog.chunk_map(c)).chunks
             if ch.shard_id != old}
    assert moved and moved <= {m.chunk_id for m in stored}


async def test_a_move_starts_only_when_both_its_shards_have_room(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker_settings: Settings, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """With ``max_running_per_shard`` a drain of two shards onto two never runs more moves per
    shard than that, while moves whose shards have room run alongside: with a limit of 1, two
    moves on four different shards at once."""
    c = collection_name
    fleet = await make_fleet(router_catalog, c,
                             {f"{c[:40]}-a0": (pg18_dsns[0], 18), f"{c[:40]}-a1": (pg18_dsns[1], 18)},
                             {f"{c[:40]}-b0": (pg18_dsns[2], 18), f"{c[:40]}-b1": (pg18_dsns[0], 18)},
                             chunks_per_shard=4)
    fleet_cleanup.append(fleet)
    await tables_on_targets(fleet)
    moves = CatalogMoveActivities(router_catalog, hold_s=1.5)
    async with catalog_move_worker(worker_settings, temporal_client, router_catalog,
                                   moves) as queue:
        result = await temporal_client.execute_workflow(
            DrainShardWorkflow.run,
            DrainShardInput(shards=fleet.old, targets=fleet.new, max_parallel=8,
                            limits=RunLimits(max_running_per_shard=1)),
            id=f"drain-{uuid.uuid4().hex[:8]}", task_queue=queue)
    assert sorted(result.retired) == sorted(fleet.old)
    assert len(result.moves) == 8 and {m.outcome for m in result.moves} == {"completed"}
    assert max(moves.peak.values()) == 1, moves.peak
    assert moves.peak_total == 2, moves.peak_total
