"""Write commands through the MongoDB front end with the real pymongo driver (sync and async):
insert, update, delete, findAndModify, against real PostgreSQL shards."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from decimal import Decimal
from typing import Any

import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId
from bson.errors import InvalidDocument
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, OperationFailure, WriteError

from router.hashing import khash
from router.mongo.errors_map import OUTCOME_UNKNOWN_LABEL
from tests.router.conftest import Deployment, TcpProxy, router_settings
from tests.router.mongo_front import MongoFront, mongo_front

T0 = dt.datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=dt.UTC)


def rich(acct: str, **extra: Any) -> dict[str, Any]:
    """A document with the Extended JSON types a user stores."""
    return {"_id": ObjectId(), "acct": acct, "email": f"{acct}@example.com",
            "amount": Decimal128(Decimal("10.25")), "big": Int64(2**40), "at": T0,
            "nested": {"tags": ["x", {"y": 1}], "n": 1}, **extra}


def everything(deployment: Deployment, mongo: MongoFront) -> list[dict[str, Any]]:
    """Every document of the collection, read from the shards directly (not through the
    front end under test), sorted by _id's text."""
    async def scan() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cmap = await deployment.chunk_map()
        for c in cmap.chunks:
            out += await deployment.shards[c.shard_id].scan(deployment.collection, c.range)
        return out
    return sorted(mongo.run(scan()), key=lambda d: str(d["_id"]))


def keys_on_shards(deployment: Deployment, per_shard: int) -> list[str]:
    """Shard key values spread over every shard (``per_shard`` on each)."""
    by: dict[str, list[str]] = {}
    i = 0
    while any(len(by.get(s, [])) < per_shard for s in deployment.shards):
        k = f"k{i}"
        sid = deployment.initial.locate(khash(k)).shard_id
        if len(by.setdefault(sid, [])) < per_shard:
            by[sid].append(k)
        i += 1
    return [k for ks in by.values() for k in ks]


# -- insert -------------------------------------------------------------------------------------


def test_ordered_insert_stops_at_the_first_failure(mongo: MongoFront,
                                                    deployment: Deployment) -> None:
    a, b, c = rich("a"), rich("b"), rich("c")
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        with pytest.raises(BulkWriteError) as err:
            coll.insert_many([a, b, dict(a), c])
        res = err.value.details
        assert res["nInserted"] == 2
        (we,) = res["writeErrors"]
        assert we["index"] == 2 and we["code"] == 11000
        assert we["keyPattern"] == {"acct": 1, "_id": 1}
        assert we["keyValue"] == {"acct": "a", "_id": a["_id"]}
        assert "E11000 duplicate key error" in we["errmsg"]
    assert everything(deployment, mongo) == sorted([a, b], key=lambda d: str(d["_id"]))


def test_unordered_insert_goes_on_and_reports_each_failure(mongo: MongoFront,
                                                           deployment: Deployment) -> None:
    a, c = rich("a"), rich("c")
    no_key = {"_id": ObjectId(), "email": "nokey@example.com"}
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one(a)
        with pytest.raises(BulkWriteError) as err:
            coll.insert_many([dict(a), no_key, c], ordered=False)
        res = err.value.details
        assert res["nInserted"] == 1
        assert [(e["index"], e["code"]) for e in res["writeErrors"]] == [(0, 11000), (1, 61)]
        assert coll.find_one({"acct": "c", "_id": c["_id"]}) == c
    assert len(everything(deployment, mongo)) == 2


def test_insert_generates_an_id_in_the_body_and_in_a_document_sequence(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        db = client.shardshift
        # the body form (a command document), without _id
        reply = db.command({"insert": deployment.collection,
                            "documents": [{"acct": "body", "v": Int64(1)}]})
        assert reply["n"] == 1
        # insert_many sends the documents as an OP_MSG document sequence (kind 1)
        db[deployment.collection].insert_many([{"acct": "seq", "v": i} for i in range(5)])
    docs = everything(deployment, mongo)
    assert len(docs) == 6 and all(isinstance(d["_id"], ObjectId) for d in docs)
    assert {d["acct"] for d in docs} == {"body", "seq"}


def test_uuids_are_stored_and_found(mongo: MongoFront, deployment: Deployment) -> None:
    """A UUID (BSON binary subtype 4, as drivers send it with ``uuidRepresentation``
    standard) as ``_id`` and as a field: stored, found by it, and read back as a UUID."""
    u, v = uuid.UUID(int=0x0102030405060708090A0B0C0D0E0F10), uuid.uuid4()
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one({"_id": u, "acct": "uuid", "ref": v})
        assert coll.find_one({"_id": u, "acct": "uuid"}) == {"_id": u, "acct": "uuid",
                                                              "ref": v}
        assert coll.find_one({"ref": v})["_id"] == u
        coll.update_one({"_id": u, "acct": "uuid"}, {"$set": {"ref2": v}})
        assert coll.find_one({"_id": u, "acct": "uuid"})["ref2"] == v


@pytest.mark.parametrize("name", ["a.b", "$x", "a\x00b", "x" * 300, "system.users"])
def test_hostile_collection_names_are_refused(mongo: MongoFront, deployment: Deployment,
                                              name: str) -> None:
    with mongo.client() as client:
        with pytest.raises((OperationFailure, InvalidDocument, pymongo.errors.InvalidName)):
            client.shardshift[name].insert_one({"acct": "a", "v": 1})
        with pytest.raises((OperationFailure, InvalidDocument, pymongo.errors.InvalidName)):
            client.shardshift.command({"update": name, "updates": [
                {"q": {"acct": "a"}, "u": {"$set": {"v": 2}}, "upsert": True}]})
    assert everything(deployment, mongo) == []


def test_unknown_fields_and_bad_write_concerns_change_nothing(mongo: MongoFront,
                                                              deployment: Deployment) -> None:
    with mongo.client() as client:
        db = client.shardshift
        for cmd, code in [
            ({"insert": deployment.collection, "documents": [{"acct": "a"}], "bogus": 1}, 40415),
            ({"insert": deployment.collection, "documents": [{"acct": "a"}],
              "writeConcern": {"w": 3}}, 100),
            ({"insert": deployment.collection, "documents": [{"acct": "a"}],
              "writeConcern": {"w": "somewhere"}}, 79),
            ({"insert": deployment.collection, "documents": []}, 16),
            ({"delete": deployment.collection, "deletes": [{"q": {}, "limit": 5}]}, None),
        ]:
            if code is None:
                reply = db.command(cmd)
                assert reply["writeErrors"][0]["code"] == 9
                continue
            with pytest.raises(OperationFailure) as err:
                db.command(cmd)
            assert err.value.code == code, cmd
        # majority and w: 1 are acknowledged; comment, let and bypassDocumentValidation pass
        db.command({"insert": deployment.collection, "documents": [{"acct": "ok"}],
                    "writeConcern": {"w": "majority", "j": True}, "comment": "c",
                    "bypassDocumentValidation": True, "let": {"x": 1}})
    assert [d["acct"] for d in everything(deployment, mongo)] == ["ok"]


def test_unacknowledged_writes_run_without_a_reply(mongo: MongoFront,
                                                  deployment: Deployment) -> None:
    with mongo.client(w=0) as client:
        coll = client.shardshift[deployment.collection]
        res = coll.insert_one({"acct": "w0", "v": 1})
        assert res.acknowledged is False
        coll.update_one({"acct": "w0"}, {"$inc": {"v": 1}})
        deadline = time.monotonic() + 15
        while True:  # the write runs after the driver moved on: wait for it to show
            docs = everything(deployment, mongo)
            if docs and docs[0]["v"] == 2:
                break
            assert time.monotonic() < deadline, f"the unacknowledged writes never ran: {docs}"
            time.sleep(0.05)


# -- update -------------------------------------------------------------------------------------


def test_update_operators_keep_types_and_count_no_ops(mongo: MongoFront,
                                                     deployment: Deployment) -> None:
    doc = rich("u1")
    sel = {"acct": "u1", "_id": doc["_id"]}
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one(doc)
        res = coll.update_one(sel, {"$inc": {"amount": Decimal128("0.75"), "big": 1,
                                             "nested.n": 2, "fresh": Int64(5)},
                                    "$set": {"at": T0 + dt.timedelta(days=1), "nested.k": [1]},
                                    "$unset": {"email": ""}})
        assert (res.matched_count, res.modified_count) == (1, 1)
        got = coll.find_one(sel)
        assert got["amount"] == Decimal128("11.00")
        assert got["big"] == 2**40 + 1 and isinstance(got["big"], Int64)
        assert got["nested"] == {"tags": ["x", {"y": 1}], "n": 3, "k": [1]}
        assert got["fresh"] == 5 and isinstance(got["fresh"], Int64)
        assert got["at"] == T0 + dt.timedelta(days=1) and "email" not in got
        # the same $set again changes nothing: matched, not modified
        res = coll.update_one(sel, {"$set": {"nested.k": [1]}})
        assert (res.matched_count, res.modified_count) == (1, 0)
        # a replacement keeps _id and the shard key
        res = coll.replace_one(sel, {"acct": "u1", "v": "replaced"})
        assert (res.matched_count, res.modified_count) == (1, 1)
        assert coll.find_one(sel) == {"_id": doc["_id"], "acct": "u1", "v": "replaced"}
        # nothing matches: zero, no upsert
        res = coll.update_one({"acct": "u1", "_id": ObjectId()}, {"$set": {"v": 1}})
        assert (res.matched_count, res.modified_count, res.upserted_id) == (0, 0, None)


@pytest.mark.parametrize(("update", "code", "text"), [
    ({"$push": {"tags": 1}}, 9, "Unknown modifier: $push"),
    ({"$set": {"v": 1}, "plain": 2}, 9, "Unknown modifier: plain"),
    ({"$set": {"_id": ObjectId()}}, 66, "_id"),
    ({"$set": {"acct": "other"}}, 66, "acct"),
    ({"$unset": {"acct": ""}}, 66, "acct"),
    ({"$inc": {"email": 1}}, 14, "non-numeric"),
    ({"$inc": {"v": "one"}}, 14, "non-numeric"),
    ({"$set": {"email.inner": 1}}, 28, "Cannot create field"),
    ({"$set": {"a.$b": 1}}, 52, "$b"),
    ({"$set": {"": 1}}, 56, "empty"),
    ({"$set": {"a..b": 1}}, 56, "empty"),
    ({"$set": {"a-b": 1}}, 2, "invalid field path"),
    ({"$set": {"x" * 300: 1}}, 2, "invalid field path"),
    ({"$set": {"n": 1}, "$inc": {"n": 1}}, 40, "conflict"),
    ({"acct": "u2", "$bad": 1}, 52, "$bad"),
    ({"acct": "other"}, 66, "acct"),
    ([{"$set": {"v": 1}}], 238, "pipeline"),
])
def test_bad_updates_are_refused_and_change_nothing(mongo: MongoFront, deployment: Deployment,
                                                    update: Any, code: int, text: str) -> None:
    doc = rich("u2", v=1)
    sel = {"acct": "u2", "_id": doc["_id"]}
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one(doc)
        reply = client.shardshift.command({"update": deployment.collection,
                                           "updates": [{"q": sel, "u": update}]})
        (we,) = reply["writeErrors"]
        assert we["code"] == code and text in we["errmsg"], we
        assert reply["n"] == 0 and reply["nModified"] == 0
        assert coll.find_one(sel) == doc


def test_a_nul_in_a_field_name_never_reaches_the_router(mongo: MongoFront,
                                                        deployment: Deployment) -> None:
    doc = rich("nul")
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one(doc)
        with pytest.raises(InvalidDocument):
            coll.update_one({"acct": "nul", "_id": doc["_id"]}, {"$set": {"a\x00b": 1}})
        assert coll.find_one({"acct": "nul", "_id": doc["_id"]}) == doc


def test_statement_options_the_router_lacks_are_refused(mongo: MongoFront,
                                                        deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one({"_id": 1, "acct": "o", "a": [1, 2]})
        for kw in ({"array_filters": [{"x": 1}]}, {"hint": "by_email"},
                   {"collation": {"locale": "fr"}}):
            with pytest.raises(WriteError) as err:
                coll.update_one({"acct": "o", "_id": 1}, {"$set": {"b": 1}}, **kw)
            assert err.value.code == 238
        reply = client.shardshift.command({"update": deployment.collection, "updates": [
            {"q": {"acct": "o"}, "u": {"acct": "o", "replaced": 1}, "multi": True}]})
        assert reply["writeErrors"][0]["code"] == 9
        assert coll.find_one({"acct": "o", "_id": 1}) == {"_id": 1, "acct": "o", "a": [1, 2]}


def test_upserts_build_the_document_from_the_filter_and_the_update(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        oid = ObjectId()
        res = coll.update_one({"acct": "up", "_id": oid, "profile.tier": "gold"},
                              {"$set": {"seen": T0}, "$inc": {"n": Int64(1)}}, upsert=True)
        assert (res.matched_count, res.modified_count, res.upserted_id) == (0, 0, oid)
        assert coll.find_one({"acct": "up", "_id": oid}) == {
            "_id": oid, "acct": "up", "profile": {"tier": "gold"}, "seen": T0, "n": 1}
        # again: it matches now
        res = coll.update_one({"acct": "up", "_id": oid}, {"$inc": {"n": 1}}, upsert=True)
        assert (res.matched_count, res.modified_count, res.upserted_id) == (1, 1, None)
        # a replacement upsert: the shard key comes from the replacement, _id is generated
        res = coll.replace_one({"email": "r@example.com"},
                               {"acct": "up2", "email": "r@example.com"}, upsert=True)
        assert isinstance(res.upserted_id, ObjectId)
        # without the shard key in the filter, an operator upsert cannot be targeted
        with pytest.raises(WriteError) as err:
            coll.update_one({"email": "none@example.com"}, {"$set": {"v": 1}}, upsert=True)
        assert err.value.code == 61
        # upserted: the index of each statement that inserted
        reply = client.shardshift.command({"update": deployment.collection, "updates": [
            {"q": {"acct": "up", "_id": oid}, "u": {"$set": {"x": 1}}, "upsert": True},
            {"q": {"acct": "new", "_id": 7}, "u": {"$set": {"x": 1}}, "upsert": True}]})
        assert reply["n"] == 2 and reply["nModified"] == 1
        assert reply["upserted"] == [{"index": 1, "_id": 7}]
    assert len(everything(deployment, mongo)) == 3


def test_multi_update_and_delete_reach_every_shard(mongo: MongoFront,
                                                   deployment: Deployment) -> None:
    keys = keys_on_shards(deployment, 3)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many([{"acct": k, "email": "team@x", "n": Int64(i), "t": T0}
                          for i, k in enumerate(keys)])
        coll.insert_one({"acct": keys[0], "email": "other@x", "n": 100})
        res = coll.update_many({"email": "team@x"}, {"$inc": {"n": 10}, "$set": {"tag": "m"}})
        assert (res.matched_count, res.modified_count) == (9, 9)
        assert sorted(d["n"] for d in coll.find({"email": "team@x"})) == [
            10 + i for i in range(9)]
        # update_one with a scattering filter changes exactly one
        res = coll.update_one({"email": "team@x"}, {"$set": {"tag": "one"}})
        assert (res.matched_count, res.modified_count) == (1, 1)
        assert coll.delete_one({"email": "team@x"}).deleted_count == 1
        assert coll.delete_many({"email": "team@x"}).deleted_count == 8
        assert coll.delete_many({"email": "team@x"}).deleted_count == 0
    left = everything(deployment, mongo)
    assert [d["email"] for d in left] == ["other@x"] and left[0]["n"] == 100


def test_ordered_updates_stop_at_a_failure_and_unordered_go_on(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many([{"_id": i, "acct": f"o{i}", "v": 0} for i in range(3)])
        ops = [pymongo.UpdateOne({"acct": "o0", "_id": 0}, {"$set": {"v": 1}}),
               pymongo.UpdateOne({"acct": "o1", "_id": 1}, {"$inc": {"acct": 1}}),
               pymongo.UpdateOne({"acct": "o2", "_id": 2}, {"$set": {"v": 1}})]
        with pytest.raises(BulkWriteError) as err:
            coll.bulk_write(ops)
        assert err.value.details["nModified"] == 1
        assert [e["index"] for e in err.value.details["writeErrors"]] == [1]
        assert coll.find_one({"acct": "o2", "_id": 2})["v"] == 0
        with pytest.raises(BulkWriteError) as err:
            coll.bulk_write(ops, ordered=False)
        assert err.value.details["nModified"] == 1  # o0 already 1 (no-op); o2 changes
        assert err.value.details["nMatched"] == 2
        assert coll.find_one({"acct": "o2", "_id": 2})["v"] == 1
        # deletes: ordered stops at the bad statement
        reply = client.shardshift.command({"delete": deployment.collection, "deletes": [
            {"q": {"acct": "o0", "_id": 0}, "limit": 1},
            {"q": {"acct": "o1", "_id": 1}, "limit": 2},
            {"q": {"acct": "o2", "_id": 2}, "limit": 1}]})
        assert reply["n"] == 1 and reply["writeErrors"][0]["index"] == 1
        assert [d["_id"] for d in everything(deployment, mongo)] == [1, 2]


# -- findAndModify --------------------------------------------------------------------------


def test_find_and_modify_forms(mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many([{"_id": i, "acct": f"f{i}", "email": "q@x", "rank": r, "at": T0}
                          for i, r in enumerate([Int64(3), 1.5, Decimal128("2"), 7])])
        before = coll.find_one_and_update({"email": "q@x"}, {"$inc": {"rank": 10}},
                                          sort=[("rank", pymongo.ASCENDING)])
        assert before["_id"] == 1 and before["rank"] == 1.5
        after = coll.find_one_and_update({"email": "q@x"}, {"$set": {"top": True}},
                                         sort=[("rank", -1)], projection={"rank": 1, "_id": 0},
                                         return_document=ReturnDocument.AFTER)
        assert after == {"rank": 11.5}
        gone = coll.find_one_and_delete({"email": "q@x"}, sort=[("rank", 1)],
                                        projection={"at": 0, "email": 0})
        assert gone == {"_id": 2, "acct": "f2", "rank": Decimal128("2")}
        replaced = coll.find_one_and_replace({"acct": "f0", "_id": 0},
                                             {"acct": "f0", "r": "new"},
                                             return_document=ReturnDocument.AFTER)
        assert replaced == {"_id": 0, "acct": "f0", "r": "new"}
        assert coll.find_one_and_update({"acct": "zz", "_id": 9}, {"$set": {"v": 1}}) is None
        made = coll.find_one_and_update({"acct": "zz", "_id": 9}, {"$set": {"v": 1}},
                                        upsert=True, return_document=ReturnDocument.AFTER)
        assert made == {"_id": 9, "acct": "zz", "v": 1}
        raw = client.shardshift.command({"findAndModify": deployment.collection,
                                         "query": {"acct": "yy", "_id": 10},
                                         "update": {"$set": {"v": 1}}, "upsert": True})
        assert raw["lastErrorObject"] == {"n": 1, "updatedExisting": False, "upserted": 10}
        assert raw["value"] is None
        raw = client.shardshift.command({"findAndModify": deployment.collection,
                                         "query": {"acct": "yy", "_id": 10},
                                         "update": {"$set": {"v": 1}}})
        assert raw["lastErrorObject"] == {"n": 1, "updatedExisting": True}
        for bad, code in [({"remove": True, "update": {"$set": {"v": 1}}}, 9),
                          ({}, 9), ({"remove": True, "new": True}, 9),
                          ({"update": {"$set": {"_id": 5}}}, 66),
                          ({"update": {"$pull": {"a": 1}}}, 9)]:
            with pytest.raises(OperationFailure) as err:
                client.shardshift.command({"findAndModify": deployment.collection,
                                           "query": {"acct": "yy", "_id": 10}, **bad})
            assert err.value.code == code, bad
        assert coll.find_one({"acct": "yy", "_id": 10}) == {"_id": 10, "acct": "yy", "v": 1}


# -- async driver, and a write whose outcome is unknown -------------------------------------


async def test_async_driver_writes(mongo: MongoFront, deployment: Deployment) -> None:
    client: pymongo.AsyncMongoClient[dict[str, Any]] = pymongo.AsyncMongoClient(
        mongo.uri(), tz_aware=True, serverSelectionTimeoutMS=5000)
    try:
        coll = client.shardshift[deployment.collection]
        await coll.insert_many([rich(k) for k in ("as1", "as2", "as3")])
        res = await coll.update_many({"email": "as1@example.com"}, {"$inc": {"big": 1}})
        assert res.modified_count == 1
        doc = await coll.find_one_and_update({"email": "as2@example.com"},
                                             {"$set": {"v": Int64(3)}},
                                             return_document=ReturnDocument.AFTER)
        assert doc["v"] == 3 and isinstance(doc["v"], Int64)
        assert (await coll.delete_many({"email": "as3@example.com"})).deleted_count == 1
    finally:
        await client.close()


async def test_a_write_whose_outcome_is_unknown_is_reported_and_not_repeated(
        deployment: Deployment, catalog_reader_dsn: str, proxies: Any) -> None:
    """The shard commits an insert, the connection breaks before its reply: the client is
    told the outcome is unknown (labelled), and the router does not insert again."""
    c = deployment.collection
    key = next(f"lost{i}" for i in range(1000)
               if deployment.initial.locate(khash(f"lost{i}")).shard_id == next(
                   iter(deployment.shards)))
    sid = deployment.initial.locate(khash(key)).shard_id
    real = deployment.shards[sid].dsn
    proxy: TcpProxy = await proxies(real)
    await deployment.catalog.register_shard(sid, proxy.dsn(real), engine="postgres",
                                            major_version=18)
    with mongo_front(catalog_reader_dsn, router_settings(pool_max_size=1)) as front:
        client: pymongo.AsyncMongoClient[dict[str, Any]] = pymongo.AsyncMongoClient(
            front.uri(), serverSelectionTimeoutMS=5000)
        try:
            coll = client.shardshift[c]
            await coll.insert_one({"_id": 0, "acct": key})  # the pooled connection is open
            proxy.hold_next_reply()
            first = asyncio.create_task(coll.insert_one({"_id": 1, "acct": key, "v": 1}))
            async with asyncio.timeout(10):
                await proxy.reply_held.wait()  # committed; the reply is held
            proxy.cut()
            with pytest.raises(WriteError) as err:
                await first
            assert OUTCOME_UNKNOWN_LABEL in err.value.details["errorLabels"]
            assert err.value.code == 6
            found = await coll.find_one({"acct": key, "_id": 1})
            assert found == {"_id": 1, "acct": key, "v": 1}
        finally:
            await client.close()
