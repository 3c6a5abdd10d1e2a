"""Reads through the MongoDB front end with the real pymongo driver (sync and async) against
real PostgreSQL shards: filters, targeting, cursors, counts, listings, bad input, and a scan
that meets a chunk map gone stale."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import os
import time
from decimal import Decimal
from typing import Any

import bson
import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.errors import CursorNotFound, OperationFailure

from catalog.admin import split_chunk
from router.hashing import khash
from router.mongo import cursors, reads
from router.mongo.cursors import BATCH_BYTES
from settings import MongoUser
from tests.router.conftest import Deployment, router_settings
from tests.router.mongo_front import MongoFront, mongo_front

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def corpus(n: int = 60) -> list[dict[str, Any]]:
    """Documents of many BSON types, over several accounts (so over every chunk)."""
    docs: list[dict[str, Any]] = []
    for i in range(n):
        amount: Any = [i, Int64(i), float(i), Decimal128(Decimal(i))][i % 4]
        docs.append({
            "_id": ObjectId(f"{i:024x}"), "acct": f"acct-{i % 7}", "i": i, "amount": amount,
            "email": f"u{i % 10}@example.com", "at": T0 + dt.timedelta(hours=i),
            "tags": [f"t{i % 3}", f"t{i % 5}"], "nested": {"level": {"v": i % 4}},
            **({"opt": None} if i % 6 == 0 else {}), **({"s": str(i)} if i % 9 == 0 else {}),
        })
    return docs


def ids(docs: Any) -> list[int]:
    return sorted(d["i"] for d in docs)


def expected(docs: list[dict[str, Any]], pred: Any) -> list[int]:
    return sorted(d["i"] for d in docs if pred(d))


def test_filters_return_what_mongodb_returns(mongo: MongoFront, deployment: Deployment) -> None:
    docs = corpus()
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many(docs)
        cases: list[tuple[dict[str, Any], Any]] = [
            ({}, lambda d: True),
            ({"i": 7}, lambda d: d["i"] == 7),
            ({"amount": 10}, lambda d: d["i"] == 10),  # numbers compare across types
            ({"amount": {"$gt": Int64(50)}}, lambda d: d["i"] > 50),
            ({"amount": {"$gte": Decimal128("57"), "$lt": 59.5}}, lambda d: 57 <= d["i"] <= 59),
            ({"amount": {"$lte": 3}}, lambda d: d["i"] <= 3),
            ({"s": {"$gt": 5}}, lambda d: False),  # type bracketing: strings are not numbers
            ({"s": {"$gte": "3"}}, lambda d: "s" in d and d["s"] >= "3"),
            ({"i": {"$ne": 3}}, lambda d: d["i"] != 3),
            ({"i": {"$in": [1, 2, Int64(3), 99]}}, lambda d: d["i"] in (1, 2, 3)),
            ({"i": {"$nin": [1, 2]}}, lambda d: d["i"] not in (1, 2)),
            ({"opt": {"$exists": True}}, lambda d: "opt" in d),
            ({"opt": None}, lambda d: d.get("opt") is None),
            ({"s": {"$exists": False}}, lambda d: "s" not in d),
            ({"tags": "t4"}, lambda d: "t4" in d["tags"]),  # arrays: "contains"
            ({"tags": {"$in": ["t4", "t2"]}}, lambda d: {"t4", "t2"} & set(d["tags"])),
            ({"nested.level.v": 2}, lambda d: d["nested"]["level"]["v"] == 2),
            ({"nested": {"level": {"v": 3}}}, lambda d: d["nested"]["level"]["v"] == 3),
            ({"at": {"$gte": T0 + dt.timedelta(hours=55)}}, lambda d: d["i"] >= 55),
            ({"$or": [{"i": 1}, {"email": "u2@example.com"}]},
             lambda d: d["i"] == 1 or d["email"] == "u2@example.com"),
            ({"$and": [{"acct": "acct-3"}, {"i": {"$gt": 20}}]},
             lambda d: d["acct"] == "acct-3" and d["i"] > 20),
            ({"$nor": [{"i": {"$lt": 50}}]}, lambda d: d["i"] >= 50),
            ({"i": {"$not": {"$lt": 50}}}, lambda d: d["i"] >= 50),
            ({"tags": {"$all": ["t0", "t0"]}, "i": {"$mod": [2, 0]}},
             lambda d: "t0" in d["tags"] and d["i"] % 2 == 0),
            ({"tags": {"$size": 2}, "email": {"$regex": "^U1@", "$options": "i"}},
             lambda d: d["email"] == "u1@example.com"),
            ({"amount": {"$type": "decimal"}}, lambda d: d["i"] % 4 == 3),
            ({"tags": {"$elemMatch": {"$in": ["t1"]}}}, lambda d: "t1" in d["tags"]),
        ]
        for flt, pred in cases:
            assert ids(coll.find(flt)) == expected(docs, pred), flt
        got = coll.find_one({"_id": docs[5]["_id"]})
        assert got == docs[5] and isinstance(got["amount"], Int64)


def async_client(front: MongoFront, **kw: Any) -> pymongo.AsyncMongoClient[dict[str, Any]]:
    return pymongo.AsyncMongoClient(front.uri(**kw), tz_aware=True,
                                    uuidRepresentation="standard",
                                    serverSelectionTimeoutMS=5000)


async def test_shard_key_equality_and_in_read_only_the_owning_chunks(
        mongo: MongoFront, deployment: Deployment) -> None:
    docs = corpus(40)
    client = async_client(mongo)
    try:
        coll = client.shardshift[deployment.collection]
        await coll.insert_many(docs)
        # Freeze every chunk that holds neither account: a query that read them would wait
        # on their fences until its deadline and fail; a targeted one never touches them.
        wanted = {"acct-1", "acct-4"}
        cmap = await deployment.chunk_map()
        owning = {c.chunk_id for c in cmap.chunks for a in wanted
                  if c.range.lo <= khash(a) < c.range.hi}
        frozen = [c for c in cmap.chunks if c.chunk_id not in owning]
        assert frozen
        for c in frozen:
            await deployment.shards[c.shard_id].freeze(deployment.collection, c.chunk_id,
                                                       c.token)
        try:
            got = await coll.find({"acct": {"$in": sorted(wanted)}, "i": {"$gte": 0}}).to_list()
            assert ids(got) == expected(docs, lambda d: d["acct"] in wanted)
            got = await coll.find({"acct": "acct-4", "_id": docs[4]["_id"]}).to_list()
            assert ids(got) == [4]
            assert await coll.count_documents({"acct": "acct-1"}) == len(
                expected(docs, lambda d: d["acct"] == "acct-1"))
        finally:
            for c in frozen:
                await deployment.shards[c.shard_id].unfreeze(
                    deployment.collection, c.chunk_id, c.token + 1)
        # _id and the indexed field are pushed down to each shard; the answer is the same
        got = await coll.find({"_id": {"$in": [docs[3]["_id"], docs[30]["_id"]]}}).to_list()
        assert ids(got) == [3, 30]
        got = await coll.find({"email": {"$in": ["u3@example.com", "nobody"]}}).to_list()
        assert ids(got) == expected(docs, lambda d: d["email"] == "u3@example.com")
    finally:
        await client.close()


def test_projection_sort_skip_limit_and_batches(mongo: MongoFront,
                                                 deployment: Deployment) -> None:
    docs = corpus(250)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many(docs)
        got = list(coll.find({"i": {"$lt": 3}}, {"nested.level": 1, "_id": 0}).sort("i", 1))
        assert got == [{"nested": {"level": {"v": i % 4}}} for i in range(3)]
        got = list(coll.find({"i": 4}, {"tags": 0, "nested": 0, "at": 0}))
        assert got == [{k: v for k, v in docs[4].items() if k not in ("tags", "nested", "at")}]
        # multi-key sort across number types, then skip and limit
        cur = coll.find({}, {"i": 1}).sort([("nested.level.v", -1), ("amount", 1)])
        want = sorted(docs, key=lambda d: (-d["nested"]["level"]["v"], d["i"]))
        assert [d["i"] for d in cur.skip(10).limit(30)] == [d["i"] for d in want[10:40]]
        # several getMores, batchSize honoured
        cur = coll.find({}, batch_size=40)
        assert len(list(cur)) == 250
        # a negative limit is one batch, closed at once
        cur = coll.find({}).limit(-5)
        assert len(list(cur)) == 5 and cur.cursor_id in (None, 0)
        reply = client.shardshift.command({"find": deployment.collection, "batchSize": 0})
        assert reply["cursor"]["firstBatch"] == [] and reply["cursor"]["id"] != 0
        cid = reply["cursor"]["id"]
        more = client.shardshift.command({"getMore": cid, "collection": deployment.collection,
                                          "batchSize": 100})
        assert len(more["cursor"]["nextBatch"]) == 100 and more["cursor"]["id"] == cid
        killed = client.shardshift.command({"killCursors": deployment.collection,
                                            "cursors": [cid]})
        assert killed["cursorsKilled"] == [cid]
        with pytest.raises(CursorNotFound) as err:
            client.shardshift.command({"getMore": cid, "collection": deployment.collection})
        assert err.value.code == 43
        single = client.shardshift.command({"find": deployment.collection, "singleBatch": True,
                                            "batchSize": 7})
        assert len(single["cursor"]["firstBatch"]) == 7 and single["cursor"]["id"] == 0
        with pytest.raises(OperationFailure) as err2:
            client.shardshift.command({"getMore": Int64(12345),
                                       "collection": deployment.collection})
        assert err2.value.code == 43


def test_cursors_belong_to_their_user(deployment: Deployment, catalog_reader_dsn: str) -> None:
    users = [MongoUser(name="alice", password="pw-alice-1"),
             MongoUser(name="bob", password="pw-bob-1")]
    with mongo_front(catalog_reader_dsn, router_settings(mongo_users=users)) as front, \
            pymongo.MongoClient(front.uri("alice", "pw-alice-1")) as alice, \
            pymongo.MongoClient(front.uri("bob", "pw-bob-1")) as bob:
        alice.shardshift[deployment.collection].insert_many(corpus(20))
        reply = alice.shardshift.command({"find": deployment.collection, "batchSize": 2})
        cid = reply["cursor"]["id"]
        with pytest.raises(OperationFailure) as err:
            bob.shardshift.command({"getMore": cid, "collection": deployment.collection})
        assert err.value.code == 13
        more = alice.shardshift.command({"getMore": cid, "collection": deployment.collection})
        assert len(more["cursor"]["nextBatch"]) == 18 and more["cursor"]["id"] == 0


def test_an_unbounded_sort_past_the_memory_bound_is_refused(
        mongo: MongoFront, deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = corpus(100)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many(docs)
        monkeypatch.setattr(reads, "SORT_MAX_BYTES", 4096)
        with pytest.raises(OperationFailure) as err:
            list(coll.find({}).sort("i", -1))
        assert err.value.code == 292
        # with a limit, only the top documents are held
        assert [d["i"] for d in coll.find({}).sort("i", -1).limit(5)] == [99, 98, 97, 96, 95]


def test_batches_stay_under_the_reply_size_limit(mongo: MongoFront,
                                                  deployment: Deployment) -> None:
    """Incompressible 3 MiB documents: shard pages stop at about 4 MiB as stored (so a page
    holds one or two of them) and reply batches below 16 MiB; nothing is lost between."""
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        for i in range(8):
            blob = base64.b64encode(os.urandom(3 * 1024 * 1024 * 3 // 4)).decode()
            coll.insert_one({"_id": i, "acct": "same", "i": i, "blob": blob})
        reply = client.shardshift.command({"find": deployment.collection})
        first = reply["cursor"]["firstBatch"]
        size = sum(len(bson.encode(d)) for d in first)
        assert 0 < len(first) < 8 and size <= BATCH_BYTES
        assert sorted(d["i"] for d in coll.find({}, {"i": 1})) == list(range(8))
        assert sorted(d["i"] for d in coll.find({"acct": "same"}, {"i": 1}, batch_size=3)) == \
            list(range(8))


def test_count_and_the_count_pipelines(mongo: MongoFront, deployment: Deployment) -> None:
    docs = corpus(45)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        assert coll.estimated_document_count() == 0
        coll.insert_many(docs)
        assert coll.estimated_document_count() == 45
        assert coll.count_documents({}) == 45
        assert coll.count_documents({"i": {"$gte": 40}}) == 5
        assert coll.count_documents({"i": {"$gte": 10}}, skip=30, limit=3) == 3
        assert coll.count_documents({"i": {"$gte": 40}}, skip=4) == 1
        assert coll.count_documents({"i": -1}) == 0
        n = client.shardshift.command({"count": deployment.collection,
                                       "query": {"acct": "acct-2"}, "limit": 2})["n"]
        assert n == 2
        missing = client.shardshift["no_such_collection"]
        assert missing.count_documents({}) == 0 and missing.estimated_document_count() == 0
        assert list(missing.find({})) == [] and list(client.other_db.c.find({})) == []
        with pytest.raises(OperationFailure) as err:
            list(coll.aggregate([{"$project": {"i": 1}}]))
        assert err.value.code == 238
        with pytest.raises(OperationFailure) as err:
            list(coll.aggregate([{"$frobnicate": {}}]))
        assert err.value.code == 40324


def test_list_collections_and_databases(mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        client.shardshift[deployment.collection].insert_one({"_id": 1, "acct": "a"})
        names = client.shardshift.list_collection_names()
        assert deployment.collection in names
        infos = list(client.shardshift.list_collections(filter={"name": deployment.collection}))
        assert len(infos) == 1
        info = infos[0]
        assert info["type"] == "collection" and info["idIndex"]["key"] == {"_id": 1}
        assert info["info"]["shardKey"] == {"acct": "hashed"}
        assert client.shardshift.list_collection_names(filter={"name": "nope"}) == []
        assert client.other_db.list_collection_names() == []
        dbs = list(client.list_databases())
        assert [d["name"] for d in dbs] == ["shardshift"] and "sizeOnDisk" in dbs[0]
        assert client.list_database_names() == ["shardshift"]


def test_bad_input_gets_mongodb_errors_and_changes_nothing(
        mongo: MongoFront, deployment: Deployment) -> None:
    docs = corpus(30)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many(docs)
        bad: list[tuple[dict[str, Any], dict[str, Any] | None, int]] = [
            ({"$foo": 1}, None, 2), ({"i": {"$foo": 1}}, None, 2), ({"a.$b": 1}, None, 2),
            ({"a..b": 1}, None, 2), ({"x" * 5000: 1}, None, 2), ({"i": {"$in": 5}}, None, 2),
            ({"$where": "true"}, None, 238), ({}, {"tags": {"$slice": 1}}, 238),
            ({}, {"$x": 1}, 2), ({}, {"a": 1, "b": 0}, 31254), ({}, {"x" * 5000: 1}, 2),
        ]
        for flt, proj, code in bad:
            with pytest.raises(OperationFailure) as err:
                list(coll.find(flt, proj))
            assert err.value.code == code, (flt, proj)
        deep: dict[str, Any] = {"i": 1}
        for _ in range(200):
            deep = {"$or": [deep]}
        with pytest.raises(OperationFailure) as err:
            list(coll.find(deep))
        assert err.value.code == 2
        with pytest.raises(OperationFailure) as err:
            client.shardshift.command({"getMore": "x", "collection": deployment.collection})
        assert err.value.code == 14
        with pytest.raises(OperationFailure) as err:
            client.shardshift.command({"find": deployment.collection, "sort": {"i": 3}})
        assert err.value.code == 15975
        # hostile names that are legal paths simply match nothing
        assert list(coll.find({"a.b.c.d.e.f": 1, "$comment": "x"})) == []
        assert list(coll.find({"email": "u1@example.com\x00"})) == []
        # a huge $in: every value but three matches nothing
        huge = [f"nope-{i}" for i in range(20_000)] + [docs[1]["_id"], docs[2]["_id"],
                                                         docs[29]["_id"]]
        assert ids(coll.find({"_id": {"$in": huge}})) == [1, 2, 29]
        accts = [f"acct-x{i}" for i in range(5_000)] + ["acct-3"]
        assert ids(coll.find({"acct": {"$in": accts}})) == expected(
            docs, lambda d: d["acct"] == "acct-3")
        assert coll.count_documents({}) == 30
        assert sorted(coll.find({}), key=lambda d: d["i"]) == docs


async def test_async_client_and_a_scan_across_a_stale_chunk_map(
        deployment: Deployment, catalog_reader_dsn: str) -> None:
    """The router hears of no catalog change; chunks split (new tokens) under an open cursor
    and before a new query: fences refuse the stale pages, the router reloads its map, and
    every document still comes back exactly once."""
    docs = corpus(300)
    with mongo_front(catalog_reader_dsn, router_settings(), listen=False) as front:
        client = async_client(front)
        try:
            coll = client.shardshift[deployment.collection]
            await coll.insert_many(docs)
            cursor = coll.find({"i": {"$gte": 0}}, batch_size=30)
            seen = [d["i"] async for d in itertools_take(cursor, 30)]
            emails = ["u1@example.com", "u2@example.com"]  # pushed down, chunks in parallel
            by_email = coll.find({"email": {"$in": emails}}, batch_size=5)
            seen_email = [d["i"] async for d in itertools_take(by_email, 5)]
            version_before = front.run(front.router.route(deployment.collection)).version
            for c in (await deployment.chunk_map()).chunks:
                await split_chunk(deployment.catalog, deployment.shards, deployment.collection,
                                  c.chunk_id)
            seen += [d["i"] async for d in cursor]
            assert sorted(seen) == list(range(300))
            seen_email += [d["i"] async for d in by_email]
            assert sorted(seen_email) == expected(docs, lambda d: d["email"] in emails)
            fresh = await coll.find({"tags": "t1"}).to_list()
            assert ids(fresh) == expected(docs, lambda d: "t1" in d["tags"])
            assert front.run(front.router.route(deployment.collection)).version > version_before
            assert await coll.count_documents({"i": {"$lt": 100}}) == 100
            assert await coll.estimated_document_count() == 300
        finally:
            await client.close()


async def itertools_take(cursor: Any, n: int) -> Any:
    """The first ``n`` documents of an async cursor, leaving it open."""
    for _ in itertools.repeat(None, n):
        yield await cursor.next()


def test_hostile_collection_names(mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        client.shardshift[deployment.collection].insert_one({"_id": 1, "acct": "a"})
        db = client.shardshift
        for name in ("a$b", "$x", "a\x00b", "x" * 300):
            for cmd in ({"find": name}, {"count": name},
                        {"aggregate": name, "pipeline": [], "cursor": {}}):
                with pytest.raises(OperationFailure) as err:
                    db.command(cmd)
                assert err.value.code == 73, (name, cmd)
        # names MongoDB allows but no collection has: empty, as for any missing collection
        for name in ("a.b", "system.views", "é", "x" * 200, "1abc"):
            assert list(db[name].find({})) == [] and db[name].count_documents({}) == 0
        assert db[deployment.collection].count_documents({}) == 1


def test_idle_cursors_expire_and_open_cursors_are_bounded(
        mongo: MongoFront, deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    with mongo.client() as client:
        client.shardshift[deployment.collection].insert_many(corpus(10))
        find = {"find": deployment.collection, "batchSize": 1}
        cid = client.shardshift.command(find)["cursor"]["id"]
        assert mongo.server is not None
        ctx = mongo.server.context
        # Ten minutes and a second later (MongoDB's idle timeout), the cursor is gone.
        closed = mongo.run(cursors.expire_idle(ctx, time.monotonic() + cursors.IDLE_S + 1))
        assert closed == 1 and cursors.open_count(ctx) == 0
        with pytest.raises(CursorNotFound):
            client.shardshift.command({"getMore": cid, "collection": deployment.collection})
        monkeypatch.setattr(cursors, "MAX_CURSORS", 2)
        kept = [client.shardshift.command(find)["cursor"]["id"] for _ in range(2)]
        with pytest.raises(OperationFailure) as err:
            client.shardshift.command(find)
        assert err.value.code == 96 and "too many open cursors" in str(err.value)
        # a query that needs no cursor still runs, and a closed cursor frees its place
        assert len(list(client.shardshift[deployment.collection].find({}))) == 10
        client.shardshift.command({"killCursors": deployment.collection, "cursors": kept[:1]})
        assert client.shardshift.command(find)["cursor"]["id"] != 0
