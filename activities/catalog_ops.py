"""Catalog activities: register a move, record its phase, renew its leases, finish it."""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio import activity

from activities import metrics
from activities.context import MoveContext, non_retryable, raise_catalog_failure
from activities.faults import inject
from activities.leases import renew_move_leases
from activities.models import FinishInput, MoveSpec, PhaseInput, RegisteredInput, RegisterInput
from activities.timeline import mark
from catalog import Catalog, CatalogError, ShardState, UnknownMigrationError
from catalog.models import MigrationOutcome, MigrationRecord
from catalog.timeline import MarkName, phase_mark
from shards.errors import ShardError
from shards.models import FenceState

log = logging.getLogger("shardshift.activities")


class CatalogActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.register")
    async def register(self, inp: RegisterInput) -> MoveSpec:
        """Phase 1: migration record, move leases, the target's indexes and receiving fence.

        Idempotent: a retry finds the record, renews the leases and confirms the fence.
        Bad input (unknown collection, chunk or shard, a chunk already moving, moving a chunk
        to the shard it is on) fails the move at once with a clear message.
        """
        cat = self.ctx.catalog
        try:
            chunk = await cat.chunk(inp.collection, inp.chunk_id)
            target = await cat.shard(inp.target)
            if target.state != ShardState.ACTIVE:
                raise non_retryable(ValueError(f"target shard {inp.target} is {target.state}"),
                                    "cannot move there")
            existing = await _existing(cat, inp.migration_id)
            source = existing.source if existing else chunk.shard_id
            if existing is None and chunk.shard_id == inp.target:
                raise non_retryable(
                    ValueError(f"chunk {inp.collection}/{inp.chunk_id} is already on {inp.target}"),
                    "nothing to move",
                )
            record = await cat.register_migration(
                inp.migration_id, kind=inp.kind, collection=inp.collection,
                chunk_id=inp.chunk_id, source=source, target=inp.target,
            )
            ttl = timedelta(seconds=inp.lease_ttl_s) if inp.lease_ttl_s else None
            await cat.take_leases(inp.migration_id, [record.source, record.target],
                                  holder=inp.holder, ttl=ttl)
            info = await cat.collection(inp.collection)
        except CatalogError as exc:
            raise_catalog_failure(exc, "register")
        # At the record's own time, so a retried registration marks it once.
        await mark(cat, inp.migration_id, phase_mark("registered"), at=record.started_at)
        spec = MoveSpec(
            migration_id=inp.migration_id, kind=inp.kind, collection=inp.collection,
            chunk_id=inp.chunk_id, key_range=chunk.range, source=record.source,
            target=record.target, token=record.token_before, lease_ttl_s=inp.lease_ttl_s,
        )
        try:
            engine = await self.ctx.engine(spec.target)
            await engine.ensure_schema()
            await engine.create_collection(spec.collection, info.indexes)  # before any data
            fence = await engine.fence(spec.collection, spec.chunk_id)
            if fence is None or fence.state == FenceState.RETIRED:
                if fence is not None:
                    await engine.drop_fence(spec.collection, spec.chunk_id)
                await engine.put_fence(spec.collection, spec.chunk_id, spec.key_range, spec.token,
                                       FenceState.RECEIVING, spec.migration_id)
        except ShardError as exc:
            # Unusable target: close the record so the chunk is not left "busy".
            await cat.finish_migration(spec.migration_id, MigrationOutcome.ABORTED,
                                       detail=f"target {spec.target}: {exc}"[:500])
            raise non_retryable(exc, f"preparing target {spec.target}") from exc
        return spec

    @activity.defn(name="migrate.set_phase")
    async def set_phase(self, inp: PhaseInput) -> None:
        """Record the phase a move reached, and renew its leases (best effort: the activities
        that carry the move's spec renew them too, see ``activities/leases.py``)."""
        inject(f"set_phase.{inp.phase.value}", inp.migration_id)
        try:
            record = await self.ctx.catalog.set_migration_phase(inp.migration_id, inp.phase,
                                                                detail=inp.detail)
        except CatalogError as exc:
            raise_catalog_failure(exc, "set phase")
        if record.phase == inp.phase:
            # At the time the catalog recorded the phase: a retry marks it once.
            await mark(self.ctx.catalog, inp.migration_id, phase_mark(inp.phase.value),
                       at=record.updated_at)
        try:
            await renew_move_leases(self.ctx.catalog, inp.migration_id, inp.lease_ttl_s)
        except CatalogError as exc:
            log.warning("renewing the leases of move %s failed: %s", inp.migration_id, exc)

    @activity.defn(name="migrate.registered")
    async def registered(self, inp: RegisteredInput) -> MoveSpec | None:
        """The spec of a move registered and not finished, or None: what a move cancelled
        during its registration must undo (an attempt may have taken effect)."""
        cat = self.ctx.catalog
        try:
            record = await _existing(cat, inp.migration_id)
            if record is None or not record.active:
                return None
            chunk = await cat.chunk(record.collection, record.chunk_id)
        except CatalogError as exc:
            raise_catalog_failure(exc, "registered")
        return MoveSpec(
            migration_id=record.migration_id, kind=record.kind, collection=record.collection,
            chunk_id=record.chunk_id, key_range=chunk.range, source=record.source,
            target=record.target, token=record.token_before,
        )

    @activity.defn(name="migrate.finish")
    async def finish(self, inp: FinishInput) -> None:
        inject("finish.start", inp.spec.collection)
        try:
            record = await self.ctx.catalog.finish_migration(
                inp.spec.migration_id, inp.outcome, detail=inp.detail
            )
        except CatalogError as exc:
            raise_catalog_failure(exc, "finish")
        await mark(self.ctx.catalog, inp.spec.migration_id, MarkName.FINISH,
                   at=record.finished_at, detail=record.outcome)
        metrics.moves.add(1, {"outcome": str(inp.outcome), "kind": str(inp.spec.kind)})
        metrics.log.info("move of %s chunk %d (%s -> %s) finished: %s", inp.spec.collection,
                         inp.spec.chunk_id, inp.spec.source, inp.spec.target, inp.outcome)


async def _existing(cat: Catalog, migration_id: str) -> MigrationRecord | None:
    try:
        return await cat.migration(migration_id)
    except UnknownMigrationError:
        return None
