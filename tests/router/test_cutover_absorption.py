"""A chunk changes placement while clients write in a loop: no error, nothing lost.

The test performs the cutover itself (freeze the source fence, copy the frozen chunk, activate
the target fence at the new token, switch the catalog with compare-and-set), as the migration
workflow will. With notifications off the router still converges, through fence rejections.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from catalog.models import MigrationKind
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.hashing import khash
from shards.models import FenceState
from shards.postgres.checksum import recopy_range
from tests.router.conftest import Deployment, router_settings
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig


async def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("notifications", [True, False], ids=["listen", "no-listen"])
async def test_placement_change_under_writes(deployment: Deployment, notifications: bool) -> None:
    c = deployment.collection
    cmap = deployment.initial
    moving = cmap.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    source_shard, target_shard = deployment.shards[moving.shard_id], deployment.shards[target]
    in_chunk = [k for k in (f"acct-{i}" for i in range(5000)) if moving.range.contains(khash(k))][:24]
    others = [k for k in (f"other-{i}" for i in range(200)) if not moving.range.contains(khash(k))][:8]

    source = CatalogRouteSource(deployment.catalog, listen=notifications)
    async with Router(source, router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(collection=c, rate=400, workers=8,
                                                    only_keys=in_chunk + others))
        await load.start()
        try:
            await _wait_for(lambda: sum(r.outcome == "ok" for r in load.records) >= 100)

            migration = f"{c}-m1"
            await deployment.catalog.register_migration(
                migration, kind=MigrationKind.MOVE, collection=c, chunk_id=moving.chunk_id,
                source=moving.shard_id, target=target,
            )
            await target_shard.put_fence(c, moving.chunk_id, moving.range, moving.token,
                                         FenceState.RECEIVING, migration)
            t0 = time.perf_counter()
            fence, _ = await source_shard.freeze(c, moving.chunk_id, moving.token)
            await asyncio.to_thread(recopy_range, source_shard.dsn, target_shard.dsn, c, moving.range)
            await target_shard.activate(c, moving.chunk_id, fence.token)
            switched = await deployment.catalog.move_chunk(
                c, moving.chunk_id, moving.token, target, migration,
                pause_ms=(time.perf_counter() - t0) * 1000,
            )
            assert switched.token == fence.token and switched.shard_id == target
            acked_at_switch = sum(r.outcome == "ok" for r in load.records)
            await _wait_for(lambda: sum(r.outcome == "ok" for r in load.records) >= acked_at_switch + 200)
        finally:
            await load.stop()

    stored = await collect_stored(deployment.shards, c)
    report = check(load.records, stored, chunk_of=lambda h: "moving" if moving.range.contains(h) else "other")
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    # Writes to the moving chunk happened on both sides of the switch.
    moved = [r for r in load.records if r.op != "get" and r.outcome == "ok" and moving.range.contains(r.khash)]
    assert moved and moved[-1].finished > moved[0].finished
    assert await target_shard.count(c, moving.range) > 0


async def test_router_closing_during_a_cutover_lets_operations_in_flight_finish(
        deployment: Deployment) -> None:
    """A graceful restart in the middle of a cutover: an operation already retrying against
    the frozen source needs the new owner's pool after the switch. A closing router refuses
    new operations, never the ones it already accepted (they may open the pool they need)."""
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    source_shard, target_shard = deployment.shards[moving.shard_id], deployment.shards[target]
    key = next(k for k in (f"acct-{i}" for i in range(5000)) if moving.range.contains(khash(k)))

    router = await Router(CatalogRouteSource(deployment.catalog, listen=True),
                          router_settings()).start()
    try:
        await router.insert(c, {"acct": key, "_id": 1, "n": 0})  # opens the source's pool only
        migration = f"{c}-close"
        await deployment.catalog.register_migration(
            migration, kind=MigrationKind.MOVE, collection=c, chunk_id=moving.chunk_id,
            source=moving.shard_id, target=target,
        )
        await target_shard.put_fence(c, moving.chunk_id, moving.range, moving.token,
                                     FenceState.RECEIVING, migration)
        fence, _ = await source_shard.freeze(c, moving.chunk_id, moving.token)
        write = asyncio.create_task(router.replace(c, {"acct": key, "_id": 1, "n": 1}))
        await asyncio.sleep(0.2)  # let the write meet the frozen fence and start retrying
        assert not write.done()
        closing = asyncio.create_task(router.close())
        await asyncio.sleep(0.1)
        await asyncio.to_thread(recopy_range, source_shard.dsn, target_shard.dsn, c, moving.range)
        await target_shard.activate(c, moving.chunk_id, fence.token)
        await deployment.catalog.move_chunk(c, moving.chunk_id, moving.token, target, migration)
        assert await write is True
        await closing
    finally:
        await router.close()
    async with Router(CatalogRouteSource(deployment.catalog, listen=False),
                      router_settings()) as fresh:
        assert (await fresh.get(c, key, 1))["n"] == 1


async def test_write_blocked_on_a_frozen_chunk_wakes_on_the_switch_not_on_its_backoff(
        deployment: Deployment) -> None:
    """A write retrying against a frozen chunk is woken by the catalog's notification of the
    switch (the route reloaded with the new placement), not by its backoff timer: with a
    backoff of 1000 s the write still completes right after the switch, on the new owner.
    (Before, the retry slept out its backoff: the timer added directly to the pause clients
    saw.)"""
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    source_shard, target_shard = deployment.shards[moving.shard_id], deployment.shards[target]
    key = next(k for k in (f"acct-{i}" for i in range(5000)) if moving.range.contains(khash(k)))

    settings = router_settings(retry_backoff_s=1000.0, retry_deadline_s=600.0)
    async with Router(CatalogRouteSource(deployment.catalog, listen=True), settings) as router:
        await router.insert(c, {"acct": key, "_id": 1, "n": 0})
        migration = f"{c}-wake"
        await deployment.catalog.register_migration(
            migration, kind=MigrationKind.MOVE, collection=c, chunk_id=moving.chunk_id,
            source=moving.shard_id, target=target,
        )
        await target_shard.put_fence(c, moving.chunk_id, moving.range, moving.token,
                                     FenceState.RECEIVING, migration)
        fence, _ = await source_shard.freeze(c, moving.chunk_id, moving.token)
        reads_before = sum(router.refreshes.values())
        write = asyncio.create_task(router.replace(c, {"acct": key, "_id": 1, "n": 1}))
        # The write met the frozen fence: its rejection re-read the route.
        await _wait_for(lambda: sum(router.refreshes.values()) > reads_before)
        assert not write.done()
        await asyncio.to_thread(recopy_range, source_shard.dsn, target_shard.dsn, c, moving.range)
        await target_shard.activate(c, moving.chunk_id, fence.token)
        await deployment.catalog.move_chunk(c, moving.chunk_id, moving.token, target, migration)
        # A liveness bound, far below the backoff: the old retry loop slept 600 s here.
        assert await asyncio.wait_for(write, timeout=60) is True
    async with Router(CatalogRouteSource(deployment.catalog, listen=False),
                      router_settings()) as fresh:
        assert (await fresh.get(c, key, 1))["n"] == 1
