"""Migration records: one per chunk move, from ``registered`` through its phases to an outcome.

At most one migration per chunk is active (a partial unique index); while one is, splits,
merges and dropping the collection refuse the chunk (``ChunkBusyError``). The cutover itself
is recorded by ``move_chunk`` (``topology``), in the same transaction as the placement switch;
an outcome must agree with the chunk's placement, and finishing releases the migration's
leases. Registering, phase changes and finishing are ``MIGRATION`` changes (no routing
change).
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncCursor

from catalog.errors import MigrationStateError, ShardStateError
from catalog.models import (
    ChangeKind,
    MigrationKind,
    MigrationOutcome,
    MigrationPhase,
    MigrationRecord,
    ShardState,
)
from catalog.store.checks import check_chunk_id, check_migration_id, check_shard_id
from catalog.store.rows import (
    MIGRATION_SELECT,
    chunk_in,
    migration_in,
    one,
    refuse_busy,
    shard_in,
    to_migration,
)
from catalog.store.txn import CatalogBase, bump
from shards.names import check_collection

MIGRATIONS_SQL = (
    MIGRATION_SELECT + " WHERE (%(c)s::text IS NULL OR collection = %(c)s)"
    " AND (NOT %(a)s OR outcome IS NULL) ORDER BY started_at DESC, migration_id"
    " LIMIT %(n)s"
)
"""Migration records, newest first (``migrations``; ``active_only`` uses the partial index
``migrations_active``)."""


class Migrations(CatalogBase):
    """Register migrations, record their phases and outcomes, read them."""

    async def register_migration(
        self,
        migration_id: str,
        *,
        kind: MigrationKind,
        collection: str,
        chunk_id: int,
        source: str,
        target: str,
    ) -> MigrationRecord:
        """Record a new chunk migration (phase ``registered``); idempotent for the same id.

        Raises:
            ChunkBusyError: another migration of this chunk is active.
            MigrationStateError: the chunk is not on ``source``, or the id was used for a
                different migration.
            UnknownShardError, ShardStateError: the target is unknown or not active.
            UnknownCollectionError, UnknownChunkError.
        """
        check_migration_id(migration_id)
        kind = MigrationKind(kind)
        check_collection(collection)
        check_chunk_id(chunk_id)
        check_shard_id(source)
        check_shard_id(target)
        if source == target:
            raise MigrationStateError(f"source and target are both {source!r}")

        async def body(cur: AsyncCursor[Any]) -> MigrationRecord:
            row = await one(
                cur, MIGRATION_SELECT + " WHERE migration_id = %s",
                (migration_id,),
            )
            if row is not None:
                existing = to_migration(row)
                if (existing.kind, existing.collection, existing.chunk_id, existing.source,
                        existing.target) != (kind, collection, chunk_id, source, target):
                    raise MigrationStateError(
                        f"migration id {migration_id!r} is already used for {existing.kind} of "
                        f"{existing.collection}/{existing.chunk_id} {existing.source} -> "
                        f"{existing.target}"
                    )
                return existing
            # Index DDL holds this row FOR UPDATE while it runs (``change_indexes``): a move
            # waits for it, then creates its target with the new definition.
            await cur.execute(
                "SELECT 1 FROM catalog.collections WHERE name = %s FOR SHARE", (collection,))
            chunk = await chunk_in(cur, collection, chunk_id, lock=True)
            await refuse_busy(cur, collection, [chunk_id])
            if chunk.shard_id != source:
                raise MigrationStateError(
                    f"chunk {collection}/{chunk_id} is on {chunk.shard_id!r}, not on the "
                    f"requested source {source!r}; re-read the chunk map"
                )
            tgt = await shard_in(cur, target)
            if tgt.state != ShardState.ACTIVE:
                raise ShardStateError(
                    f"target shard {target!r} is {tgt.state}; only active shards receive chunks"
                )
            await cur.execute(
                "INSERT INTO catalog.migrations (migration_id, kind, collection, chunk_id,"
                " source, target, phase, token_before) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (migration_id, kind.value, collection, chunk_id, source, target,
                 MigrationPhase.REGISTERED.value, chunk.token),
            )
            await bump(cur, ChangeKind.MIGRATION, collection)
            return await migration_in(cur, migration_id)

        return await self._txn(body)

    async def set_migration_phase(
        self, migration_id: str, phase: MigrationPhase, *, detail: str | None = None
    ) -> MigrationRecord:
        """Record the phase an active migration has reached (idempotent).

        Raises:
            UnknownMigrationError, MigrationStateError: unknown, or already finished.
        """
        check_migration_id(migration_id)
        phase = MigrationPhase(phase)

        async def body(cur: AsyncCursor[Any]) -> MigrationRecord:
            mig = await migration_in(cur, migration_id, lock=True)
            if not mig.active:
                raise MigrationStateError(
                    f"migration {migration_id!r} already finished ({mig.outcome})"
                )
            if mig.phase == phase and (detail is None or detail == mig.detail):
                return mig
            await cur.execute(
                "UPDATE catalog.migrations SET phase = %s, detail = coalesce(%s, detail),"
                " updated_at = now() WHERE migration_id = %s",
                (phase.value, detail, migration_id),
            )
            await bump(cur, ChangeKind.MIGRATION, mig.collection)
            return await migration_in(cur, migration_id)

        return await self._txn(body)

    async def finish_migration(
        self, migration_id: str, outcome: MigrationOutcome, *, detail: str | None = None
    ) -> MigrationRecord:
        """Close a migration with its outcome and release its leases (idempotent).

        The outcome must agree with the chunk's placement: ``completed`` only when the chunk
        is on the target, ``aborted``/``rolled_back`` only when it is on the source. ``failed``
        is accepted anywhere (it asks for a person).

        Raises:
            UnknownMigrationError.
            MigrationStateError: finished already with another outcome, or the outcome
                contradicts the placement.
        """
        check_migration_id(migration_id)
        outcome = MigrationOutcome(outcome)
        if outcome == MigrationOutcome.DRY_RUN:
            raise MigrationStateError("a dry run registers nothing, so it finishes nothing")

        async def body(cur: AsyncCursor[Any]) -> MigrationRecord:
            mig = await migration_in(cur, migration_id, lock=True)
            if not mig.active:
                if mig.outcome == outcome:
                    return mig
                raise MigrationStateError(
                    f"migration {migration_id!r} already finished as {mig.outcome}, not "
                    f"{outcome}"
                )
            chunk = await chunk_in(cur, mig.collection, mig.chunk_id)
            want = {MigrationOutcome.COMPLETED: mig.target, MigrationOutcome.ABORTED: mig.source,
                    MigrationOutcome.ROLLED_BACK: mig.source}.get(outcome)
            if want is not None and chunk.shard_id != want:
                raise MigrationStateError(
                    f"migration {migration_id!r} cannot finish as {outcome}: chunk "
                    f"{mig.collection}/{mig.chunk_id} is on {chunk.shard_id!r}, not {want!r}"
                )
            await cur.execute(
                "UPDATE catalog.migrations SET outcome = %s, detail = coalesce(%s, detail),"
                " finished_at = now(), updated_at = now() WHERE migration_id = %s",
                (outcome.value, detail, migration_id),
            )
            await cur.execute("DELETE FROM catalog.leases WHERE migration_id = %s",
                              (migration_id,))
            await bump(cur, ChangeKind.MIGRATION, mig.collection)
            return await migration_in(cur, migration_id)

        return await self._txn(body)

    async def migration(self, migration_id: str) -> MigrationRecord:
        """One migration record. Raises ``UnknownMigrationError``."""
        check_migration_id(migration_id)
        return await self._txn(lambda cur: migration_in(cur, migration_id), read_only=True)

    async def migrations(
        self, *, collection: str | None = None, active_only: bool = False, limit: int = 1000
    ) -> list[MigrationRecord]:
        """Migration records, newest first."""
        if collection is not None:
            check_collection(collection)

        async def body(cur: AsyncCursor[Any]) -> list[MigrationRecord]:
            await cur.execute(
                MIGRATIONS_SQL,
                {"c": collection, "a": active_only, "n": limit},
            )
            return [to_migration(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)
