"""Chunk statistics in bulk: what planners weigh chunks by, written and read a fleet at a time.

Statistics are observations, not metadata (no version bump, no notification, see
``catalog.models``). Two writers fill ``chunk_stats``, each its own columns: the planners'
measurement of the shards (``record_chunk_sizes``: bytes and documents) and the routers'
traffic (``ops_per_s``). A size report therefore never overwrites the traffic a router
measured; a chunk measured for the first time starts with no traffic.

Writes go in batches of one statement each (``unnest`` of parallel arrays, joined to
``chunks`` so a chunk split or merged since it was measured is skipped, not an error), each
batch its own short transaction: 100,000 chunks are a handful of statements, and no write
holds locks across the fleet. ``chunk_loads`` is the planners' read: one statement, plain
tuples rather than models, every chunk with its placement and statistics.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import AsyncCursor

from catalog.store.txn import CatalogBase, db_now
from shards.names import check_collection

STATS_BATCH = 20_000
"""Chunks per statement (and transaction) of ``record_chunk_sizes``."""


class ChunkSize(NamedTuple):
    """One chunk's measured size, as a shard reports it."""

    collection: str
    chunk_id: int
    size_bytes: int
    doc_count: int


class ChunkLoad(NamedTuple):
    """One chunk as a planner weighs it: placement, range and statistics."""

    collection: str
    chunk_id: int
    shard_id: str
    lo: int
    hi: int | None
    """None: the top of the khash space (2^63)."""
    size_bytes: int
    doc_count: int
    ops_per_s: float
    measured_at: datetime | None
    """When its size was last measured (None: never, or an estimate carried by a split)."""


class ChunkStatistics(CatalogBase):
    """Record chunk sizes in bulk; read every chunk's load for the planners."""

    async def record_chunk_sizes(
        self, sizes: Sequence[ChunkSize], *, measured_at: datetime | None = None,
        batch: int = STATS_BATCH,
    ) -> int:
        """Record measured sizes (bytes, documents), ``batch`` chunks per statement; the
        chunks' ``ops_per_s`` are kept. Sizes of chunks that no longer exist are dropped.

        Returns:
            How many chunks were recorded.

        Raises:
            ValueError: a negative size or count, or an invalid collection name (nothing is
                written).
        """
        if not 1 <= batch <= 100_000:
            raise ValueError("a batch holds between 1 and 100000 chunks")
        for name in {s.collection for s in sizes}:
            check_collection(name)
        for s in sizes:
            if s.size_bytes < 0 or s.doc_count < 0:
                raise ValueError(f"chunk {s.collection}/{s.chunk_id}: negative size {s}")
        done = 0
        for start in range(0, len(sizes), batch):
            part = sizes[start:start + batch]

            async def body(cur: AsyncCursor[Any], part: Sequence[ChunkSize] = part) -> int:
                at = await db_now(cur, measured_at)
                await cur.execute(
                    "INSERT INTO catalog.chunk_stats AS s (collection, chunk_id, size_bytes,"
                    " doc_count, ops_per_s, measured_at)"
                    " SELECT c.collection, c.chunk_id, x.size_bytes, x.doc_count, 0, %s"
                    " FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[])"
                    "   AS x(collection, chunk_id, size_bytes, doc_count)"
                    " JOIN catalog.chunks c"
                    "   ON c.collection = x.collection AND c.chunk_id = x.chunk_id"
                    " ON CONFLICT (collection, chunk_id) DO UPDATE SET"
                    " size_bytes = EXCLUDED.size_bytes, doc_count = EXCLUDED.doc_count,"
                    " measured_at = EXCLUDED.measured_at",
                    (at, [s.collection for s in part], [s.chunk_id for s in part],
                     [s.size_bytes for s in part], [s.doc_count for s in part]),
                )
                return cur.rowcount

            done += await self._txn(body)
        return done

    async def chunk_loads(self, collections: Collection[str] | None = None, *,
                          traffic_span_s: float | None = None) -> list[ChunkLoad]:
        """Every chunk (of ``collections``, default all) with its shard, range and statistics
        (zero where never measured), in one read, ordered by collection and range.

        With ``traffic_span_s``, a chunk's ``ops_per_s`` is what routers reported for it over
        that many seconds (``catalog/store/traffic.py``; 0 for a chunk of a reported
        collection that nobody touched); a collection no router reported on keeps its
        recorded figure."""
        names = None if collections is None else sorted(collections)
        for name in names or []:
            check_collection(name)
        span = traffic_span_s if traffic_span_s is not None and traffic_span_s > 0 else None

        async def body(cur: AsyncCursor[Any]) -> list[ChunkLoad]:
            await cur.execute(
                "WITH t AS (SELECT collection, chunk_id, sum(ops)::float8 / %(span)s AS rate"
                "   FROM catalog.chunk_traffic WHERE %(span)s::float8 IS NOT NULL"
                "    AND window_start >= clock_timestamp() - make_interval(secs => %(span)s)"
                "    AND (%(names)s::text[] IS NULL OR collection = ANY(%(names)s::text[]))"
                "   GROUP BY collection, chunk_id),"
                " seen AS (SELECT DISTINCT collection FROM t)"
                " SELECT c.collection, c.chunk_id, c.shard_id, c.lo, c.hi,"
                " coalesce(s.size_bytes, 0), coalesce(s.doc_count, 0),"
                " CASE WHEN seen.collection IS NOT NULL THEN coalesce(t.rate, 0)"
                "      ELSE coalesce(s.ops_per_s, 0) END,"
                " s.measured_at"
                " FROM catalog.chunks c LEFT JOIN catalog.chunk_stats s"
                "   ON s.collection = c.collection AND s.chunk_id = c.chunk_id"
                " LEFT JOIN t ON t.collection = c.collection AND t.chunk_id = c.chunk_id"
                " LEFT JOIN seen ON seen.collection = c.collection"
                " WHERE %(names)s::text[] IS NULL OR c.collection = ANY(%(names)s::text[])"
                " ORDER BY c.collection, c.lo",
                {"names": names, "span": span},
            )
            return [ChunkLoad(*row) for row in await cur.fetchall()]

        return await self._txn(body, read_only=True)


__all__ = ["STATS_BATCH", "ChunkLoad", "ChunkSize", "ChunkStatistics"]
