"""Phases 7-8 and abort: stop streams, drop what the move made, delete the copy nobody serves.

``complete`` after a committed move: every slot, publication and origin of the migration on
both shards, the staged files, the source's fence retired and its rows deleted in throttled
batches (resumable from the heartbeated last key). After a rollback the same happens to the
target's copy instead. ``abort`` before the commit point: the same cleanup of streams and
staging, the source fence unfrozen if a cutover was interrupted, the target's partial copy
deleted and its receiving fence dropped. All steps are idempotent, so a retry (or a second
abort) is harmless.

Before touching anything, cleanup reads the chunk's owner from the catalog (waiting for a
switch still in flight): it never deletes, demotes or unfreezes against the catalog. An
abort whose switch in fact committed (or a completion whose switch did not) fails
non-retryably (``OwnerMismatch``) with both copies intact; the workflow learns the outcome
from the catalog before it cleans up, so this is a second line of defence.

``target_lost`` (abort only): the target is unreachable for good (past the move's give-up
time, or declared lost). Only the source side is cleaned: its slot and publication dropped,
its fence unfrozen if a cutover was interrupted, the staged files removed. The target's
leftovers (receiving fence, partial rows, import progress, stream state, origin) stay for
``shardshift doctor``, which removes those of moves that are not running once it answers.
"""

from __future__ import annotations

import threading

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import MoveContext, raise_catalog_failure
from activities.faults import inject
from activities.models import CleanupInput, CleanupResult, DeleteCheckpoint, MoveSpec
from catalog import CatalogError, UnknownChunkError, UnknownCollectionError
from catalog.models import MigrationOutcome
from shards.models import FenceState
from shards.postgres.bulk_import import forget_parts
from shards.postgres.range_delete import DeleteProgress, delete_range
from shards.postgres.replication import cleanup_stream_objects


class CleanupActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.cleanup")
    async def cleanup(self, inp: CleanupInput) -> CleanupResult:
        if inp.target_lost and inp.outcome == MigrationOutcome.ABORTED:
            return await self._abort_source_side(inp.spec)
        spec = inp.spec
        inject("cleanup.start", spec.collection)
        committed = inp.outcome == MigrationOutcome.COMPLETED
        # The shard whose copy nobody serves any more.
        loser = spec.source if committed else spec.target
        winner = spec.target if committed else spec.source
        await self._refuse_to_empty_the_owner(spec, inp.outcome, loser)
        dropped = await self._drop_streams(spec)
        winner_engine = await self.ctx.engine(winner)
        loser_engine = await self.ctx.engine(loser)
        c, k = spec.collection, spec.chunk_id
        if not committed:
            # Before the commit point the source must serve again at its own token; after a
            # rollback it already does.
            fence = await winner_engine.fence(c, k)
            if fence is not None and fence.state == FenceState.FROZEN and fence.token == spec.token + 1:
                await winner_engine.unfreeze(c, k, spec.token + 1)
        fence = await loser_engine.fence(c, k)
        if inp.outcome == MigrationOutcome.ABORTED and fence is not None \
                and fence.state == FenceState.ACTIVE:
            # An interrupted cutover had activated the target; it never committed.
            await loser_engine.transition(c, k, expect_token=fence.token,
                                          expect_state=[FenceState.ACTIVE],
                                          new_token=spec.token, new_state=FenceState.RECEIVING)
        if fence is not None:
            await loser_engine.retire(c, k)
        deleted = await self._delete(spec, loser, inp)
        if inp.outcome != MigrationOutcome.COMPLETED:
            # The target never owned the chunk for good: forget its fence entirely.
            await loser_engine.drop_fence(c, k)
        target_dsn = await self.ctx.dsn(spec.target)
        await self.ctx.run_blocking(lambda _stop: self.ctx.staging.remove(spec.migration_id))
        await self.ctx.run_blocking(lambda _stop: forget_parts(target_dsn, spec.migration_id))
        return CleanupResult(rows_deleted=deleted, **dropped)

    async def _refuse_to_empty_the_owner(self, spec: MoveSpec, outcome: MigrationOutcome,
                                         loser: str) -> None:
        """Fail for good if the catalog serves the chunk from the copy this cleanup deletes."""
        try:
            chunk = await self.ctx.catalog.settled_chunk(spec.collection, spec.chunk_id)
        except (UnknownChunkError, UnknownCollectionError):
            return  # the collection was dropped: no copy is served any more
        except CatalogError as exc:
            raise_catalog_failure(exc, "cleanup: reading the chunk's owner")
        if chunk.shard_id == loser:
            raise ApplicationError(
                f"refusing to clean up migration {spec.migration_id} as {outcome}: the catalog "
                f"names {loser} (token {chunk.token}) as the owner of chunk "
                f"{spec.collection}/{spec.chunk_id}, and that is the copy this cleanup would "
                "delete; nothing was changed (finish the move the way the catalog says)",
                type="OwnerMismatch", non_retryable=True,
            )

    async def _abort_source_side(self, spec: MoveSpec) -> CleanupResult:
        """Abort a move whose target is lost: touch nothing but the source and staging."""
        await self._refuse_to_empty_the_owner(spec, MigrationOutcome.ABORTED, spec.target)
        dropped = await self._drop_streams(spec, target=False)
        source = await self.ctx.engine(spec.source)
        fence = await source.fence(spec.collection, spec.chunk_id)
        if fence is not None and fence.state == FenceState.FROZEN and fence.token == spec.token + 1:
            await source.unfreeze(spec.collection, spec.chunk_id, spec.token + 1)
        await self.ctx.run_blocking(lambda _stop: self.ctx.staging.remove(spec.migration_id))
        return CleanupResult(rows_deleted=0, **dropped)

    async def _drop_streams(self, spec: MoveSpec, *, target: bool = True) -> dict[str, int]:
        dsns = [await self.ctx.dsn(spec.source)]
        if target:
            dsns.append(await self.ctx.dsn(spec.target))

        def work(stop: threading.Event) -> dict[str, int]:
            out = {"slots_dropped": 0, "publications_dropped": 0, "origins_dropped": 0}
            for dsn in dsns:
                report = cleanup_stream_objects(dsn, spec.migration_id)
                out["slots_dropped"] += len(report.slots)
                out["publications_dropped"] += len(report.publications)
                out["origins_dropped"] += len(report.origins)
            return out

        return await self.ctx.run_blocking(work)

    async def _delete(self, spec: MoveSpec, shard: str, inp: CleanupInput) -> int:
        dsn = await self.ctx.dsn(shard)
        details = activity.info().heartbeat_details
        resume: tuple[int, str] | None = None
        if details:
            cp = DeleteCheckpoint.model_validate(details[0]) if isinstance(details[0], dict) else details[0]
            if isinstance(cp, DeleteCheckpoint) and cp.after_khash is not None and cp.after_id is not None:
                resume = (cp.after_khash, cp.after_id)
        state = {"cp": DeleteCheckpoint(rows_deleted=0)}

        def progress(p: DeleteProgress) -> None:
            state["cp"] = DeleteCheckpoint(rows_deleted=p.rows_deleted, after_khash=p.after_khash,
                                           after_id=p.after_id)

        def work(stop: threading.Event) -> int:
            return delete_range(dsn, spec.collection, spec.key_range, batch_size=inp.delete_batch,
                                pause_s=inp.delete_pause_s, after=resume,
                                progress=progress).rows_deleted

        return await self.ctx.run_blocking(work, lambda: state["cp"].model_dump())
