"""Moves under load across a failover: a shard's primary or the catalog's is stopped
(immediate) mid-move and its streaming standby promoted.

The module runs its own private stack (its catalog, a PostgreSQL 18 shard and, when installed,
the PostgreSQL 15 shard have streaming standbys; shards' and the catalog's addresses are
multi-host DSNs with ``target_session_attrs=read-write``) and its own Temporal dev server.
Each test consumes one standby: (1) shard-1 (18), (1b) shard-2 (18, a move's target),
(2) shard-3 (15), (3) the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.replicate import HOLD_LAG_ENV
from bench.faultkit import stop_immediate
from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import private_stack, register_stack_shards
from catalog.models import Chunk
from infra import Stack
from settings import Settings, TemporalSettings
from shards.postgres import PostgresShard
from shards.postgres import replication as repl
from tests.conftest import HAS_PG15, TEST_STATE_PREFIX
from tests.router.conftest import Deployment
from tests.workflows.helpers import (
    FAULT_FAST,
    assert_moved,
    failure_chain,
    load_on,
    stream_objects,
    wait_until,
)
from tests.workflows.procs import poll_progress
from worker import run_worker
from workflows import MigrateChunkInput, MigrateChunkWorkflow

RESULT_TIMEOUT_S = 180.0
MOVE = {**FAULT_FAST, "part_rows": 500}


@pytest.fixture(scope="module")
def ha_stack() -> Iterator[Stack]:
    standbys = ("catalog", "shard-1", "shard-2") + (("shard-3",) if HAS_PG15 else ())
    with private_stack(2, pg15_shards=1 if HAS_PG15 else 0, standbys=standbys,
                       prefix=f"{TEST_STATE_PREFIX}failover-") as stack:
        yield stack


@pytest.fixture(scope="module")
async def ha_client(ha_stack: Stack) -> Client:
    return await Client.connect(ha_stack.temporal.address,
                                data_converter=pydantic_data_converter)


@pytest.fixture
async def ha_catalog(ha_stack: Stack) -> AsyncIterator[Catalog]:
    """A catalog client per test: after the catalog's failover a pooled connection to the old
    primary would fail the next test's first write."""
    async with Catalog(ha_stack.catalog_dsn, max_size=8) as cat:
        await cat.ensure_schema()
        await register_stack_shards(cat, ha_stack)
        yield cat


@pytest.fixture
async def ha_worker(ha_stack: Stack, ha_client: Client,
                    ha_catalog: Catalog) -> AsyncIterator[Settings]:
    staging = ha_stack.state_dir / f"staging-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        catalog_dsn=ha_stack.catalog_dsn, staging_url=str(staging),
        temporal=TemporalSettings(address=ha_stack.temporal.address,
                                  task_queue=f"ha-{uuid.uuid4().hex[:8]}"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop=stop, client=ha_client))
    try:
        yield settings
    finally:
        stop.set()
        await task
        shutil.rmtree(staging, ignore_errors=True)


async def deploy(stack: Stack, catalog: Catalog, name: str, shard_ids: list[str]) -> Deployment:
    """A collection with 2 chunks on each of ``shard_ids`` (engines as the mover, on the
    shards' multi-host addresses)."""
    shards = {sid: await PostgresShard(sid, stack.dsn(sid, "mover"), max_size=4).open()
              for sid in shard_ids}
    cmap = await provision_collection(catalog, shards, name, "acct", [], chunks_per_shard=2)
    return Deployment(catalog, name, shards, cmap)


async def close(d: Deployment) -> None:
    for s in d.shards.values():
        await s.close()


async def start(client: Client, d: Deployment, chunk_id: int, target: str,
                task_queue: str) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=d.collection, chunk_id=chunk_id, target=target,
                          **MOVE),  # type: ignore[arg-type]
        id=f"ha-{d.collection}-{uuid.uuid4().hex[:6]}", task_queue=task_queue)


def slot_failover_ready(stack: Stack, shard: str, slot: str) -> bool:
    """The move's slot is synchronized to the shard's standby and usable once it is promoted
    (PostgreSQL's own readiness check for logical replication failover)."""
    server = next(s for s in (stack.record() or pytest.fail("no stack")).servers
                  if s.name == shard)
    replica = stack.replica(server)
    assert replica is not None
    with psycopg.connect(replica.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT synced AND NOT temporary AND invalidation_reason IS NULL"
            " FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return bool(row and row[0])


def slot_streaming(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
    return bool(row and row[0])


def fail_over(stack: Stack, name: str) -> None:
    """A crash of ``name``'s primary (immediate stop), then its standby promoted."""
    server = next(s for s in (stack.record() or pytest.fail("no stack")).servers
                  if s.name == name)
    stop_immediate(stack.instance(server))
    stack.promote(name)


def applier_streams(d: Deployment, source: str, mid: str) -> bool:
    return slot_streaming(d.shards[source].dsn, repl.stream_names(mid, "fwd").slot)


@dataclass
class Replicating:
    """A move held in replicate under load, its applier streaming."""

    moving: Chunk
    handle: WorkflowHandle[Any, Any]
    migration_id: str
    load: Any

    async def finish(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        """Release the lag hold and wait for the move's result."""
        monkeypatch.delenv(HOLD_LAG_ENV)
        return await asyncio.wait_for(self.handle.result(), RESULT_TIMEOUT_S)


@contextlib.asynccontextmanager
async def deployed(stack: Stack, catalog: Catalog, prefix: str, shard_ids: list[str]
                   ) -> AsyncIterator[Deployment]:
    d = await deploy(stack, catalog, f"{prefix}_{uuid.uuid4().hex[:6]}", shard_ids)
    try:
        yield d
    finally:
        await close(d)


@contextlib.asynccontextmanager
async def replicating(d: Deployment, client: Client, worker: Settings,
                      monkeypatch: pytest.MonkeyPatch, source: str, target: str
                      ) -> AsyncIterator[Replicating]:
    """Load on a chunk of ``source`` and one of ``target``; the first moving to ``target``,
    held in replicate (``HOLD_LAG_ENV``) with its applier streaming."""
    moving = next(c for c in d.initial.chunks if c.shard_id == source)
    other = next(c for c in d.initial.chunks if c.shard_id == target)
    monkeypatch.setenv(HOLD_LAG_ENV, d.collection)
    async with load_on(d, moving, other) as load:
        handle = await start(client, d, moving.chunk_id, target, worker.temporal.task_queue)
        p = await poll_progress(handle, lambda p: p.phase == "replicate", timeout=120,
                                what="replicate")
        await wait_until(lambda: asyncio.to_thread(applier_streams, d, source, p.migration_id),
                         timeout=60, what="the applier streaming")
        yield Replicating(moving, handle, p.migration_id, load)


# -- 1. a PostgreSQL 18 shard fails over mid-move ----------------------------------------------


async def test_pg18_source_failover_mid_move(ha_stack: Stack, ha_catalog: Catalog,
                                             ha_worker: Settings, ha_client: Client,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """shard-1's primary dies while the move replicates; its standby is promoted. The move's
    failover slot was synchronized to the standby, so the applier resumes from it on the new
    primary: the move completes, verifies, and the checker finds nothing lost; the router
    follows the promotion through the multi-host address."""
    async with deployed(ha_stack, ha_catalog, "ha18", ["shard-1", "shard-2"]) as d:
        async with replicating(d, ha_client, ha_worker, monkeypatch, "shard-1", "shard-2") as m:
            slot = repl.stream_names(m.migration_id, "fwd").slot
            await wait_until(lambda: asyncio.to_thread(slot_failover_ready, ha_stack,
                                                       "shard-1", slot),
                             timeout=150, what="the slot synced to the standby")
            await asyncio.to_thread(fail_over, ha_stack, "shard-1")
            # The applier streams again, from the promoted standby's synced slot.
            await wait_until(lambda: asyncio.to_thread(applier_streams, d, "shard-1",
                                                       m.migration_id),
                             timeout=90, what="the applier streaming from the new primary")
            assert (await poll_progress(m.handle, lambda p: True)).phase == "replicate"
            result = await m.finish(monkeypatch)
        report = await assert_moved(d, result, m.moving, "shard-2", m.load,
                                    allow_client_errors=True)
        print(f"\nclient errors {report.client_errors}, unknown {report.unknown_outcomes}")


# -- 1b. the target of a move fails over mid-move ---------------------------------------------


async def test_pg18_target_failover_mid_move(ha_stack: Stack, ha_catalog: Catalog,
                                             ha_worker: Settings, ha_client: Client,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """shard-2, the move's target, loses its primary while the move replicates; its standby
    is promoted. The imported copy was committed synchronously to the standby; the applier's
    batches commit without waiting, so the new primary may lack the last ones, with their
    origin progress and state row, but the source was told only of batches a waiting commit
    covered and sends the rest again: the applier resumes on the new primary from where its
    origin says, the move completes, verifies, nothing is lost."""
    async with deployed(ha_stack, ha_catalog, "ha18t", ["shard-1", "shard-2"]) as d:
        async with replicating(d, ha_client, ha_worker, monkeypatch, "shard-1", "shard-2") as m:
            acked = sum(r.outcome == "ok" for r in m.load.records)
            await asyncio.to_thread(fail_over, ha_stack, "shard-2")
            # Writes go on (the moving chunk is still served by its source), and the applier
            # streams again into the promoted target.
            await wait_until(lambda: sum(r.outcome == "ok" for r in m.load.records) >= acked + 50,
                             timeout=90, what="writes after the target's failover")
            await wait_until(lambda: asyncio.to_thread(applier_streams, d, "shard-1",
                                                       m.migration_id),
                             timeout=90, what="the applier streaming into the new target")
            assert (await poll_progress(m.handle, lambda p: True)).phase == "replicate"
            result = await m.finish(monkeypatch)
        report = await assert_moved(d, result, m.moving, "shard-2", m.load,
                                    allow_client_errors=True)
        print(f"\nclient errors {report.client_errors}, unknown {report.unknown_outcomes}")


# -- 2. a PostgreSQL 15 shard fails over mid-move ----------------------------------------------


@pytest.mark.pg15
async def test_pg15_source_failover_aborts_clean_and_retry_completes(
        ha_stack: Stack, ha_catalog: Catalog, ha_worker: Settings, ha_client: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL 15 has no failover slots: the promoted standby has no slot, the stream fails
    with a missing slot and the move aborts clean (no stream object, no partial copy on the
    target, leases released, the chunk still on its source at its token); a second move of
    the same chunk completes and nothing is lost."""
    async with deployed(ha_stack, ha_catalog, "ha15", ["shard-3", "shard-2"]) as d:
        async with replicating(d, ha_client, ha_worker, monkeypatch, "shard-3", "shard-2") as m:
            mid, moving = m.migration_id, m.moving
            await asyncio.to_thread(fail_over, ha_stack, "shard-3")
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(m.handle.result(), RESULT_TIMEOUT_S)
            chain = " | ".join(str(e) for e in failure_chain(failed.value))
            assert "does not exist" in chain, chain
            dsns = [s.dsn for s in d.shards.values()]
            assert await asyncio.to_thread(stream_objects, dsns,
                                           repl.migration_prefix(mid)) == []
            assert await d.shards["shard-2"].count(d.collection, moving.range) == 0
            assert await ha_catalog.leases(migration_id=mid) == []
            chunk = await ha_catalog.chunk(d.collection, moving.chunk_id)
            assert (chunk.shard_id, chunk.token) == ("shard-3", moving.token)

            monkeypatch.delenv(HOLD_LAG_ENV)
            retry = await start(ha_client, d, moving.chunk_id, "shard-2",
                                ha_worker.temporal.task_queue)
            result = await asyncio.wait_for(retry.result(), RESULT_TIMEOUT_S)
        report = await assert_moved(d, result, moving, "shard-2", m.load,
                                    allow_client_errors=True)
        print(f"\nclient errors {report.client_errors}, unknown {report.unknown_outcomes}")


# -- 3. the catalog fails over under a router and a running move --------------------------------


async def test_catalog_failover_under_router_and_move(
        ha_stack: Stack, ha_catalog: Catalog, ha_worker: Settings, ha_client: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog's primary dies while a move replicates under load; its standby is
    promoted. Router, worker and the test's catalog client reach the new primary through the
    multi-host DSN: clients see no error (a pause at most) and the move completes."""
    async with deployed(ha_stack, ha_catalog, "hacat", ["shard-2", "shard-1"]) as d:
        async with replicating(d, ha_client, ha_worker, monkeypatch, "shard-2", "shard-1") as m:
            await asyncio.to_thread(fail_over, ha_stack, "catalog")
            result = await m.finish(monkeypatch)
        await assert_moved(d, result, m.moving, "shard-1", m.load)
        with psycopg.connect(ha_stack.catalog_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), current_setting('port')").fetchone()
        server = next(s for s in (ha_stack.record() or pytest.fail("no stack")).servers
                      if s.name == "catalog")
        assert row == (False, str(server.standby_port)), row
