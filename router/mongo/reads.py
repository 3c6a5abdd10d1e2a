"""Reads: ``find``.

A first, narrow version: a filter that names the shard key and ``_id`` (one document), or one
field that is the shard key or the first field of an index (equality). Everything is returned
in the first batch (cursor id 0).
"""

from __future__ import annotations

from typing import Any

from router.mongo.common import collection_arg, in_data_database, int_arg
from router.mongo.errors import MongoError
from router.mongo.registry import Sequences, Session, command

_OPERATOR_PREFIX = "$"


@command("find")
async def find(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = collection_arg(s, db, cmd, "find")
    ns = f"{db}.{coll}"
    flt = cmd.get("filter", {})
    if not isinstance(flt, dict):
        raise MongoError("TypeMismatch", "filter must be an object")
    limit = int_arg(cmd, "limit", 0)
    if not in_data_database(s, db):
        return {"cursor": {"id": 0, "ns": ns, "firstBatch": []}}
    route = await s.router.route(coll)
    if any(isinstance(v, dict) and any(str(k).startswith(_OPERATOR_PREFIX) for k in v)
           for v in flt.values()):
        raise MongoError("NotImplemented", "query operators are not supported yet")
    docs: list[dict[str, Any]]
    if set(flt) == {route.shard_key, "_id"}:
        doc = await s.router.get(coll, flt[route.shard_key], flt["_id"])
        docs = [doc] if doc is not None else []
    elif len(flt) == 1:
        docs = list(await s.router.find(coll, flt, limit=min(limit or 10_000, 10_000)))
    else:
        raise MongoError("NotImplemented", "this filter shape is not supported yet")
    return {"cursor": {"id": 0, "ns": ns, "firstBatch": docs}}
