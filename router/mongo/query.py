"""Query filters: parsing, matching, and finding the documents a filter selects.

The interface command modules use (reads, writes, findAndModify):

* ``parse_filter(doc)`` -> ``Filter`` (``MongoError`` BadValue for what is not supported);
* ``matches(doc, f)`` -> whether a document satisfies the filter (MongoDB semantics);
* ``pinned(route, f)`` -> ``(shard key value, _id)`` when the filter selects at most one
  document by equality on both (the single-document fast path), else None;
* ``find_matching(router, collection, f, limit=...)`` -> the matching documents (fenced reads:
  routed to the owning chunks when the filter pins the shard key, else scattered).

``iterate_matching`` is the same search as pages (what a cursor reads from).

Operators: ``$eq $ne $gt $gte $lt $lte $in $nin $exists $type $size $all $elemMatch $regex
$options $mod $not`` on fields, ``$and $or $nor $comment`` at the top. Comparisons follow
MongoDB's order across types (``ordering``) with type bracketing: ``{$gt: 5}`` matches numbers
only. A field holding an array matches when the array itself or one of its elements does.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import Decimal128, Int64, ObjectId, Regex
from bson.binary import Binary

from router.core import Router
from router.hashing import khash
from router.mongo.errors import MongoError
from router.mongo.ordering import (
    ARRAY,
    MISSING,
    NULL,
    compare,
    equal,
    is_number,
    number_value,
    numeric_variants,
    type_rank,
    values_at,
)
from router.routes import CollectionRoute
from shards.codec import check_storable
from shards.errors import InvalidDocumentError

_MISSING = MISSING
MAX_DEPTH = 100
"""Nesting of operators deeper than this is refused (MongoDB's limit)."""
MAX_PATH_CHARS = 1024
PAGE_SIZE = 500
"""Documents per fenced page of a scan."""

Pred = Callable[[Any], bool]
Test = Callable[[list[Any]], bool]


@dataclass(frozen=True)
class Filter:
    """A validated filter document, compiled."""

    doc: dict[str, Any]
    pred: Pred = field(default=lambda d: True, compare=False, repr=False)
    eqs: dict[str, tuple[Any, ...]] = field(default_factory=dict, compare=False)
    """Paths the filter pins to a set of values (equality or ``$in``, possibly in ``$and``)."""

    def equality(self, path: str) -> Any:
        """The one value the filter requires ``path`` to equal, or ``_MISSING``."""
        values = self.eqs.get(path)
        if values is None or len(values) != 1:
            return _MISSING
        return values[0]

    def values(self, path: str) -> tuple[Any, ...] | None:
        """The values one of which ``path`` must equal, or None if the filter does not say."""
        return self.eqs.get(path)


# -- parsing -----------------------------------------------------------------------------------

_UNSUPPORTED_TOP = frozenset({"$expr", "$where", "$text", "$jsonSchema", "$sampleRate",
                              "$alwaysTrue", "$alwaysFalse"})
_UNSUPPORTED_FIELD_OPS = frozenset({
    "$geoWithin", "$geoIntersects", "$near", "$nearSphere", "$within", "$box", "$center",
    "$centerSphere", "$polygon", "$geometry", "$maxDistance", "$minDistance",
    "$bitsAllSet", "$bitsAnySet", "$bitsAllClear", "$bitsAnyClear",
})
_TYPE_ALIASES: dict[str, int] = {
    "double": 1, "string": 2, "object": 3, "array": 4, "binData": 5, "objectId": 7, "bool": 8,
    "date": 9, "null": 10, "regex": 11, "int": 16, "timestamp": 17, "long": 18, "decimal": 19,
    "minKey": -1, "maxKey": 127,
}


def _is_operator_doc(v: Any) -> bool:
    return isinstance(v, Mapping) and bool(v) and str(next(iter(v))).startswith("$")


def _is_regex(v: Any) -> bool:
    return isinstance(v, Regex | re.Pattern)


def check_path(path: Any) -> tuple[str, ...]:
    """A field path's parts, or MongoDB's error for a name no document can have."""
    if not isinstance(path, str):
        raise MongoError("BadValue", "field names must be strings")
    if not path:
        raise MongoError("BadValue", "field path cannot be empty")
    if len(path) > MAX_PATH_CHARS:
        raise MongoError("BadValue", f"field path is longer than {MAX_PATH_CHARS} characters")
    if "\x00" in path:
        raise MongoError("BadValue", "field path cannot contain a NUL character")
    parts = tuple(path.split("."))
    for p in parts:
        if not p:
            raise MongoError("BadValue", f"field path {path[:64]!r} has an empty part")
        if p.startswith("$"):
            raise MongoError("BadValue", f"field path part {p[:64]!r} cannot start with '$'")
    return parts


def parse_filter(doc: Any) -> Filter:
    """Compile a filter document; ``MongoError`` (BadValue, code 2) for what is malformed or
    not supported."""
    if doc is None:
        return Filter({})
    if not isinstance(doc, Mapping):
        raise MongoError("TypeMismatch", "filter must be an object")
    eqs: dict[str, tuple[Any, ...]] = {}
    pred = _compile_doc(doc, 0, eqs)
    return Filter(dict(doc), pred, eqs)


def _merge_eq(eqs: dict[str, tuple[Any, ...]], path: str, values: tuple[Any, ...]) -> None:
    if path not in eqs or len(values) < len(eqs[path]):
        eqs[path] = values


def _compile_doc(doc: Mapping[str, Any], depth: int,
                 eqs: dict[str, tuple[Any, ...]] | None) -> Pred:
    if depth > MAX_DEPTH:
        raise MongoError("BadValue", f"exceeded depth limit of {MAX_DEPTH} when parsing")
    preds: list[Pred] = []
    for key, value in doc.items():
        if not isinstance(key, str):
            raise MongoError("BadValue", "field names must be strings")
        if key.startswith("$"):
            preds.append(_compile_top(key, value, depth, eqs))
        else:
            preds.append(_compile_field(key, value, depth, eqs))
    if len(preds) == 1:
        return preds[0]
    return lambda d: all(p(d) for p in preds)


def _compile_top(key: str, value: Any, depth: int,
                 eqs: dict[str, tuple[Any, ...]] | None) -> Pred:
    if key == "$comment":
        return lambda d: True
    if key in ("$and", "$or", "$nor"):
        if not isinstance(value, list) or not value:
            raise MongoError("BadValue", f"{key} must be a nonempty array")
        if not all(isinstance(v, Mapping) for v in value):
            raise MongoError("BadValue", f"{key} argument's entries must be objects")
        # Only $and narrows where to look: every branch must hold.
        subs = [_compile_doc(v, depth + 1, eqs if key == "$and" else None) for v in value]
        if key == "$and":
            return lambda d: all(p(d) for p in subs)
        if key == "$or":
            return lambda d: any(p(d) for p in subs)
        return lambda d: not any(p(d) for p in subs)
    if key in _UNSUPPORTED_TOP:
        raise MongoError("NotImplemented", f"{key} is not supported by this router")
    raise MongoError("BadValue", f"unknown top level operator: {key[:100]}. If you have a field "
                     "name that starts with a '$' symbol, consider using $getField or $setField.")


def _compile_field(path: str, value: Any, depth: int,
                   eqs: dict[str, tuple[Any, ...]] | None) -> Pred:
    parts = check_path(path)
    if _is_operator_doc(value):
        tests = _compile_ops(value, depth + 1, path, eqs)
    else:
        if eqs is not None and not _is_regex(value):
            _merge_eq(eqs, path, (value,))
        tests = [_eq_test(value)]

    def pred(d: Any) -> bool:
        cands = list(values_at(d, parts))
        return all(t(cands) for t in tests)

    return pred


def _expand(cands: list[Any]) -> list[Any]:
    """The candidates and, for arrays, their elements (one level, as MongoDB does)."""
    out: list[Any] = []
    for x in cands:
        out.append(x)
        if isinstance(x, list):
            out.extend(x)
    return out


def _value_eq(x: Any, v: Any) -> bool:
    if _is_regex(v):
        return isinstance(x, str) and _as_re(v).search(x) is not None or (
            _is_regex(x) and str(x.pattern) == str(v.pattern))
    if v is None:
        return x is None or x is MISSING
    return x is not MISSING and equal(x, v)


def _eq_test(v: Any) -> Test:
    return lambda cands: any(_value_eq(x, v) for x in _expand(cands)) or (
        v is None and not cands)


def _cmp_test(op: str, v: Any) -> Test:
    if _is_regex(v):
        raise MongoError("BadValue", f"Can't have RegEx as arg to {op}")
    want = type_rank(v)
    ok: Callable[[int], bool] = {
        "$gt": lambda c: c > 0, "$gte": lambda c: c >= 0,
        "$lt": lambda c: c < 0, "$lte": lambda c: c <= 0,
    }[op]

    def test(cands: list[Any]) -> bool:
        for x in _expand(cands):
            xx = None if x is MISSING else x
            if type_rank(xx) == want and ok(compare(xx, v)):
                return True
        return False

    return test


def _in_values(op: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise MongoError("BadValue", f"{op} needs an array")
    for v in value:
        if _is_operator_doc(v):
            raise MongoError("BadValue", f"cannot nest $ under {op}")
    return value


def _type_codes(value: Any) -> set[int | str]:
    codes: set[int | str] = set()
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, str):
            if v != "number" and v not in _TYPE_ALIASES:
                raise MongoError("BadValue", f"Unknown type name alias: {v[:64]}")
            codes.add(v if v == "number" else _TYPE_ALIASES[v])
        elif is_number(v) and number_value(v) == int(number_value(v)):
            codes.add(int(number_value(v)))
        else:
            raise MongoError("BadValue", "type must be represented as a number or a string")
    return codes


def _bson_type(x: Any) -> int:
    if x is None:
        return 10
    if isinstance(x, bool):
        return 8
    if isinstance(x, Int64):
        return 18
    if isinstance(x, int):
        return 16 if -(2**31) <= x < 2**31 else 18
    if isinstance(x, float):
        return 1
    if isinstance(x, Decimal128):
        return 19
    if isinstance(x, str):
        return 2
    if isinstance(x, ObjectId):
        return 7
    if isinstance(x, bytes | Binary | uuid.UUID):
        return 5
    if _is_regex(x):
        return 11
    rank = type_rank(x)
    return {5: 3, 6: 4, 10: 9, 11: 17, 1: -1, 13: 127}.get(rank, 0)


def _as_re(v: Any) -> re.Pattern[str]:
    if isinstance(v, re.Pattern):
        return v
    return _regex(str(v.pattern), str(v.flags) if isinstance(v.flags, str) else "")


def _regex(pattern: Any, options: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not isinstance(options, str):
        raise MongoError("BadValue", "$regex has to be a string")
    flags = 0
    for ch in options:
        if ch not in "imsx":
            raise MongoError("BadValue", f"invalid flag in regex options: {ch[:1]}")
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[ch]
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise MongoError("BadValue", f"Regular expression is invalid: {exc}") from exc


def _negate(t: Test) -> Test:
    return lambda c: not t(c)


def _any_of(subs: list[Test]) -> Test:
    return lambda c: any(t(c) for t in subs)


def _all_of(subs: list[Test]) -> Test:
    return lambda c: all(t(c) for t in subs)


def _exists_test(want: bool) -> Test:
    return lambda c: any(x is not MISSING for x in c) == want


def _type_test(codes: set[int | str]) -> Test:
    return lambda c: any(
        x is not MISSING and (_bson_type(x) in codes or ("number" in codes and is_number(x)))
        for x in _expand(c))


def _size_test(v: Any) -> Test:
    if not is_number(v) or number_value(v) != int(number_value(v)) or number_value(v) < 0:
        raise MongoError("BadValue", "$size needs a non-negative whole number")
    n = int(number_value(v))
    return lambda c: any(isinstance(x, list) and len(x) == n for x in c)


def _regex_test(rx: re.Pattern[str]) -> Test:
    return lambda c: any(isinstance(x, str) and rx.search(x) is not None for x in _expand(c))


def _compile_ops(ops: Mapping[str, Any], depth: int, path: str,
                 eqs: dict[str, tuple[Any, ...]] | None) -> list[Test]:
    if depth > MAX_DEPTH:
        raise MongoError("BadValue", f"exceeded depth limit of {MAX_DEPTH} when parsing")
    tests: list[Test] = []
    for op, v in ops.items():
        if not isinstance(op, str) or not op.startswith("$"):
            raise MongoError("BadValue", f"unknown operator: {str(op)[:100]}")
        if op in ("$eq", "$ne"):
            if op == "$eq" and eqs is not None and not _is_regex(v):
                _merge_eq(eqs, path, (v,))
            t = _eq_test(v) if not _is_regex(v) else _eq_exact(v)
            tests.append(t if op == "$eq" else _negate(t))
        elif op in ("$gt", "$gte", "$lt", "$lte"):
            tests.append(_cmp_test(op, v))
        elif op in ("$in", "$nin"):
            values = _in_values(op, v)
            any_of = _any_of([_eq_test(x) for x in values])
            if op == "$in" and eqs is not None and not any(_is_regex(x) for x in values):
                _merge_eq(eqs, path, tuple(values))
            tests.append(any_of if op == "$in" else _negate(any_of))
        elif op == "$exists":
            tests.append(_exists_test(bool(v) if not is_number(v) else number_value(v) != 0))
        elif op == "$type":
            tests.append(_type_test(_type_codes(v)))
        elif op == "$size":
            tests.append(_size_test(v))
        elif op == "$all":
            values = _in_values(op, v)
            tests.append(_all_of([_eq_test(x) for x in values]) if values
                         else (lambda c: False))
        elif op == "$elemMatch":
            if not isinstance(v, Mapping):
                raise MongoError("BadValue", "$elemMatch needs an Object")
            tests.append(_elem_match(v, depth + 1))
        elif op == "$regex":
            pattern = v.pattern if isinstance(v, Regex) else v
            tests.append(_regex_test(_regex(pattern, ops.get("$options", ""))))
        elif op == "$options":
            if "$regex" not in ops:
                raise MongoError("BadValue", "$options needs a $regex")
        elif op == "$mod":
            tests.append(_mod_test(v))
        elif op == "$not":
            if _is_regex(v):
                tests.append(_negate(_eq_test(v)))
            elif _is_operator_doc(v):
                tests.append(_negate(_all_of(_compile_ops(v, depth + 1, path, None))))
            else:
                raise MongoError("BadValue", "$not needs a regex or a document of operators")
        elif op in _UNSUPPORTED_FIELD_OPS:
            raise MongoError("NotImplemented", f"{op} is not supported by this router")
        else:
            raise MongoError("BadValue", f"unknown operator: {op[:100]}")
    return tests


def _eq_exact(v: Any) -> Test:
    """``$eq`` with a regular expression: the field holds that very regex."""
    return lambda c: any(_is_regex(x) and str(x.pattern) == str(v.pattern)
                         for x in _expand(c))


def _mod_test(v: Any) -> Test:
    if not isinstance(v, list) or len(v) != 2 or not all(is_number(x) for x in v):
        raise MongoError("BadValue", "malformed mod, needs to be an array of two numbers")
    div, rem = int(number_value(v[0])), int(number_value(v[1]))
    if div == 0:
        raise MongoError("BadValue", "divisor cannot be 0")

    def test(c: list[Any]) -> bool:
        for x in _expand(c):
            if is_number(x):
                n = number_value(x)
                if n == n and abs(n) != float("inf"):
                    i = int(n)
                    if abs(i) % abs(div) * (1 if i >= 0 else -1) == rem:
                        return True
        return False

    return test


def _elem_match(spec: Mapping[str, Any], depth: int) -> Test:
    if _is_operator_doc(spec):
        subs = _compile_ops(spec, depth, "", None)

        def on_value(e: Any) -> bool:
            return all(t([e]) for t in subs)
        check = on_value
    else:
        pred = _compile_doc(spec, depth, None)

        def on_doc(e: Any) -> bool:
            return isinstance(e, Mapping) and pred(e)
        check = on_doc
    return lambda c: any(isinstance(x, list) and any(check(e) for e in x) for x in c)


# -- matching and targeting --------------------------------------------------------------------

def matches(doc: Mapping[str, Any], f: Filter) -> bool:
    return f.pred(doc)


def _storable(v: Any) -> bool:
    """Can a stored value equal ``v`` only by having the same type (numbers by variant)?"""
    return not (v is None or _is_regex(v) or isinstance(v, list)
                or type_rank(v) in (NULL, ARRAY))


def pinned(route: CollectionRoute, f: Filter) -> tuple[Any, Any] | None:
    """(shard key value, _id) when equality pins both to one value of a type stored only as
    itself (numbers are not: ``5`` equals ``Int64(5)`` and ``5.0`` too), else None."""
    key, _id = f.equality(route.shard_key), f.equality("_id")
    if key is _MISSING or _id is _MISSING:
        return None
    if not (_storable(key) and _storable(_id)) or is_number(key) or is_number(_id):
        return None
    if isinstance(key, Mapping) or _variants((key, _id)) != [key, _id]:
        return None  # a value no document can hold: the scan finds nothing, as it should
    return key, _id


def pinned_pair(shard_key: str, q: Mapping[str, Any]) -> tuple[Any, Any] | None:
    """(shard key value, _id) when the raw filter document is exactly ``{<shard key>: v,
    _id: w}`` (either order) with plain values a document can hold (not null, a regex, an
    array, a document or an operator), else None: the shape a driver sends to read or write
    one document by its address (the fast paths of ``find`` and ``update``)."""
    if len(q) != 2 or shard_key == "_id":
        return None
    key, _id = q.get(shard_key, _MISSING), q.get("_id", _MISSING)
    if key is _MISSING or _id is _MISSING:
        return None
    for v in (key, _id):
        if isinstance(v, Mapping) or not _storable(v):
            return None
        try:
            check_storable(v)
        except InvalidDocumentError:
            return None
    return key, _id


def _variants(values: tuple[Any, ...], *, numbers: bool = True) -> list[Any] | None:
    """What to look for where values are stored by type; None when a value can also match
    what is not stored (null: a missing field). A value no document can hold (a string
    with NUL) is left out: it matches nothing. ``numbers=False``: a number stands for
    itself only (where it is only hashed: every form of it hashes alike)."""
    out: list[Any] = []
    for v in values:
        if not _storable(v):
            return None
        try:
            check_storable(v)
        except InvalidDocumentError:
            continue
        if numbers:
            out.extend(numeric_variants(v))
        else:
            out.append(v)
    return out


MAX_POINT_IDS = 64
MAX_POINT_KEYS = 8
"""A filter pinning at most ``MAX_POINT_KEYS`` shard key hashes and ``MAX_POINT_IDS`` ``_id``
forms is read with one statement per hash (``Router.get_many``) rather than a scan."""


def khash_key(value: Any) -> Any:
    """A key that tells shard key values apart as the shard key hash does: every numeric
    form of one number (``5``, ``Int64(5)``, ``5.0``, ``Decimal128("5")``) hashes alike
    (``router.hashing``), so they share one key and one statement."""
    try:
        return khash(value)
    except InvalidDocumentError:
        return (type(value).__name__, repr(value))


@dataclass(frozen=True)
class Plan:
    """Where a filter's documents are looked for (see ``Router.scan``)."""

    key_values: list[Any] | None = None
    ids: list[Any] | None = None
    field: str | None = None
    values: list[Any] | None = None

    def describe(self) -> str:
        if self.key_values is not None:
            return f"targeted: {len(self.key_values)} shard key value(s)"
        if self.ids is not None:
            return f"scatter, _id pushed down ({len(self.ids)} value(s))"
        if self.field is not None:
            return f"scatter, index on {self.field!r} ({len(self.values or [])} value(s))"
        return "scatter, full scan"


def plan(route: CollectionRoute, f: Filter) -> Plan:
    keys = f.values(route.shard_key)
    # Shard key values are only hashed (``Router.get_many``, ``Router.scan``), and every
    # numeric form of a number hashes alike: no need to list the forms.
    key_values = _variants(keys, numbers=False) if keys is not None else None
    if key_values is not None and any(isinstance(v, Mapping) for v in key_values):
        key_values = None  # a document is never a shard key value: look everywhere
    ids_in = f.values("_id")
    ids = _variants(ids_in) if ids_in is not None else None
    if key_values is not None or ids is not None:
        return Plan(key_values=key_values, ids=ids)
    for path in sorted(route.indexed_fields()):
        vals = f.values(path)
        pushed = _variants(vals) if vals is not None else None
        if pushed is not None:
            return Plan(field=path, values=pushed)
    return Plan()


async def iterate_matching(router: Router, collection: str, f: Filter, *,
                           page_size: int = PAGE_SIZE) -> AsyncIterator[list[dict[str, Any]]]:
    """The matching documents, in pages of fenced reads (a page may be empty)."""
    route = await router.route(collection)
    p = plan(route, f)
    keys = (list({khash_key(k): k for k in p.key_values}.values())
            if p.key_values is not None else None)
    if (keys is not None and p.ids is not None
            and len(keys) <= MAX_POINT_KEYS and len(p.ids) <= MAX_POINT_IDS):
        # A few shard key values and a few _ids (a number has a few stored forms: 5,
        # Int64(5), 5.0, all hashed alike, so one key): one fenced statement per key hash
        # (khash = h AND id = ANY(every _id form)), at once.
        if len(keys) == 1:
            yield [d for d in await router.get_many(collection, keys[0], p.ids) if f.pred(d)]
            return
        found = await asyncio.gather(*(router.get_many(collection, k, p.ids) for k in keys))
        yield [d for docs in found for d in docs if f.pred(d)]
        return
    async for page in router.scan(collection, ids=p.ids, field=p.field, values=p.values,
                                  key_values=p.key_values, page_size=page_size):
        yield [d for d in page if f.pred(d)]


async def find_matching(router: Router, collection: str, f: Filter, *,
                        limit: int | None = None) -> list[dict[str, Any]]:
    route = await router.route(collection)
    one = pinned(route, f)
    if one is not None:
        doc = await router.get(collection, *one)
        return [doc] if doc is not None and matches(doc, f) else []
    out: list[dict[str, Any]] = []
    async for page in iterate_matching(router, collection, f):
        out.extend(page)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out
