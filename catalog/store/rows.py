"""Row mapping: the column lists the catalog reads, rows to models, and the reads inside a
transaction that every section shares (one shard, collection, chunk, chunk map or migration,
optionally locked ``FOR UPDATE``; the busy-chunk refusal).

The ``*_in`` functions run on the caller's cursor, inside the caller's transaction: they never
open one of their own. Each raises the precise ``Unknown*Error`` when its row is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncCursor

from catalog.errors import (
    CatalogUnavailableError,
    ChunkBusyError,
    UnknownChunkError,
    UnknownCollectionError,
    UnknownMigrationError,
    UnknownShardError,
)
from catalog.models import (
    Chunk,
    ChunkMap,
    CollectionInfo,
    Lease,
    MigrationKind,
    MigrationOutcome,
    MigrationPhase,
    MigrationRecord,
    ShardInfo,
    ShardState,
)
from shards.models import KHASH_END, IndexDefinition, KeyRange

CHUNK_SELECT = (
    "SELECT c.collection, c.chunk_id, c.lo, c.hi, c.shard_id, c.token, c.updated_at,"
    " s.size_bytes, s.doc_count, s.ops_per_s, s.measured_at"
    " FROM catalog.chunks c LEFT JOIN catalog.chunk_stats s"
    " ON s.collection = c.collection AND s.chunk_id = c.chunk_id"
)
SHARD_SELECT = (
    "SELECT shard_id, address, engine, major_version, state, capacity_bytes,"
    " capacity_ops_per_s, registered_at, updated_at FROM catalog.shards"
)
COLLECTION_SELECT = (
    "SELECT name, shard_key, indexes, created_at, layout_version FROM catalog.collections"
)
MIGRATION_SELECT = (
    "SELECT migration_id, kind, collection, chunk_id, source, target, phase, outcome,"
    " token_before, cutover_token, cutover_shard, pause_ms, detail, started_at, updated_at,"
    " committed_at, finished_at FROM catalog.migrations"
)
LEASE_SELECT = (
    "SELECT lease_id, shard_id, migration_id, holder, acquired_at, expires_at FROM catalog.leases"
)
BUSY_SQL = (
    "SELECT migration_id, chunk_id, phase FROM catalog.migrations"
    " WHERE outcome IS NULL AND collection = %s"
    " AND (%s::bigint[] IS NULL OR chunk_id = ANY(%s::bigint[])) LIMIT 1"
)


# -- rows to models --------------------------------------------------------------------------


def key_range(lo: int, hi: int | None) -> KeyRange:
    return KeyRange(lo=lo, hi=KHASH_END if hi is None else hi)


def to_chunk(row: Sequence[Any]) -> Chunk:
    coll, chunk_id, lo, hi, shard_id, token, updated_at, size, docs, ops, measured = row
    return Chunk(
        collection=coll, chunk_id=chunk_id, range=key_range(lo, hi), shard_id=shard_id,
        token=token, size_bytes=size or 0, doc_count=docs or 0, ops_per_s=ops or 0.0,
        stats_at=measured, updated_at=updated_at,
    )


def to_shard(row: Sequence[Any]) -> ShardInfo:
    sid, address, engine, major, state, cap_b, cap_ops, registered, updated = row
    return ShardInfo(
        shard_id=sid, address=address, engine=engine, major_version=major,
        state=ShardState(state), capacity_bytes=cap_b, capacity_ops_per_s=cap_ops,
        registered_at=registered, updated_at=updated,
    )


def to_collection(row: Sequence[Any]) -> CollectionInfo:
    name, shard_key, indexes, created_at, layout_version = row
    return CollectionInfo(
        name=name, shard_key=shard_key,
        indexes=tuple(IndexDefinition.model_validate(i) for i in indexes),
        created_at=created_at, layout_version=layout_version,
    )


def to_migration(row: Sequence[Any]) -> MigrationRecord:
    (mid, kind, coll, chunk_id, source, target, phase, outcome, token_before, cut_token,
     cut_shard, pause_ms, detail, started, updated, committed, finished) = row
    return MigrationRecord(
        migration_id=mid, kind=MigrationKind(kind), collection=coll, chunk_id=chunk_id,
        source=source, target=target, phase=MigrationPhase(phase),
        outcome=MigrationOutcome(outcome) if outcome else None, token_before=token_before,
        cutover_token=cut_token, cutover_shard=cut_shard, pause_ms=pause_ms, detail=detail,
        started_at=started, updated_at=updated, committed_at=committed, finished_at=finished,
    )


def to_lease(row: Sequence[Any]) -> Lease:
    lid, sid, mid, holder, acquired, expires = row
    return Lease(lease_id=lid, shard_id=sid, migration_id=mid, holder=holder,
                 acquired_at=acquired, expires_at=expires)


async def one(cur: AsyncCursor[Any], query: str, params: Any = None) -> tuple[Any, ...] | None:
    await cur.execute(query, params)
    row = await cur.fetchone()
    return tuple(row) if row is not None else None


# -- reads inside a transaction --------------------------------------------------------------


async def version_in(cur: AsyncCursor[Any]) -> int:
    row = await one(cur, "SELECT version FROM catalog.meta WHERE id = 1")
    if row is None:
        raise CatalogUnavailableError("the catalog schema is missing: run ensure_schema()")
    return int(row[0])


async def shard_in(cur: AsyncCursor[Any], shard_id: str, *, lock: bool = False) -> ShardInfo:
    row = await one(
        cur, SHARD_SELECT + " WHERE shard_id = %s" + (" FOR UPDATE" if lock else ""),
        (shard_id,),
    )
    if row is None:
        raise UnknownShardError(shard_id)
    return to_shard(row)


async def collection_in(cur: AsyncCursor[Any], name: str) -> CollectionInfo:
    row = await one(cur, COLLECTION_SELECT + " WHERE name = %s", (name,))
    if row is None:
        raise UnknownCollectionError(name)
    return to_collection(row)


async def map_in(cur: AsyncCursor[Any], collection: str) -> ChunkMap:
    version = await version_in(cur)
    info = await collection_in(cur, collection)
    await cur.execute(CHUNK_SELECT + " WHERE c.collection = %s ORDER BY c.lo", (collection,))
    chunks = tuple(to_chunk(r) for r in await cur.fetchall())
    return ChunkMap(collection=info, chunks=chunks, version=version)


async def chunk_in(
    cur: AsyncCursor[Any], collection: str, chunk_id: int, *, lock: bool = False
) -> Chunk:
    row = await one(
        cur,
        CHUNK_SELECT + " WHERE c.collection = %s AND c.chunk_id = %s"
        + (" FOR UPDATE OF c" if lock else ""),
        (collection, chunk_id),
    )
    if row is None:
        await collection_in(cur, collection)  # the more useful error if it is unknown
        raise UnknownChunkError(collection, chunk_id)
    return to_chunk(row)


async def migration_in(
    cur: AsyncCursor[Any], migration_id: str, *, lock: bool = False
) -> MigrationRecord:
    row = await one(
        cur,
        MIGRATION_SELECT + " WHERE migration_id = %s"
        + (" FOR UPDATE" if lock else ""),
        (migration_id,),
    )
    if row is None:
        raise UnknownMigrationError(migration_id)
    return to_migration(row)


async def refuse_busy(
    cur: AsyncCursor[Any], collection: str, chunk_ids: Sequence[int] | None
) -> None:
    """Raise ``ChunkBusyError`` if an active migration moves one of ``chunk_ids`` (``None``:
    any chunk of the collection)."""
    row = await one(
        cur,
        BUSY_SQL,
        (collection, chunk_ids, chunk_ids),
    )
    if row is not None:
        raise ChunkBusyError(collection, row[1], row[0], row[2])
