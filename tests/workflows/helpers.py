"""Workflow-test helpers shared by the test modules: waiting on a condition, a move started and
run under load, the proof that it moved, and what a move may leave on the shards.

``chunk_keys``, ``preload_chunk``, ``poll_progress`` and the worker as a process of its own are
in ``tests.workflows.procs``; fleets (several shards, drains) in ``tests.workflows.fleet``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from temporalio.client import Client, WorkflowHandle

from catalog import Catalog
from catalog.models import Chunk, MigrationOutcome
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.hashing import khash
from router.mongo.server import serving
from shards.models import KeyRange
from shards.postgres.documents import encode_for_store
from shards.postgres.replication import NAME_PREFIX, migration_prefix
from tests.router.conftest import Deployment, router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.procs import chunk_keys
from workflows import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow
from workload.checker import CheckReport, check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig
from workload.stores import DocumentStore, MongoStore, RouterStore, mongo_uri

FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "part_rows": 500}
"""Move options for tests: short polls and retries, small parts."""
HEARTBEAT_S = 3.0
"""Short heartbeat timeout of the fault tests: a killed worker's long-running activities are
retried after it."""
FAULT_FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "heartbeat_timeout_s": HEARTBEAT_S}
"""Move options of the fault tests (``part_rows`` chosen per test)."""


# -- waiting ------------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0,
                     what: str = "condition") -> Any:
    """Poll a (sync or async) predicate until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.02)


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    """``wait_until`` for a synchronous predicate, without a name."""
    await wait_until(predicate, timeout)


def failure_chain(exc: BaseException) -> list[BaseException]:
    """An exception and its causes (Temporal's ``cause`` first, else ``__cause__``)."""
    out = []
    cur: BaseException | None = exc
    while cur is not None:
        out.append(cur)
        cur = cur.cause if hasattr(cur, "cause") else cur.__cause__  # type: ignore[attr-defined]
    return out


# -- what a move may leave behind ----------------------------------------------------------------


def slots_left(dsns: list[str], migration_id: str) -> list[str]:
    """Replication slots a migration left behind (scoped, so tests stay independent)."""
    prefix = migration_prefix(migration_id)
    out = []
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            out += [r[0] for r in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE starts_with(slot_name::text, %s)",
                (prefix,))]
    return out


def stream_objects(dsns: list[str], prefix: str = NAME_PREFIX) -> list[str]:
    """Replication slots, publications and origins whose name starts with ``prefix``."""
    out = []
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for kind, query in (
                ("slot", "SELECT slot_name FROM pg_replication_slots"
                         " WHERE starts_with(slot_name::text, %s)"),
                ("publication", "SELECT pubname FROM pg_publication"
                                " WHERE starts_with(pubname::text, %s)"),
                ("origin", "SELECT roname FROM pg_replication_origin WHERE starts_with(roname, %s)"),
            ):
                out += [f"{kind}:{r[0]}" for r in conn.execute(query, (prefix,))]
    return out


# -- setup -------------------------------------------------------------------------------------


def load_chunk(dsn: str, collection: str, rng: KeyRange, n: int, *, id_prefix: str = "b") -> int:
    """Write ``n`` documents of the chunk ``rng`` straight into a shard's table (setup); their
    ``_id``s are ``{id_prefix}{i}`` (give each chunk its own prefix when loading several)."""
    keys = [k for k in (f"bulk-{i}" for i in range(n * 12)) if rng.contains(khash(k))]
    assert len(keys) >= n // 2, "too few keys fall in the range"
    table = sql.SQL("docs.{}").format(sql.Identifier(collection))
    written = 0
    with psycopg.connect(dsn) as conn, conn.cursor().copy(
        sql.SQL("COPY {} (khash, id, doc) FROM STDIN").format(table)
    ) as copy:
        for i in range(n):
            key = keys[i % len(keys)]
            id_text, doc_text = encode_for_store({"_id": f"{id_prefix}{i}", "acct": key, "v": i,
                                                  "pad": "x" * 100})
            copy.write_row((khash(key), id_text, doc_text))
            written += 1
    return written


# -- a move under load -------------------------------------------------------------------------


def acked(load: LoadGenerator) -> int:
    """Operations the load generator saw acknowledged so far."""
    return sum(r.outcome == "ok" for r in load.records)


def pick(deployment: Deployment) -> tuple[Chunk, str, Chunk]:
    """(chunk to move, target shard, a bystander chunk on the third shard)."""
    moving = deployment.initial.chunks[0]
    target = next(s for s in sorted(deployment.shards) if s != moving.shard_id)
    other = next(ch for ch in deployment.initial.chunks
                 if ch.shard_id not in (moving.shard_id, target))
    return moving, target, other


@asynccontextmanager
async def load_path(catalog: Catalog, *, via_mongo: bool) -> AsyncIterator[DocumentStore]:
    """A fresh router over ``catalog``; with ``via_mongo`` also its MongoDB front end and a
    pymongo ``AsyncMongoClient`` through it (the store a load generator drives)."""
    async with AsyncExitStack() as stack:
        settings = router_settings()
        router = await stack.enter_async_context(Router(CatalogRouteSource(catalog), settings))
        if not via_mongo:
            yield RouterStore(router)
            return
        front = await stack.enter_async_context(serving(router, settings))
        store = MongoStore(mongo_uri(front.host, front.port), settings.mongo_database)
        stack.push_async_callback(store.close)
        yield store


def driver_errors(load: LoadGenerator) -> int:
    """Operations whose caller saw an exception (failed, or of unknown outcome)."""
    return sum(r.outcome != "ok" for r in load.records)


@asynccontextmanager
async def load_on(deployment: Deployment, moving: Chunk, other: Chunk, *, rate: float = 300,
                  workers: int = 6, keys: tuple[int, int] = (30, 6),
                  warm: int = 100, via_mongo: bool = False) -> AsyncIterator[LoadGenerator]:
    """Writes and reads on the moving chunk's keys and a bystander's (``keys``: how many of
    each) for the whole block, once ``warm`` operations were acknowledged; on a clean exit the
    load keeps running until ``warm`` more were acknowledged after the block. ``via_mongo``:
    through the MongoDB front end with pymongo instead of the router core."""
    async with load_path(deployment.catalog, via_mongo=via_mongo) as store:
        load = LoadGenerator(store, WorkloadConfig(
            collection=deployment.collection, rate=rate, workers=workers,
            only_keys=chunk_keys(moving, keys[0], "acct") + chunk_keys(other, keys[1], "o"),
        ))
        await load.start()
        try:
            await wait_until(lambda: acked(load) >= warm, what="load warm-up")
            yield load
            before = acked(load)
            await wait_until(lambda: acked(load) >= before + warm, what="writes after the move")
        finally:
            await load.stop()


async def start_move(client: Client, deployment: Deployment, moving: Chunk, target: str,
                     task_queue: str, **kw: object
                     ) -> WorkflowHandle[MigrateChunkWorkflow, MigrateChunkResult]:
    """Start moving ``moving`` to ``target`` on ``task_queue`` (``kw``: ``MigrateChunkInput``
    fields)."""
    return await client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=deployment.collection, chunk_id=moving.chunk_id,
                          target=target, **kw),  # type: ignore[arg-type]
        id=f"fault-{deployment.collection}-{uuid.uuid4().hex[:6]}", task_queue=task_queue,
    )


async def assert_moved(deployment: Deployment, result: MigrateChunkResult, moving: Chunk,
                       target: str, load: LoadGenerator, *,
                       allow_client_errors: bool = False) -> CheckReport:
    """The move completed and verified, the catalog places the chunk on the target at the next
    token, the checker finds nothing lost, altered, duplicated or resurrected (and no client
    error unless allowed), the source's copy is gone and no slot of the move is left."""
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert result.verified is True, result
    chunk = await deployment.catalog.chunk(deployment.collection, moving.chunk_id)
    assert chunk.shard_id == target and chunk.token == moving.token + 1
    stored = await collect_stored(deployment.shards, deployment.collection)
    report = check(load.records, stored)
    assert allow_client_errors or report.client_errors == 0, report.error_samples
    assert report.ok, report
    assert await deployment.shards[moving.shard_id].count(deployment.collection, moving.range) == 0
    assert slots_left([s.dsn for s in deployment.shards.values()], result.migration_id) == []
    return report


async def start_worker_move(client: Client, worker: WorkerHandle, collection: str, chunk_id: int,
                     target: str, **kw: Any) -> WorkflowHandle[Any, Any]:
    assert not worker.task.done(), "the worker is not running"
    inp = MigrateChunkInput(collection=collection, chunk_id=chunk_id, target=target,
                            **{**FAST, **kw})
    return await client.start_workflow(
        MigrateChunkWorkflow.run, inp, id=f"lc-{collection}-{chunk_id}-{uuid.uuid4().hex[:6]}",
        task_queue=worker.task_queue,
    )


def other_shard(d: Deployment, *not_these: str) -> str:
    return next(s for s in sorted(d.shards) if s not in not_these)
