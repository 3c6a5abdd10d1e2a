"""Writes: ``insert``, ``update``, ``delete``.

A first, narrow version: updates and deletes name the shard key and ``_id`` of one document.
Per-statement failures are reported as MongoDB does, in ``writeErrors`` with the statement's
index; an ordered batch stops at its first failure.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from router.mongo.common import collection_arg, documents_arg, require_data_database
from router.mongo.errors import MongoError
from router.mongo.errors_map import to_mongo_error
from router.mongo.registry import Sequences, Session, command


def _write_error(index: int, exc: BaseException) -> dict[str, Any]:
    err = to_mongo_error(exc)
    out: dict[str, Any] = {"index": index, "code": err.code, "errmsg": err.message}
    if err.labels:
        out["errorLabels"] = err.labels  # kept on the write error for the application
    return out


def _reply(n: int, errors: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"n": n, **extra}
    if errors:
        reply["writeErrors"] = errors
    return reply


@command("insert")
async def insert(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = collection_arg(s, db, cmd, "insert")
    require_data_database(s, db, coll)
    docs = documents_arg(cmd, seqs, "documents")
    ordered = cmd.get("ordered", True) is not False
    n, errors = 0, []
    for i, doc in enumerate(docs):
        if "_id" not in doc:
            doc = {"_id": ObjectId(), **doc}
        try:
            await s.router.insert(coll, doc)
            n += 1
        except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
            errors.append(_write_error(i, exc))
            if ordered:
                break
    return _reply(n, errors)


def _key_and_id(route_key: str, q: Any) -> tuple[Any, Any]:
    if not isinstance(q, dict) or set(q) != {route_key, "_id"}:
        raise MongoError("NotImplemented",
                         f"a filter naming the shard key {route_key!r} and _id is needed")
    return q[route_key], q["_id"]


@command("update")
async def update(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = collection_arg(s, db, cmd, "update")
    require_data_database(s, db, coll)
    stmts = documents_arg(cmd, seqs, "updates")
    ordered = cmd.get("ordered", True) is not False
    route = await s.router.route(coll)
    n = modified = 0
    errors: list[dict[str, Any]] = []
    for i, st in enumerate(stmts):
        try:
            key, _id = _key_and_id(route.shard_key, st.get("q"))
            u = st.get("u")
            if not isinstance(u, dict):
                raise MongoError("FailedToParse", "u must be an update document")
            if u and all(k.startswith("$") for k in u):
                done = await s.router.patch(coll, key, _id, u) is not None
            else:
                done = await s.router.replace(coll, {**u, "_id": _id}, key=key)
            n += int(done)
            modified += int(done)
        except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
            errors.append(_write_error(i, exc))
            if ordered:
                break
    return _reply(n, errors, nModified=modified)


@command("delete")
async def delete(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    coll = collection_arg(s, db, cmd, "delete")
    require_data_database(s, db, coll)
    stmts = documents_arg(cmd, seqs, "deletes")
    ordered = cmd.get("ordered", True) is not False
    route = await s.router.route(coll)
    n, errors = 0, []
    for i, st in enumerate(stmts):
        try:
            key, _id = _key_and_id(route.shard_key, st.get("q"))
            n += int(await s.router.delete(coll, key, _id))
        except Exception as exc:  # noqa: BLE001 - each failure is reported for its statement
            errors.append(_write_error(i, exc))
            if ordered:
                break
    return _reply(n, errors)
