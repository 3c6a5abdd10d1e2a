"""Move timelines and the loads of fleet operations (``catalog.timeline``).

Observations, not catalog changes: written without a version bump or notification, so a
move's samples never invalidate routers' maps or conflict with a cutover. Bounded: per move at
most ``MAX_SAMPLES_PER_KIND`` copy and lag samples each (past it every second one is dropped,
keeping the whole span at half the resolution) and ``MAX_MARKS`` marks; the samples go with
their migration record (``ON DELETE CASCADE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncCursor

from catalog.models import MigrationRecord
from catalog.store.checks import check_migration_id, check_shard_id
from catalog.store.rows import MIGRATION_SELECT, one, to_migration
from catalog.store.txn import CatalogBase, db_now
from catalog.timeline import (
    MAX_MARKS,
    MAX_SAMPLES_PER_KIND,
    LoadStage,
    MoveSample,
    SampleKind,
    ShardLoad,
)

_INSERT_SAMPLE = (
    "INSERT INTO catalog.move_samples (migration_id, at, kind, name, rows, rate, lag_bytes,"
    " lag_s, value, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)
_SELECT_SAMPLES = (
    "SELECT at, kind, name, rows, rate, lag_bytes, lag_s, value, detail"
    " FROM catalog.move_samples WHERE migration_id = %s ORDER BY at, kind, name"
)
_INSERT_LOAD = (
    "INSERT INTO catalog.shard_loads (operation_id, first_run_id, kind, stage, shard_id, bytes,"
    " measured_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
_SELECT_LOADS = (
    "SELECT operation_id, first_run_id, kind, stage, shard_id, bytes, measured_at"
    " FROM catalog.shard_loads WHERE operation_id = %s AND first_run_id = %s"
    " ORDER BY stage DESC, shard_id"
)
_THIN = (
    "DELETE FROM catalog.move_samples m USING ("
    " SELECT kind, name, at, row_number() OVER (ORDER BY at, name) AS n, count(*) OVER () AS total"
    " FROM catalog.move_samples WHERE migration_id = %(m)s AND kind = %(k)s) o"
    " WHERE m.migration_id = %(m)s AND m.kind = o.kind AND m.name = o.name AND m.at = o.at"
    " AND o.n %% 2 = 0 AND o.n < o.total"
)
"""Every second sample of one kind, except the first and the newest."""


def _to_sample(row: Sequence[Any]) -> MoveSample:
    return MoveSample(at=row[0], kind=SampleKind(row[1]), name=row[2], rows=row[3], rate=row[4],
                      lag_bytes=row[5], lag_s=row[6], value=row[7], detail=row[8])


def _check_operation(operation_id: object) -> str:
    """An operation id is a workflow id: the same alphabet as migration ids."""
    return check_migration_id(operation_id)


class Samples(CatalogBase):
    """Record and read move timelines and fleet loads."""

    async def record_move_samples(
        self, migration_id: str, samples: Sequence[MoveSample], *,
        max_samples: int = MAX_SAMPLES_PER_KIND, max_marks: int = MAX_MARKS,
    ) -> int:
        """Add samples and marks to a move's timeline in one transaction; returns how many
        were new. A sample already stored (same kind, name and time) is skipped, so a batch
        written twice is written once.

        Raises:
            InvalidNameError: a malformed migration id.
            psycopg.errors.ForeignKeyViolation: no migration record has that id.
        """
        check_migration_id(migration_id)
        if max_samples < 4 or max_marks < 1:
            raise ValueError("keep at least 4 samples per kind and 1 mark")
        batch = [MoveSample.model_validate(s) for s in samples]
        if not batch:
            return 0

        async def body(cur: AsyncCursor[Any]) -> int:
            row = await one(cur, "SELECT count(*) FROM catalog.move_samples"
                                 " WHERE migration_id = %s AND kind = 'mark'", (migration_id,))
            marks_left = max_marks - int(row[0] if row else 0)
            written = 0
            kinds: set[SampleKind] = set()
            for s in sorted(batch, key=lambda s: s.at):
                if s.kind == SampleKind.MARK:
                    if marks_left <= 0:
                        continue
                    marks_left -= 1
                else:
                    kinds.add(s.kind)
                await cur.execute(
                    _INSERT_SAMPLE, (migration_id, s.at, s.kind.value, s.name, s.rows, s.rate, s.lag_bytes,
                     s.lag_s, s.value, s.detail),
                )
                written += cur.rowcount
            for kind in sorted(kinds):
                row = await one(cur, "SELECT count(*) FROM catalog.move_samples"
                                     " WHERE migration_id = %s AND kind = %s",
                                (migration_id, kind.value))
                if int(row[0] if row else 0) > max_samples:
                    await cur.execute(_THIN, {"m": migration_id, "k": kind.value})
            return written

        return await self._txn(body)

    async def move_samples(self, migration_id: str) -> list[MoveSample]:
        """A move's timeline, oldest first (marks and samples interleaved by time)."""
        check_migration_id(migration_id)

        async def body(cur: AsyncCursor[Any]) -> list[MoveSample]:
            await cur.execute(_SELECT_SAMPLES, (migration_id,))
            return [_to_sample(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)

    async def migrations_with_prefix(self, prefix: str, *, limit: int = 20) -> list[MigrationRecord]:
        """Migration records whose id starts with ``prefix``, newest first (a workflow's
        moves: their ids are the workflow id, sanitized, then ``.`` and a run suffix)."""
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("give a non-empty prefix")

        async def body(cur: AsyncCursor[Any]) -> list[MigrationRecord]:
            await cur.execute(
                MIGRATION_SELECT + " WHERE starts_with(migration_id, %s)"
                " ORDER BY started_at DESC, migration_id LIMIT %s", (prefix, limit))
            return [to_migration(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)

    async def record_shard_loads(
        self, operation_id: str, first_run_id: str, *, kind: str, stage: LoadStage,
        loads: Mapping[str, int], now: datetime | None = None,
    ) -> bool:
        """Record bytes per shard of a drain or rebalance. ``before`` is kept from the first
        call of the operation's chain (later ones change nothing: False); ``after`` replaces
        what an earlier call recorded.

        Raises:
            InvalidNameError: a malformed operation or shard id.
            ValueError: a negative byte count.
        """
        _check_operation(operation_id)
        _check_operation(first_run_id)
        stage = LoadStage(stage)
        rows = {check_shard_id(s): int(b) for s, b in loads.items()}
        if any(b < 0 for b in rows.values()):
            raise ValueError("bytes cannot be negative")

        async def body(cur: AsyncCursor[Any]) -> bool:
            at = await db_now(cur, now)
            key = (operation_id, first_run_id, stage.value)
            if stage == LoadStage.BEFORE:
                row = await one(cur, "SELECT 1 FROM catalog.shard_loads WHERE operation_id = %s"
                                     " AND first_run_id = %s AND stage = %s LIMIT 1", key)
                if row is not None:
                    return False
            else:
                await cur.execute("DELETE FROM catalog.shard_loads WHERE operation_id = %s"
                                  " AND first_run_id = %s AND stage = %s", key)
            for shard_id, size in sorted(rows.items()):
                await cur.execute(
                    _INSERT_LOAD, (operation_id, first_run_id, kind, stage.value, shard_id, size, at))
            return True

        return await self._txn(body)

    async def shard_loads(self, operation_id: str,
                          first_run_id: str | None = None) -> list[ShardLoad]:
        """Loads recorded for an operation: of the chain ``first_run_id``, else of its newest
        chain (a workflow id can be used again by a later operation)."""
        _check_operation(operation_id)

        async def body(cur: AsyncCursor[Any]) -> list[ShardLoad]:
            chain = first_run_id
            if chain is None:
                row = await one(cur, "SELECT first_run_id FROM catalog.shard_loads"
                                     " WHERE operation_id = %s ORDER BY measured_at DESC LIMIT 1",
                                (operation_id,))
                if row is None:
                    return []
                chain = str(row[0])
            await cur.execute(_SELECT_LOADS, (operation_id, chain))
            return [ShardLoad(operation_id=r[0], first_run_id=r[1], kind=r[2],
                              stage=LoadStage(r[3]), shard_id=r[4], bytes=r[5],
                              measured_at=r[6]) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)


__all__ = ["Samples"]
