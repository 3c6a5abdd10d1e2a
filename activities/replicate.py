"""Phase 4 (and the rollback window): stream a chunk's changes and apply them.

``replicate`` runs for as long as the workflow wants the stream: until it is cancelled (the
workflow cancels it after the cutover, or on abort). It is resumable by construction: the
applier starts from the target's replication-origin progress, so a retry on another worker
continues exactly where the last committed batch ended. Heartbeats carry the applied LSN and
lag, shown in the Temporal UI, and why the applier is throttled while it is (the forward
stream of a move with ``copy_throttle.max_active`` pauses while the source is busy; see
``shards/postgres/throttle.py``).

Waiting is done inside activities, not by the workflow polling: ``wait_caught_up`` samples
the lag every ``poll_s`` and heartbeats it (the Temporal UI shows it) until the stream is
close enough or a window (60 s) has passed, and ``wait_reachable`` probes a shard that went
away. A move that waits for hours therefore records a few events per minute, not a dozen per
poll. Connection failures raise ``ShardUnavailable`` naming the shard that is down (see
``activities/availability.py``), so the workflow can pause the move instead of failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TypedDict

from temporalio import activity

from activities import metrics
from activities.availability import shard_dsn, shard_errors
from activities.context import MoveContext, non_retryable
from activities.models import (
    Direction,
    LagInput,
    LagResult,
    MoveSpec,
    ReachableInput,
    ReachableResult,
    ReplicateCheckpoint,
    ReplicateInput,
    ReplicateResult,
    WaitLagInput,
)
from activities.timeline import Sampler, utcnow
from catalog.timeline import MoveSample, SampleKind
from shards.postgres.apply import ChangeApplier, StreamSpec
from shards.postgres.pgoutput import lsn_to_str
from shards.postgres.replication import SlotMissingError, StreamNames, WalPositionReader
from shards.postgres.server import probe
from shards.postgres.stream_control import StreamStateError, measure_lag, read_state

HOLD_LAG_ENV = "SHARDSHIFT_TEST_HOLD_LAG"
"""Test hook: ``wait_caught_up`` of the collection named here never reports caught up, so a
test can keep a move in its replicate phase for as long as it needs. ``@path`` instead names a
file: the collections it lists (whitespace-separated) are held while it does, so a test can
release a worker *process* it cannot change the environment of (by removing the file)."""


def lag_held(collection: str) -> bool:
    """Whether the ``HOLD_LAG_ENV`` test hook holds ``collection``'s lag wait (unset: no)."""
    value = os.environ.get(HOLD_LAG_ENV)
    if not value:
        return False
    if value.startswith("@"):
        try:
            return collection in Path(value[1:]).read_text().split()
        except FileNotFoundError:
            return False
    return value == collection


def stream_spec(spec: MoveSpec, direction: Direction) -> StreamSpec:
    return StreamSpec(migration_id=spec.migration_id, part=direction.value,
                      collection=spec.collection, chunk_id=spec.chunk_id,
                      key_range=spec.key_range)


def endpoints(spec: MoveSpec, direction: Direction) -> tuple[str, str]:
    """(stream source shard, stream target shard) for a direction."""
    return (spec.source, spec.target) if direction == Direction.FORWARD else (spec.target, spec.source)


class _Probing(TypedDict):
    """What ``wait_reachable`` reports in its heartbeat: probes so far and the last error."""

    probes: int
    error: str | None


class ReplicateActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.replicate")
    async def replicate(self, inp: ReplicateInput) -> ReplicateResult:
        src, dst = endpoints(inp.spec, inp.direction)
        async with shard_errors(self.ctx, dst, src):
            return await self._replicate(inp, src, dst)

    async def _replicate(self, inp: ReplicateInput, src: str, dst: str) -> ReplicateResult:
        source_dsn, target_dsn = await shard_dsn(self.ctx, src), await shard_dsn(self.ctx, dst)
        applier = ChangeApplier(stream_spec(inp.spec, inp.direction), source_dsn, target_dsn,
                                throttle=inp.throttle)

        def checkpoint() -> ReplicateCheckpoint:
            s = applier.stats
            lag = list(s.lag_samples)[-1] if s.lag_samples else 0.0
            return ReplicateCheckpoint(
                direction=inp.direction, applied_lsn=lsn_to_str(applier.applied_lsn),
                applied_txns=s.applied_txns, applied_changes=s.applied_changes, lag_s=lag,
                throttled=applier.throttle.reason if applier.throttle is not None else None,
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

        sampler = Sampler(self.ctx.catalog, inp.spec.migration_id)
        async with sampler:
            lag_task = asyncio.create_task(_lag_samples(applier, source_dsn, inp.direction,
                                                        sampler))
            try:
                return await self.ctx.run_blocking(work, checkpoint)
            finally:
                lag_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lag_task

    @activity.defn(name="migrate.lag")
    async def lag(self, inp: LagInput) -> LagResult:
        src, dst = endpoints(inp.spec, inp.direction)
        source_dsn, target_dsn = await self.ctx.dsn(src), await self.ctx.dsn(dst)
        names = stream_spec(inp.spec, inp.direction).names

        def work(stop: threading.Event) -> LagResult:
            return _record_lag(inp.spec, inp.direction,
                               _sample_lag(source_dsn, target_dsn, names))

        return await self.ctx.run_blocking(work)

    @activity.defn(name="migrate.wait_caught_up")
    async def wait_caught_up(self, inp: WaitLagInput) -> LagResult:
        """Sample the lag until it is at most ``max_lag_bytes`` or ``window_s`` has passed;
        returns the last sample (heartbeated meanwhile, so the Temporal UI shows it)."""
        src, dst = endpoints(inp.spec, inp.direction)
        names = stream_spec(inp.spec, inp.direction).names
        async with shard_errors(self.ctx, dst, src):
            source_dsn, target_dsn = await shard_dsn(self.ctx, src), await shard_dsn(self.ctx, dst)
            last: dict[str, LagResult | None] = {"lag": None}

            def work(stop: threading.Event) -> LagResult:
                deadline = time.monotonic() + inp.window_s
                while True:
                    lag = last["lag"] = _record_lag(inp.spec, inp.direction,
                                                    _sample_lag(source_dsn, target_dsn, names))
                    held = lag_held(inp.spec.collection)
                    if lag.streaming and lag.lag_bytes <= inp.max_lag_bytes and not held:
                        return lag
                    if time.monotonic() >= deadline or stop.wait(inp.poll_s):
                        return lag

            return await self.ctx.run_blocking(work, lambda: last["lag"])

    @activity.defn(name="migrate.wait_reachable")
    async def wait_reachable(self, inp: ReachableInput) -> ReachableResult:
        """Probe a shard (one fresh connection and ``SELECT 1``) with a growing interval until
        it answers or ``window_s`` has passed."""
        dsn = await shard_dsn(self.ctx, inp.shard)
        state: _Probing = {"probes": 0, "error": None}

        def work(stop: threading.Event) -> ReachableResult:
            deadline = time.monotonic() + inp.window_s
            interval = inp.poll_s
            while True:
                error = probe(dsn)
                state["probes"] += 1
                state["error"] = error
                if error is None:
                    return ReachableResult(reachable=True, probes=state["probes"])
                left = deadline - time.monotonic()
                if left <= 0 or stop.wait(min(interval, left)):
                    return ReachableResult(reachable=False, probes=state["probes"], error=error)
                interval = min(interval * 2, inp.max_poll_s)

        return await self.ctx.run_blocking(work, lambda: dict(state))


async def _lag_samples(applier: ChangeApplier, source_dsn: str, direction: Direction,
                       sampler: Sampler) -> None:
    """``lag`` samples of a running applier for the move's timeline: the source's WAL
    position (one query on one connection kept open) against what the applier has caught up
    to (in memory), as ``measure_lag`` defines it, and the commit lag of the last applied
    transaction. At most one per sampler interval; a failed query skips that sample."""
    reader = WalPositionReader(source_dsn)
    try:
        while True:
            caught = applier.caught_up_lsn
            if not caught:
                await asyncio.sleep(0.1)  # not streaming yet: the first sample comes soon
                continue
            if not sampler.due(SampleKind.LAG, direction.value):
                await asyncio.sleep(0.1)
                continue
            lsn = await asyncio.to_thread(reader.read)
            if lsn is None:
                # The source is away: the applier reports that, not the timeline.
                await asyncio.sleep(sampler.min_interval_s)
                continue
            lags = applier.stats.lag_samples
            sampler.add(MoveSample(at=utcnow(), kind=SampleKind.LAG, name=direction.value,
                                   lag_bytes=max(0, lsn - caught),
                                   lag_s=lags[-1] if lags else None))
            await asyncio.sleep(sampler.min_interval_s)
    finally:
        await asyncio.to_thread(reader.close)


def _record_lag(spec: MoveSpec, direction: Direction, lag: LagResult) -> LagResult:
    """Publish a lag sample of a streaming applier as the move's live lag gauges."""
    if lag.streaming:
        labels = {"migration": spec.migration_id, "direction": direction.value}
        metrics.replication_lag_bytes.set(max(lag.lag_bytes, 0), labels)
        if lag.lag_s is not None:
            metrics.replication_lag.set(lag.lag_s, labels)
    return lag


def _sample_lag(source_dsn: str, target_dsn: str, names: StreamNames) -> LagResult:
    state = read_state(target_dsn, names)
    if state is None:
        return LagResult(lag_bytes=-1, lag_s=None, applied_lsn=None, streaming=False)
    lag = measure_lag(source_dsn, target_dsn, names)
    return LagResult(lag_bytes=lag.lag_bytes, lag_s=lag.commit_lag_s,
                     applied_lsn=state.applied_lsn, streaming=True)
