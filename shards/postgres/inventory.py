"""What shardshift keeps on one PostgreSQL shard, listed for ``shardshift doctor``.

A move leaves server objects on its shards while it runs: a slot and a publication on the
source, a replication origin and a ``stream_state`` row on the target (all named by
:func:`~shards.postgres.replication.stream_names`), a ``chunk_fence`` row, rows of the chunk
on the target, and ``import_parts`` progress rows. A move that finishes removes them; a move
whose workflow died, or whose cleanup could not reach a shard, may not. This module lists
them (:func:`inspect_shard`, :func:`chunks_with_rows`) and removes one named object at a
time (:func:`drop_stream_object`); deciding *whether* an object is a leftover needs the
catalog and Temporal and lives in ``activities/doctor.py`` (the cutover lock it takes first
is in ``locks.py``).

Only objects with shardshift's name prefix (``ss_``) are listed: anything else on the server
is not ours. Every function is blocking (run it in a thread) and idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from shards.models import KHASH_END, FenceState, KeyRange
from shards.names import check_collection
from shards.postgres.replication import NAME_PREFIX, drop_slot
from shards.postgres.schema import DOCS, collection_table

ROWS_COUNT_CAP = 1_000_000
"""Rows of a leftover chunk are counted up to this many (an estimate for people, not a plan)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StreamObjectKind(StrEnum):
    SLOT = "slot"
    PUBLICATION = "publication"
    ORIGIN = "origin"
    STREAM_STATE = "stream_state"
    """A ``shardshift.stream_state`` row whose replication origin is gone."""


class StreamObject(_Frozen):
    """One change-stream object with shardshift's name prefix."""

    kind: StreamObjectKind
    name: str
    active_pid: int | None = None
    """Slots: the walsender holding it (None: idle)."""
    collections: tuple[str, ...] = ()
    """Publications: the collections whose table it publishes."""
    migration_id: str | None = None
    """Known exactly for streams with a ``stream_state`` row (the target side)."""

    @property
    def prefix(self) -> str:
        """The migration prefix of the name (``migration_prefix``): the name minus its part."""
        return self.name.rsplit("_", 1)[0] + "_"


class FenceRow(_Frozen):
    """A ``chunk_fence`` row, with the migration that wrote it (when recorded)."""

    collection: str
    chunk_id: int
    range: KeyRange
    token: int
    state: FenceState
    migration_id: str | None = None


class ShardInventory(_Frozen):
    """Everything of shardshift's on one server."""

    server_version: int
    streams: tuple[StreamObject, ...] = ()
    fences: tuple[FenceRow, ...] = ()
    import_parts: dict[str, int] = {}
    """Migration id -> import-progress rows kept for it."""
    collections: tuple[str, ...] = ()
    """Collections with a table in the ``docs`` schema."""


def _exists(conn: psycopg.Connection[Any], relation: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()
    return bool(row and row[0])


def inspect_shard(dsn: str, *, connect_timeout: float = 5.0) -> ShardInventory:
    """List shardshift's slots, publications, origins, stream rows, fences, import rows and
    collection tables on one server (read only).

    Raises:
        psycopg.OperationalError: the server cannot be reached.
    """
    like = NAME_PREFIX.replace("_", r"\_") + "%"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=int(connect_timeout)) as conn:
        version = conn.info.server_version
        streams: list[StreamObject] = [
            StreamObject(kind=StreamObjectKind.SLOT, name=name, active_pid=pid)
            for name, pid in conn.execute(
                "SELECT slot_name::text, active_pid FROM pg_replication_slots"
                " WHERE slot_name::text LIKE %s AND database = current_database()"
                " ORDER BY slot_name", (like,))
        ]
        tables: dict[str, list[str]] = {}
        for pub, schema, table in conn.execute(
            "SELECT p.pubname::text, t.schemaname::text, t.tablename::text"
            " FROM pg_publication p LEFT JOIN pg_publication_tables t ON t.pubname = p.pubname"
            " WHERE p.pubname::text LIKE %s ORDER BY p.pubname", (like,)
        ):
            tables.setdefault(pub, [])
            if schema == DOCS and table is not None:
                tables[pub].append(table)
        streams += [StreamObject(kind=StreamObjectKind.PUBLICATION, name=pub,
                                 collections=tuple(sorted(colls)))
                    for pub, colls in tables.items()]
        states: dict[str, str] = {}
        if _exists(conn, "shardshift.stream_state"):
            states = dict(conn.execute(
                "SELECT stream, migration_id FROM shardshift.stream_state"
                " WHERE stream LIKE %s", (like,)).fetchall())
        origins = [r[0] for r in conn.execute(
            "SELECT roname FROM pg_replication_origin WHERE roname LIKE %s ORDER BY roname",
            (like,))]
        streams += [StreamObject(kind=StreamObjectKind.ORIGIN, name=o, migration_id=states.get(o))
                    for o in origins]
        streams += [StreamObject(kind=StreamObjectKind.STREAM_STATE, name=s, migration_id=m)
                    for s, m in sorted(states.items()) if s not in origins]
        fences: list[FenceRow] = []
        parts: dict[str, int] = {}
        if _exists(conn, "shardshift.chunk_fence"):
            fences = [
                FenceRow(collection=c, chunk_id=k,
                         range=KeyRange(lo=lo, hi=KHASH_END if hi is None else hi),
                         token=t, state=FenceState(s), migration_id=m)
                for c, k, lo, hi, t, s, m in conn.execute(
                    "SELECT collection, chunk_id, lo, hi, token, state, migration_id"
                    " FROM shardshift.chunk_fence ORDER BY collection, lo")
            ]
        if _exists(conn, "shardshift.import_parts"):
            parts = {m: int(n) for m, n in conn.execute(
                "SELECT migration_id, count(*) FROM shardshift.import_parts"
                " GROUP BY migration_id ORDER BY migration_id")}
        collections = tuple(r[0] for r in conn.execute(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = %s ORDER BY 1", (DOCS,)))
    return ShardInventory(server_version=version, streams=tuple(streams), fences=tuple(fences),
                          import_parts=parts, collections=collections)


def chunks_with_rows(
    dsn: str, collection: str, chunks: Sequence[tuple[int, KeyRange]]
) -> dict[int, int]:
    """Which of ``chunks`` (chunk id, range) have rows on this server, and how many (counted
    up to :data:`ROWS_COUNT_CAP`). One index probe per chunk, in one round trip."""
    check_collection(collection)
    if not chunks:
        return {}
    table = collection_table(collection)
    ids = [k for k, _ in chunks]
    los = [r.lo for _, r in chunks]
    # An inclusive top bound fits a bigint even for the last chunk (hi = 2^63).
    his = [r.hi - 1 for _, r in chunks]
    probe = sql.SQL(
        "SELECT r.chunk_id FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])"
        " AS r(chunk_id, lo, hi)"
        " WHERE EXISTS (SELECT 1 FROM {t} d WHERE d.khash >= r.lo AND d.khash <= r.hi)"
    ).format(t=table)
    count = sql.SQL(
        "SELECT count(*) FROM (SELECT 1 FROM {t} WHERE khash >= %s AND khash <= %s LIMIT %s) x"
    ).format(t=table)
    out: dict[int, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not _exists(conn, f'{DOCS}."{collection}"'):
            return {}
        found = {int(r[0]) for r in conn.execute(probe, (ids, los, his))}
        for k, lo, hi in zip(ids, los, his, strict=True):
            if k in found:
                row = conn.execute(count, (lo, hi, ROWS_COUNT_CAP)).fetchone()
                out[k] = int(row[0]) if row else 0
    return out


def drop_stream_object(dsn: str, kind: StreamObjectKind, name: str,
                       timeout: float = 30.0) -> bool:
    """Drop one slot, publication or origin (with its stream rows), or one orphan stream
    row, by exact name; False when it was already gone.

    A slot held by a walsender is dropped after terminating that walsender; dropping an
    origin waits (up to ``timeout``) for a session that uses it.
    """
    if not name.startswith(NAME_PREFIX):
        raise ValueError(f"{name!r} is not a shardshift stream object")
    kind = StreamObjectKind(kind)
    if kind == StreamObjectKind.SLOT:
        return drop_slot(dsn, name, timeout)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if kind == StreamObjectKind.PUBLICATION:
            gone = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                (name,)).fetchone() is None
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
            return not gone
        dropped = False
        if kind == StreamObjectKind.ORIGIN:
            conn.execute("SELECT set_config('statement_timeout', %s, false)",
                         (f"{int(timeout * 1000)}ms",))
            row = conn.execute(
                "SELECT count(pg_replication_origin_drop(roname)) FROM pg_replication_origin"
                " WHERE roname = %s", (name,)).fetchone()
            dropped = bool(row and row[0])
        if _exists(conn, "shardshift.stream_state"):
            with conn.transaction():
                conn.execute("DELETE FROM shardshift.stream_markers WHERE stream = %s", (name,))
                cur = conn.execute("DELETE FROM shardshift.stream_state WHERE stream = %s",
                                   (name,))
                dropped = dropped or cur.rowcount > 0
        return dropped


__all__ = [
    "ROWS_COUNT_CAP",
    "FenceRow",
    "ShardInventory",
    "StreamObject",
    "StreamObjectKind",
    "chunks_with_rows",
    "drop_stream_object",
    "inspect_shard",
]
