"""Arguments every write command shares: the known fields, ``ordered``, ``writeConcern``.

MongoDB checks a command's fields against its definition (IDL) and refuses an unknown one
(``BSON field 'insert.foo' is an unknown field.``, code 40415) before anything runs; so does
the router, so a misspelt option is never silently ignored.
"""

from __future__ import annotations

from typing import Any

from router.mongo.admin import MAX_WRITE_BATCH
from router.mongo.errors import MongoError

GENERIC_FIELDS = frozenset({
    "$db", "lsid", "$clusterTime", "$readPreference", "apiVersion", "apiStrict",
    "apiDeprecationErrors", "maxTimeMS", "comment", "writeConcern", "$client", "$audit",
    "mayBypassWriteBlocking", "readConcern",
})
"""Fields any command may carry (drivers add some of them to every command)."""


def check_fields(cmd: dict[str, Any], name: str, allowed: frozenset[str]) -> None:
    for key in cmd:
        if key != name and key not in allowed and key not in GENERIC_FIELDS:
            raise MongoError("Location40415",
                             f"BSON field '{name}.{str(key)[:100]}' is an unknown field.")


def check_statement(stmt: dict[str, Any], where: str, allowed: frozenset[str]) -> None:
    for key in stmt:
        if key not in allowed:
            raise MongoError("Location40415",
                             f"BSON field '{where}.{str(key)[:100]}' is an unknown field.")


def bool_arg(doc: dict[str, Any], name: str, where: str, default: bool) -> bool:
    value = doc.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return bool(value)  # MongoDB takes a number where a bool is expected
    raise MongoError("TypeMismatch",
                     f"BSON field '{where}.{name}' is the wrong type '{type(value).__name__}', "
                     "expected type 'bool'")


def check_batch(stmts: list[dict[str, Any]]) -> None:
    if not 1 <= len(stmts) <= MAX_WRITE_BATCH:
        raise MongoError("InvalidLength", f"Write batch sizes must be between 1 and "
                                          f"{MAX_WRITE_BATCH}. Got {len(stmts)} operations.")


def write_concern(cmd: dict[str, Any]) -> dict[str, Any]:
    """The command's ``writeConcern``, checked. Every acknowledged write is committed on its
    shard's primary (PostgreSQL, synchronous commit) before the reply, so ``w: 1`` and
    ``w: "majority"`` are both met; ``w: 0`` runs the write and sends no reply (the driver
    sets ``moreToCome``). A ``w`` of more than one node or a tag cannot be met."""
    wc = cmd.get("writeConcern", {})
    if not isinstance(wc, dict):
        raise MongoError("TypeMismatch", "writeConcern must be an object")
    for key in wc:
        if key not in ("w", "j", "wtimeout", "fsync", "provenance", "wtimeoutMS"):
            raise MongoError("Location40415",
                             f"BSON field 'writeConcern.{str(key)[:100]}' is an unknown field.")
    w = wc.get("w", 1)
    if isinstance(w, bool) or not isinstance(w, int | float | str):
        raise MongoError("FailedToParse", "w has to be a number or string")
    if isinstance(w, str):
        if w != "majority":
            raise MongoError("UnknownReplWriteConcern",
                             f"No write concern mode named '{w[:100]}' found in the "
                             "router's configuration")
    elif w < 0 or w != int(w):
        raise MongoError("FailedToParse", "w has to be a non-negative integer")
    elif w > 1:
        raise MongoError("UnsatisfiableWriteConcern",
                         "Not enough data-bearing nodes: each shard acknowledges as one node "
                         "(w: 1 or 'majority')")
    for flag in ("j", "fsync"):
        if flag in wc and not isinstance(wc[flag], bool | int | float):
            raise MongoError("TypeMismatch", f"writeConcern.{flag} must be a boolean")
    return wc


def let_arg(cmd: dict[str, Any]) -> None:
    """``let`` defines variables for ``$expr``/pipelines, which the router does not evaluate:
    accepted (a document) and unused."""
    if "let" in cmd and not isinstance(cmd["let"], dict):
        raise MongoError("TypeMismatch", "BSON field 'let' is the wrong type, expected object")


def refuse_unsupported(stmt: dict[str, Any], where: str) -> None:
    """Statement options MongoDB has and the router does not: an error, nothing written."""
    if stmt.get("arrayFilters") is not None:
        raise MongoError("NotImplemented", f"{where}: arrayFilters are not supported")
    if stmt.get("hint") not in (None, {}, ""):
        raise MongoError("NotImplemented", f"{where}: hint is not supported")
    coll = stmt.get("collation")
    if coll is not None and coll != {"locale": "simple"}:
        raise MongoError("NotImplemented",
                         f"{where}: collation is not supported (only {{locale: 'simple'}})")
