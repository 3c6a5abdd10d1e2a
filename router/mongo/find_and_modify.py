"""``findAndModify``: update or remove one document and return it (before or after).

The document is chosen as ``update``/``delete`` choose theirs (``query.find_matching``), the
first in ``sort`` order when one is given (the matches are sorted by the router, in MongoDB's
comparison order), then written through the router core by its shard key and ``_id``. The
reply is MongoDB's: ``{lastErrorObject: {n, updatedExisting[, upserted]}, value}``.

A document a concurrent writer deletes between the read and the write is looked for again
(up to three times) rather than reported as modified.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp

from router.mongo.common import collection_arg, require_data_database
from router.mongo.errors import MongoError
from router.mongo.query import find_matching, parse_filter
from router.mongo.registry import Sequences, Session, command
from router.mongo.updates import MISSING, value_at
from router.mongo.write_args import (
    bool_arg,
    check_fields,
    let_arg,
    refuse_unsupported,
    write_concern,
)
from router.mongo.writes import (
    MULTI_WRITE_MAX,
    delete_document,
    parse_statement_update,
    upsert_new,
    write_update,
)
from shards.codec import bson_bytes

_FIELDS = frozenset({"query", "sort", "remove", "update", "new", "fields", "upsert",
                     "bypassDocumentValidation", "collation", "arrayFilters", "hint", "let"})
_ATTEMPTS = 3


# -- MongoDB's comparison order, for ``sort`` ---------------------------------------------------

def _rank(v: Any) -> tuple[int, Any]:
    """A key that orders values as MongoDB does across types (MinKey, null, numbers, strings,
    objects, arrays, binary, ObjectId, booleans, dates, timestamps, regexes, MaxKey)."""
    if isinstance(v, MinKey):
        return (0, 0)
    if v is None or v is MISSING:
        return (1, 0)
    if isinstance(v, bool):
        return (8, v)
    if isinstance(v, int | float | Int64):
        return (2, Decimal(repr(float(v))) if isinstance(v, float) else Decimal(int(v)))
    if isinstance(v, Decimal128):
        return (2, v.to_decimal())
    if isinstance(v, str):
        return (3, v.encode("utf-8"))
    if isinstance(v, dict):
        return (4, bson_bytes(v))
    if isinstance(v, list):
        return (5, bson_bytes({"a": v}))
    if isinstance(v, Binary | bytes):
        return (6, bytes(v))
    if isinstance(v, ObjectId):
        return (7, v.binary)
    if isinstance(v, dt.datetime):
        return (9, v.timestamp())
    if isinstance(v, Timestamp):
        return (10, (v.time, v.inc))
    if isinstance(v, Regex | re.Pattern):
        return (11, str(v.pattern))
    if isinstance(v, MaxKey):
        return (12, 0)
    return (3, repr(v).encode())


def sort_documents(docs: list[dict[str, Any]], sort: Any) -> list[dict[str, Any]]:
    if sort is None or sort == {}:
        return docs
    if not isinstance(sort, dict):
        raise MongoError("TypeMismatch", "sort must be an object")
    keys: list[tuple[str, bool]] = []
    for path, direction in sort.items():
        if isinstance(direction, bool) or direction not in (1, -1):
            raise MongoError("BadValue", f"$sort: the direction of {str(path)[:100]!r} must "
                                         "be 1 or -1 (text and other sorts are not supported)")
        keys.append((str(path), direction == -1))
    out = list(docs)
    for path, descending in reversed(keys):  # stable sorts, least significant key first
        out.sort(key=_by(path), reverse=descending)
    return out


def _by(path: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    def key(doc: dict[str, Any]) -> tuple[int, Any]:
        return _rank(value_at(doc, path))
    return key


# -- projection (``fields``) ----------------------------------------------------------------

def project(doc: dict[str, Any] | None, fields: Any) -> dict[str, Any] | None:
    """``doc`` with the inclusion or exclusion projection ``fields`` applied."""
    if doc is None or fields is None or fields == {}:
        return doc
    if not isinstance(fields, dict):
        raise MongoError("TypeMismatch", "fields must be an object")
    spec: dict[str, bool] = {}
    for path, how in fields.items():
        if not isinstance(path, str) or not path or path.startswith("$") or (
                isinstance(how, dict)):
            raise MongoError("NotImplemented",
                             f"projection of {str(path)[:100]!r}: only inclusion (1) and "
                             "exclusion (0) of fields are supported")
        if not isinstance(how, bool | int | float):
            raise MongoError("BadValue", f"projection of {path[:100]!r} must be 1 or 0")
        spec[path] = bool(how)
    include_id = spec.pop("_id", True)
    if any(spec.values()) and not all(spec.values()):
        bad = next(p for p, v in spec.items() if not v)
        raise MongoError("Location31254",
                         f"Cannot do exclusion on field {bad} in inclusion projection")
    out: dict[str, Any]
    if spec and all(spec.values()):
        out = {"_id": doc["_id"]} if include_id and "_id" in doc else {}
        for path in spec:
            value = value_at(doc, path)
            if value is MISSING:
                continue
            parts = path.split(".")
            into = out
            for part in parts[:-1]:
                into = into.setdefault(part, {})
            into[parts[-1]] = copy.deepcopy(value)
        return out
    out = copy.deepcopy(doc)
    for path in [*spec, *([] if include_id else ["_id"])]:
        parts = path.split(".")
        cur: Any = out
        for part in parts[:-1]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return out


# -- the command ----------------------------------------------------------------------------

def _check_options(cmd: dict[str, Any]) -> tuple[bool, bool, bool]:
    remove = bool_arg(cmd, "remove", "findAndModify", False)
    new = bool_arg(cmd, "new", "findAndModify", False)
    upsert = bool_arg(cmd, "upsert", "findAndModify", False)
    has_update = cmd.get("update") is not None
    if remove and has_update:
        raise MongoError("FailedToParse", "Cannot specify both an update and remove=true")
    if not remove and not has_update:
        raise MongoError("FailedToParse", "Either an update or remove=true must be specified")
    if remove and new:
        raise MongoError("FailedToParse", "Cannot specify both new=true and remove=true; "
                                          "'remove' always returns the deleted document")
    if remove and upsert:
        raise MongoError("FailedToParse", "Cannot specify both upsert=true and remove=true")
    return remove, new, upsert


@command("findAndModify", "findandmodify")
async def find_and_modify(s: Session, db: str, cmd: dict[str, Any],
                          seqs: Sequences) -> dict[str, Any]:
    name = next(iter(cmd))
    check_fields(cmd, name, _FIELDS)
    coll = collection_arg(s, db, cmd, name)
    require_data_database(s, db, coll)
    write_concern(cmd)
    let_arg(cmd)
    refuse_unsupported(cmd, "findAndModify")
    remove, new, upsert = _check_options(cmd)
    q = cmd.get("query", {})
    if q is None:
        q = {}
    if not isinstance(q, dict):
        raise MongoError("TypeMismatch", "BSON field 'findAndModify.query' is the wrong type, "
                                         "expected type 'object'")
    flt = parse_filter(q)
    fields = cmd.get("fields")
    project({"_id": 0}, fields)  # a bad projection is refused before anything is written
    upd = None if remove else parse_statement_update({"u": cmd["update"]}, False)
    route = await s.router.route(coll)
    sort = cmd.get("sort")
    sort_documents([], sort)
    for _ in range(_ATTEMPTS):
        limit = 1 if not sort else MULTI_WRITE_MAX + 1
        docs = sort_documents(await find_matching(s.router, coll, flt, limit=limit), sort)
        if len(docs) > MULTI_WRITE_MAX:
            raise MongoError("ExceededTimeLimit",
                             f"findAndModify with a sort reads at most {MULTI_WRITE_MAX} "
                             "matches; narrow the query (nothing was written)")
        if not docs:
            break
        doc = docs[0]
        if upd is None:
            if await delete_document(s, coll, route, doc):
                return {"lastErrorObject": {"n": 1}, "value": project(doc, fields)}
            continue
        _, now = await write_update(s, coll, route, doc, upd)
        if now is not None:
            return {"lastErrorObject": {"n": 1, "updatedExisting": True},
                    "value": project(now if new else doc, fields)}
    if upd is not None and upsert:
        inserted = await upsert_new(s, db, coll, route, q, upd)
        return {"lastErrorObject": {"n": 1, "updatedExisting": False,
                                    "upserted": inserted["_id"]},
                "value": project(inserted, fields) if new else None}
    out: dict[str, Any] = {"lastErrorObject": {"n": 0}, "value": None}
    if upd is not None:
        out["lastErrorObject"]["updatedExisting"] = False
    return out
