"""Phase 4 (and the rollback window): stream a chunk's changes and apply them.

``replicate`` runs for as long as the workflow wants the stream: until it is cancelled (the
workflow cancels it after the cutover, or on abort). It is resumable by construction: the
applier starts from the target's replication-origin progress, so a retry on another worker
continues exactly where the last committed batch ended. Heartbeats carry the applied LSN and
lag, shown in the Temporal UI.
"""

from __future__ import annotations

import threading

from temporalio import activity

from activities.context import MoveContext, non_retryable
from activities.models import (
    Direction,
    LagInput,
    LagResult,
    MoveSpec,
    ReplicateCheckpoint,
    ReplicateInput,
    ReplicateResult,
)
from shards.postgres.apply import (
    ChangeApplier,
    StreamSpec,
    StreamStateError,
    measure_lag,
    read_state,
)
from shards.postgres.pgoutput import lsn_to_str
from shards.postgres.replication import SlotMissingError


def stream_spec(spec: MoveSpec, direction: Direction) -> StreamSpec:
    return StreamSpec(migration_id=spec.migration_id, part=direction.value,
                      collection=spec.collection, chunk_id=spec.chunk_id,
                      key_range=spec.key_range)


def endpoints(spec: MoveSpec, direction: Direction) -> tuple[str, str]:
    """(stream source shard, stream target shard) for a direction."""
    return (spec.source, spec.target) if direction == Direction.FORWARD else (spec.target, spec.source)


class ReplicateActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.replicate")
    async def replicate(self, inp: ReplicateInput) -> ReplicateResult:
        src, dst = endpoints(inp.spec, inp.direction)
        source_dsn, target_dsn = await self.ctx.dsn(src), await self.ctx.dsn(dst)
        applier = ChangeApplier(stream_spec(inp.spec, inp.direction), source_dsn, target_dsn)

        def checkpoint() -> ReplicateCheckpoint:
            s = applier.stats
            lag = list(s.lag_samples)[-1] if s.lag_samples else 0.0
            return ReplicateCheckpoint(
                direction=inp.direction, applied_lsn=lsn_to_str(applier.applied_lsn),
                applied_txns=s.applied_txns, applied_changes=s.applied_changes, lag_s=lag,
            )

        def work(stop: threading.Event) -> ReplicateResult:
            try:
                stats = applier.run(stop)
            except (StreamStateError, SlotMissingError) as exc:
                # Retrying cannot bring back a dropped slot or a contradicted origin: fail
                # the activity for good, so the workflow aborts the move instead of waiting
                # on an applier that retries forever.
                raise non_retryable(exc, f"{inp.direction.value} stream") from exc
            return ReplicateResult(applied_txns=stats.applied_txns,
                                   applied_changes=stats.applied_changes,
                                   applied_lsn=lsn_to_str(applier.applied_lsn))

        return await self.ctx.run_blocking(work, checkpoint)

    @activity.defn(name="migrate.lag")
    async def lag(self, inp: LagInput) -> LagResult:
        src, dst = endpoints(inp.spec, inp.direction)
        source_dsn, target_dsn = await self.ctx.dsn(src), await self.ctx.dsn(dst)
        names = stream_spec(inp.spec, inp.direction).names

        def work(stop: threading.Event) -> LagResult:
            state = read_state(target_dsn, names)
            if state is None:
                return LagResult(lag_bytes=-1, lag_s=None, applied_lsn=None, streaming=False)
            lag = measure_lag(source_dsn, target_dsn, names)
            return LagResult(lag_bytes=lag.lag_bytes, lag_s=lag.commit_lag_s,
                             applied_lsn=state.applied_lsn, streaming=True)

        return await self.ctx.run_blocking(work)
