"""End-to-end chunk migrations through the real Temporal server and PostgreSQL shards."""

from __future__ import annotations

import uuid

from temporalio.client import Client

from catalog.models import MigrationOutcome
from router.catalog_source import CatalogRouteSource
from router.core import Router
from tests.router.conftest import Deployment, router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import FAST, slots_left, wait_for
from workflows import MigrateChunkInput, MigrateChunkWorkflow
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig, keys_in


async def test_move_under_load(deployment: Deployment, worker: WorkerHandle,
                               temporal_client: Client) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(
            collection=c, rate=300, workers=6,
            only_keys=keys_in(moving.range, 30) + keys_in(deployment.initial.chunks[1].range, 6, "o"),
        ))
        await load.start()
        try:
            await wait_for(lambda: sum(r.outcome == "ok" for r in load.records) >= 150)
            result = await temporal_client.execute_workflow(
                MigrateChunkWorkflow.run,
                MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target, **FAST),
                id=f"move-{c}-{uuid.uuid4().hex[:6]}", task_queue=worker.task_queue,
            )
            acked = sum(r.outcome == "ok" for r in load.records)
            await wait_for(lambda: sum(r.outcome == "ok" for r in load.records) >= acked + 100)
        finally:
            await load.stop()
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert result.verified is True
    assert result.pause_ms is not None and result.pause_ms < 2000
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert chunk.shard_id == target and chunk.token == moving.token + 1
    stored = await collect_stored(deployment.shards, c)
    report = check(load.records, stored)
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    # The source's copy is gone and nothing of the move is left behind.
    assert await deployment.shards[moving.shard_id].count(c, moving.range) == 0
    assert slots_left([s.dsn for s in deployment.shards.values()], result.migration_id) == []
