"""Numeric shard keys: every BSON number type holding one value hashes alike (``khash``), so a
filter pinning a numeric shard key and ``_id`` reads one chunk with one fenced statement and
finds, updates and deletes the documents stored with each numeric form, as MongoDB does."""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Any

import bson
import pytest
from bson import Decimal128, Int64
from pymongo.errors import WriteError

from router.hashing import khash
from tests.router.conftest import Deployment
from tests.router.mongo_front import MongoFront

# khash of Python ints and strings as defined before numbers were normalized: every stored
# document's place depends on them, so they may never change.
PINNED = {
    0: 5402404698030259028,
    1: -16363267498456235,
    -1: 8330298648759045749,
    5: -1155148307276820460,
    2**31 - 1: 2784678489652430886,
    2**31: -2197598139718058913,
    -(2**31) - 1: -8203029261730970226,
    2**63 - 1: 2796919881196518954,
    -(2**63): 8272922478863431671,
    "acct-1": -8262028761714211036,
    "a-1": -3296792287290447453,
}


def _bson_hash(v: Any) -> int:
    """The definition before numbers were normalized: the value's own BSON encoding."""
    return int.from_bytes(blake2b(bson.encode({"": v}), digest_size=8).digest(), "big",
                          signed=True)


def test_python_ints_and_strings_hash_as_they_always_did() -> None:
    for v, h in PINNED.items():
        assert khash(v) == h, v
    for v in [*range(-70_000, 70_000, 997), -(2**31), 2**40, -(2**50) + 3, "", "k5", "é"]:
        assert khash(v) == _bson_hash(v), v


@pytest.mark.parametrize("forms", [
    [5, Int64(5), 5.0, Decimal128("5"), Decimal128("5.000"), Decimal128("0.5E1")],
    [0, Int64(0), 0.0, -0.0, Decimal128("0"), Decimal128("-0"), Decimal128("0E-10")],
    [2**40, Int64(2**40), float(2**40), Decimal128(str(2**40))],
    [-(2**63), Int64(-(2**63)), -float(2**63), Decimal128(str(-(2**63)))],
    [2.5, Decimal128("2.5"), Decimal128("2.50")],
    [2.0**63, Decimal128("9223372036854775808")],  # integral, outside int64: as the double
    [Decimal128("0.1"), Decimal128("0.10")],  # not a double: the normalized Decimal128
    [math.nan, -math.nan, Decimal128("NaN"), Decimal128("-NaN"), Decimal128("sNaN")],
    [math.inf, Decimal128("Infinity")],
    [-math.inf, Decimal128("-Infinity")],
])
def test_every_form_of_one_number_hashes_alike(forms: list[Any]) -> None:
    assert len({khash(v) for v in forms}) == 1, forms


def test_distinct_values_and_non_numbers_stay_apart() -> None:
    assert khash(0.1) != khash(Decimal128("0.1"))  # two values: 0.1 is no double
    assert khash(True) != khash(1) and khash(False) != khash(0)  # booleans are no numbers
    assert khash("5") != khash(5)
    assert khash(Int64(2**31)) == PINNED[2**31] and khash(7.0) == khash(7)
    assert len({khash(v) for v in (1, 2, 2.5, 3, Decimal128("3.5"), math.inf, math.nan)}) == 7


FORMS: list[Any] = [7, Int64(7), 7.0, Decimal128("7")]


def num(x: Any) -> Any:
    """A stored number as a Python value (Decimal128 has no numeric equality of its own)."""
    return x.to_decimal() if isinstance(x, Decimal128) else x


def _statements(mongo: MongoFront) -> dict[str, int]:
    assert mongo.router is not None
    return dict(mongo.router.statements)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def test_each_numeric_form_is_found_updated_and_deleted_with_one_read(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        # One document per form, its shard key and _id both in that form: four documents
        # MongoDB's equality on 7 selects together.
        coll.insert_many([{"_id": f, "acct": f, "form": i} for i, f in enumerate(FORMS)])
        others = [{"_id": 8, "acct": 7, "form": 9}, {"_id": 7, "acct": 8, "form": 10}]
        coll.insert_many(others)

        # Every document lives on the chunk the normalized hash names.
        chunk = deployment.initial.locate(khash(7))
        stored = mongo.run(deployment.shards[chunk.shard_id].scan(deployment.collection,
                                                                  chunk.range))
        assert sorted(d["form"] for d in stored if num(d["acct"]) == 7 and num(d["_id"]) == 7) == [
            0, 1, 2, 3]
        assert {type(d["acct"]) for d in stored if d["form"] < 4} == {
            int, Int64, float, Decimal128}  # each stored as the client sent it

        for key, _id in [(7, 7), (Int64(7), 7.0), (Decimal128("7.00"), Decimal128("7"))]:
            before = _statements(mongo)
            got = list(coll.find({"acct": key, "_id": _id}))
            assert sorted(d["form"] for d in got) == [0, 1, 2, 3], (key, _id)
            assert _delta(before, _statements(mongo)) == {"get": 1}, (key, _id)

        before = _statements(mongo)
        assert coll.find_one({"acct": 7.0, "_id": Int64(7), "form": 2})["_id"] == 7.0
        assert _delta(before, _statements(mongo)) == {"get": 1}

        before = _statements(mongo)
        res = coll.update_many({"acct": 7, "_id": 7.0}, {"$inc": {"n": 1}})
        assert (res.matched_count, res.modified_count) == (4, 4)
        assert _delta(before, _statements(mongo)) == {"get": 1, "patch": 4}
        assert sorted((d["form"], d["n"]) for d in coll.find({"acct": 7, "_id": 7})) == [
            (0, 1), (1, 1), (2, 1), (3, 1)]

        before = _statements(mongo)
        res = coll.delete_many({"acct": Decimal128("7"), "_id": Int64(7)})
        assert res.deleted_count == 4
        assert _delta(before, _statements(mongo)) == {"get": 1, "delete": 4}
        assert list(coll.find({"acct": 7, "_id": 7})) == []
        # The documents that only share the key or only the _id are untouched.
        assert sorted(d["form"] for d in coll.find({"form": {"$gte": 9}})) == [9, 10]


def test_an_upsert_stores_the_form_sent_on_the_chunk_its_normalized_hash_names(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        res = coll.update_one({"acct": Int64(2**40), "_id": 9.5}, {"$set": {"x": 1}},
                              upsert=True)
        assert res.upserted_id == 9.5
        res = coll.replace_one({"_id": 3}, {"acct": Decimal128("12"), "y": 2}, upsert=True)
        assert res.upserted_id == 3
        for key, _id in [(2**40, 9.5), (12, 3)]:
            chunk = deployment.initial.locate(khash(key))
            stored = mongo.run(deployment.shards[chunk.shard_id].scan(deployment.collection,
                                                                      chunk.range))
            assert [d["_id"] for d in stored if num(d["acct"]) == key] == [_id], key
        assert [type(d["acct"]) for d in coll.find({"acct": 2**40})] == [Int64]
        before = _statements(mongo)
        assert coll.find_one({"acct": 12.0, "_id": Int64(3)}) == {
            "_id": 3, "acct": Decimal128("12"), "y": 2}
        assert _delta(before, _statements(mongo)) == {"get": 1}


def test_a_replacement_pinned_by_shard_key_and_id_is_one_statement(
        mongo: MongoFront, deployment: Deployment) -> None:
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        coll.insert_many([{"_id": "a", "acct": "x", "v": 1, "nested": {"p": 1, "q": 2}},
                          {"_id": Int64(7), "acct": 7, "v": 1}])

        before = _statements(mongo)
        res = coll.replace_one({"acct": "x", "_id": "a"}, {"acct": "x", "v": 2,
                                                           "nested": {"p": 1, "q": 2}})
        assert (res.matched_count, res.modified_count) == (1, 1)
        assert _delta(before, _statements(mongo)) == {"replace": 1}  # no read first
        assert coll.find_one({"acct": "x", "_id": "a"}) == {
            "_id": "a", "acct": "x", "v": 2, "nested": {"p": 1, "q": 2}}

        # The same document again (fields in another order): matched, not modified.
        before = _statements(mongo)
        res = coll.replace_one({"_id": "a", "acct": "x"}, {"nested": {"q": 2, "p": 1},
                                                           "v": 2, "acct": "x", "_id": "a"})
        assert (res.matched_count, res.modified_count) == (1, 0)
        assert _delta(before, _statements(mongo)) == {"replace": 1}

        # Nothing there: matched nothing, nothing written, no document made.
        res = coll.replace_one({"acct": "x", "_id": "nope"}, {"acct": "x", "v": 9})
        assert (res.matched_count, res.modified_count) == (0, 0)
        assert coll.count_documents({"acct": "x"}) == 1

        # Stored with another numeric form of the _id: found by the general path, which
        # keeps the stored _id.
        res = coll.replace_one({"acct": 7, "_id": 7}, {"acct": 7, "v": 3})
        assert (res.matched_count, res.modified_count) == (1, 1)
        got = coll.find_one({"acct": 7, "_id": 7})
        assert got == {"_id": 7, "acct": 7, "v": 3} and isinstance(got["_id"], Int64)

        # What MongoDB refuses is refused as before, nothing written.
        for q, doc in [({"acct": "x", "_id": "a"}, {"acct": "y", "v": 5}),
                       ({"acct": "x", "_id": "a"}, {"_id": "b", "acct": "x"})]:
            with pytest.raises(WriteError) as err:
                coll.replace_one(q, doc)
            assert err.value.code == 66
        assert coll.find_one({"acct": "x", "_id": "a"})["v"] == 2
