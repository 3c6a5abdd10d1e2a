"""Route reads: what a router needs of a collection's chunks, fast at 100,000 chunks.

``route_columns`` is the whole map in one statement returning one row of arrays (chunk ids,
bounds, shards, tokens, sorted by ``lo`` through the ``(collection, lo)`` index): no per-chunk
rows, no statistics join, no per-chunk models. ``route_delta`` is the same shape restricted to
the chunks written after a version the router holds (``chunks.version``, the
``chunks_by_version`` index): a move costs one row, a split two, a merge one, whatever the
collection's size. Removed chunks need no tombstones: every chunk a split or merge removed is
covered by the new chunks that replaced it, which are in the delta (see ``router.routes``).

Both read the catalog version, the collection and the chunks in one statement, hence in one
snapshot: a delta at version G holds every change up to G and none after it. Each is sent
alone, without a transaction block (``CatalogBase._txn(one_statement=True)``): one round trip
(a router reads a delta after every cutover's switch, while clients wait), and no
serializable predicate lock per row read.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncCursor

from catalog.errors import CatalogUnavailableError, UnknownCollectionError
from catalog.models import CollectionInfo, RouteColumns
from catalog.store.txn import CatalogBase
from shards.models import KHASH_END, IndexDefinition
from shards.names import check_collection

# One row: the catalog version, the collection, and its (changed) chunks as arrays sorted by
# lo. ``changed`` caps a delta: the newest-first index range stops after ``limit`` rows, so a
# router far behind learns it from the row count and reads the whole map instead.
_ROUTE_SQL = """
SELECT m.version, col.name, col.shard_key, col.indexes, col.created_at, col.layout_version,
       a.ids, a.los, a.his, a.shards, a.tokens
FROM catalog.meta m
JOIN catalog.collections col ON col.name = %(c)s
LEFT JOIN LATERAL (
    SELECT array_agg(x.chunk_id ORDER BY x.lo) AS ids, array_agg(x.lo ORDER BY x.lo) AS los,
           array_agg(x.hi ORDER BY x.lo) AS his, array_agg(x.shard_id ORDER BY x.lo) AS shards,
           array_agg(x.token ORDER BY x.lo) AS tokens
    FROM ({chunks}) x
) a ON true
WHERE m.id = 1
"""
_ALL_CHUNKS = ("SELECT chunk_id, lo, hi, shard_id, token FROM catalog.chunks"
               " WHERE collection = col.name")
_CHANGED_CHUNKS = ("SELECT chunk_id, lo, hi, shard_id, token FROM catalog.chunks"
                   " WHERE collection = col.name AND version > %(since)s"
                   " ORDER BY version DESC LIMIT %(limit)s")
ROUTE_QUERY = _ROUTE_SQL.format(chunks=_ALL_CHUNKS)
DELTA_QUERY = _ROUTE_SQL.format(chunks=_CHANGED_CHUNKS)


def _columns(row: tuple[Any, ...] | None, collection: str, *, complete: bool,
             since: int) -> RouteColumns:
    if row is None:
        raise UnknownCollectionError(collection)
    version, name, shard_key, indexes, created_at, layout_version = row[:6]
    ids, los, his, shards, tokens = (list(v) if v is not None else [] for v in row[6:])
    if None in his:  # the top chunk's hi is NULL (2^63 does not fit a bigint)
        his[his.index(None)] = KHASH_END
    info = CollectionInfo(
        name=name, shard_key=shard_key,
        indexes=tuple(IndexDefinition.model_validate(i) for i in indexes),
        created_at=created_at, layout_version=layout_version,
    )
    return RouteColumns(collection=info, version=int(version), complete=complete, since=since,
                        chunk_ids=ids, los=los, his=his, shard_ids=shards, tokens=tokens)


class RouteMaps(CatalogBase):
    """The router's reads: a whole map as columns, and the chunks changed since a version."""

    async def route_columns(self, collection: str) -> RouteColumns:
        """The collection's whole map as columns sorted by ``lo`` (one statement).

        Raises:
            UnknownCollectionError: no such collection.
        """
        check_collection(collection)

        async def body(cur: AsyncCursor[Any]) -> RouteColumns:
            await cur.execute(ROUTE_QUERY, {"c": collection}, binary=True)
            return _columns(await _one(cur), collection, complete=True, since=0)

        return await self._txn(body, one_statement=True)

    async def route_delta(self, collection: str, since: int, *, limit: int) -> RouteColumns:
        """The chunks of ``collection`` written after catalog version ``since`` (at most
        ``limit`` of them: a result of ``limit`` rows may be cut short, and the caller then
        reads the whole map), sorted by ``lo``, with the version they are current at.

        Raises:
            UnknownCollectionError: no such collection (dropped).
        """
        check_collection(collection)
        if since < 0 or limit < 1:
            raise ValueError("since must be a catalog version (>= 0) and limit at least 1")

        async def body(cur: AsyncCursor[Any]) -> RouteColumns:
            await cur.execute(DELTA_QUERY, {"c": collection, "since": since, "limit": limit},
                              binary=True)
            return _columns(await _one(cur), collection, complete=False, since=since)

        return await self._txn(body, one_statement=True)


async def _one(cur: AsyncCursor[Any]) -> tuple[Any, ...] | None:
    row = await cur.fetchone()
    if row is None:
        return None
    if row[0] is None:
        raise CatalogUnavailableError("the catalog schema is missing: run ensure_schema()")
    return tuple(row)


__all__ = ["DELTA_QUERY", "ROUTE_QUERY", "RouteMaps"]
