"""The catalog's foundation: the connection pool, its lifecycle, the schema, and the one
serializable transaction per operation, retried from scratch on conflicts.

Every section of the catalog (``registry``, ``collection``, ``chunkmaps``, ``topology``,
``migrations``, ``leases``, ``notify``) is a mixin over ``CatalogBase``: its methods validate
their arguments, then hand a ``body(cur)`` to ``_txn``. A change calls ``bump`` inside that
body, so the version increment and the notification commit with it or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Self, TypeVar

import psycopg
from psycopg import AsyncCursor, IsolationLevel, errors
from psycopg_pool import AsyncConnectionPool

from catalog.errors import CatalogBusyError, CatalogUnavailableError, InvalidLayoutError
from catalog.models import CatalogChange, ChangeKind
from catalog.schema import DDL, LAYOUT_ERRCODE, NOTIFY_CHANNEL
from catalog.store.rows import one

T = TypeVar("T")

_DDL_LOCK = 0x5348_4152_4443_4154  # "SHARDCAT": serializes catalog DDL across processes
_RETRY_ON = (errors.SerializationFailure, errors.DeadlockDetected)
# Unique violations that a concurrent transaction can cause between our check and our insert;
# the retry's explicit check then reports the conflict precisely.
_RACE_CONSTRAINTS = frozenset({
    "migrations_one_active_per_chunk", "migrations_pkey", "leases_pkey", "shards_pkey",
    "collections_pkey",
})


class CatalogBase:
    """The pool and the transaction runner; ``Catalog`` composes the sections over it."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        max_attempts: int = 40,
        max_moves_per_shard: int = 2,
        lease_ttl: timedelta = timedelta(seconds=120),
        **pool_options: Any,
    ) -> None:
        """``pool_options``: more ``psycopg_pool.AsyncConnectionPool`` options (e.g.
        ``timeout``)."""
        if max_moves_per_shard < 1:
            raise ValueError("max_moves_per_shard must be at least 1")
        self.dsn = dsn
        self.max_attempts = max_attempts
        self.max_moves_per_shard = max_moves_per_shard
        self.lease_ttl = lease_ttl
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True},
            configure=self._configure,
            name="catalog",
            **pool_options,
        )

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # With autocommit on, psycopg opens each `transaction()` with
        # BEGIN ISOLATION LEVEL SERIALIZABLE.
        await conn.set_isolation_level(IsolationLevel.SERIALIZABLE)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Self:
        await self._pool.open(wait=True)
        return self

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ensure_schema(self) -> None:
        """Create the catalog schema if it does not exist (idempotent, safe to race)."""
        async with self._pool.connection() as conn, conn.transaction():
            # READ COMMITTED: a serializable snapshot taken before the lock is granted would
            # fail against any catalog change committed while waiting for it.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            await conn.execute(DDL)

    # -- transactions ------------------------------------------------------------------------

    async def _txn(
        self, body: Callable[[AsyncCursor[Any]], Awaitable[T]], *, read_only: bool = False,
        snapshot: bool = False, one_statement: bool = False, pipeline: bool = False,
    ) -> T:
        """Run ``body`` in one serializable transaction, retrying it on conflicts.

        ``snapshot``: a read-only REPEATABLE READ transaction instead, for large reads. It
        sees the same consistent state: every change writes ``meta``'s row, so changes commit
        in version order and any snapshot holds exactly the changes up to one version; and it
        takes no serializable predicate locks (one per row read, promoted to page and table
        locks past a limit: memory, and false conflicts with concurrent changes).

        ``one_statement``: a read whose body runs ONE statement, sent as it is (autocommit):
        a statement always reads one snapshot, so it sees what ``snapshot`` would, in one
        round trip instead of four (BEGIN, SET TRANSACTION, the statement, COMMIT). The
        router's route reads, which follow every cutover's switch, are such reads.

        ``pipeline``: the transaction runs in pipeline mode, so ``BEGIN`` travels with the
        body's first statement (one round trip less; the cutover's switch)."""
        read_only = read_only or snapshot or one_statement
        delay = 0.002
        for attempt in range(1, self.max_attempts + 1):
            try:
                if one_statement:
                    async with self._pool.connection() as conn, conn.cursor() as cur:
                        return await body(cur)
                async with self._pool.connection() as conn, (
                        conn.pipeline() if pipeline else contextlib.nullcontext()), \
                        conn.transaction():
                    if snapshot:
                        await conn.execute(
                            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    elif read_only:
                        await conn.execute("SET TRANSACTION READ ONLY")
                    async with conn.cursor() as cur:
                        return await body(cur)
            except _RETRY_ON:
                pass  # serialization failure or deadlock: run the transaction again
            except errors.UniqueViolation as exc:
                if exc.diag.constraint_name not in _RACE_CONSTRAINTS:
                    raise
            except psycopg.OperationalError as exc:
                # A read can simply run again. A change may have committed before the
                # connection broke: only the caller, re-reading, can tell.
                if not read_only or attempt == self.max_attempts:
                    raise CatalogUnavailableError(
                        f"catalog connection failed ({exc}); "
                        + ("" if read_only else "the change may or may not have committed: "
                           "re-read the catalog before retrying")
                    ) from exc
            except psycopg.Error as exc:
                if exc.sqlstate == LAYOUT_ERRCODE:
                    raise InvalidLayoutError(
                        f"the catalog refused a chunk layout that would not tile the khash "
                        f"space: {exc.diag.message_primary}"
                    ) from exc
                raise
            # Jittered exponential backoff so that N losers do not collide again in lockstep.
            await asyncio.sleep(random.uniform(0, delay))  # jitter, not cryptographic
            delay = min(delay * 2, 0.2)
        raise CatalogBusyError(
            f"the catalog transaction lost {self.max_attempts} serialization conflicts in a "
            "row; nothing changed, retry later"
        )

    async def version(self) -> int:
        """The current catalog version."""

        async def body(cur: AsyncCursor[Any]) -> int:
            row = await one(cur, "SELECT version FROM catalog.meta WHERE id = 1")
            assert row is not None
            return int(row[0])

        return await self._txn(body, read_only=True)


async def bump(cur: AsyncCursor[Any], change: ChangeKind, collection: str | None) -> int:
    """Increment the catalog version and queue the notification (sent at COMMIT)."""
    row = await one(
        cur, "UPDATE catalog.meta SET version = version + 1 WHERE id = 1 RETURNING version"
    )
    assert row is not None, "catalog.meta is missing its row: run ensure_schema()"
    version = int(row[0])
    payload = CatalogChange(version=version, change=change, collection=collection)
    await cur.execute(
        "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload.model_dump_json())
    )
    if collection is not None and change is ChangeKind.LAYOUT:
        await cur.execute(
            "UPDATE catalog.collections SET layout_version = %s WHERE name = %s",
            (version, collection),
        )
    return version


async def db_now(cur: AsyncCursor[Any], now: datetime | None) -> datetime:
    if now is not None:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return now
    row = await one(cur, "SELECT clock_timestamp()")
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


__all__ = ["CatalogBase", "bump", "db_now"]
