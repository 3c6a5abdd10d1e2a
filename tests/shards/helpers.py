"""Shard-test helpers: documents covering every BSON type, written straight into a shard's
table and read back decoded (test setup, no fences involved)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp
from psycopg import sql

from router.hashing import khash
from shards.codec import decode_document
from shards.models import KHASH_END, KHASH_MIN, IndexDefinition, KeyRange
from shards.postgres import PostgresShard
from shards.postgres.documents import encode_for_store

FULL = KeyRange(lo=KHASH_MIN, hi=KHASH_END)
INDEXES = (IndexDefinition(name="acct", fields=("account",)),)
TRICKY = 'quote " comma , newline \n cr \r tab \t backslash \\ "" \\" unicode é 😀 \\N'


async def prepare(dsn: str, collection: str) -> None:
    """Schema, the collection's table and its secondary index (before any data, as on a target)."""
    async with PostgresShard("t", dsn) as shard:
        await shard.ensure_schema()
        await shard.create_collection(collection, INDEXES)


def make_docs(n: int, tag: str = "d") -> list[dict[str, Any]]:
    """Documents covering every BSON type the codec keeps, and CSV-hostile strings."""
    base = dt.datetime(2024, 2, 29, 23, 59, 59, 123000, tzinfo=dt.UTC)
    docs = []
    for i in range(n):
        docs.append({
            "_id": ObjectId() if i % 3 else f"{tag}-{i},\"x\"\n",
            "account": f"acct-{tag}-{i}",
            "amount": Decimal128(Decimal(f"{i}.{i % 100:02d}")),
            "when": base + dt.timedelta(seconds=i),
            "i32": i,
            "i64": Int64(2**40 + i),
            "dbl": i / 3,
            "bin": bytes([i % 256, 0, 255]) * 3,  # subtype 0 reads back as bytes
            "bin80": Binary(bytes([i % 256]) * 5, 0x80),
            "uid": uuid.UUID(int=i + 1),
            "nested": {"a": [1, {"b": Int64(i)}, [TRICKY]], "empty": {}, "none": None},
            "re": Regex(r"^a.*\d$", "i"),
            "ts": Timestamp(1_700_000_000 + i, i % 7),
            "flag": bool(i % 2),
            "text": TRICKY,
        })
    return docs


def load_docs(dsn: str, collection: str, docs: Sequence[dict[str, Any]]) -> None:
    """Write documents straight into a shard's table (test setup; no fences involved)."""
    table = sql.SQL("docs.{}").format(sql.Identifier(collection))
    with psycopg.connect(dsn) as conn, conn.cursor().copy(
        sql.SQL("COPY {} (khash, id, doc) FROM STDIN").format(table)
    ) as copy:
        for doc in docs:
            id_text, doc_text = encode_for_store(doc)
            copy.write_row((khash(doc["account"]), id_text, doc_text))


def read_docs(dsn: str, collection: str, key_range: KeyRange = FULL) -> list[dict[str, Any]]:
    """Every document of a range, decoded, in primary-key order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT doc::text FROM docs.{} WHERE khash >= %s AND (%s::bigint IS NULL"
                    " OR khash < %s) ORDER BY khash, id").format(sql.Identifier(collection)),
            (key_range.lo, key_range.sql_hi, key_range.sql_hi),
        ).fetchall()
    return [decode_document(r[0]) for r in rows]


def keyed(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["account"]: d for d in docs}
