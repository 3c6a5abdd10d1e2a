"""Moves under the load of a MongoDB driver: pymongo's ``AsyncMongoClient`` writes and reads
through the router's wire-protocol front end while a chunk moves, a shard drains, and a move
rolls back. The checker finds nothing lost, both in what the shards hold and in what the
driver reads back afterwards, and the driver saw no exception at all (counted)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.client import Client

from catalog import Catalog
from catalog.models import MigrationKind, MigrationOutcome
from shards.models import FenceState
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.fleet import RESULT_TIMEOUT_S, Fleet, assert_drained, make_fleet, start_drain
from tests.workflows.helpers import (
    FAST,
    acked,
    assert_moved,
    driver_errors,
    load_path,
    pick,
    start_move,
    wait_until,
)
from tests.workflows.procs import chunk_keys
from workflows import DrainShardInput, MigrateChunkWorkflow
from workload.checker import CheckReport, check, collect_stored, collect_visible
from workload.generator import LoadGenerator, WorkloadConfig

T = TypeVar("T")


async def under_driver_load(catalog: Catalog, config: WorkloadConfig,
                            during: Callable[[LoadGenerator], Awaitable[T]], *, warm: int = 60
                            ) -> tuple[T, LoadGenerator, CheckReport]:
    """Run ``during`` with a pymongo load through the front end (``warm`` acknowledged
    operations before and after it); the check of what the driver reads back at the end."""
    async with load_path(catalog, via_mongo=True) as store:
        assert store.path == "mongo-wire"
        load = LoadGenerator(store, config)
        await load.start()
        try:
            await wait_until(lambda: acked(load) >= warm, what="load warm-up")
            out = await during(load)
            before = acked(load)
            await wait_until(lambda: acked(load) >= before + warm, what="writes after")
        finally:
            await load.stop()
        visible = check(load.records, await collect_visible(store, config.collection,
                                                            load.records))
    assert driver_errors(load) == 0, [r.error for r in load.records if r.outcome != "ok"][:5]
    assert visible.ok and visible.documents_found == visible.documents_expected, visible
    return out, load, visible


def rollback_open(handle: Any) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return bool((await handle.query(MigrateChunkWorkflow.progress)).rollback_open)
    return probe


async def test_move_under_pymongo_load(deployment: Deployment, worker: WorkerHandle,
                                       temporal_client: Client) -> None:
    moving, target, other = pick(deployment)

    async def move(load: LoadGenerator) -> Any:
        handle = await start_move(temporal_client, deployment, moving, target,
                                  worker.task_queue, **FAST)
        return await handle.result()

    config = WorkloadConfig(collection=deployment.collection, rate=300, workers=6,
                            only_keys=chunk_keys(moving, 30, "acct") + chunk_keys(other, 6, "o"))
    result, load, _ = await under_driver_load(deployment.catalog, config, move)
    report = await assert_moved(deployment, result, moving, target, load)
    assert report.acknowledged_writes > 100 and report.unknown_outcomes == 0


async def test_drain_under_pymongo_load(router_catalog: Catalog, pg18_dsns: list[str],
                                        collection_name: str, worker: WorkerHandle,
                                        temporal_client: Client,
                                        fleet_cleanup: list[Fleet]) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-d0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-d1": (pg18_dsns[1], 18),
                              f"{c[:40]}-d2": (pg18_dsns[2], 18)}, chunks_per_shard=2)
    fleet_cleanup.append(fleet)

    async def drain(load: LoadGenerator) -> Any:
        handle = await start_drain(temporal_client, worker, DrainShardInput(
            shards=fleet.old, targets=fleet.new, max_parallel=2, move=FAST))
        return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)

    config = WorkloadConfig(collection=c, rate=200, workers=4, accounts=60)
    result, load, _ = await under_driver_load(router_catalog, config, drain)
    await assert_drained(fleet, result, load, MigrationKind.MERGE_SHARDS)


async def test_rollback_under_pymongo_load(deployment: Deployment, worker: WorkerHandle,
                                           temporal_client: Client) -> None:
    c = deployment.collection
    moving, target, other = pick(deployment)

    async def move_and_roll_back(load: LoadGenerator) -> Any:
        handle = await start_move(temporal_client, deployment, moving, target,
                                  worker.task_queue, rollback_window_s=60, **FAST)
        await wait_until(rollback_open(handle), 60, "rollback window")
        before = acked(load)  # writes reach the target during the window; they stream back
        await wait_until(lambda: acked(load) >= before + 40, what="writes on the target")
        assert await handle.execute_update(MigrateChunkWorkflow.rollback) == "rollback requested"
        return await handle.result()

    config = WorkloadConfig(collection=c, rate=200, workers=4,
                            only_keys=chunk_keys(moving, 20, "acct") + chunk_keys(other, 4, "o"))
    result, load, _ = await under_driver_load(deployment.catalog, config, move_and_roll_back)
    assert result.outcome == MigrationOutcome.ROLLED_BACK, result
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert (chunk.shard_id, chunk.token) == (moving.shard_id, moving.token + 2)
    fence = await deployment.shards[moving.shard_id].fence(c, moving.chunk_id)
    assert fence is not None and fence.state == FenceState.ACTIVE
    report = check(load.records, await collect_stored(deployment.shards, c))
    assert report.client_errors == 0 and report.ok, report
    assert await deployment.shards[target].count(c, moving.range) == 0
