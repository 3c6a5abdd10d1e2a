"""Chunk maps: the chunks of a collection as routers and workflows read them, chunk ids, and
chunk statistics.

Reads (``chunk_map``, ``chunk_maps``) run in a read-only REPEATABLE READ transaction
(``_txn(snapshot=True)``): a snapshot consistent with the catalog version they report (every
change writes ``meta``'s row, so a snapshot holds exactly the changes up to one version),
without a serializable predicate lock per chunk row read. ``settled_chunk`` is the one read that
waits for a placement change in flight (see its docstring). Statistics reports are not
catalog changes: no version bump, no notification.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncCursor, errors

from catalog.errors import CatalogUnavailableError
from catalog.models import Chunk, ChunkMap, ChunkStats
from catalog.store.checks import check_chunk_id
from catalog.store.rows import (
    CHUNK_SELECT,
    COLLECTION_SELECT,
    chunk_in,
    map_in,
    one,
    to_chunk,
    to_collection,
    version_in,
)
from catalog.store.txn import CatalogBase, db_now
from shards.names import check_collection


class ChunkMaps(CatalogBase):
    """Read chunk maps and chunks, hand out chunk ids, record chunk statistics."""

    async def chunk_map(self, collection: str) -> ChunkMap:
        """A consistent snapshot of one collection's chunks and the catalog version.

        Raises:
            UnknownCollectionError: no such collection.
        """
        check_collection(collection)
        return await self._txn(lambda cur: map_in(cur, collection), snapshot=True)

    async def chunk_maps(self) -> dict[str, ChunkMap]:
        """Every collection's chunk map, all read at one catalog version."""

        async def body(cur: AsyncCursor[Any]) -> dict[str, ChunkMap]:
            version = await version_in(cur)
            await cur.execute(COLLECTION_SELECT + " ORDER BY name")
            infos = {r[0]: to_collection(r) for r in await cur.fetchall()}
            await cur.execute(CHUNK_SELECT + " ORDER BY c.collection, c.lo")
            chunks: dict[str, list[Chunk]] = {n: [] for n in infos}
            for r in await cur.fetchall():
                chunks[r[0]].append(to_chunk(r))
            return {
                n: ChunkMap(collection=info, chunks=tuple(chunks[n]), version=version)
                for n, info in infos.items()
            }

        return await self._txn(body, snapshot=True)

    async def chunk(self, collection: str, chunk_id: int) -> Chunk:
        """One chunk as the catalog holds it now.

        Raises:
            UnknownCollectionError, UnknownChunkError.
        """
        check_collection(collection)
        check_chunk_id(chunk_id)
        return await self._txn(
            lambda cur: chunk_in(cur, collection, chunk_id), read_only=True
        )

    async def settled_chunk(
        self, collection: str, chunk_id: int, *, wait_s: float = 10.0
    ) -> Chunk:
        """One chunk once every placement change in flight on it has committed or rolled back.

        ``chunk`` reads a snapshot, and a ``move_chunk`` whose transaction is still open (its
        reply lost, its COMMIT still on the way to the server) is invisible there: "not
        moved" read then is a guess. This read takes the row's share lock, which waits for
        such a transaction; if it committed, the serializable snapshot conflicts and the
        retry reads the new placement. Whoever decides whether a cutover committed uses this.

        Raises:
            CatalogUnavailableError: the catalog is unreachable, or a change still held the
                row after ``wait_s`` (a client gone quiet mid-transaction): retry later.
            UnknownCollectionError, UnknownChunkError.
        """
        check_collection(collection)
        check_chunk_id(chunk_id)

        async def body(cur: AsyncCursor[Any]) -> Chunk:
            await cur.execute(f"SET LOCAL lock_timeout = '{int(wait_s * 1000)}ms'")
            try:
                row = await one(
                    cur, CHUNK_SELECT + " WHERE c.collection = %s AND c.chunk_id = %s"
                    " FOR SHARE OF c", (collection, chunk_id),
                )
            except errors.LockNotAvailable as exc:
                raise CatalogUnavailableError(
                    f"a change to chunk {collection}/{chunk_id} is still in flight after "
                    f"{wait_s}s; read it again later"
                ) from exc
            if row is None:
                return await chunk_in(cur, collection, chunk_id)  # the precise error
            return to_chunk(row)

        return await self._txn(body)

    async def allocate_chunk_ids(self, n: int) -> list[int]:
        """``n`` fresh chunk ids (never handed out again), for a split or merge whose shard
        fences are created before the catalog change commits."""
        if not 1 <= n <= 1024:
            raise ValueError("allocate between 1 and 1024 chunk ids at a time")

        async def body(cur: AsyncCursor[Any]) -> list[int]:
            await cur.execute(
                "SELECT nextval('catalog.chunk_ids') FROM generate_series(1, %s)", (n,)
            )
            return [int(r[0]) for r in await cur.fetchall()]

        return await self._txn(body)

    async def report_stats(
        self, collection: str, stats: Sequence[ChunkStats], *, measured_at: datetime | None = None
    ) -> int:
        """Record chunk statistics (not a catalog change: no version bump, no notification).

        Stats for chunks that no longer exist (split or merged since they were measured) are
        dropped. Returns how many chunks were updated.
        """
        check_collection(collection)
        if not stats:
            return 0

        async def body(cur: AsyncCursor[Any]) -> int:
            at = await db_now(cur, measured_at)
            await cur.execute(
                "INSERT INTO catalog.chunk_stats AS s (collection, chunk_id, size_bytes,"
                " doc_count, ops_per_s, measured_at)"
                " SELECT c.collection, c.chunk_id, x.size_bytes, x.doc_count, x.ops_per_s, %s"
                " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::float8[])"
                "   AS x(chunk_id, size_bytes, doc_count, ops_per_s)"
                " JOIN catalog.chunks c ON c.collection = %s AND c.chunk_id = x.chunk_id"
                " ON CONFLICT (collection, chunk_id) DO UPDATE SET size_bytes = EXCLUDED.size_bytes,"
                " doc_count = EXCLUDED.doc_count, ops_per_s = EXCLUDED.ops_per_s,"
                " measured_at = EXCLUDED.measured_at",
                (at, [s.chunk_id for s in stats], [s.size_bytes for s in stats],
                 [s.doc_count for s in stats], [s.ops_per_s for s in stats], collection),
            )
            return cur.rowcount

        return await self._txn(body)
