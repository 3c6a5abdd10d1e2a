"""The Extended JSON codec: what it accepts reads back as the same BSON values; what it
cannot hold is refused with ``InvalidDocumentError`` (never a driver or JSON error)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId, json_util
from hypothesis import example, given
from hypothesis import strategies as st

from router.errors import BadRequestError
from router.http import from_ejson
from shards.codec import (
    JSON_OPTIONS,
    decode_document,
    decode_value,
    encode_document,
    encode_value,
)
from shards.errors import InvalidDocumentError
from tests.properties.conftest import PURE, hostile_text

_text = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
_keys = _text.filter(lambda k: not k.startswith("$"))

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(allow_nan=False),
    _text,
    st.binary(max_size=16),
    st.binary(min_size=12, max_size=12).map(ObjectId),
    st.decimals(allow_nan=False, allow_infinity=False, places=4,
                min_value=-(10**20), max_value=10**20).map(lambda d: Decimal128(str(d))),
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                 timezones=st.just(dt.UTC)).map(lambda t: t.replace(
                     microsecond=t.microsecond // 1000 * 1000)),
    st.uuids(),
    st.binary(max_size=8).map(lambda b: Binary(b, 0x80)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)
documents = st.dictionaries(_keys, values, max_size=6).map(lambda d: {"_id": 1, **d})


def _same(a: Any, b: Any) -> bool:
    """Equal as BSON values: the same types (an int64 is not an int32) and values."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, bytes) and not isinstance(a, Binary):
        return isinstance(b, bytes) and bytes(a) == bytes(b)
    if type(a) is int and not -(2**31) <= a < 2**31:
        return type(b) is Int64 and a == b  # BSON stores a wider Python int as an int64
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))) and \
            math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


@PURE
@given(documents)
def test_documents_round_trip(doc: dict[str, Any]) -> None:
    text = encode_document(doc)
    json.loads(text)  # plain JSON, as jsonb takes it
    assert "\\u0000" not in text.replace("\\\\", "")
    assert _same(doc, decode_document(text))


@PURE
@given(values)
def test_values_round_trip(value: Any) -> None:
    assert _same(value, decode_value(encode_value(value)))


@PURE
@given(values.filter(lambda v: not isinstance(v, dict)))
def test_a_stored_value_that_is_not_an_object_is_not_a_document(value: Any) -> None:
    with pytest.raises(InvalidDocumentError, match="not an object"):
        decode_document(encode_value(value))


@PURE
@given(st.dictionaries(st.one_of(hostile_text, st.integers(), st.none()),
                       st.one_of(hostile_text, st.integers(min_value=-(2**70), max_value=2**70)),
                       max_size=4))
@example({"x": {"$oid": "zz"}})
@example({"x": {"$numberInt": "5"}})
@example({"s": "a\x00b"})
@example({"a\x00": 1})
@example({"s": "\ud800"})
@example({"n": 2**64})
def test_hostile_documents_round_trip_or_are_refused(doc: dict[Any, Any]) -> None:
    """Found: a field named ``$oid`` or ``$numberInt`` was stored and read back as another
    value (or made the document unreadable); a NUL or a lone surrogate was encoded, then
    refused by PostgreSQL with a driver error; an integer wider than int64 was stored as a
    ``$numberLong`` BSON cannot hold."""
    doc = {"_id": 1, **doc}
    try:
        text = encode_document(doc)
    except InvalidDocumentError as exc:
        assert str(exc)
        return
    assert _same(doc, decode_document(text))


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    doc: dict[str, Any] = {"_id": 1}
    cur = doc
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    try:
        encode_document(doc)
    except InvalidDocumentError as exc:
        assert "nested" in str(exc)
    else:
        raise AssertionError("a 5000-level document was accepted")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(hostile_text, st.sampled_from(
            ["$oid", "$date", "$numberLong", "$numberDecimal", "$binary", "$regularExpression",
             "$uuid", "$numberDouble", "$timestamp", "$code", "$dbPointer", "$symbol"])),
            inner, max_size=3)),
    max_leaves=10,
)


@PURE
@given(json_values)
@example({"$date": {"$numberLong": "99999999999999999999"}})
@example({"$numberDecimal": "abc"})
@example({"$binary": {"base64": "!!", "subType": "zz"}})
@example({"$timestamp": {"t": -1, "i": "x"}})
@example({"$oid": 5})
def test_request_extended_json_is_parsed_or_a_bad_request(value: Any) -> None:
    """What an HTTP client sends as a value parses, or is a ``BadRequestError`` (HTTP 400)."""
    try:
        from_ejson(value)
    except BadRequestError as exc:
        assert "invalid Extended JSON" in str(exc)


@PURE
@given(st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                 st.sampled_from([0, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1,
                                  -(2**63)])))
def test_an_int_id_is_spelled_as_json_util_spells_it(value: int) -> None:
    """``encode_value``'s shortcut for ints gives the very text the generic path gives: an
    ``_id`` is stored (and looked up) by this text, so one character apart is a lost document."""
    generic = json_util.dumps(value, json_options=JSON_OPTIONS, separators=(",", ":"))
    assert encode_value(value) == generic
    assert decode_value(encode_value(value)) == value
    assert type(decode_value(encode_value(value))) is (int if -(2**31) <= value < 2**31 else Int64)


@PURE
@given(st.one_of(hostile_text, st.integers(), st.floats(), st.booleans(), st.none()))
def test_from_ejson_gives_a_scalar_back_as_it_is(value: Any) -> None:
    """Only an object can be an Extended JSON wrapper: a scalar passes ``from_ejson`` unchanged,
    as the JSON round trip it skips would give it back."""
    got = from_ejson(value)
    assert got is value
    again = json.loads(json.dumps(value))
    assert type(again) is type(value) and (again == value or again != again)
