"""Fleet-test helpers: shards registered in the catalog with a collection provisioned on some
of them, a drain started and run under load, and the proof that a drained shard is empty."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from temporalio.client import Client, WorkflowHandle

from catalog import Catalog, ShardState
from catalog.admin import provision_collection
from catalog.models import MigrationKind, MigrationOutcome
from router.catalog_source import CatalogRouteSource
from router.core import Router
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from tests.router.conftest import router_settings
from tests.workflows.helpers import stream_objects, wait_until
from workflows import DrainShardInput, DrainShardResult, DrainShardWorkflow
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig

if TYPE_CHECKING:
    from tests.workflows.conftest import WorkerHandle

RESULT_TIMEOUT_S = 240


@dataclass
class Fleet:
    catalog: Catalog
    collection: str
    shards: dict[str, PostgresShard]
    old: list[str]
    """Shards holding the collection's chunks at the start."""
    new: list[str]
    """Empty shards registered as targets."""


async def make_fleet(catalog: Catalog, collection: str, old: dict[str, tuple[str, int]],
                     new: dict[str, tuple[str, int]], chunks_per_shard: int = 2) -> Fleet:
    """Register shards (id -> (dsn, major version)) and provision the collection on ``old``."""
    shards: dict[str, PostgresShard] = {}
    for sid, (dsn, version) in {**old, **new}.items():
        await catalog.register_shard(sid, dsn, engine="postgres", major_version=version)
        shards[sid] = await PostgresShard(sid, dsn, max_size=4).open()
    await provision_collection(
        catalog, {s: shards[s] for s in old}, collection, "acct",
        [IndexDefinition(name="by_email", fields=("email",))], chunks_per_shard=chunks_per_shard,
    )
    return Fleet(catalog, collection, shards, list(old), list(new))


async def start_drain(client: Client, worker: WorkerHandle, inp: DrainShardInput
                      ) -> WorkflowHandle[DrainShardWorkflow, DrainShardResult]:
    return await client.start_workflow(
        DrainShardWorkflow.run, inp, id=f"drain-{uuid.uuid4().hex[:8]}",
        task_queue=worker.task_queue,
    )


async def run_under_load(fleet: Fleet, handle: WorkflowHandle) -> tuple[DrainShardResult, LoadGenerator]:
    async with Router(CatalogRouteSource(fleet.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(collection=fleet.collection, rate=200,
                                                    workers=4, accounts=60))
        await load.start()
        try:
            await wait_until(lambda: sum(r.outcome == "ok" for r in load.records) >= 50,
                             what="load warm-up")
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            acked = sum(r.outcome == "ok" for r in load.records)
            await wait_until(lambda: sum(r.outcome == "ok" for r in load.records) >= acked + 50,
                             what="writes after the drain")
        finally:
            await load.stop()
    return result, load


async def assert_drained(fleet: Fleet, result: DrainShardResult, load: LoadGenerator,
                         kind: MigrationKind) -> None:
    assert sorted(result.retired) == sorted(fleet.old), result
    assert result.moves and all(m.outcome == MigrationOutcome.COMPLETED.value
                                for m in result.moves), result.moves
    for sid in fleet.old:
        assert (await fleet.catalog.shard(sid)).state == ShardState.RETIRED
    cmap = await fleet.catalog.chunk_map(fleet.collection)
    assert {c.shard_id for c in cmap.chunks} <= set(fleet.new), cmap
    for m in result.moves:
        record = (await fleet.catalog.migrations(collection=fleet.collection))
        assert any(r.chunk_id == m.chunk_id and r.kind == kind for r in record), m
    stored = await collect_stored(fleet.shards, fleet.collection)
    report = check(load.records, stored)
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    for sid in fleet.old:
        assert await fleet.shards[sid].count(fleet.collection) == 0
    dsns = [s.dsn for s in fleet.shards.values()]
    assert stream_objects(dsns, "ss_drain") == []


async def run_histories(client: Client, workflow_id: str, first_run_id: str
                        ) -> list[list[Any]]:
    """The events of every run of a workflow, first to last, following continue-as-new."""
    runs: list[list[Any]] = []
    run_id: str | None = first_run_id
    while run_id is not None:
        events = [e async for e in client.get_workflow_handle(
            workflow_id, run_id=run_id).fetch_history_events()]
        runs.append(events)
        last = events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes")
                  else None)
    return runs


def child_starts(events: list[Any]) -> list[str]:
    return [e.start_child_workflow_execution_initiated_event_attributes.workflow_id
            for e in events
            if e.HasField("start_child_workflow_execution_initiated_event_attributes")]
