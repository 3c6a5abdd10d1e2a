"""Topology changes: split, merge and ``move_chunk``, the cutover's commit point.

Each is a compare-and-set on chunk tokens (the package docstring says how it holds under
concurrency). The new chunk(s) get a token one above the highest expected, so tokens stay
monotone along a range's history; a split or merge gives its new chunks fresh ids (from
``allocate_chunk_ids`` when the caller creates their fence rows first), never an id a chunk
had before. Each is a ``LAYOUT`` change of the collection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from psycopg import AsyncCursor

from catalog.errors import (
    InvalidLayoutError,
    MigrationStateError,
    ShardStateError,
    TokenMismatchError,
)
from catalog.models import ChangeKind, Chunk, ShardState
from catalog.schema import NOTIFY_CHANNEL
from catalog.store.checks import check_chunk_id, check_migration_id, check_shard_id, check_token
from catalog.store.rows import chunk_in, migration_in, one, refuse_busy, shard_in, to_chunk
from catalog.store.txn import CatalogBase, bump
from shards.models import KHASH_END, KHASH_MIN, KeyRange
from shards.names import check_collection

MOVE_CHUNK_SQL = """
WITH m AS (
    SELECT source, target FROM catalog.migrations
    WHERE migration_id = %(mid)s AND outcome IS NULL
      AND collection = %(coll)s AND chunk_id = %(cid)s
), c AS (
    UPDATE catalog.chunks ch SET shard_id = %(new)s, token = %(tok)s + 1, updated_at = now()
    FROM m
    WHERE ch.collection = %(coll)s AND ch.chunk_id = %(cid)s AND ch.token = %(tok)s
      AND ((%(new)s = m.target AND ch.shard_id = m.source
            AND EXISTS (SELECT 1 FROM catalog.shards s
                        WHERE s.shard_id = %(new)s AND s.state = %(active)s))
           OR (%(new)s = m.source AND ch.shard_id = m.target))
    RETURNING ch.collection, ch.chunk_id, ch.lo, ch.hi, ch.shard_id, ch.token, ch.updated_at,
              ch.version
), v AS (
    UPDATE catalog.meta SET version = version + 1
    WHERE id = 1 AND EXISTS (SELECT 1 FROM c) RETURNING version
), mu AS (
    UPDATE catalog.migrations SET cutover_token = %(tok)s + 1, cutover_shard = %(new)s,
        committed_at = now(), pause_ms = coalesce(%(pause)s, pause_ms), updated_at = now()
    WHERE migration_id = %(mid)s AND EXISTS (SELECT 1 FROM c) RETURNING 1
), co AS (
    UPDATE catalog.collections SET layout_version = v.version FROM v
    WHERE name = %(coll)s RETURNING 1
)
SELECT c.collection, c.chunk_id, c.lo, c.hi, c.shard_id, c.token, c.updated_at,
       s.size_bytes, s.doc_count, s.ops_per_s, s.measured_at,
       c.version, v.version, (SELECT count(*) FROM mu), (SELECT count(*) FROM co),
       pg_notify(%(chan)s, json_build_object('version', v.version, 'change', %(layout)s::text,
                                             'collection', %(coll)s::text)::text)
FROM c CROSS JOIN v
LEFT JOIN catalog.chunk_stats s ON s.collection = c.collection AND s.chunk_id = c.chunk_id
"""
"""``move_chunk`` in one statement: every check of the full path (token, active migration of
this chunk, direction, an active target) as conditions of the chunk's ``UPDATE``, the
migration record, the version ``bump`` and its notification with it. ``v`` runs after the
chunk's update (it needs ``c``'s row), so the ``chunks_stamp`` trigger stamped the version
this bump commits; the caller checks that and the counts, and rolls back otherwise."""


class _SlowPath(Exception):
    """The one-statement switch changed nothing (or not as expected): roll back and take the
    full path, which finds the precise error."""


class _BeforeCommitFailed(Exception):
    """``move_chunk``'s ``before_commit`` raised (carried as the cause): the transaction rolls
    back and the caller gets that error itself, never a catalog error in its place."""


class Topology(CatalogBase):
    """Split, merge and move chunks (compare-and-set on their tokens)."""

    @staticmethod
    def _expect(chunk: Chunk, expect_token: int) -> None:
        if chunk.token != expect_token:
            raise TokenMismatchError(
                chunk.collection, chunk.chunk_id, expected=expect_token, actual=chunk.token,
                shard_id=chunk.shard_id,
            )

    async def _fresh_ids(
        self, cur: AsyncCursor[Any], collection: str, given: Sequence[int] | None, n: int
    ) -> list[int]:
        """Ids for new chunks: fresh from the sequence, or ones allocated earlier by
        ``allocate_chunk_ids`` and not yet used (never an id a chunk had before)."""
        if given is None:
            await cur.execute(
                "SELECT nextval('catalog.chunk_ids') FROM generate_series(1, %s)", (n,)
            )
            return [int(r[0]) for r in await cur.fetchall()]
        ids = [check_chunk_id(i) for i in given]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"expected {n} distinct new chunk ids, got {list(given)}")
        row = await one(cur, "SELECT last_value FROM catalog.chunk_ids")
        assert row is not None
        if max(ids) > row[0]:
            raise InvalidLayoutError(
                f"chunk ids {ids} were not allocated by the catalog; use allocate_chunk_ids()"
            )
        await cur.execute(
            "SELECT chunk_id FROM catalog.chunks WHERE chunk_id = ANY(%s)"
            " UNION SELECT chunk_id FROM catalog.migrations WHERE chunk_id = ANY(%s)",
            (ids, ids),
        )
        used = sorted(r[0] for r in await cur.fetchall())
        if used:
            raise InvalidLayoutError(
                f"chunk ids {used} are already used; new chunks need fresh ids "
                "(allocate_chunk_ids())"
            )
        return ids

    async def split_chunk(
        self,
        collection: str,
        chunk_id: int,
        at_khash: int,
        expect_token: int,
        *,
        child_ids: Sequence[int] | None = None,
    ) -> tuple[Chunk, Chunk]:
        """Split a chunk at ``at_khash`` into ``[lo, at)`` and ``[at, hi)`` on the same shard.

        The children get new ids (``child_ids`` if the caller allocated them to create fence
        rows first) and token ``expect_token + 1``: the parent's token bump, so tokens stay
        monotone along a range's history. Statistics are halved between the children as an
        estimate until the next measurement.

        Raises:
            TokenMismatchError: the chunk is not at ``expect_token``.
            ChunkBusyError: the chunk is moving.
            InvalidLayoutError: ``at_khash`` is not strictly inside the chunk, or bad child ids.
            UnknownCollectionError, UnknownChunkError.
        """
        check_collection(collection)
        check_chunk_id(chunk_id)
        check_token(expect_token)
        if not isinstance(at_khash, int) or not KHASH_MIN < at_khash < KHASH_END:
            raise InvalidLayoutError(f"split point {at_khash!r} is not a khash")

        async def body(cur: AsyncCursor[Any]) -> tuple[Chunk, Chunk]:
            parent = await chunk_in(cur, collection, chunk_id, lock=True)
            self._expect(parent, expect_token)
            await refuse_busy(cur, collection, [chunk_id])
            if not parent.range.lo < at_khash < parent.range.hi:
                raise InvalidLayoutError(
                    f"split point {at_khash} is not strictly inside chunk {collection}/"
                    f"{chunk_id} [{parent.range.lo}, {parent.range.hi})"
                )
            left_id, right_id = await self._fresh_ids(cur, collection, child_ids, 2)
            token = expect_token + 1
            await cur.execute(
                "DELETE FROM catalog.chunks WHERE collection = %s AND chunk_id = %s",
                (collection, chunk_id),
            )
            await cur.execute(
                "INSERT INTO catalog.chunks (collection, chunk_id, lo, hi, shard_id, token)"
                " VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s)",
                (collection, left_id, parent.range.lo, at_khash, parent.shard_id, token,
                 collection, right_id, at_khash, parent.range.sql_hi, parent.shard_id, token),
            )
            if parent.stats_at is not None or parent.size_bytes or parent.doc_count:
                for cid, share in ((left_id, 0), (right_id, 1)):
                    await cur.execute(
                        "INSERT INTO catalog.chunk_stats (collection, chunk_id, size_bytes,"
                        " doc_count, ops_per_s, measured_at) VALUES (%s, %s, %s, %s, %s, NULL)",
                        (collection, cid, parent.size_bytes // 2 + share * (parent.size_bytes % 2),
                         parent.doc_count // 2 + share * (parent.doc_count % 2),
                         parent.ops_per_s / 2),
                    )
            # The parent's reported traffic goes to its halves, half each (where in the range
            # it fell is not known): a chunk split for being hot stays hot in both halves, so
            # the next plan can move them apart.
            await cur.execute(
                "INSERT INTO catalog.chunk_traffic (collection, chunk_id, window_start,"
                "  window_s, ops)"
                " SELECT t.collection, x.id, t.window_start, t.window_s, (t.ops + x.share) / 2"
                " FROM catalog.chunk_traffic t, (VALUES (%s::bigint, 0), (%s::bigint, 1))"
                "   AS x(id, share)"
                " WHERE t.collection = %s AND t.chunk_id = %s",
                (left_id, right_id, collection, chunk_id))
            await cur.execute(
                "DELETE FROM catalog.chunk_traffic WHERE collection = %s AND chunk_id = %s",
                (collection, chunk_id))
            await bump(cur, ChangeKind.LAYOUT, collection)
            return (await chunk_in(cur, collection, left_id),
                    await chunk_in(cur, collection, right_id))

        return await self._txn(body)

    async def merge_chunks(
        self,
        collection: str,
        chunk_ids: Sequence[int],
        expect_tokens: Sequence[int],
        *,
        new_chunk_id: int | None = None,
    ) -> Chunk:
        """Merge adjacent chunks on one shard into one chunk with a new id.

        The merged chunk's token is ``max(expect_tokens) + 1``; statistics are summed.

        Args:
            chunk_ids: Two or more chunks, in any order, together one contiguous range.
            expect_tokens: The token each chunk is expected at, in ``chunk_ids`` order.
            new_chunk_id: An id from ``allocate_chunk_ids`` (to create the fence first).

        Raises:
            TokenMismatchError: a chunk is not at its expected token.
            ChunkBusyError: a chunk is moving.
            InvalidLayoutError: the chunks are not adjacent or not on one shard.
        """
        check_collection(collection)
        ids = [check_chunk_id(c) for c in chunk_ids]
        tokens = [check_token(t) for t in expect_tokens]
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise InvalidLayoutError("merge needs two or more distinct chunk ids")
        if len(tokens) != len(ids):
            raise ValueError("give one expected token per chunk id, in the same order")

        async def body(cur: AsyncCursor[Any]) -> Chunk:
            # Lock in id order so two merges over shared chunks cannot deadlock.
            chunks = {i: await chunk_in(cur, collection, i, lock=True) for i in sorted(ids)}
            for i, t in zip(ids, tokens, strict=True):
                self._expect(chunks[i], t)
            await refuse_busy(cur, collection, ids)
            ordered = sorted(chunks.values(), key=lambda c: c.range.lo)
            shards = {c.shard_id for c in ordered}
            if len(shards) != 1:
                raise InvalidLayoutError(
                    f"chunks {ids} of {collection} are on different shards {sorted(shards)}; "
                    "move them onto one shard before merging"
                )
            for a, b in zip(ordered, ordered[1:], strict=False):
                if a.range.hi != b.range.lo:
                    raise InvalidLayoutError(
                        f"chunks {a.chunk_id} [{a.range.lo}, {a.range.hi}) and {b.chunk_id} "
                        f"[{b.range.lo}, {b.range.hi}) of {collection} are not adjacent"
                    )
            (new_id,) = await self._fresh_ids(
                cur, collection, None if new_chunk_id is None else [new_chunk_id], 1
            )
            merged = KeyRange(lo=ordered[0].range.lo, hi=ordered[-1].range.hi)
            await cur.execute(
                "DELETE FROM catalog.chunks WHERE collection = %s AND chunk_id = ANY(%s)",
                (collection, ids),
            )
            await cur.execute(
                "INSERT INTO catalog.chunks (collection, chunk_id, lo, hi, shard_id, token)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (collection, new_id, merged.lo, merged.sql_hi, ordered[0].shard_id,
                 max(tokens) + 1),
            )
            if any(c.stats_at is not None or c.size_bytes for c in ordered):
                stamps = [c.stats_at for c in ordered]
                await cur.execute(
                    "INSERT INTO catalog.chunk_stats (collection, chunk_id, size_bytes,"
                    " doc_count, ops_per_s, measured_at) VALUES (%s, %s, %s, %s, %s, %s)",
                    (collection, new_id, sum(c.size_bytes for c in ordered),
                     sum(c.doc_count for c in ordered), sum(c.ops_per_s for c in ordered),
                     None if None in stamps else min(s for s in stamps if s is not None)),
                )
            # The merged chunk's traffic is the sum of its parts', window by window.
            await cur.execute(
                "INSERT INTO catalog.chunk_traffic (collection, chunk_id, window_start,"
                "  window_s, ops)"
                " SELECT %s, %s, window_start, max(window_s), sum(ops)"
                " FROM catalog.chunk_traffic WHERE collection = %s AND chunk_id = ANY(%s)"
                " GROUP BY window_start",
                (collection, new_id, collection, ids))
            await cur.execute(
                "DELETE FROM catalog.chunk_traffic WHERE collection = %s AND chunk_id = ANY(%s)",
                (collection, ids))
            await bump(cur, ChangeKind.LAYOUT, collection)
            return await chunk_in(cur, collection, new_id)

        return await self._txn(body)

    async def move_chunk(
        self,
        collection: str,
        chunk_id: int,
        expect_token: int,
        new_shard: str,
        migration_id: str,
        *,
        pause_ms: float | None = None,
        before_commit: Callable[[], Awaitable[object]] | None = None,
    ) -> Chunk:
        """Switch a chunk's placement: the commit point of a cutover (compare-and-set).

        ``before_commit``: awaited inside the transaction, after its statements and before
        its COMMIT (again if the transaction is retried); when it raises, nothing commits and
        its error propagates as it is. The cutover activates the new owner there, so the
        activation's round trip overlaps the switch's statement while the commit point stays
        after the activation.

        Places the chunk on ``new_shard`` at token ``expect_token + 1`` and records the cutover
        (token, shard, time, pause) in the migration record, in one transaction. The migration
        must be active and for this chunk; ``new_shard`` is its target (forward) or its source
        (a rollback during the rollback window).

        Raises:
            TokenMismatchError: the chunk is not at ``expect_token`` (nothing changed; if the
                caller's own earlier call may have committed, compare ``migration(id)``).
            UnknownMigrationError, MigrationStateError: no such active migration for this
                chunk and direction.
            ShardStateError: the target is no longer active.
        """
        check_collection(collection)
        check_chunk_id(chunk_id)
        check_token(expect_token)
        check_shard_id(new_shard)
        check_migration_id(migration_id)
        if pause_ms is not None and pause_ms < 0:
            raise ValueError("pause_ms cannot be negative")

        async def fast(cur: AsyncCursor[Any]) -> Chunk:
            # One statement, sent with BEGIN (pipeline), then COMMIT: two round trips instead
            # of a dozen; the switch sits inside the writes' pause.
            row = await one(cur, MOVE_CHUNK_SQL, {
                "mid": migration_id, "coll": collection, "cid": chunk_id, "tok": expect_token,
                "new": new_shard, "active": ShardState.ACTIVE.value, "pause": pause_ms,
                "chan": NOTIFY_CHANNEL, "layout": ChangeKind.LAYOUT.value})
            if row is None or row[11] != row[12] or row[13] != 1 or row[14] != 1:
                raise _SlowPath
            await hook()
            return to_chunk(row[:11])

        async def hook() -> None:
            if before_commit is None:
                return
            try:
                await before_commit()
            except Exception as exc:
                raise _BeforeCommitFailed from exc

        try:
            return await self._txn(fast, pipeline=True)
        except _SlowPath:
            pass  # nothing committed: the full path below says why (or moves the chunk)
        except _BeforeCommitFailed as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None

        async def body(cur: AsyncCursor[Any]) -> Chunk:
            chunk = await chunk_in(cur, collection, chunk_id, lock=True)
            self._expect(chunk, expect_token)
            mig = await migration_in(cur, migration_id, lock=True)
            if not mig.active:
                raise MigrationStateError(
                    f"migration {migration_id!r} already finished ({mig.outcome}); it cannot "
                    "move the chunk any more"
                )
            if (mig.collection, mig.chunk_id) != (collection, chunk_id):
                raise MigrationStateError(
                    f"migration {migration_id!r} moves chunk {mig.collection}/{mig.chunk_id}, "
                    f"not {collection}/{chunk_id}"
                )
            if new_shard == mig.target and chunk.shard_id == mig.source:
                target = await shard_in(cur, new_shard)
                if target.state != ShardState.ACTIVE:
                    raise ShardStateError(
                        f"target shard {new_shard!r} is {target.state}; abort the migration"
                    )
            elif not (new_shard == mig.source and chunk.shard_id == mig.target):
                raise MigrationStateError(
                    f"migration {migration_id!r} moves between {mig.source!r} and "
                    f"{mig.target!r}; the chunk is on {chunk.shard_id!r} and cannot go to "
                    f"{new_shard!r}"
                )
            new_token = expect_token + 1
            await cur.execute(
                "UPDATE catalog.chunks SET shard_id = %s, token = %s, updated_at = now()"
                " WHERE collection = %s AND chunk_id = %s",
                (new_shard, new_token, collection, chunk_id),
            )
            await cur.execute(
                "UPDATE catalog.migrations SET cutover_token = %s, cutover_shard = %s,"
                " committed_at = now(), pause_ms = coalesce(%s, pause_ms), updated_at = now()"
                " WHERE migration_id = %s",
                (new_token, new_shard, pause_ms, migration_id),
            )
            await bump(cur, ChangeKind.LAYOUT, collection)
            moved = await chunk_in(cur, collection, chunk_id)
            await hook()
            return moved

        try:
            return await self._txn(body)
        except _BeforeCommitFailed as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
