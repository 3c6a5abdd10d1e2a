"""The MongoDB query engine as pure logic: comparison order across BSON types, filter
semantics, projection, sort, and where a filter sends a scan (no servers needed)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId, Regex
from bson.max_key import MaxKey
from bson.min_key import MinKey

from router.mongo.errors import MongoError
from router.mongo.ordering import compare, numeric_variants
from router.mongo.query import matches, parse_filter, pinned, plan
from router.mongo.shape import parse_projection, parse_sort, sort_key_fn
from router.routes import ChunkRoute, CollectionRoute
from shards.models import KHASH_END, KHASH_MIN, IndexDefinition, KeyRange

AT = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
OID = ObjectId("65a000000000000000000001")

DOC: dict[str, Any] = {
    "_id": 1, "a": 5, "s": "x", "arr": [1, 7, {"b": 3}], "n": {"x": {"y": Int64(2)}},
    "dec": Decimal128("5.0"), "at": AT, "nul": None, "oid": OID, "flag": True,
    "tags": ["red", "blue"], "empty": [], "dbl": 2.5,
}


@pytest.mark.parametrize(("flt", "expected"), [
    ({"a": 5}, True), ({"a": 5.0}, True), ({"a": Int64(5)}, True),
    ({"a": Decimal128("5")}, True), ({"dec": 5}, True), ({"a": "5"}, False),
    ({"a": {"$eq": 5}}, True), ({"a": {"$ne": 5}}, False), ({"zz": {"$ne": 5}}, True),
    ({"a": {"$gt": 4}}, True), ({"a": {"$gt": 5}}, False), ({"a": {"$gte": 5}}, True),
    ({"a": {"$lt": 5.5}}, True), ({"a": {"$lte": Decimal128("4.9")}}, False),
    ({"s": {"$gt": 4}}, False), ({"a": {"$lt": "z"}}, False), ({"s": {"$gt": "a"}}, True),
    ({"dbl": {"$gt": Int64(2), "$lt": Decimal128("2.6")}}, True),
    ({"at": {"$gt": AT - dt.timedelta(seconds=1)}}, True), ({"at": {"$gt": 0}}, False),
    ({"oid": {"$gte": OID}}, True), ({"flag": {"$gt": False}}, True),
    ({"arr": 7}, True), ({"arr": [1, 7, {"b": 3}]}, True), ({"arr": [7, 1]}, False),
    ({"arr.b": 3}, True), ({"arr.1": 7}, True), ({"arr": {"$gt": 6}}, True),
    ({"arr": {"$gt": 7}}, False), ({"n.x.y": 2}, True), ({"n": {"x": {"y": Int64(2)}}}, True),
    ({"n.x": {"y": 3}}, False),
    ({"zz": None}, True), ({"nul": None}, True), ({"a": None}, False),
    ({"nul": {"$exists": True}}, True), ({"zz": {"$exists": False}}, True),
    ({"n.x.y": {"$exists": True}}, True), ({"n.x.q": {"$exists": True}}, False),
    ({"a": {"$in": [1, 5]}}, True), ({"a": {"$in": []}}, False), ({"zz": {"$in": [None]}}, True),
    ({"a": {"$nin": [1, 5]}}, False), ({"tags": {"$in": ["blue"]}}, True),
    ({"tags": {"$nin": ["green"]}}, True), ({"s": {"$in": [Regex("^x$")]}}, True),
    ({"$and": [{"a": 5}, {"s": "x"}]}, True), ({"$and": [{"a": 5}, {"s": "y"}]}, False),
    ({"$or": [{"a": 1}, {"s": "x"}]}, True), ({"$or": [{"a": 1}, {"s": "y"}]}, False),
    ({"$nor": [{"a": 1}, {"s": "y"}]}, True), ({"a": {"$not": {"$gt": 4}}}, False),
    ({"zz": {"$not": {"$gt": 4}}}, True), ({"a": {"$type": "int"}}, True),
    ({"a": {"$type": "number"}}, True), ({"dec": {"$type": 19}}, True),
    ({"tags": {"$type": "array"}}, True), ({"tags": {"$size": 2}}, True),
    ({"empty": {"$size": 0}}, True), ({"tags": {"$all": ["blue", "red"]}}, True),
    ({"tags": {"$all": ["blue", "green"]}}, False), ({"arr": {"$elemMatch": {"b": 3}}}, True),
    ({"arr": {"$elemMatch": {"$gt": 5, "$lt": 8}}}, True),
    ({"arr": {"$elemMatch": {"$gt": 7}}}, False), ({"s": {"$regex": "^X", "$options": "i"}}, True),
    ({"s": Regex("^y")}, False), ({"a": {"$mod": [2, 1]}}, True), ({"$comment": "hi"}, True),
])
def test_filter_semantics(flt: dict[str, Any], expected: bool) -> None:
    assert matches(DOC, parse_filter(flt)) is expected


@pytest.mark.parametrize(("flt", "code"), [
    ({"$foo": 1}, 2), ({"a": {"$foo": 1}}, 2), ({"a": {"$in": 1}}, 2),
    ({"a": {"$gt": 1, "b": 2}}, 2), ({"a\x00": 1}, 2), ({"a..b": 1}, 2), ({"a.$b": 1}, 2),
    ({"$and": []}, 2), ({"$or": [1]}, 2), ({"x" * 2000: 1}, 2), ({"a": {"$size": -1}}, 2),
    ({"a": {"$regex": "("}}, 2), ({"a": {"$type": "nope"}}, 2), ({"a": {"$mod": [0, 1]}}, 2),
    ({"$where": "1"}, 238), ({"a": {"$near": [0, 0]}}, 238), ("not a filter", 14),
])
def test_bad_filters_get_mongodb_errors(flt: Any, code: int) -> None:
    with pytest.raises(MongoError) as err:
        parse_filter(flt)
    assert err.value.code == code


def test_deep_nesting_is_refused_past_mongodb_limit() -> None:
    ok: dict[str, Any] = {"a": 1}
    for _ in range(50):
        ok = {"$and": [ok]}
    assert matches({"a": 1}, parse_filter(ok))
    deep: dict[str, Any] = {"a": 1}
    for _ in range(150):
        deep = {"$and": [deep]}
    with pytest.raises(MongoError) as err:
        parse_filter(deep)
    assert err.value.code == 2 and "depth" in err.value.message


def test_comparison_order_across_types() -> None:
    ordered = [MinKey(), None, math.nan, -1, Int64(2), 2.5, Decimal128("3"), "", "a", {"a": 1},
               [1], b"\x01", OID, False, True, AT, Regex("x"), MaxKey()]
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        assert compare(lo, hi) < 0, (lo, hi)
        assert compare(hi, lo) > 0, (lo, hi)
    assert compare(5, Decimal128("5.00")) == 0 and compare(Int64(5), 5.0) == 0


def test_numeric_variants_cover_every_number_type_holding_the_value() -> None:
    kinds = {type(v).__name__ for v in numeric_variants(5)}
    assert kinds == {"int", "Int64", "float", "Decimal128"}
    assert {type(v).__name__ for v in numeric_variants(2.5)} == {"float", "Decimal128"}
    assert numeric_variants(2**40)[1:] and all(v == 2**40 or isinstance(v, Decimal128)
                                              for v in numeric_variants(2**40))
    assert numeric_variants("5") == ["5"]


def test_projection_and_sort() -> None:
    doc = {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "arr": [{"x": 1, "y": 2}, 5]}
    proj = parse_projection({"b.c": 1, "arr.x": 1})
    assert proj is not None and proj.apply(doc) == {"_id": 1, "b": {"c": 2}, "arr": [{"x": 1}]}
    proj = parse_projection({"b.d": 0, "_id": 0})
    assert proj is not None and proj.apply(doc) == {"a": 1, "b": {"c": 2},
                                                    "arr": [{"x": 1, "y": 2}, 5]}
    proj = parse_projection({"a": 1, "_id": 0})
    assert proj is not None and proj.apply(doc) == {"a": 1}
    for bad, code in (({"a": 1, "b": 0}, 31254), ({"a": 0, "b": 1}, 31253),
                      ({"a": 1, "a.b": 1}, 31249), ({"a": {"$slice": 1}}, 238),
                      ({"a.$": 1}, 238), ({"$x": 1}, 2)):
        with pytest.raises(MongoError) as err:
            parse_projection(bad)
        assert err.value.code == code, bad
    docs = [{"k": "b", "n": 1}, {"k": 2, "n": 2}, {"n": 3}, {"k": [0, 9], "n": 4},
            {"k": 2, "n": 0}]
    asc = sorted(docs, key=sort_key_fn(parse_sort({"k": 1, "n": -1})))
    assert [d["n"] for d in asc] == [3, 4, 2, 0, 1]
    desc = sorted(docs, key=sort_key_fn(parse_sort({"k": -1})))
    assert [d["n"] for d in desc] == [1, 4, 2, 0, 3]
    with pytest.raises(MongoError) as err:
        parse_sort({"k": 2})
    assert err.value.code == 15975


def _route() -> CollectionRoute:
    mid = 0
    return CollectionRoute(
        collection="c", shard_key="acct",
        indexes=(IndexDefinition(name="by_email", fields=("email",)),),
        chunks=(ChunkRoute(chunk_id=1, range=KeyRange(lo=KHASH_MIN, hi=mid), shard_id="s0",
                           token=1),
                ChunkRoute(chunk_id=2, range=KeyRange(lo=mid, hi=KHASH_END), shard_id="s1",
                           token=1)))


def test_plan_targets_the_shard_key_and_pushes_down_id_and_indexed_fields() -> None:
    route = _route()
    p = plan(route, parse_filter({"acct": {"$in": ["a", "b"]}, "x": {"$gt": 1}}))
    assert p.key_values == ["a", "b"]
    p = plan(route, parse_filter({"$and": [{"acct": 7}, {"_id": OID}]}))
    # Every numeric form of 7 hashes alike: one shard key value to hash, not four forms.
    assert p.key_values == [7] and p.ids == [OID]
    assert plan(route, parse_filter({"_id": {"$in": [OID]}})).ids == [OID]
    p = plan(route, parse_filter({"email": "e@x"}))
    assert p.field == "email" and p.values == ["e@x"]
    assert plan(route, parse_filter({"$or": [{"acct": "a"}, {"acct": "b"}]})).describe() == \
        "scatter, full scan"
    assert plan(route, parse_filter({"acct": None})).key_values is None
    assert pinned(route, parse_filter({"acct": "a", "_id": OID})) == ("a", OID)
    assert pinned(route, parse_filter({"acct": 1, "_id": OID})) is None  # 1 == Int64(1)
