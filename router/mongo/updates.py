"""Update documents: parsing, applying to a copy, and what an upsert inserts.

An update is either a *replacement* (a document without ``$`` keys) or a set of *operators*
(``$set``, ``$unset``, ``$inc``: what the shards apply in one statement). Everything here is
pure: the write commands apply an update to a copy of the document they read, so that

* every error MongoDB would report (an unknown modifier, a path through a scalar, ``$inc`` on
  a string, a change to ``_id`` or the shard key) is found *before* anything is written;
* a no-op update is counted as matched but not modified (``nModified``), as MongoDB does, and
  costs no write;
* an upsert's new document is built exactly as MongoDB builds it: the equality fields of the
  filter, then the update applied to them.

The shard applies the operators itself (``$inc`` adds to the value it holds, not to the one
the router read), so a concurrent writer's increment is never lost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bson import Decimal128, Int64

from router.mongo.errors import MongoError
from shards.codec import bson_bytes
from shards.errors import InvalidNameError
from shards.names import check_field_path

SUPPORTED_OPERATORS = ("$set", "$unset", "$inc")
MISSING = object()
"""What ``value_at`` returns for a path the document does not have."""
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Update:
    """A validated update: a replacement document, or operators by name."""

    replacement: dict[str, Any] | None
    operators: dict[str, dict[str, Any]]

    @property
    def is_replacement(self) -> bool:
        return self.replacement is not None


def check_path(path: Any, op: str) -> tuple[str, ...]:
    """A field path an operator may name, with MongoDB's errors for the ones it refuses."""
    if not isinstance(path, str):
        raise MongoError("TypeMismatch", f"{op}: field names must be strings")
    if path == "" or "" in path.split("."):
        raise MongoError("EmptyFieldName",
                         f"An empty update path is not valid: {path[:100]!r} ({op})")
    for part in path.split("."):
        if part.startswith("$"):
            raise MongoError(
                "DollarPrefixedFieldName",
                f"The dollar ($) prefixed field '{part[:100]}' in '{path[:200]}' is not valid "
                "for storage.")
    try:
        return check_field_path(path)
    except InvalidNameError as exc:
        raise MongoError("BadValue", f"{op}: {exc}") from None


def parse_update(u: Any) -> Update:
    """An update document from a command (``u``, ``update``)."""
    if isinstance(u, list):
        raise MongoError("NotImplemented",
                         "pipeline-style updates (an array) are not supported; use a "
                         "replacement document or $set/$unset/$inc")
    if not isinstance(u, dict):
        raise MongoError("FailedToParse", "Update argument must be either an object or an array")
    ops = [k for k in u if isinstance(k, str) and k.startswith("$")]
    if not u or not str(next(iter(u))).startswith("$"):
        # MongoDB decides by the first field: a replacement (whose "$" fields are refused
        # by ``check_replacement``), or operators.
        return Update(replacement=dict(u), operators={})
    if len(ops) != len(u):
        plain = next(k for k in u if k not in ops)
        raise MongoError(
            "FailedToParse",
            f"Unknown modifier: {str(plain)[:100]}. Expected a valid update modifier or "
            "pipeline-style update specified as an array")
    operators: dict[str, dict[str, Any]] = {}
    seen: list[tuple[str, tuple[str, ...]]] = []
    for op, fields in u.items():
        if op not in SUPPORTED_OPERATORS:
            raise MongoError(
                "FailedToParse",
                f"Unknown modifier: {op[:100]}. The router supports "
                f"{', '.join(SUPPORTED_OPERATORS)} and replacement documents")
        if not isinstance(fields, dict):
            raise MongoError("FailedToParse",
                             f"Modifiers operate on fields but we found type "
                             f"{type(fields).__name__} instead. For example: "
                             f"{{$mod: {{<field>: ...}}}} not {{{op}: {fields!r:.60}}}")
        for path, value in fields.items():
            parts = check_path(path, op)
            for other, other_parts in seen:
                n = min(len(parts), len(other_parts))
                if parts[:n] == other_parts[:n]:
                    raise MongoError(
                        "ConflictingUpdateOperators",
                        f"Updating the path '{path}' would create a conflict at '{other}'")
            seen.append((path, parts))
            if op == "$inc" and not _is_number(value):
                raise MongoError(
                    "TypeMismatch",
                    f"Cannot increment with non-numeric argument: {{{path}: {value!r:.60}}}")
        operators[op] = dict(fields)
    return Update(replacement=None, operators=operators)


def check_replacement(doc: dict[str, Any]) -> None:
    """A replacement's top-level names: MongoDB refuses ``$`` names there."""
    for key in doc:
        if not isinstance(key, str) or key.startswith("$") or key == "":
            raise MongoError("DollarPrefixedFieldName" if str(key).startswith("$")
                             else "EmptyFieldName",
                             f"The field name {str(key)[:100]!r} is not valid in a replacement "
                             "document")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | Int64 | Decimal128) and not isinstance(v, bool)


def _add(a: Any, b: Any, path: str) -> Any:
    """``a + b`` with MongoDB's type promotion (decimal > double > long > int)."""
    if not _is_number(a):
        raise MongoError(
            "TypeMismatch",
            f"Cannot apply $inc to a value of non-numeric type. Field '{path}' has a "
            f"non-numeric value of type {type(a).__name__}")
    if isinstance(a, Decimal128) or isinstance(b, Decimal128):
        da = a.to_decimal() if isinstance(a, Decimal128) else Decimal(repr(float(a)) if
                                                                     isinstance(a, float) else a)
        db = b.to_decimal() if isinstance(b, Decimal128) else Decimal(repr(float(b)) if
                                                                     isinstance(b, float) else b)
        return Decimal128(da + db)
    if isinstance(a, float) or isinstance(b, float):
        return float(a) + float(b)
    total = int(a) + int(b)
    if not _INT64[0] <= total <= _INT64[1]:
        raise MongoError("BadValue", f"Failed to apply $inc operations to current value "
                                     f"of '{path}': integer overflow")
    if isinstance(a, Int64) or isinstance(b, Int64) or not _INT32[0] <= total <= _INT32[1]:
        return Int64(total)
    return total


def _parent(doc: dict[str, Any], parts: tuple[str, ...], path: str, *,
            create: bool) -> dict[str, Any] | None:
    cur = doc
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part, MISSING)
        if nxt is MISSING:
            if not create:
                return None
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            if not create:
                return None
            raise MongoError(
                "PathNotViable",
                f"Cannot create field '{parts[i + 1]}' in element "
                f"{{{part}: {nxt!r:.60}}} (path '{path}')")
        cur = nxt
    return cur


def apply_update(doc: dict[str, Any], upd: Update) -> dict[str, Any]:
    """The document ``upd`` makes of ``doc`` (a new object; ``doc`` is unchanged)."""
    if upd.replacement is not None:
        new = {"_id": doc["_id"]} if "_id" in doc else {}
        new.update(copy.deepcopy(upd.replacement))
        return new
    new = copy.deepcopy(doc)
    for op, fields in upd.operators.items():
        for path, value in fields.items():
            parts = tuple(path.split("."))
            if op == "$unset":
                parent = _parent(new, parts, path, create=False)
                if parent is not None:
                    parent.pop(parts[-1], None)
                continue
            parent = _parent(new, parts, path, create=True)
            assert parent is not None
            if op == "$set":
                parent[parts[-1]] = copy.deepcopy(value)
            else:
                old = parent.get(parts[-1], MISSING)
                parent[parts[-1]] = value if old is MISSING else _add(old, value, path)
    return new


def _canonical(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canonical(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_canonical(x) for x in v]
    return v


def same_document(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same fields with the same values of the same BSON types. Field order does not
    count: the shards store documents as jsonb, which keeps its own order."""
    return bson_bytes(_canonical(a)) == bson_bytes(_canonical(b))


def value_at(doc: dict[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def check_immutable(old: dict[str, Any], new: dict[str, Any], shard_key: str) -> None:
    """``_id`` and the shard key keep their values (ImmutableField, as MongoDB says it)."""
    for path in ("_id", shard_key):
        a, b = value_at(old, path), value_at(new, path)
        if a is MISSING and b is MISSING:
            continue
        if a is MISSING or b is MISSING or bson_bytes({"v": a}) != bson_bytes({"v": b}):
            what = "the shard key field" if path == shard_key else "the immutable field"
            raise MongoError(
                "ImmutableField",
                f"Performing an update on the path '{path}' would modify {what} '{path}'")


def patch_for_shard(upd: Update, shard_key: str) -> dict[str, dict[str, Any]]:
    """The operators to send to the shard: ``$set`` of ``_id`` or the shard key (to the value
    it already has: ``check_immutable`` refused any other) is dropped, as the shard protects
    both paths."""
    out: dict[str, dict[str, Any]] = {}
    for op, fields in upd.operators.items():
        kept = {p: v for p, v in fields.items()
                if not (op == "$set" and p in ("_id", shard_key))}
        if kept:
            out[op] = kept
    return out


def _equalities(q: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in q.items():
        if key == "$and" and isinstance(value, list):
            for part in value:
                if isinstance(part, dict):
                    _equalities(part, out)
            continue
        if key.startswith("$"):
            continue
        if isinstance(value, dict) and any(str(k).startswith("$") for k in value):
            if set(value) == {"$eq"}:
                out[key] = value["$eq"]
            continue
        out[key] = value


def upsert_seed(q: dict[str, Any]) -> dict[str, Any]:
    """The document an upsert starts from: the filter's equality fields (dotted paths become
    nested documents), as MongoDB builds it."""
    flat: dict[str, Any] = {}
    _equalities(q, flat)
    seed: dict[str, Any] = {}
    if "_id" in flat:
        seed["_id"] = flat.pop("_id")
    for path, value in flat.items():
        parts = check_path(path, "upsert filter")
        parent = _parent(seed, parts, path, create=True)
        assert parent is not None
        parent[parts[-1]] = copy.deepcopy(value)
    return seed


def upsert_document(q: dict[str, Any], upd: Update) -> dict[str, Any]:
    """The new document of an upsert that matched nothing (without ``_id`` if neither the
    filter nor the replacement names one: the caller adds one)."""
    seed = upsert_seed(q)
    if upd.replacement is not None:
        new = {"_id": seed["_id"]} if "_id" in seed else {}
        new.update(copy.deepcopy(upd.replacement))
        if "_id" in seed and "_id" in upd.replacement:
            check_immutable(seed, new, "_id")
        return new
    return apply_update(seed, upd)
