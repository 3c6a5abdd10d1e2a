"""Reads: ``find``, ``getMore``, ``killCursors``, ``count``, ``aggregate`` (the pipelines
``count_documents`` sends), ``listCollections`` and ``listDatabases``.

Every document comes through the router core's fenced reads (``query.iterate_matching``):
pages of a scan, read when a batch needs them. A sort is done in memory, bounded by
``SORT_MAX_BYTES`` of documents held (MongoDB's default for a blocking sort, 100 MiB): past it,
QueryExceededMemoryLimitNoDiskUseAllowed (292), whatever ``allowDiskUse`` says (the router has
no disk to spill to). A sort with a limit holds only ``skip + limit`` documents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import bson

from router.errors import UnknownCollectionError
from router.mongo import cursors
from router.mongo.common import collection_arg, in_data_database, int_arg
from router.mongo.errors import CODES, MongoError
from router.mongo.query import (
    Filter,
    find_matching,
    iterate_matching,
    matches,
    parse_filter,
    pinned_pair,
)
from router.mongo.registry import Sequences, Session, command
from router.mongo.shape import Projection, SortSpec, parse_projection, parse_sort, sort_key_fn
from shards.codec import bson_bytes
from shards.errors import InvalidNameError
from shards.names import check_collection

CODES.setdefault("Location40324", 40324)  # MongoDB's "Unrecognized pipeline stage name"

SORT_MAX_BYTES = 100 * 1024 * 1024
_PAGE = 500
_MAX_NS_BYTES = 255

_FIND_UNSUPPORTED = ("min", "max", "returnKey", "showRecordId", "tailable", "awaitData",
                     "oplogReplay", "let")
_KNOWN_STAGES = frozenset({
    "$addFields", "$bucket", "$bucketAuto", "$changeStream", "$collStats", "$count",
    "$densify", "$documents", "$facet", "$fill", "$geoNear", "$graphLookup", "$group",
    "$indexStats", "$limit", "$listSessions", "$lookup", "$match", "$merge", "$out",
    "$planCacheStats", "$project", "$redact", "$replaceRoot", "$replaceWith", "$sample",
    "$search", "$set", "$setWindowFields", "$skip", "$sort", "$sortByCount", "$unionWith",
    "$unset", "$unwind", "$currentOp", "$listLocalSessions", "$searchMeta",
})


def _empty_cursor(ns: str, key: str = "firstBatch") -> dict[str, Any]:
    return {"cursor": {"id": bson.Int64(0), "ns": ns, key: []}}


def _signed_int(cmd: dict[str, Any], name: str) -> int | None:
    if name not in cmd or cmd[name] is None:
        return None
    return int_arg(cmd, name, 0, lo=-(2**62))


async def _skip_project(pages: AsyncIterator[list[dict[str, Any]]], skip: int,
                        proj: Projection | None) -> AsyncIterator[list[dict[str, Any]]]:
    async for page in pages:
        if skip:
            cut = min(skip, len(page))
            page, skip = page[cut:], skip - cut
        yield [proj.apply(d) for d in page] if proj is not None else page


async def _sorted(pages: AsyncIterator[list[dict[str, Any]]], spec: SortSpec,
                  keep: int | None) -> AsyncIterator[list[dict[str, Any]]]:
    """All of ``pages`` in ``spec`` order (the first ``keep`` only, when given)."""
    key: Callable[[Mapping[str, Any]], Any] = sort_key_fn(spec)
    held: list[tuple[int, dict[str, Any]]] = []
    used = 0
    async for page in pages:
        for doc in page:
            size = len(bson_bytes(doc))
            held.append((size, doc))
            used += size
        if keep is not None and len(held) > keep and (
                len(held) > 2 * keep + _PAGE or used > SORT_MAX_BYTES):
            held.sort(key=lambda sd: key(sd[1]))
            del held[keep:]
            used = sum(sz for sz, _ in held)
        if used > SORT_MAX_BYTES:
            raise MongoError(
                "QueryExceededMemoryLimitNoDiskUseAllowed",
                f"Executor error during find command :: caused by :: Sort exceeded memory "
                f"limit of {SORT_MAX_BYTES} bytes, but did not opt in to external sorting. "
                "Add a limit, or a filter that selects fewer documents.")
    held.sort(key=lambda sd: key(sd[1]))
    docs = [d for _, d in (held if keep is None else held[:keep])]
    for i in range(0, len(docs), _PAGE):
        yield docs[i:i + _PAGE]


def _coll(s: Session, db: str, cmd: dict[str, Any], name: str) -> str:
    """The collection a read names; InvalidNamespace (73) for a name MongoDB refuses."""
    coll = collection_arg(s, db, cmd, name)
    if "\x00" in coll or "$" in coll or len(f"{db}.{coll}".encode()) > _MAX_NS_BYTES:
        raise MongoError("InvalidNamespace",
                         f"Invalid collection name: {coll[:100]!r} (no '$' or NUL, and the "
                         f"namespace at most {_MAX_NS_BYTES} bytes)")
    return coll


async def _exists(s: Session, coll: str) -> bool:
    """Does the collection exist? A name no shardshift collection can have does not."""
    try:
        check_collection(coll)
        await s.router.route(coll)
    except (UnknownCollectionError, InvalidNameError):
        return False
    return True


def _check_find(cmd: dict[str, Any]) -> None:
    for name in _FIND_UNSUPPORTED:
        if cmd.get(name) not in (None, False):
            raise MongoError("NotImplemented", f"find option {name!r} is not supported")
    coll = cmd.get("collation")
    if coll is not None and (not isinstance(coll, dict) or coll.get("locale") != "simple"):
        raise MongoError("NotImplemented", "only the simple collation is supported")


@command("find")
async def find(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = _coll(s, db, cmd, "find")
    ns = f"{db}.{coll}"
    _check_find(cmd)
    f = parse_filter(cmd.get("filter"))
    proj = parse_projection(cmd.get("projection"))
    spec = parse_sort(cmd.get("sort"))
    skip = int_arg(cmd, "skip", 0)
    limit = _signed_int(cmd, "limit")
    batch = _signed_int(cmd, "batchSize")
    if batch is not None and batch < 0:
        raise MongoError("BadValue", "batchSize must be non-negative")
    single = cmd.get("singleBatch") is True
    if limit is not None and limit < 0:  # the legacy "negative limit": one batch
        limit, single = -limit, True
    limit = limit or None
    if single and limit is not None:
        batch = limit if batch is None else min(batch, limit)
    if (limit == 1 and batch != 0 and proj is None and not spec and not skip
            and in_data_database(s, db)):
        # The fast path of ``find_one({<shard key>: v, _id: w})``: one fenced read, the
        # reply built here (no cursor can remain open with a limit of one).
        try:
            check_collection(coll)
            route = await s.router.route(coll)
        except (UnknownCollectionError, InvalidNameError):
            return _empty_cursor(ns)
        if pinned_pair(route.shard_key, f.doc) is not None:
            docs = await find_matching(s.router, coll, f, limit=1)
            return {"cursor": {"id": bson.Int64(0), "ns": ns, "firstBatch": docs}}
    if not in_data_database(s, db) or not await _exists(s, coll):
        return _empty_cursor(ns)
    pages: AsyncIterator[list[dict[str, Any]]] = iterate_matching(s.router, coll, f)
    if spec:
        pages = _sorted(pages, spec, None if limit is None else skip + limit)
    pages = _skip_project(pages, skip, proj)
    return await cursors.open_cursor(s, ns, pages, first_batch=batch, limit=limit,
                                     single=single)


@command("getMore")
async def get_more(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                   ) -> dict[str, Any]:
    cursor_id = cmd.get("getMore")
    if not isinstance(cursor_id, int) or isinstance(cursor_id, bool):
        raise MongoError("TypeMismatch", "Field 'getMore' must be of type long")
    coll = cmd.get("collection")
    if not isinstance(coll, str) or not coll:
        raise MongoError("TypeMismatch", "Field 'collection' must be of type string")
    batch = _signed_int(cmd, "batchSize")
    if batch is not None and batch < 0:
        raise MongoError("BadValue", "batchSize must be non-negative")
    return await cursors.get_more(s, int(cursor_id), f"{db}.{coll}", batch or None)


@command("killCursors")
async def kill_cursors(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                       ) -> dict[str, Any]:
    coll = _coll(s, db, cmd, "killCursors")
    ids = cmd.get("cursors")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in ids):
        raise MongoError("TypeMismatch", "Field 'cursors' must be an array of longs")
    return await cursors.kill(s, f"{db}.{coll}", [int(i) for i in ids])


async def _count(s: Session, coll: str, f: Filter, skip: int, limit: int | None) -> int:
    if not f.doc and not skip and limit is None:
        return await s.router.count(coll)
    n = 0
    async for page in iterate_matching(s.router, coll, f):
        n += len(page)
        if limit is not None and n >= skip + limit:
            break
    n = max(0, n - skip)
    return n if limit is None else min(n, limit)


@command("count")
async def count(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = _coll(s, db, cmd, "count")
    f = parse_filter(cmd.get("query"))
    skip = int_arg(cmd, "skip", 0)
    limit = _signed_int(cmd, "limit")
    limit = abs(limit) if limit else None
    if not in_data_database(s, db) or not await _exists(s, coll):
        return {"n": 0}
    return {"n": await _count(s, coll, f, skip, limit)}


def _count_pipeline(pipeline: Any) -> tuple[Filter, int, int | None, Any, str]:
    """The parts of ``[{$match}?, {$skip}?, {$limit}?, {$group: {_id: X, F: {$sum: 1}}}]``."""
    if not isinstance(pipeline, list):
        raise MongoError("TypeMismatch", "'pipeline' must be an array of objects")
    stages: list[tuple[str, Any]] = []
    for st in pipeline:
        if not isinstance(st, dict) or len(st) != 1:
            raise MongoError("Location40324" if isinstance(st, dict) else "TypeMismatch",
                             "A pipeline stage specification object must contain exactly "
                             "one field.")
        ((name, arg),) = st.items()
        if name not in _KNOWN_STAGES:
            raise MongoError("Location40324",
                             f"Unrecognized pipeline stage name: '{str(name)[:100]}'")
        stages.append((name, arg))
    f, skip, limit = parse_filter(None), 0, None
    names = [n for n, _ in stages]
    supported = names and names[-1] == "$group" and all(
        n in ("$match", "$skip", "$limit") for n in names[:-1]) and names[:-1] == sorted(
        names[:-1], key=["$match", "$skip", "$limit"].index) and len(set(names)) == len(names)
    group = stages[-1][1] if supported else None
    if (not isinstance(group, dict) or len(group) != 2 or "_id" not in group
            or isinstance(group["_id"], dict | str)):
        raise MongoError("NotImplemented", "aggregate supports only the count pipeline "
                         "(count_documents): [{$match}, {$skip}, {$limit}, "
                         "{$group: {_id: 1, n: {$sum: 1}}}]")
    out_name = next(k for k in group if k != "_id")
    if group[out_name] != {"$sum": 1}:
        raise MongoError("NotImplemented", "the $group of a count must be {$sum: 1}")
    for name, arg in stages[:-1]:
        if name == "$match":
            f = parse_filter(arg)
        elif name == "$skip":
            skip = int_arg({"$skip": arg}, "$skip", 0)
        else:
            limit = int_arg({"$limit": arg}, "$limit", 0, lo=1)
    return f, skip, limit, group["_id"], out_name


@command("aggregate")
async def aggregate(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                    ) -> dict[str, Any]:
    if not isinstance(cmd.get("aggregate"), str):
        raise MongoError("NotImplemented", "collectionless aggregate is not supported")
    coll = _coll(s, db, cmd, "aggregate")
    ns = f"{db}.{coll}"
    if not isinstance(cmd.get("cursor"), dict) and not cmd.get("explain"):
        raise MongoError("FailedToParse", "The 'cursor' option is required, except for "
                         "aggregate with the explain argument")
    if cmd.get("explain"):
        raise MongoError("NotImplemented", "explain is not supported")
    f, skip, limit, group_id, out_name = _count_pipeline(cmd.get("pipeline"))
    if not in_data_database(s, db) or not await _exists(s, coll):
        return _empty_cursor(ns)
    n = await _count(s, coll, f, skip, limit)
    batch = [{"_id": group_id, out_name: n}] if n else []
    return {"cursor": {"id": bson.Int64(0), "ns": ns, "firstBatch": batch}}


_ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


@command("listCollections")
async def list_collections(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                           ) -> dict[str, Any]:
    ns = f"{db}.$cmd.listCollections"
    flt = cmd.get("filter")
    f = parse_filter(flt)
    name_only = bool(cmd.get("nameOnly", False))
    if not in_data_database(s, db):
        return _empty_cursor(ns)
    out = []
    for c in await s.router.collections():
        entry: dict[str, Any] = {
            "name": c.name, "type": "collection", "options": {},
            "info": {"readOnly": False, "shardKey": {c.shard_key: "hashed"}},
            "idIndex": dict(_ID_INDEX),
        }
        if matches(entry, f):
            out.append({"name": c.name, "type": "collection"} if name_only else entry)
    return {"cursor": {"id": bson.Int64(0), "ns": ns, "firstBatch": out}}


@command("listDatabases")
async def list_databases(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                         ) -> dict[str, Any]:
    if db != "admin":
        raise MongoError("Unauthorized",
                         "listDatabases may only be run against the admin database.")
    f = parse_filter(cmd.get("filter"))
    colls = await s.router.collections()
    size = sum(c.size_bytes for c in colls)
    entry: dict[str, Any] = {"name": s.server.database, "sizeOnDisk": bson.Int64(size),
                             "empty": not colls}
    dbs = [entry] if matches(entry, f) else []
    if cmd.get("nameOnly"):
        return {"databases": [{"name": d["name"]} for d in dbs]}
    return {"databases": dbs, "totalSize": bson.Int64(sum(d["sizeOnDisk"] for d in dbs)),
            "totalSizeMb": bson.Int64(sum(d["sizeOnDisk"] for d in dbs) // (1024 * 1024))}
