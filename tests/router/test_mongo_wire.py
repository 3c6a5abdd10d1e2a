"""The MongoDB front end with the real pymongo driver: handshake, authentication, CRUD."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.errors import DuplicateKeyError, OperationFailure

from tests.router.conftest import Deployment
from tests.router.mongo_front import MongoFront


def test_handshake_answers_as_a_sharded_router(mongo: MongoFront) -> None:
    with mongo.client() as client:
        hello = client.admin.command("hello")
        assert hello["msg"] == "isdbgrid"
        assert hello["isWritablePrimary"] is True
        assert client.admin.command("ping")["ok"] == 1.0
        assert client.admin.command("buildInfo")["version"].startswith("7.")


def test_wrong_password_is_refused_and_unauthenticated_commands_are_limited(
        mongo: MongoFront, deployment: Deployment) -> None:
    bad = pymongo.MongoClient(mongo.uri(password="wrong"), serverSelectionTimeoutMS=3000)
    with bad, pytest.raises(OperationFailure) as err:
        bad.admin.command("ping")
    assert err.value.code == 18
    anon = pymongo.MongoClient(f"mongodb://127.0.0.1:{mongo.port}/",
                               serverSelectionTimeoutMS=3000)
    with anon:
        assert anon.admin.command("hello")["msg"] == "isdbgrid"
        with pytest.raises(OperationFailure) as err:
            anon.shardshift[deployment.collection].insert_one({"acct": "a", "_id": 1})
        assert err.value.code == 13


def test_insert_find_update_delete_keep_bson_types(mongo: MongoFront,
                                                  deployment: Deployment) -> None:
    doc: dict[str, Any] = {
        "_id": ObjectId(), "acct": "acct-1", "email": "a@example.com",
        "amount": Decimal128(Decimal("10.25")), "big": Int64(2**40),
        "at": dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC),
        "nested": {"tags": ["x", {"y": 1}]},
    }
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_one(doc)
        with pytest.raises(DuplicateKeyError):
            coll.insert_one(doc)
        got = coll.find_one({"acct": "acct-1", "_id": doc["_id"]})
        assert got == doc and isinstance(got["big"], Int64)
        assert [d["_id"] for d in coll.find({"email": "a@example.com"})] == [doc["_id"]]
        res = coll.update_one({"acct": "acct-1", "_id": doc["_id"]},
                              {"$inc": {"amount": Decimal128("0.75")}})
        assert res.matched_count == 1
        assert coll.find_one({"acct": "acct-1", "_id": doc["_id"]})["amount"] == Decimal128("11.00")
        assert coll.delete_one({"acct": "acct-1", "_id": doc["_id"]}).deleted_count == 1
        assert coll.find_one({"acct": "acct-1", "_id": doc["_id"]}) is None
