"""Operations per chunk: routers' reports, summed per window, turned into rates for planners.

Routers call ``report_traffic`` (as the catalog reader: it runs ``catalog.report_traffic``,
which may only add counts). ``refresh_ops_rates`` sets ``chunk_stats.ops_per_s`` of a
collection's chunks to their operations over the last ``span_s`` seconds of complete windows
divided by that span, and forgets windows older than ``RETENTION_S``. Observations, not catalog
changes: no version bump, no notification.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncCursor

from catalog.store.txn import CatalogBase
from shards.names import check_collection

RETENTION_S = 3600
"""Windows older than this are deleted when rates are refreshed."""


class Traffic(CatalogBase):
    async def report_traffic(self, collection: str, ops: dict[int, int], *,
                             window_s: float) -> None:
        """Add ``ops`` (chunk id -> operations) to the collection's current window (chunks
        that no longer exist are ignored)."""
        check_collection(collection)
        if not ops:
            return
        chunks = list(ops)

        async def body(cur: AsyncCursor[Any]) -> None:
            await cur.execute("SELECT catalog.report_traffic(%s, %s::bigint[], %s::bigint[], %s)",
                              (collection, chunks, [ops[c] for c in chunks],
                               max(1, round(window_s))))

        await self._txn(body)

    async def traffic_rates(self, collection: str, span_s: float) -> dict[int, float]:
        """Operations per second of each chunk over the last ``span_s`` seconds (chunks with
        no report are left out)."""
        check_collection(collection)

        async def body(cur: AsyncCursor[Any]) -> dict[int, float]:
            await cur.execute(
                "SELECT chunk_id, sum(ops)::float8 / %s FROM catalog.chunk_traffic"
                " WHERE collection = %s AND window_start >= clock_timestamp() - make_interval("
                "secs => %s) GROUP BY chunk_id", (span_s, collection, span_s))
            return {int(c): float(r) for c, r in await cur.fetchall()}

        return await self._txn(body, read_only=True)

    async def refresh_ops_rates(self, collection: str, span_s: float) -> int:
        """Set ``ops_per_s`` of every chunk of ``collection`` from the reports of the last
        ``span_s`` seconds (0 for a chunk nobody reported); returns the chunks updated. A chunk
        with no statistics row gets one with its size unmeasured (``measured_at`` NULL)."""
        check_collection(collection)
        if span_s <= 0:
            raise ValueError("span_s must be positive")

        async def body(cur: AsyncCursor[Any]) -> int:
            await cur.execute(
                "DELETE FROM catalog.chunk_traffic WHERE window_start < clock_timestamp()"
                " - make_interval(secs => %s)", (max(RETENTION_S, span_s),))
            await cur.execute(
                "INSERT INTO catalog.chunk_stats AS s (collection, chunk_id, size_bytes,"
                "  doc_count, ops_per_s, measured_at)"
                " SELECT c.collection, c.chunk_id, 0, 0, coalesce(t.ops, 0) / %s, NULL"
                "   FROM catalog.chunks c LEFT JOIN ("
                "     SELECT chunk_id, sum(ops)::float8 AS ops FROM catalog.chunk_traffic"
                "      WHERE collection = %s"
                "        AND window_start >= clock_timestamp() - make_interval(secs => %s)"
                "      GROUP BY chunk_id) t ON t.chunk_id = c.chunk_id"
                "  WHERE c.collection = %s"
                " ON CONFLICT (collection, chunk_id) DO UPDATE SET ops_per_s = EXCLUDED.ops_per_s",
                (span_s, collection, span_s, collection))
            return cur.rowcount

        return await self._txn(body)
