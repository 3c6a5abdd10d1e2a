"""``Catalog``: the chunk metadata service over its own PostgreSQL database.

How the catalog stays correct
-----------------------------
* **One serializable transaction per operation.** Every method runs in exactly one
  ``SERIALIZABLE`` transaction, retried from scratch on a serialization failure (SQLSTATE
  40001) or deadlock, with jittered backoff, up to ``max_attempts`` times. A retry re-reads
  everything, so its checks see the winner's commit. Every failure raises a typed
  ``CatalogError`` and leaves the catalog unchanged.
* **Compare-and-set on tokens.** Splits, merges and placement changes name the token(s) they
  expect; the transaction locks the chunk row, compares, and refuses with
  ``TokenMismatchError`` (expected vs actual) before changing anything. Of N concurrent
  writers expecting the same token exactly one commits: the others either find the new token
  or lose a serialization conflict, retry, and then find it.
* **``move_chunk`` is the cutover's commit point.** It switches placement (new token =
  expected + 1, which is the token the shard engine's freeze gave the source fence and the
  token the target fence was activated at) and records the cutover in the migration record in
  the same transaction. A lost ``COMMIT`` reply surfaces as ``CatalogUnavailableError``; the
  caller reads ``migration(id).cutover_token`` / ``cutover_shard`` to learn whether its switch
  committed. The CAS itself is never made "idempotent" by guessing: a second call with the same
  expected token always fails, so "exactly one wins" holds even for calls with the same
  migration id.
* **A total order of changes.** Every change increments ``meta.version`` and sends
  ``pg_notify('shardshift_catalog', {"version", "change", "collection"})`` in the same
  transaction, so a notification is delivered only if its change committed, and never before.
  Because every change writes the same row, changes are also serialized (cheaply: catalog
  changes are rare next to routed traffic). Two kinds of write are deliberately *not* changes:
  chunk statistics reports and renewals of a lease already held, both frequent and neither
  affecting routing or ownership.
* **At most one active migration per chunk** (partial unique index) and at most
  ``max_moves_per_shard`` live move leases per shard. A lease is live until ``expires_at``;
  expired leases are ignored when counting and deleted when next seen, so a dead holder
  frees its slots by simply not renewing. Lease time is the catalog database's clock (one
  clock for every worker); tests inject ``now``.

Reads (``chunk_map``, ``chunk_maps``) run in a read-only serializable transaction: a snapshot
consistent with the catalog version they report.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncCursor
from pydantic import ValidationError

from catalog.errors import (
    LeaseUnavailableError,
    MigrationStateError,
    ShardStateError,
)
from catalog.models import (
    CatalogChange,
    ChangeKind,
    Lease,
    ShardState,
    lease_id,
)
from catalog.schema import NOTIFY_CHANNEL
from catalog.store.checks import (
    check_address,
    check_migration_id,
    check_shard_id,
)
from catalog.store.chunkmaps import ChunkMaps
from catalog.store.collection import MAX_CHUNKS_PER_COLLECTION_CREATE, Collections
from catalog.store.migrations import Migrations
from catalog.store.registry import ShardRegistry
from catalog.store.rows import (
    LEASE_SELECT,
    one,
    shard_in,
    to_lease,
)
from catalog.store.topology import Topology
from catalog.store.txn import CatalogBase, bump, db_now

log = logging.getLogger(__name__)

_HOLDER = re.compile(r"[ -~]{1,200}")  # printable ASCII: it is shown to people


class Catalog(ShardRegistry, Collections, ChunkMaps, Topology, Migrations, CatalogBase):
    """The catalog: shards, collections, chunks, migrations and leases.

    Build one per process, ``await catalog.open()`` (or ``async with``), share it: methods are
    safe to call concurrently (each takes its own pooled connection).

    Args:
        dsn: libpq DSN of the catalog database.
        min_size: Connections kept open.
        max_size: Connections at most.
        max_attempts: Attempts per transaction before ``CatalogBusyError``.
        max_moves_per_shard: Default limit of live move leases per shard.
        lease_ttl: Default lease lifetime; holders renew well within it.
    """

    # -- leases ------------------------------------------------------------------------------

    async def take_leases(
        self,
        migration_id: str,
        shard_ids: Sequence[str],
        *,
        holder: str,
        ttl: timedelta | None = None,
        max_moves_per_shard: int | None = None,
        now: datetime | None = None,
    ) -> list[Lease]:
        """Take (or renew) a move lease on every listed shard, all or none.

        A shard grants at most ``max_moves_per_shard`` live leases. Taking a lease this
        migration already holds renews it without using a second slot; a lease of this
        migration held by another holder is refused until it expires.

        Args:
            migration_id: The move the leases are for (lease ids derive from it).
            shard_ids: Usually ``[source, target]``.
            holder: Who renews them (the workflow id), shown to people in errors.
            ttl: Lifetime from ``now``; default ``self.lease_ttl``.
            max_moves_per_shard: Default ``self.max_moves_per_shard``.
            now: The time to judge expiry by; default the catalog database's clock.

        Raises:
            LeaseUnavailableError: a shard is at its limit (says which moves hold it).
            UnknownShardError, ShardStateError: a shard is unknown or retired.
            MigrationStateError: the migration is recorded as finished.
        """
        check_migration_id(migration_id)
        if not isinstance(holder, str) or not _HOLDER.fullmatch(holder):
            raise ValueError("holder must be 1 to 200 printable ASCII characters")
        wanted = sorted({check_shard_id(s) for s in shard_ids})
        if not wanted:
            raise ValueError("name at least one shard to lease")
        ttl = self.lease_ttl if ttl is None else ttl
        if ttl <= timedelta(0):
            raise ValueError("lease ttl must be positive")
        limit = self.max_moves_per_shard if max_moves_per_shard is None else max_moves_per_shard
        if limit < 1:
            raise ValueError("max_moves_per_shard must be at least 1")

        async def body(cur: AsyncCursor[Any]) -> list[Lease]:
            at = await db_now(cur, now)
            row = await one(
                cur, "SELECT outcome FROM catalog.migrations WHERE migration_id = %s",
                (migration_id,),
            )
            if row is not None and row[0] is not None:
                raise MigrationStateError(
                    f"migration {migration_id!r} already finished ({row[0]}); it takes no leases"
                )
            changed = False
            for sid in wanted:
                info = await shard_in(cur, sid)
                if info.state == ShardState.RETIRED:
                    raise ShardStateError(f"shard {sid!r} is retired; it takes part in no moves")
                lid = lease_id(migration_id, sid)
                # Expired leases free their slot now; deleting them keeps the table small.
                await cur.execute(
                    "DELETE FROM catalog.leases WHERE shard_id = %s AND expires_at <= %s"
                    " AND lease_id <> %s",
                    (sid, at, lid),
                )
                row = await one(
                    cur, LEASE_SELECT + " WHERE lease_id = %s FOR UPDATE",
                    (lid,),
                )
                mine = to_lease(row) if row else None
                if mine is not None and mine.live(at) and mine.holder != holder:
                    raise LeaseUnavailableError(
                        f"the lease of migration {migration_id!r} on shard {sid!r} is held by "
                        f"{mine.holder!r} until {mine.expires_at.isoformat()}",
                        shard_id=sid, holders=[mine.holder],
                    )
                if mine is None or not mine.live(at):
                    await cur.execute(
                        "SELECT migration_id FROM catalog.leases WHERE shard_id = %s"
                        " AND expires_at > %s AND lease_id <> %s ORDER BY migration_id",
                        (sid, at, lid),
                    )
                    others = [r[0] for r in await cur.fetchall()]
                    if len(others) >= limit:
                        raise LeaseUnavailableError(
                            f"shard {sid!r} already takes part in {len(others)} move(s) "
                            f"({', '.join(others)}), its limit is {limit}; retry when one "
                            "finishes",
                            shard_id=sid, holders=others,
                        )
                    changed = True
                await cur.execute(
                    "INSERT INTO catalog.leases (lease_id, shard_id, migration_id, holder,"
                    " acquired_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (lease_id) DO UPDATE SET holder = EXCLUDED.holder,"
                    " acquired_at = CASE WHEN catalog.leases.expires_at > %s"
                    "   THEN catalog.leases.acquired_at ELSE EXCLUDED.acquired_at END,"
                    " expires_at = EXCLUDED.expires_at",
                    (lid, sid, migration_id, holder, at, at + ttl, at),
                )
            if changed:
                await bump(cur, ChangeKind.LEASE, None)
            await cur.execute(
                LEASE_SELECT + " WHERE migration_id = %s"
                " AND shard_id = ANY(%s) ORDER BY shard_id",
                (migration_id, wanted),
            )
            return [to_lease(r) for r in await cur.fetchall()]

        return await self._txn(body)

    async def renew_leases(
        self,
        migration_id: str,
        *,
        holder: str,
        ttl: timedelta | None = None,
        max_moves_per_shard: int | None = None,
        now: datetime | None = None,
    ) -> list[Lease]:
        """Extend every lease of a migration (call it from the holder's heartbeat).

        A lease that expired in the meantime is re-taken if its shard has room, so a holder
        that paused too long either gets it back or learns it lost it.

        Raises:
            LeaseUnavailableError: the migration holds no lease, or lost one and the shard is
                now full.
        """
        check_migration_id(migration_id)
        held = [lease.shard_id for lease in await self.leases(migration_id=migration_id,
                                                               live_only=False)]
        if not held:
            raise LeaseUnavailableError(
                f"migration {migration_id!r} holds no lease to renew; take them again",
                shard_id="",
            )
        return await self.take_leases(
            migration_id, held, holder=holder, ttl=ttl,
            max_moves_per_shard=max_moves_per_shard, now=now,
        )

    async def release_leases(self, migration_id: str) -> int:
        """Release every lease of a migration (idempotent); returns how many were held."""
        check_migration_id(migration_id)

        async def body(cur: AsyncCursor[Any]) -> int:
            await cur.execute("DELETE FROM catalog.leases WHERE migration_id = %s",
                              (migration_id,))
            n = cur.rowcount
            if n:
                await bump(cur, ChangeKind.LEASE, None)
            return n

        return await self._txn(body)

    async def leases(
        self,
        shard_id: str | None = None,
        *,
        migration_id: str | None = None,
        live_only: bool = True,
        now: datetime | None = None,
    ) -> list[Lease]:
        """Leases, optionally of one shard or one migration; by default only live ones."""
        if shard_id is not None:
            check_shard_id(shard_id)
        if migration_id is not None:
            check_migration_id(migration_id)

        async def body(cur: AsyncCursor[Any]) -> list[Lease]:
            at = await db_now(cur, now)
            await cur.execute(
                LEASE_SELECT + " WHERE (%(s)s::text IS NULL OR shard_id = %(s)s)"
                " AND (%(m)s::text IS NULL OR migration_id = %(m)s)"
                " AND (NOT %(l)s OR expires_at > %(t)s) ORDER BY shard_id, lease_id",
                {"s": shard_id, "m": migration_id, "l": live_only, "t": at},
            )
            return [to_lease(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)

    async def reap_expired_leases(self, *, now: datetime | None = None) -> int:
        """Delete every expired lease; returns how many. Expired leases are already ignored,
        so this is housekeeping, not a correctness step."""

        async def body(cur: AsyncCursor[Any]) -> int:
            at = await db_now(cur, now)
            await cur.execute("DELETE FROM catalog.leases WHERE expires_at <= %s", (at,))
            n = cur.rowcount
            if n:
                await bump(cur, ChangeKind.LEASE, None)
            return n

        return await self._txn(body)

    # -- notifications -----------------------------------------------------------------------

    async def listen(
        self, *, reconnect_delay_s: float = 0.2, max_reconnect_delay_s: float = 5.0
    ) -> AsyncGenerator[CatalogChange, None]:
        """Catalog changes as they commit, forever (cancel the consuming task or ``break``).

        The first item, and the first after every reconnect, is a ``RESYNC`` change carrying
        the current version: from that moment on no change is missed, so a router starts
        listening, waits for that item, then (re)reads its maps. Notifications are a latency
        optimisation: a lost one is caught by the router's stale-token retry.
        """
        delay = reconnect_delay_s
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: cannot connect (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    cur = await conn.execute("SELECT version FROM catalog.meta WHERE id = 1")
                    row = await cur.fetchone()
                    delay = reconnect_delay_s
                    yield CatalogChange(version=int(row[0]) if row else 0,
                                        change=ChangeKind.RESYNC)
                    async for note in conn.notifies():
                        try:
                            yield CatalogChange.model_validate_json(note.payload)
                        except ValidationError:
                            log.warning("catalog listen: malformed payload %r", note.payload[:200])
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)


__all__ = [
    "MAX_CHUNKS_PER_COLLECTION_CREATE", "Catalog", "check_address", "check_migration_id",
    "check_shard_id",
]
