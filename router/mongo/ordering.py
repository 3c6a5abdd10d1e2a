"""MongoDB's comparison order across BSON types, and the paths of a document.

Values of different types compare by their type's place in MongoDB's order (MinKey < null <
numbers < strings < documents < arrays < binary < ObjectId < booleans < dates < timestamps <
regular expressions < MaxKey); numbers compare by value across int32, int64, double and
Decimal128 (NaN below every other number); strings by code point (the simple collation);
documents field by field (the value's type, then the name, then the value); arrays element by
element. ``sort_key`` turns a value into a Python tuple that orders exactly so.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from bson import Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.max_key import MaxKey
from bson.min_key import MinKey

MISSING: Any = object()
"""A path that names no value in a document."""

MINKEY, NULL, NUMBER, STRING, OBJECT, ARRAY, BINARY, OBJECTID, BOOL, DATE, TIMESTAMP, REGEX = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
MAXKEY = 13
_OTHER = 14


def is_number(v: Any) -> bool:
    return (isinstance(v, int | float | Decimal128) and not isinstance(v, bool))


def number_value(v: Any) -> Decimal | float:
    """A number as something Python compares exactly across types (NaN as float NaN)."""
    if isinstance(v, Decimal128):
        d = v.to_decimal()
        return math.nan if d.is_nan() else d
    if isinstance(v, float):
        return v
    return Decimal(int(v))


def type_rank(v: Any) -> int:
    """The place of a value's type in MongoDB's comparison order."""
    if v is None or v is MISSING:
        return NULL
    if isinstance(v, bool):
        return BOOL
    if is_number(v):
        return NUMBER
    if isinstance(v, str):
        return STRING
    if isinstance(v, Mapping):
        return OBJECT
    if isinstance(v, list | tuple):
        return ARRAY
    if isinstance(v, bytes | Binary | uuid.UUID):
        return BINARY
    if isinstance(v, ObjectId):
        return OBJECTID
    if isinstance(v, dt.datetime):
        return DATE
    if isinstance(v, Timestamp):
        return TIMESTAMP
    if isinstance(v, Regex) or hasattr(v, "pattern"):
        return REGEX
    if isinstance(v, MinKey):
        return MINKEY
    if isinstance(v, MaxKey):
        return MAXKEY
    return _OTHER


def _utc(d: dt.datetime) -> dt.datetime:
    return d.replace(tzinfo=dt.UTC) if d.tzinfo is None else d.astimezone(dt.UTC)


def sort_key(v: Any) -> tuple[Any, ...]:
    """A tuple that orders values as MongoDB does."""
    rank = type_rank(v)
    if rank == NUMBER:
        n = number_value(v)
        if isinstance(n, float) and math.isnan(n):
            return (rank, 0)
        return (rank, 1, n)
    if rank == STRING:
        return (rank, v)
    if rank == OBJECT:
        return (rank, tuple((type_rank(x), k, sort_key(x)) for k, x in v.items()))
    if rank == ARRAY:
        return (rank, tuple(sort_key(x) for x in v))
    if rank == BINARY:
        if isinstance(v, uuid.UUID):  # binary subtype 4
            return (rank, 16, 4, v.bytes)
        data = bytes(v)
        return (rank, len(data), getattr(v, "subtype", 0), data)
    if rank == OBJECTID:
        return (rank, v.binary)
    if rank == BOOL:
        return (rank, bool(v))
    if rank == DATE:
        return (rank, _utc(v))
    if rank == TIMESTAMP:
        return (rank, v.time, v.inc)
    if rank == REGEX:
        return (rank, str(v.pattern), str(getattr(v, "flags", "")))
    if rank == _OTHER:
        return (rank, type(v).__name__, repr(v))
    return (rank,)


def compare(a: Any, b: Any) -> int:
    """-1, 0 or 1, as MongoDB orders ``a`` and ``b``."""
    ka, kb = sort_key(a), sort_key(b)
    try:
        return (ka > kb) - (ka < kb)
    except (TypeError, InvalidOperation):
        return (repr(ka) > repr(kb)) - (repr(ka) < repr(kb))


def equal(a: Any, b: Any) -> bool:
    """MongoDB's equality of two values (numbers across types; documents in field order)."""
    if type_rank(a) != type_rank(b):
        return False
    return compare(a, b) == 0


def values_at(doc: Any, parts: tuple[str, ...]) -> Iterator[Any]:
    """The values a dotted path reaches in a document, descending into arrays as MongoDB does
    (``a.b`` reaches ``b`` of each document in an array ``a``; a numeric part also indexes an
    array); ``MISSING`` where the path names nothing."""
    if not parts:
        yield doc
        return
    head, rest = parts[0], parts[1:]
    if isinstance(doc, Mapping):
        if head in doc:
            yield from values_at(doc[head], rest)
        else:
            yield MISSING
    elif isinstance(doc, list):
        found = False
        if head.isdigit():
            i = int(head)
            if i < len(doc):
                found = True
                yield from values_at(doc[i], rest)
        for el in doc:
            if isinstance(el, Mapping):
                found = True
                yield from values_at(el, parts)
        if not found:
            yield MISSING
    else:
        yield MISSING


def numeric_variants(v: Any) -> list[Any]:
    """The values of every BSON number type that holds ``v`` exactly (int32, int64, double,
    and Decimal128 in its plain form), ``v`` first: what an equality on a number must look
    for where values are stored by type (``_id``, indexed fields; the shard key *hash* is the
    same for all of them, see ``router.hashing``). Not a number: ``[v]``."""
    if not is_number(v):
        return [v]
    n = number_value(v)
    out: list[Any] = [v]
    if isinstance(n, float):
        if math.isnan(n):
            return [v, math.nan, Decimal128("NaN")]
        if math.isinf(n):
            return [v, n, Decimal128("Infinity" if n > 0 else "-Infinity")]
        d = Decimal(n)
    else:
        d = n
    if d.is_finite() and d == d.to_integral_value():
        i = int(d)
        if -(2**31) <= i < 2**31:
            out.append(i)
        if -(2**63) <= i < 2**63:
            out.append(Int64(i))
        out.append(Decimal128(str(i)))
    f = float(d)
    if not math.isinf(f) and Decimal(f) == d:
        out.append(f)
    if not (d.is_finite() and d == d.to_integral_value()):
        try:
            out.append(Decimal128(d.normalize()))
        except (InvalidOperation, ValueError, TypeError):
            pass  # not representable as a Decimal128: no such value can be stored either
    seen: list[Any] = []
    for x in out:
        if not any(type(x) is type(y) and sort_key(x) == sort_key(y) for y in seen):
            seen.append(x)
    return seen
