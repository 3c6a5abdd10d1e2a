"""Move leases: at most ``max_moves_per_shard`` live moves per shard.

A lease is live until ``expires_at``; expired leases are ignored when counting and deleted
when next seen, so a dead holder frees its slots by simply not renewing. Lease time is the
catalog database's clock (one clock for every worker); tests inject ``now``. Taking or
releasing a lease is a ``LEASE`` change; renewing one already held is not a change at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncCursor

from catalog.errors import LeaseUnavailableError, MigrationStateError, ShardStateError
from catalog.models import ChangeKind, Lease, ShardState, lease_id
from catalog.store.checks import check_migration_id, check_shard_id
from catalog.store.rows import LEASE_SELECT, one, shard_in, to_lease
from catalog.store.txn import CatalogBase, bump, db_now

_HOLDER = re.compile(r"[ -~]{1,200}")  # printable ASCII: it is shown to people


class Leases(CatalogBase):
    """Take, renew, release and read move leases."""

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
