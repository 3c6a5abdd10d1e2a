"""What command modules share: namespaces, argument checks."""

from __future__ import annotations

from typing import Any

from router.mongo.errors import MongoError
from router.mongo.registry import Session


def collection_arg(s: Session, db: str, cmd: dict[str, Any], name: str) -> str:
    """The collection a command names (``{find: "orders"}``), checked against the database
    that holds the catalog's collections."""
    coll = cmd.get(name)
    if not isinstance(coll, str) or not coll:
        raise MongoError("InvalidNamespace",
                         f"collection name has invalid type {type(coll).__name__}")
    return coll


def in_data_database(s: Session, db: str) -> bool:
    """Does ``db`` hold the catalog's collections?"""
    return db == s.server.database


def require_data_database(s: Session, db: str, coll: str) -> None:
    """Writes and DDL need the data database: other databases hold no collections."""
    if not in_data_database(s, db):
        raise MongoError(
            "NamespaceNotFound",
            f"{db[:64]}.{coll[:100]}: collections live in database {s.server.database!r}; "
            "create a sharded collection with `shardshift collection create`")


def int_arg(cmd: dict[str, Any], name: str, default: int, *, lo: int = 0,
            hi: int = 2**62) -> int:
    value = cmd.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise MongoError("TypeMismatch", f"{name} must be an integer")
    if not lo <= int(value) <= hi:
        raise MongoError("BadValue", f"{name} must be between {lo} and {hi}")
    return int(value)


def documents_arg(cmd: dict[str, Any], seqs: dict[str, list[dict[str, Any]]],
                  name: str) -> list[dict[str, Any]]:
    """A list argument given in the body or as an OP_MSG document sequence (not both)."""
    in_body = cmd.get(name)
    in_seq = seqs.get(name)
    if in_body is not None and in_seq is not None:
        raise MongoError("BadValue", f"{name} given both in the command and as a sequence")
    docs = in_seq if in_seq is not None else in_body
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        raise MongoError("TypeMismatch", f"{name} must be an array of documents")
    return docs
