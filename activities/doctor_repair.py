"""The doctor's repairs: each fix re-checks what it relies on, then acts.

:class:`DoctorRepairs` holds the repair half of :class:`~activities.doctor.Doctor` (a base
class of it): taking the cutover locks of dead migrations, running each finding's fix in
order, and the fixes themselves (unfreeze, retire a partial copy or an old owner, delete
stray rows, drop a stream object, close a record). Why each is safe is in the invariants of
``activities/doctor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from activities.doctor_findings import Context, FindingKind, Item, Server
from catalog import Catalog
from catalog.models import Chunk, MigrationOutcome, MigrationRecord
from settings import DatabaseSettings
from shards.models import FenceState
from shards.postgres import PostgresShard
from shards.postgres.inventory import FenceRow, StreamObject, drop_stream_object
from shards.postgres.locks import cutover_lock
from shards.postgres.range_delete import delete_range


class _Skip(Exception):
    """A repair that re-checked and found it must not act (the message says why)."""


class DoctorRepairs:
    """The repairs of :class:`~activities.doctor.Doctor` (its base class)."""

    catalog: Catalog
    db: DatabaseSettings
    delete_batch: int
    delete_pause_s: float
    _engines: dict[str, PostgresShard]

    async def _repair(self, items: list[Item]) -> None:
        async with contextlib.AsyncExitStack() as locks:
            blocked = await self._lock_dead_migrations(items, locks)
            for it in items:
                if it.fix is None:
                    continue
                if it.migration_id in blocked:
                    it.finding.action += f" — not done: {blocked[it.migration_id]}"
                    continue
                try:
                    await it.fix()
                    it.finding.repaired = True
                except _Skip as why:
                    it.finding.action += f" — not done: {why}"
                except Exception as exc:  # noqa: BLE001 - reported, the others go on
                    it.finding.action += f" — failed: {type(exc).__name__}: {exc}"

    async def _lock_dead_migrations(self, items: list[Item],
                                    locks: contextlib.AsyncExitStack) -> dict[str, str]:
        """Take the cutover lock of every dead migration with something to repair (invariant
        4); returns the migrations that must not be touched, with why."""
        wanted: dict[str, MigrationRecord] = {}
        for it in items:
            if it.fix is not None and it.migration_id is not None \
                    and it.migration_id not in wanted:
                wanted[it.migration_id] = await self.catalog.migration(it.migration_id)
        blocked: dict[str, str] = {}
        for mid, rec in wanted.items():
            for sid in (rec.source, rec.target):
                try:
                    dsn = self.db.mover((await self.catalog.shard(sid)).address)
                    held = await locks.enter_async_context(cutover_lock(dsn, mid))
                except Exception as exc:  # noqa: BLE001 - an unreachable shard holds no attempt
                    if sid == rec.source:
                        blocked[mid] = f"its source {sid} is unreachable ({type(exc).__name__})"
                    continue
                if not held:
                    blocked[mid] = (f"a cutover attempt of it still runs (it holds its lock on "
                                    f"{sid}); run doctor again in a minute")
        return blocked

    async def _engine(self, s: Server) -> PostgresShard:
        engine = self._engines.get(s.key)
        if engine is None:
            engine = await PostgresShard(s.label(), s.dsn, max_size=2, check=True).open()
            self._engines[s.key] = engine
        return engine

    async def _recheck(self, seen: Chunk, ctx: Context) -> Chunk:
        """The chunk as the catalog has it now; raises ``_Skip`` when it changed or a move of
        it started since the examination (invariant 3)."""
        now = await self.catalog.chunk(seen.collection, seen.chunk_id)
        if (now.shard_id, now.token, now.range) != (seen.shard_id, seen.token, seen.range):
            raise _Skip(f"the catalog changed since (now on {now.shard_id} at token "
                        f"{now.token}); run doctor again")
        for m in await self.catalog.migrations(collection=seen.collection, active_only=True):
            if m.chunk_id == seen.chunk_id and m.migration_id not in ctx.dead:
                raise _Skip(f"migration {m.migration_id} of this chunk started since")
        return now

    async def _delete_rows(self, s: Server, chunk: Chunk) -> None:
        await asyncio.to_thread(delete_range, s.dsn, chunk.collection, chunk.range,
                                batch_size=self.delete_batch, pause_s=self.delete_pause_s)

    def _fix_unfreeze(self, s: Server, chunk: Chunk, f: FenceRow,
                      ctx: Context) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            now = await self._recheck(chunk, ctx)
            if now.shard_id not in s.ids:
                raise _Skip(f"the catalog no longer places the chunk here ({now.shard_id})")
            engine = await self._engine(s)
            await engine.unfreeze(chunk.collection, chunk.chunk_id, now.token + 1)
        return fix

    def _fix_partial_copy(self, s: Server, chunk: Chunk, f: FenceRow,
                          ctx: Context) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            await self._recheck(chunk, ctx)
            engine = await self._engine(s)
            c, k = chunk.collection, chunk.chunk_id
            if f.state == FenceState.ACTIVE:
                await engine.transition(c, k, expect_token=f.token,
                                        expect_state=[FenceState.ACTIVE], new_token=f.token,
                                        new_state=FenceState.RECEIVING)
            await engine.retire(c, k)
            await self._delete_rows(s, chunk)
            await engine.drop_fence(c, k)
        return fix

    def _fix_old_owner(self, s: Server, chunk: Chunk, f: FenceRow,
                       ctx: Context) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            now = await self._recheck(chunk, ctx)
            owner = ctx.server_of(now.shard_id)
            if owner is None:
                raise _Skip(f"the owner {now.shard_id} is not registered")
            there = await (await self._engine(owner)).fence(chunk.collection, chunk.chunk_id)
            if there is None or there.state != FenceState.ACTIVE or there.token != now.token:
                raise _Skip(f"the owner's fence is no longer active at token {now.token}")
            engine = await self._engine(s)
            await engine.transition(chunk.collection, chunk.chunk_id, expect_token=f.token,
                                    expect_state=[FenceState.FROZEN], new_token=f.token,
                                    new_state=FenceState.RETIRED)
            await self._delete_rows(s, chunk)
        return fix

    def _fix_rows(self, s: Server, chunk: Chunk,
                  ctx: Context) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            now = await self._recheck(chunk, ctx)
            if now.shard_id in s.ids:
                raise _Skip("the catalog places the chunk here now")
            await self._delete_rows(s, chunk)  # refuses if an active or frozen fence appeared
        return fix

    def _fix_close(self, rec: MigrationRecord, outcome: MigrationOutcome, ctx: Context,
                   items: list[Item]) -> Callable[[], Awaitable[None]]:
        key = (rec.collection, rec.chunk_id)

        async def fix() -> None:
            left = [it for it in items
                    if it.finding.kind != FindingKind.MIGRATION and not it.finding.repaired
                    and (it.migration_id == rec.migration_id or it.chunk == key)]
            for sid in (rec.source, rec.target):
                s = ctx.server_of(sid)
                if s is None or s.inventory is None:
                    raise _Skip(f"{sid} could not be inspected, so what the move left there "
                                "is unknown; the record stays open")
            if left:
                raise _Skip(f"{len(left)} of its leftovers remain (see above); the record "
                            "stays open")
            await self.catalog.finish_migration(
                rec.migration_id, outcome,
                detail=f"closed by shardshift doctor: no workflow ran it (phase {rec.phase})")
        return fix


def drop_stream_fix(dsn: str, obj: StreamObject) -> Callable[[], Awaitable[None]]:
    async def fix() -> None:
        await asyncio.to_thread(drop_stream_object, dsn, obj.kind, obj.name)
    return fix


__all__ = ["DoctorRepairs", "drop_stream_fix"]
