"""Documents, patches and filters against a real PostgreSQL shard: hostile input gets a clear
error (``InvalidDocumentError`` / ``InvalidNameError``, both ``ValueError``) and leaves the
stored documents exactly as they were; valid input does what it says."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import psycopg
from bson import Decimal128, Int64, ObjectId, json_util
from hypothesis import example, given
from hypothesis import strategies as st

from router.hashing import khash
from shards.codec import JSON_OPTIONS, canonical_text, decode_document
from shards.errors import InvalidDocumentError, InvalidNameError
from shards.models import FenceRef
from tests.properties.conftest import DB, FULL, SyncShard, field_paths, hostile_text, hostile_values

REF = FenceRef(chunk_id=1, token=1)
CLEAR = (InvalidDocumentError, InvalidNameError)
BASE = {"_id": "doc-1", "acct": "a-1", "email": "x@example.com", "n": 1, "nested": {"k": 2}}
H = khash("a-1")

paths = st.one_of(field_paths, hostile_text, st.sampled_from(
    ["_id", "acct", "nested", "nested.k", "nested.k.deeper", "n", "$where", "a..b", "_id.x"]))
operators = st.one_of(st.sampled_from(["$set", "$unset", "$inc"]), hostile_text,
                      st.sampled_from(["$rename", "$push", "set", "$SET", ""]))
patch_values = st.one_of(hostile_values, st.integers(min_value=-(2**64), max_value=2**64),
                         st.sampled_from([Int64(2**63 - 1), Decimal128("NaN"), Decimal128("1e6144"),
                                          {"$oid": "zz"}, {"$numberInt": "1"}, {"a\x00": 1}]))
patches = st.one_of(
    st.dictionaries(operators, st.dictionaries(paths, patch_values, max_size=3), max_size=3),
    hostile_values,
)


def _stored(s: SyncShard) -> list[dict[str, Any]]:
    return s(s.shard.scan(s.collection, FULL))


def _ensure_base(s: SyncShard) -> None:
    if s(s.shard.get(s.collection, REF, H, "doc-1")) is None:
        s(s.shard.insert(s.collection, REF, H, BASE))


@DB
@given(patches)
@example({"$set": {"s": "a\x00b"}})
@example({"$set": {"x": {"$oid": "zz"}}})
@example({"$inc": {"n": 2**64}})
@example({"$inc": {"n": Int64(2**63 - 1)}})
@example({"$set": {"nested.k.deeper": 1}})
@example({"$inc": {"nested": 1}})
def test_patches_apply_or_change_nothing(sync_shard: SyncShard, patch: Any) -> None:
    """Found: ``$set`` of a string holding NUL failed inside PostgreSQL with a driver error
    (``UntranslatableCharacter``), and ``$set`` of ``{"$oid": "zz"}`` stored a document that
    could no longer be read."""
    s = sync_shard
    _ensure_base(s)
    before = _stored(s)
    try:
        after = s(s.shard.patch(s.collection, REF, H, "doc-1", patch, ("_id", "acct")))
    except CLEAR as exc:
        assert str(exc)
        assert _stored(s) == before
        return
    except psycopg.Error as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"a driver error reached the caller: {exc!r}") from exc
    assert after is not None
    assert _stored(s) == [after]
    assert after["_id"] == "doc-1" and after["acct"] == "a-1"
    s(s.shard.replace(s.collection, REF, H, BASE))  # the next example starts from BASE


documents = st.dictionaries(st.one_of(hostile_text, st.sampled_from(["$oid", "$numberInt", "a.b"])),
                            hostile_values, max_size=4)


@DB
@given(documents, st.one_of(hostile_text, st.integers(), st.floats()))
@example({"s": "\x00"}, "id")
@example({"k": "x"}, "\x00")
@example({"\ud800": 1}, "id")
def test_inserts_store_exactly_or_change_nothing(sync_shard: SyncShard, extra: dict[Any, Any],
                                                 _id: Any) -> None:
    s = sync_shard
    doc = {**extra, "_id": _id, "acct": "a-1"}
    before = s(s.shard.count(s.collection))
    try:
        s(s.shard.insert(s.collection, REF, H, doc))
    except CLEAR as exc:
        assert str(exc)
        assert s(s.shard.count(s.collection)) == before
        return
    except psycopg.Error as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"a driver error reached the caller: {exc!r}") from exc
    try:
        got = s(s.shard.get(s.collection, REF, H, _id))
        assert got is not None
        assert got.keys() == doc.keys()
        assert s(s.shard.delete(s.collection, REF, H, _id))
    finally:
        s(s.shard.delete(s.collection, REF, H, _id))


@DB
@given(st.one_of(paths, hostile_values), st.one_of(hostile_values, st.just("x@example.com")))
def test_filters_answer_or_refuse(sync_shard: SyncShard, path: Any, value: Any) -> None:
    """A find on any path with any value is an answer (possibly empty) or a clear error;
    hostile text in a path never reaches SQL (the property: never a driver error)."""
    s = sync_shard
    _ensure_base(s)
    for find in (lambda: s.shard.find_by_field(s.collection, [REF], path, value),
                 lambda: s.shard.find_by_shard_key(s.collection, REF, H, path, value)):
        try:
            docs = s(find())
        except CLEAR as exc:
            assert str(exc)
            continue
        except psycopg.Error as exc:  # pragma: no cover - the property's failure
            raise AssertionError(f"a driver error reached the caller: {exc!r}") from exc
        assert all(d["_id"] == "doc-1" for d in docs)
        if path == "email" and value == "x@example.com":
            assert [d["_id"] for d in docs] == ["doc-1"]


typed_values = st.one_of(
    hostile_values,
    st.builds(Int64, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.decimals(min_value=-(10**20), max_value=10**20, allow_nan=False, allow_infinity=False).map(
        lambda d: Decimal128(str(d)) if len(d.as_tuple().digits) <= 34 else Decimal128("1E-7")),
    st.datetimes(timezones=st.just(UTC)).map(lambda t: t.replace(microsecond=t.microsecond
                                                                 // 1000 * 1000)),
    st.builds(ObjectId, st.binary(min_size=12, max_size=12)),
    st.uuids(),
)
increments = st.dictionaries(st.sampled_from(["d", "m", "i"]), st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**31), 2**31),
    st.decimals(allow_nan=False, allow_infinity=False, places=7).map(lambda d: Decimal128(str(d)))),
    max_size=3)


@DB
@given(st.dictionaries(st.one_of(hostile_text, st.sampled_from(["d", "m", "i"])),
                       st.one_of(typed_values, st.lists(typed_values, max_size=3),
                                 st.dictionaries(st.text(max_size=3), typed_values, max_size=3)),
                       max_size=5),
       increments)
@example({"d": 1.5}, {"d": 1.5})                                      # stored as "3"
@example({"m": Decimal128("0.00000005")}, {"m": Decimal128("0.00000005")})  # "0.00000010"
@example({"s": "b\u00fcro \U0001f600", "n": Int64(5)}, {})
def test_stored_text_reads_as_the_document(sync_shard: SyncShard, extra: dict[Any, Any],
                                           inc: dict[str, Any]) -> None:
    """``canonical_text`` of what a get reads (the HTTP service's answer) is the canonical
    Extended JSON of the document, value for value, whatever ``$inc`` computed in the shard;
    it is the stored text itself unless a double or a decimal is in it."""
    s = sync_shard
    doc = {**extra, "_id": "t-1", "acct": "a-1"}
    try:
        s(s.shard.insert(s.collection, REF, H, doc))
    except CLEAR:
        return
    try:
        if inc:
            try:
                s(s.shard.patch(s.collection, REF, H, "t-1", {"$inc": inc}))
            except CLEAR:
                pass  # $inc of a non-number, an overflow: the document stays as it was
        stored = s(s.shard.get_text(s.collection, REF, H, "t-1"))
        assert stored is not None
        try:
            decoded = decode_document(stored)
        except CLEAR:
            return  # a value the decoder refuses (a decimal past 34 digits) is refused alike
        text = canonical_text(stored)
        assert json.loads(text) == json.loads(json_util.dumps(decoded, json_options=JSON_OPTIONS))
        assert json_util.dumps(json_util.loads(text, json_options=JSON_OPTIONS),
                               json_options=JSON_OPTIONS) == json_util.dumps(
                                   decoded, json_options=JSON_OPTIONS)  # NaN != NaN: as text
        if '"$numberDouble"' not in stored and '"$numberDecimal"' not in stored:
            assert text is stored
    finally:
        s(s.shard.delete(s.collection, REF, H, "t-1"))
