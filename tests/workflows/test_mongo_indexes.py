"""The MongoDB front end with a real worker (pymongo's async client): index commands (the
index is built by ``ChangeIndexesWorkflow`` on every shard before the catalog lists it;
index DDL and chunk moves exclude each other), and writes while a chunk moves."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.errors import OperationFailure
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from catalog.admin import change_indexes, provision_collection
from catalog.errors import ChunkBusyError
from catalog.models import MigrationKind, MigrationOutcome
from infra import Stack
from router.hashing import khash
from router.mongo.index_ddl import TemporalIndexDdl
from shards.models import IndexDefinition
from shards.postgres.schema import index_table_name
from tests.router.conftest import Deployment, router_settings
from tests.router.mongo_front import MongoFront, mongo_front
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import start_worker_move

T0 = dt.datetime(2026, 5, 6, 7, 8, 9, 10000, tzinfo=dt.UTC)


@pytest.fixture
async def front(deployment: Deployment, catalog_reader_dsn: str, stack: Stack,
                worker: WorkerHandle) -> AsyncIterator[MongoFront]:
    """The front end with index DDL run by the test's worker (its own Temporal client, made
    on the front end's loop)."""
    address = stack.temporal.address

    async def connect() -> Client:
        return await Client.connect(address, data_converter=pydantic_data_converter)

    ddl = TemporalIndexDdl(connect, worker.task_queue)
    with mongo_front(catalog_reader_dsn, router_settings(), ddl) as f:
        yield f


def client_of(front: MongoFront) -> pymongo.AsyncMongoClient[dict[str, Any]]:
    return pymongo.AsyncMongoClient(front.uri(), serverSelectionTimeoutMS=5000)


def pg_indexes(dsn: str, collection: str) -> set[str]:
    """The PostgreSQL indexes of a collection's table on one shard."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'docs' "
                            "AND tablename = %s", (collection,)).fetchall()
    return {r[0] for r in rows}


async def test_create_list_drop_indexes(front: MongoFront, deployment: Deployment) -> None:
    c = deployment.collection
    client = client_of(front)
    try:
        coll = client.shardshift[c]
        await coll.insert_many([{"acct": f"a{i}", "tier": "gold" if i % 2 else "free",
                                 "geo": {"cc": "fr"}} for i in range(20)])
        assert await coll.create_index([("tier", 1)], name="by_tier") == "by_tier"
        names = [ix["name"] async for ix in await coll.list_indexes()]
        assert names == ["_id_", "by_email", "by_tier"]
        info = await coll.index_information()
        assert info["by_tier"]["key"] == [("tier", 1)] and info["_id_"]["key"] == [("_id", 1)]
        for s in deployment.shards.values():  # built on every shard before it counted
            assert index_table_name(c, "by_tier") in pg_indexes(s.dsn, c)
        # an equality filter on the new index now scatters to the shards
        assert len([d async for d in coll.find({"tier": "gold"})]) == 10
        # idempotent: the same spec again changes nothing
        reply = await client.shardshift.command(
            {"createIndexes": c, "indexes": [{"key": {"tier": 1}, "name": "by_tier"}]})
        assert reply["note"] == "all indexes already exist"
        assert reply["numIndexesBefore"] == reply["numIndexesAfter"] == 3
        # a compound index on a nested path
        await coll.create_index([("geo.cc", 1), ("tier", 1)], name="by_cc_tier")
        # conflicts and options the router lacks: MongoDB's errors, nothing changes
        for spec, code in [({"key": {"region": 1}, "name": "by_tier"}, 86),
                           ({"key": {"tier": 1}, "name": "tier_again"}, 85),
                           ({"key": {"x": 1}, "name": "ux", "unique": True}, 67),
                           ({"key": {"x": -1}, "name": "x_desc"}, 67),
                           ({"key": {"x": "hashed"}, "name": "x_h"}, 67),
                           ({"key": {"x": 1}, "name": "x.1"}, 67),
                           ({"key": {"a.$b": 1}, "name": "ab"}, 67),
                           ({"key": {"x": 1}, "name": "x1", "bogus": 1}, 197)]:
            with pytest.raises(OperationFailure) as err:
                await client.shardshift.command({"createIndexes": c, "indexes": [spec]})
            assert err.value.code == code, spec
        assert await coll.create_index([("x", 1)]) == "x_1"  # the driver's own name
        with pytest.raises(OperationFailure) as err:
            await coll.drop_index("_id_")
        assert err.value.code == 72
        with pytest.raises(OperationFailure) as err:
            await coll.drop_index("nope")
        assert err.value.code == 27
        names = [ix["name"] async for ix in await coll.list_indexes()]
        assert names == ["_id_", "by_email", "by_tier", "by_cc_tier", "x_1"]
        reply = await client.shardshift.command(
            {"dropIndexes": c, "index": {"geo.cc": 1, "tier": 1}})  # by key pattern
        assert reply["nIndexesWas"] == 5
        await coll.drop_index("by_tier")
        assert index_table_name(c, "by_tier") not in pg_indexes(
            next(iter(deployment.shards.values())).dsn, c)
        assert [ix["name"] async for ix in await coll.list_indexes()] == [
            "_id_", "by_email", "x_1"]
        await coll.drop_indexes()  # "*"
        names = [ix["name"] async for ix in await coll.list_indexes()]
        assert names == ["_id_"]
        assert (await deployment.catalog.collection(c)).indexes == ()
    finally:
        await client.close()


async def test_index_ddl_is_refused_while_a_chunk_moves(front: MongoFront,
                                                        deployment: Deployment) -> None:
    c = deployment.collection
    chunk = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != chunk.shard_id)
    mid = f"live-{c}"[:60]
    await deployment.catalog.register_migration(
        mid, kind=MigrationKind.MOVE, collection=c, chunk_id=chunk.chunk_id,
        source=chunk.shard_id, target=target)
    client = client_of(front)
    try:
        coll = client.shardshift[c]
        with pytest.raises(OperationFailure) as err:
            await coll.create_index([("tier", 1)], name="by_tier")
        assert err.value.code == 117 and "moving" in str(err.value)
        with pytest.raises(OperationFailure) as err:
            await coll.drop_index("by_email")
        assert err.value.code == 117
        assert [i.name for i in (await deployment.catalog.collection(c)).indexes] == ["by_email"]
        for s in deployment.shards.values():
            assert index_table_name(c, "by_tier") not in pg_indexes(s.dsn, c)
        await deployment.catalog.finish_migration(mid, MigrationOutcome.ABORTED)
        await coll.create_index([("tier", 1)], name="by_tier")  # free again
    finally:
        await client.close()


async def test_a_move_registered_during_an_index_build_waits_and_gets_the_index(
        deployment: Deployment) -> None:
    """``register_migration`` waits while an index change holds the collection; the move's
    registration then reads the new definition (from which it builds its target)."""
    c = deployment.collection
    chunk = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != chunk.shard_id)
    building, release = asyncio.Event(), asyncio.Event()

    async def engine(sid: str) -> Any:
        building.set()
        await release.wait()  # the index build is "running" on the shards
        return deployment.shards[sid]

    ddl = asyncio.create_task(change_indexes(
        deployment.catalog, engine, c, create=[IndexDefinition(name="by_tier",
                                                                fields=("tier",))]))
    await asyncio.wait_for(building.wait(), 20)
    register = asyncio.create_task(deployment.catalog.register_migration(
        f"wait-{c}"[:60], kind=MigrationKind.MOVE, collection=c, chunk_id=chunk.chunk_id,
        source=chunk.shard_id, target=target))
    done, _ = await asyncio.wait({register}, timeout=1.0)
    assert not done, "a move registered while the index change held the collection"
    release.set()
    await asyncio.wait_for(ddl, 30)
    await asyncio.wait_for(register, 30)
    info = await deployment.catalog.collection(c)
    assert [i.name for i in info.indexes] == ["by_email", "by_tier"]
    with pytest.raises(ChunkBusyError):  # and now the live move refuses index DDL
        await change_indexes(deployment.catalog, _engine_of(deployment), c, drop=["by_tier"])
    await deployment.catalog.finish_migration(f"wait-{c}"[:60], MigrationOutcome.ABORTED)


def _engine_of(deployment: Deployment) -> Any:
    async def engine(sid: str) -> Any:
        return deployment.shards[sid]
    return engine


async def test_a_move_after_an_index_build_gives_its_target_the_index(
        deployment: Deployment, catalog_reader_dsn: str, stack: Stack, worker: WorkerHandle,
        temporal_client: Client) -> None:
    """A collection on two shards gets an index through the front end; one of its chunks then
    moves to the third shard, which held nothing of it: the target has the index."""
    c = f"{deployment.collection[:36]}_two"
    ids = sorted(deployment.shards)
    cmap = await provision_collection(deployment.catalog, deployment.shards, c, "acct",
                                      shard_ids=ids[:2], chunks_per_shard=1)
    third = deployment.shards[ids[2]]
    try:
        address = stack.temporal.address

        async def connect() -> Client:
            return await Client.connect(address, data_converter=pydantic_data_converter)

        with mongo_front(catalog_reader_dsn, router_settings(),
                         TemporalIndexDdl(connect, worker.task_queue)) as f:
            client = client_of(f)
            try:
                coll = client.shardshift[c]
                await coll.insert_many([{"acct": f"m{i}", "tier": i % 3} for i in range(30)])
                await coll.create_index([("tier", 1)], name="by_tier")
            finally:
                await client.close()
        assert pg_indexes(third.dsn, c) == set()
        moving = cmap.chunks[0]
        handle = await start_worker_move(temporal_client, worker, c, moving.chunk_id, ids[2])
        result = await asyncio.wait_for(handle.result(), 120)
        assert result.outcome == MigrationOutcome.COMPLETED
        assert index_table_name(c, "by_tier") in pg_indexes(third.dsn, c)
    finally:
        for s in deployment.shards.values():
            await s.drop_collection(c)
        await deployment.catalog.drop_collection(c)


async def test_mongo_writes_during_a_move_are_all_kept(
        deployment: Deployment, catalog_reader_dsn: str, worker: WorkerHandle,
        temporal_client: Client) -> None:
    """Inserts, ``$inc`` updates, upserts and deletes through the MongoDB front end on the
    keys of a moving chunk, before, during and after its cutover: every acknowledged write is
    there afterwards, exactly once."""
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in sorted(deployment.shards) if s != moving.shard_id)
    keys = [k for k in (f"mv{i}" for i in range(4000))
            if deployment.initial.locate(khash(k)).chunk_id == moving.chunk_id][:20]
    with mongo_front(catalog_reader_dsn, router_settings()) as f:
        client = client_of(f)
        try:
            coll = client.shardshift[c]
            await coll.insert_many([{"_id": k, "acct": k, "n": Int64(0), "at": T0}
                                    for k in keys])
            handle = await start_worker_move(temporal_client, worker, c, moving.chunk_id,
                                             target)
            incs = {k: 0 for k in keys}
            inserted: list[ObjectId] = []
            deleted: set[ObjectId] = set()
            rounds = 0
            seen_on: set[str] = set()
            while True:
                k = keys[rounds % len(keys)]
                res = await coll.update_one({"acct": k, "_id": k}, {"$inc": {"n": 1}})
                assert res.modified_count == 1
                incs[k] += 1
                oid = ObjectId()
                await coll.insert_one({"_id": oid, "acct": k, "email": "mv@x",
                                       "amount": Decimal128("0.10")})
                inserted.append(oid)
                if rounds % 3 == 0:
                    gone = await coll.find_one_and_delete({"acct": k, "_id": inserted[-1]})
                    assert gone is not None
                    deleted.add(oid)
                rounds += 1
                placed = (await deployment.catalog.chunk(c, moving.chunk_id)).shard_id
                seen_on.add(placed)
                desc = await handle.describe()
                if desc.status is not None and desc.status.name != "RUNNING" and rounds > 20:
                    break
            result = await handle.result()
            assert result.outcome == MigrationOutcome.COMPLETED
            # writes were acknowledged with the chunk on its source and on its target
            assert seen_on == {moving.shard_id, target}, seen_on
            for k in keys:
                doc = await coll.find_one({"acct": k, "_id": k})
                assert doc is not None and doc["n"] == incs[k], (k, doc, incs[k])
            left = {d["_id"] async for d in coll.find({"email": "mv@x"})}
            assert left == set(inserted) - deleted
        finally:
            await client.close()
    chunk = await deployment.catalog.chunk(c, moving.chunk_id)
    assert chunk.shard_id == target


async def test_without_a_worker_the_client_stops_waiting_and_nothing_counts(
        deployment: Deployment, catalog_reader_dsn: str, stack: Stack,
        temporal_client: Client) -> None:
    """No worker serves the task queue: the client gets MaxTimeMSExpired (50) after its
    maxTimeMS, and the catalog lists no new index."""
    c = deployment.collection
    address = stack.temporal.address

    async def connect() -> Client:
        return await Client.connect(address, data_converter=pydantic_data_converter)

    queue = f"nobody-{c}"[:60]
    with mongo_front(catalog_reader_dsn, router_settings(),
                     TemporalIndexDdl(connect, queue)) as f:
        client = client_of(f)
        try:
            with pytest.raises(OperationFailure) as err:
                await client.shardshift.command(
                    {"createIndexes": c, "indexes": [{"key": {"tier": 1}, "name": "by_tier"}],
                     "maxTimeMS": 1500})
            assert err.value.code == 50 and "is one running" in str(err.value)
        finally:
            await client.close()
            await temporal_client.get_workflow_handle(f"indexes-{c}").terminate("test over")
    assert [i.name for i in (await deployment.catalog.collection(c)).indexes] == ["by_email"]
