"""Phase 2: a consistent snapshot of the chunk at time T, staged as Parquet parts.

The publication is created first (pgoutput resolves publications as of each decoded
transaction), then the slot with an exported snapshot: the slot's consistent point is T and
the snapshot reads the source exactly at T. A retry keeps the slot (its position is still T)
and exports the remaining parts at a fresh snapshot: replay from T is idempotent, so parts
read later than T converge once the stream is applied (see ``shards/postgres/snapshot.py``).
"""

from __future__ import annotations

import threading

from temporalio import activity

from activities.availability import shard_dsn, shard_errors
from activities.context import MoveContext, Stopped, non_retryable
from activities.copy_seats import seat_key
from activities.models import CopyCheckpoint, SnapshotInput, SnapshotResult
from shards.errors import ShardError
from shards.postgres import replication as repl
from shards.postgres.snapshot import ExportProgress, export_chunk
from shards.postgres.stream_control import StopRequested
from shards.postgres.throttle import CopyThrottle


class SnapshotActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.snapshot")
    async def snapshot(self, inp: SnapshotInput) -> SnapshotResult:
        # Held in this worker's copy seat of the move (waiting for one if it has none).
        async with self.ctx.seats.use(seat_key(), activity.heartbeat), \
                shard_errors(self.ctx, inp.spec.source):
            return await self._snapshot(inp)

    async def _snapshot(self, inp: SnapshotInput) -> SnapshotResult:
        spec = inp.spec
        dsn = await shard_dsn(self.ctx, spec.source)
        names = repl.stream_names(spec.migration_id, "fwd")
        staged = inp.staging_id or spec.migration_id
        state = {"cp": CopyCheckpoint(stage="snapshot", rows_done=0, parts_done=0, parts_total=0)}

        def work(stop: threading.Event) -> SnapshotResult:
            try:
                return copy(stop)
            except StopRequested as exc:
                raise Stopped(str(exc)) from exc

        def throttled(why: str | None) -> None:
            cp = state["cp"]
            state["cp"] = cp.model_copy(update={"stage": why or "snapshot"})

        def copy(stop: threading.Event) -> SnapshotResult:
            throttle = None
            if inp.throttle is not None and inp.throttle.enabled:
                throttle = CopyThrottle(inp.throttle, source_dsn=dsn, stop=stop,
                                        on_wait=throttled)

            def progress(p: ExportProgress) -> None:
                state["cp"] = CopyCheckpoint(stage=state["cp"].stage, rows_done=p.rows_done,
                                             parts_done=p.parts_done, parts_total=p.parts_total)
                if stop.is_set():
                    raise Stopped()  # cancelled: stop between batches (a retry resumes)

            repl.create_publication(dsn, names, spec.collection, spec.chunk_id, spec.key_range)
            if repl.slot_position(dsn, names.slot) is None:
                with repl.create_slot(dsn, names, export_snapshot=True) as slot:
                    result = export_chunk(
                        dsn, spec.collection, spec.key_range, self.ctx.staging, staged,
                        snapshot=slot.snapshot_name, target_part_rows=inp.part_rows,
                        progress=progress, throttle=throttle,
                    )
                    lsn = slot.consistent_lsn
            else:
                # Resumed: the slot still starts at T; finish the export at a fresh snapshot.
                lsn = repl.slot_position(dsn, names.slot) or "0/0"
                result = export_chunk(
                    dsn, spec.collection, spec.key_range, self.ctx.staging, staged,
                    snapshot=None, target_part_rows=inp.part_rows, progress=progress,
                    throttle=throttle,
                )
            return SnapshotResult(consistent_lsn=lsn, parts=result.parts_total,
                                  rows=result.rows_exported, bytes=result.bytes_exported)

        try:
            return await self.ctx.run_blocking(work, lambda: state["cp"])
        except ShardError as exc:
            raise non_retryable(exc, "snapshot") from exc

