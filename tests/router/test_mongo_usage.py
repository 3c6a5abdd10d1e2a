"""The MongoDB front end as applications and tools use it: cursor ids typed as drivers
require, the start-up commands of shells and tools (getParameter, getLog, getCmdLineOpts,
listDatabases) answered as a MongoDB router does, pymongo's async client, and how the load
generator's MongoDB path classifies a driver's errors."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.errors import AutoReconnect, DuplicateKeyError, OperationFailure, WriteError

from router.mongo.errors_map import OUTCOME_UNKNOWN_LABEL
from tests.router.conftest import Deployment
from tests.router.mongo_front import MongoFront
from workload.stores import MongoStore, mongo_uri


def test_cursor_ids_are_int64(mongo: MongoFront, deployment: Deployment) -> None:
    """The Node.js driver (and so mongosh) treats an int32 cursor id as missing."""
    with mongo.client() as client:
        reply = client.shardshift.command({"find": deployment.collection,
                                           "filter": {"acct": "nobody", "_id": 1}})
        assert type(reply["cursor"]["id"]) is Int64 and reply["cursor"]["id"] == 0
        other = client.other_db.command({"find": "anything"})
        assert type(other["cursor"]["id"]) is Int64


def test_startup_commands_answer_as_a_router(mongo: MongoFront) -> None:
    with mongo.client() as client:
        admin = client.admin
        fcv = admin.command({"getParameter": 1, "featureCompatibilityVersion": 1})
        assert fcv["featureCompatibilityVersion"] == {"version": "7.0"}
        assert "authenticationMechanisms" in admin.command({"getParameter": "*"})
        with pytest.raises(OperationFailure) as err:
            admin.command({"getParameter": 1, "noSuchParameter": 1})
        assert err.value.code == 72  # InvalidOptions: "no option found to get"
        with pytest.raises(OperationFailure) as err:
            client.shardshift.command({"getParameter": 1, "featureCompatibilityVersion": 1})
        assert err.value.code == 13
        assert admin.command({"getLog": "startupWarnings"})["log"] == []
        assert admin.command({"getLog": "*"})["names"] == ["global", "startupWarnings"]
        with pytest.raises(OperationFailure):
            admin.command({"getLog": "nope\x00" + "x" * 5000})
        assert admin.command("getCmdLineOpts")["argv"][0] == "shardshift"
        assert client.list_database_names() == ["shardshift"]
        with pytest.raises(OperationFailure) as err:
            admin.command("atlasVersion")  # not Atlas: MongoDB's own answer
        assert err.value.code == 59


async def test_async_client_keeps_bson_types(mongo: MongoFront, deployment: Deployment) -> None:
    store = MongoStore(mongo_uri("127.0.0.1", mongo.port))
    doc: dict[str, Any] = {"_id": ObjectId(), "acct": "async-1", "d": Decimal128("0.10"),
                           "n": Int64(-(2**50)), "at": dt.datetime(2026, 2, 3, tzinfo=dt.UTC),
                           "nested": {"list": [1, "two", {"three": [3.0]}]}}
    try:
        await store.insert(deployment.collection, doc)
        with pytest.raises(DuplicateKeyError) as dup:
            await store.insert(deployment.collection, doc)
        assert not store.outcome_unknown(dup.value)  # a certain failure: nothing to resolve
        assert await store.get(deployment.collection, "async-1", doc["_id"]) == doc
        assert await store.patch(deployment.collection, "async-1", doc["_id"],
                                 {"$inc": {"d": Decimal128("0.05")}})
        got = await store.get(deployment.collection, "async-1", doc["_id"])
        assert got is not None and got["d"] == Decimal128("0.15")
        assert await store.replace(deployment.collection, "async-1",
                                   {"_id": doc["_id"], "acct": "async-1", "v": 2})
        assert await store.delete(deployment.collection, "async-1", doc["_id"])
        assert await store.get(deployment.collection, "async-1", doc["_id"]) is None
        assert not await store.delete(deployment.collection, "async-1", doc["_id"])
    finally:
        await store.close()


def test_the_mongo_path_knows_an_unknown_outcome() -> None:
    """A write error labelled ShardshiftOutcomeUnknown, or a lost connection, may have been
    applied: the generator reads the document back. Any other error was not applied."""
    store = MongoStore.__new__(MongoStore)
    labelled = WriteError("shard connection lost", 6,
                          {"code": 6, "errmsg": "x", "errorLabels": [OUTCOME_UNKNOWN_LABEL]})
    assert store.outcome_unknown(labelled)
    assert store.outcome_unknown(AutoReconnect("connection closed"))
    assert not store.outcome_unknown(WriteError("bad", 2, {"code": 2, "errmsg": "bad"}))
    assert not store.outcome_unknown(ValueError("not a driver error"))
