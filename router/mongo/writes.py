"""Writes: ``insert``, ``update``, ``delete``.

Every document is written through the router core (``Router.insert/replace/patch/delete``),
addressed by its shard key and ``_id``, so a chunk move's cutover stays invisible here.

How a statement runs
--------------------
* ``insert``: one core insert per document (``_id`` generated when absent). An unordered
  batch runs its documents concurrently; an ordered one stops at its first failure.
* ``update`` / ``delete``: the documents the filter selects are found first
  (``query.find_matching``: one chunk when the filter pins the shard key, else the owning
  shards), then each is written by its shard key and ``_id``. An update is applied to a copy
  first (``updates``), so MongoDB's errors (an unknown modifier, a changed ``_id`` or shard
  key, ``$inc`` on a string) come before anything is written, and a no-op counts as matched
  but not modified. ``$inc`` is applied by the shard to the value it holds.

Atomicity is per document, as in MongoDB without transactions: a multi-document update or
delete that fails midway has written the documents before the failure (counted in ``n``) and
none after; the filter is evaluated when the documents are read, so a document a concurrent
writer changes in between may be written although it no longer matches (or missed when it
starts to match).

A write whose outcome is unknown (the shard connection broke after the statement was sent)
is reported in ``writeErrors`` with the ``ShardshiftOutcomeUnknown`` label and never repeated.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from router.core import Router
from router.errors import BadRequestError, DocumentTooLargeError
from router.mongo.common import collection_arg, documents_arg, require_data_database
from router.mongo.errors import MongoError
from router.mongo.errors_map import to_mongo_error
from router.mongo.query import find_matching, parse_filter, pinned_pair
from router.mongo.registry import Sequences, Session, command
from router.mongo.updates import (
    MISSING,
    Update,
    apply_update,
    check_immutable,
    check_replacement,
    parse_update,
    patch_for_shard,
    same_document,
    upsert_document,
    upsert_seed,
    value_at,
)
from router.mongo.write_args import (
    bool_arg,
    check_batch,
    check_fields,
    check_statement,
    let_arg,
    refuse_unsupported,
    write_concern,
)
from router.routes import CollectionRoute
from shards.codec import bson_bytes
from shards.errors import DuplicateDocumentError, InvalidDocumentError

MULTI_WRITE_MAX = 9_999
"""Documents one multi-document update may change (the filter's matches are read at once);
more is refused before anything is written. A multi-document delete has no such bound: it
deletes in rounds until nothing matches."""
_ROUND = MULTI_WRITE_MAX + 1
_UNORDERED_CONCURRENCY = 16
_MISSING_KEY = object()

_INSERT_FIELDS = frozenset({"documents", "ordered", "bypassDocumentValidation", "let"})
_UPDATE_FIELDS = frozenset({"updates", "ordered", "bypassDocumentValidation", "let"})
_DELETE_FIELDS = frozenset({"deletes", "ordered", "let"})
_UPDATE_STMT = frozenset({"q", "u", "multi", "upsert", "arrayFilters", "collation", "hint",
                          "c", "upsertSupplied", "sort"})
_DELETE_STMT = frozenset({"q", "limit", "collation", "hint"})


@dataclass
class Counts:
    """What a statement did, kept as it goes (a failure midway keeps what was done)."""

    n: int = 0
    modified: int = 0
    upserted: Any = _MISSING_KEY


def _write_error(index: int, exc: BaseException) -> dict[str, Any]:
    err = to_mongo_error(exc)
    out: dict[str, Any] = {"index": index, "code": err.code, "errmsg": err.message}
    out.update(err.extra)
    if err.labels:
        out["errorLabels"] = err.labels  # kept on the write error for the application
    return out


def _reply(n: int, errors: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"n": n, **extra}
    if errors:
        reply["writeErrors"] = sorted(errors, key=lambda e: e["index"])
    return reply


def _preamble(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences, name: str,
              arg: str, fields: frozenset[str]) -> tuple[str, list[dict[str, Any]], bool]:
    check_fields(cmd, name, fields)
    coll = collection_arg(s, db, cmd, name)
    require_data_database(s, db, coll)
    write_concern(cmd)
    let_arg(cmd)
    stmts = documents_arg(cmd, seqs, arg)
    check_batch(stmts)
    return coll, stmts, bool_arg(cmd, "ordered", name, True)


def duplicate_key(db: str, coll: str, route: CollectionRoute, doc: dict[str, Any],
                  exc: BaseException) -> MongoError:
    """MongoDB's duplicate key error: a document is identified by its shard key and ``_id``."""
    key = {route.shard_key: value_at(doc, route.shard_key), "_id": doc.get("_id")}
    shown = ", ".join(f"{k}: {v!r:.80}" for k, v in key.items())
    return MongoError(
        "DuplicateKey",
        f"E11000 duplicate key error collection: {db}.{coll} index: {route.shard_key}_1__id_1 "
        f"dup key: {{ {shown} }}",
        extra={"keyPattern": {route.shard_key: 1, "_id": 1}, "keyValue": key})


def check_new_document(route: CollectionRoute, doc: dict[str, Any]) -> None:
    """What MongoDB refuses in a document to insert, as it says it."""
    if isinstance(doc.get("_id"), list):
        raise MongoError("BadValue", "can't use an array for _id")
    key = value_at(doc, route.shard_key)
    if key is MISSING:
        raise MongoError(
            "ShardKeyNotFound",
            f"document {{_id: {doc.get('_id')!r:.80}}} does not contain shard key for pattern "
            f"{{ {route.shard_key}: 1 }}")
    if isinstance(key, list):
        raise MongoError("BadValue", f"the shard key {route.shard_key!r} cannot be an array")


async def insert_document(router: Router, db: str, coll: str, route: CollectionRoute,
                          doc: dict[str, Any]) -> dict[str, Any]:
    """Insert one document (``_id`` first, generated when absent); the document inserted."""
    doc = {"_id": doc["_id"], **doc} if "_id" in doc else {"_id": ObjectId(), **doc}
    check_new_document(route, doc)
    try:
        await router.insert(coll, doc)
    except DuplicateDocumentError as exc:
        raise duplicate_key(db, coll, route, doc, exc) from exc
    return doc


@command("insert")
async def insert(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll, docs, ordered = _preamble(s, db, cmd, seqs, "insert", "documents", _INSERT_FIELDS)
    route = await s.router.route(coll)
    errors: list[dict[str, Any]] = []
    if ordered:
        n = 0
        for i, doc in enumerate(docs):
            try:
                await insert_document(s.router, db, coll, route, doc)
                n += 1
            except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
                errors.append(_write_error(i, exc))
                break
        return _reply(n, errors)
    gate = asyncio.Semaphore(_UNORDERED_CONCURRENCY)

    async def one(i: int, doc: dict[str, Any]) -> int:
        async with gate:
            try:
                await insert_document(s.router, db, coll, route, doc)
                return 1
            except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
                errors.append(_write_error(i, exc))
                return 0

    done = await asyncio.gather(*(one(i, d) for i, d in enumerate(docs)))
    return _reply(sum(done), errors)


# -- update -------------------------------------------------------------------------------------


async def write_update(s: Session, coll: str, route: CollectionRoute, doc: dict[str, Any],
                       upd: Update) -> tuple[bool, dict[str, Any] | None]:
    """Apply ``upd`` to the stored ``doc``: (modified, the document now; None when it was
    deleted in between)."""
    new = apply_update(doc, upd)
    check_immutable(doc, new, route.shard_key)
    if same_document(doc, new):
        return False, doc
    if len(bson_bytes(new)) > s.settings.max_document_bytes:
        raise MongoError("BSONObjectTooLarge",
                         f"the updated document would exceed {s.settings.max_document_bytes} "
                         "bytes of BSON")
    key = value_at(doc, route.shard_key)
    if upd.is_replacement:
        if not await s.router.replace(coll, new, key=key):
            return False, None
        return True, new
    ops = patch_for_shard(upd, route.shard_key)
    if not ops:
        return False, doc
    got = await s.router.patch(coll, key, doc["_id"], ops)
    return got is not None, got


async def upsert_new(s: Session, db: str, coll: str, route: CollectionRoute,
                     q: dict[str, Any], upd: Update) -> dict[str, Any]:
    """Insert what an upsert that matched nothing makes (MongoDB's sharded rule: the shard
    key comes from the filter's equality fields, or from the replacement)."""
    seed = upsert_seed(q)
    new = upsert_document(q, upd)
    source = new if upd.is_replacement else seed
    if value_at(source, route.shard_key) is MISSING:
        where = "the replacement document" if upd.is_replacement else "the filter (equality)"
        raise MongoError(
            "ShardKeyNotFound",
            f"Failed to target upsert by query :: could not extract exact shard key: an "
            f"upsert needs the shard key {route.shard_key!r} in {where}")
    if not upd.is_replacement:
        check_immutable(seed, new, route.shard_key)
    return await insert_document(s.router, db, coll, route, new)


def parse_statement_update(st: dict[str, Any], multi: bool) -> Update:
    upd = parse_update(st.get("u"))
    if upd.replacement is not None:
        check_replacement(upd.replacement)
        if multi:
            raise MongoError("FailedToParse",
                             "multi update is not supported for replacement-style update")
    return upd


async def update_statement(s: Session, db: str, coll: str, route: CollectionRoute,
                           st: dict[str, Any], counts: Counts) -> None:
    check_statement(st, "update.updates", _UPDATE_STMT)
    refuse_unsupported(st, "update")
    if st.get("sort") is not None:
        raise MongoError("NotImplemented", "update: sort is not supported; use findAndModify")
    if "u" not in st or "q" not in st:
        raise MongoError("FailedToParse", "an update statement needs 'q' and 'u'")
    q = st["q"]
    if not isinstance(q, dict):
        raise MongoError("TypeMismatch", "BSON field 'update.updates.q' is the wrong type, "
                                         "expected type 'object'")
    multi = bool_arg(st, "multi", "update.updates", False)
    upsert = bool_arg(st, "upsert", "update.updates", False)
    upd = parse_statement_update(st, multi)
    flt = parse_filter(q)
    if upd.replacement is not None and await _replace_pinned(s, coll, route, q, upd.replacement,
                                                             counts):
        return
    docs = await find_matching(s.router, coll, flt, limit=_ROUND if multi else 1)
    if multi and len(docs) > MULTI_WRITE_MAX:
        raise MongoError("ExceededTimeLimit",
                         f"a multi update may change at most {MULTI_WRITE_MAX} documents at "
                         "once; narrow the filter (nothing was written)")
    if not docs and upsert:
        new = await upsert_new(s, db, coll, route, q, upd)
        counts.n += 1
        counts.upserted = new["_id"]
        return
    for doc in docs[: None if multi else 1]:
        modified, now = await write_update(s, coll, route, doc, upd)
        counts.n += int(now is not None)
        counts.modified += int(modified)


def _same_bson(a: Any, b: Any) -> bool:
    return bson_bytes({"v": a}) == bson_bytes({"v": b})


async def _replace_pinned(s: Session, coll: str, route: CollectionRoute, q: dict[str, Any],
                          replacement: dict[str, Any], counts: Counts) -> bool:
    """The fast path of a replacement pinned by shard key and ``_id`` (``replace_one({k: v,
    _id: w}, doc)``): the read-modify-write in one fenced statement (``Router.replace_pinned``)
    when the stored document holds ``v`` and ``w`` in the very BSON types the filter names
    and the replacement keeps both. True when it matched (``counts`` updated); False, with
    nothing written, when the general path must decide (no such document in those types, an
    upsert to make, a replacement the general path refuses or reports on)."""
    pair = pinned_pair(route.shard_key, q)
    if pair is None:
        return False
    key, _id = pair
    if "_id" in replacement and not _same_bson(replacement["_id"], _id):
        return False  # ImmutableField, or another _id form: the general path says which
    new = {"_id": _id, **replacement}
    new_key = value_at(new, route.shard_key)
    if new_key is MISSING or not _same_bson(new_key, key):
        return False
    try:
        if len(bson_bytes(new)) > s.settings.max_document_bytes:
            return False  # BSONObjectTooLarge, once a match is known
        matched, written = await s.router.replace_pinned(coll, new)
    except (BadRequestError, DocumentTooLargeError, InvalidDocumentError):
        return False  # refused before anything was sent: reported as the general path does
    if not matched:
        return False
    counts.n += 1
    counts.modified += written
    return True


@command("update")
async def update(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll, stmts, ordered = _preamble(s, db, cmd, seqs, "update", "updates", _UPDATE_FIELDS)
    route = await s.router.route(coll)
    n = modified = 0
    errors: list[dict[str, Any]] = []
    upserted: list[dict[str, Any]] = []
    for i, st in enumerate(stmts):
        counts = Counts()
        try:
            await update_statement(s, db, coll, route, st, counts)
        except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
            errors.append(_write_error(i, exc))
        n += counts.n
        modified += counts.modified
        if counts.upserted is not _MISSING_KEY:
            upserted.append({"index": i, "_id": counts.upserted})
        if errors and ordered:
            break
    extra: dict[str, Any] = {"nModified": modified}
    if upserted:
        extra["upserted"] = upserted
    return _reply(n, errors, **extra)


# -- delete -------------------------------------------------------------------------------------


async def delete_document(s: Session, coll: str, route: CollectionRoute,
                          doc: dict[str, Any]) -> bool:
    return await s.router.delete(coll, value_at(doc, route.shard_key), doc["_id"])


async def delete_statement(s: Session, coll: str, route: CollectionRoute, st: dict[str, Any],
                           counts: Counts) -> None:
    check_statement(st, "delete.deletes", _DELETE_STMT)
    refuse_unsupported(st, "delete")
    q, limit = st.get("q"), st.get("limit")
    if not isinstance(q, dict):
        raise MongoError("TypeMismatch", "BSON field 'delete.deletes.q' is missing or is not "
                                         "an object")
    if isinstance(limit, bool) or limit not in (0, 1):
        raise MongoError("FailedToParse",
                         f"The limit field in delete objects must be 0 or 1. Got {limit!r:.40}")
    flt = parse_filter(q)
    if limit == 1:
        for _ in range(3):  # a match deleted by another client in between: look again
            docs = await find_matching(s.router, coll, flt, limit=1)
            if not docs:
                return
            if await delete_document(s, coll, route, docs[0]):
                counts.n += 1
                return
        return
    while True:  # limit 0: every match, in rounds
        docs = await find_matching(s.router, coll, flt, limit=_ROUND)
        deleted = 0
        for doc in docs:
            deleted += int(await delete_document(s, coll, route, doc))
        counts.n += deleted
        if len(docs) < _ROUND or not deleted:
            return


@command("delete")
async def delete(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll, stmts, ordered = _preamble(s, db, cmd, seqs, "delete", "deletes", _DELETE_FIELDS)
    route = await s.router.route(coll)
    n = 0
    errors: list[dict[str, Any]] = []
    for i, st in enumerate(stmts):
        counts = Counts()
        try:
            await delete_statement(s, coll, route, st, counts)
        except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
            errors.append(_write_error(i, exc))
        n += counts.n
        if errors and ordered:
            break
    return _reply(n, errors)
