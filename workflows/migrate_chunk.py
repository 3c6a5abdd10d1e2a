"""``MigrateChunkWorkflow``: move one chunk to another shard without downtime.

Phases (each recorded in the catalog's migration record and the ``ShardshiftPhase`` search
attribute): register -> snapshot + bulk import (concurrently, the import following the
export part by part) -> replicate (a long-running applier activity) -> verify -> cutover
(retried while it does not commit) -> rollback window (reverse stream; the ``rollback``
update moves the chunk back, the ``complete`` update closes the window early and keeps the
move) -> cleanup -> done.

Cancellation: before the commit point a cancel aborts cleanly (streams stopped, slots,
publications and origins dropped, the target's partial copy deleted, fences restored, leases
released). A cutover in flight is never interrupted: the workflow waits for it and then
decides. After the commit point a cancel finishes the move (skipping the rollback window).

The commit point is a fact in the catalog. A cutover activity that fails for good leaves its
outcome in doubt: before anything is undone, ``resolve_cutover`` reads the catalog (retried
without limit while it cannot), and a switch that committed is rolled forward. After the
commit point every step is retried until it succeeds (Temporal's retries without an attempt
limit, then a growing pause between steps that failed for good), so the move always finishes
its cleanup; the last error is shown in ``progress.detail``.

Orchestration only: every side effect is an activity; timers are input settings so tests
can shorten them.

Long moves and long faults (behind the ``bounded-history`` patch; older histories replay the
earlier polling loops):

- History stays bounded. The lag wait is one activity that polls inside (``wait_caught_up``,
  a minute per call), copy progress is sampled with a backoff up to ``progress_poll_max_s``,
  and when Temporal suggests it (or the run's history passes ``history_events_limit``) the
  move stops its running activities and continues as new with ``MigrateChunkResume`` (same
  migration id, spec, stage, progress): snapshot and import resume from staged and imported
  parts, the applier from its state row on the target.
- Progress is best-effort: a failed ``copy_progress`` sample is ignored.
- Transient errors wait: activity retries have no attempt limit (only logic errors and
  errors raised non-retryable fail a move). An unreachable shard (``ShardUnavailable``) pauses
  the move at its checkpoint: running activities stop, ``progress.waiting_for`` and
  ``progress.detail`` say what it waits for, ``wait_reachable`` probes with a growing
  interval, and the phase starts again from its checkpoint once the shard answers. The source
  is waited for as long as it takes; the target until ``target_give_up_s``, or until an
  operator declares it lost (the ``target_lost`` update). Then the move aborts clean on the
  source side and fails with ``ApplicationError(type="TargetLost")``, on which drains and
  rebalances re-plan the chunk elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, FailureError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.availability import SHARD_UNAVAILABLE
    from activities.bulk_import import ImportActivities
    from activities.catalog_ops import CatalogActivities
    from activities.cleanup import CleanupActivities
    from activities.cutover import CutoverActivities
    from activities.models import (
        CleanupInput,
        CopyProgressInput,
        CutoverInput,
        CutoverResult,
        Direction,
        FinishInput,
        ImportInput,
        LagInput,
        MoveSpec,
        PhaseInput,
        PlanInput,
        ReachableInput,
        RegisteredInput,
        RegisterInput,
        ReplicateInput,
        SnapshotInput,
        VerifyInput,
        VerifyResult,
        WaitLagInput,
    )
    from activities.replicate import ReplicateActivities
    from activities.snapshot import SnapshotActivities
    from activities.verify import VerifyActivities
    from catalog.models import MigrationOutcome, MigrationPhase
    from workflows.common import (
        CUTOVER_RETRY,
        FOREVER,
        MOVE_DATA,
        MOVE_QUICK,
        PROGRESS,
        REGISTER_RETRY,
        SA_CHUNK,
        SA_COLLECTION,
        SA_KIND,
        SA_PHASE,
        SA_SOURCE,
        SA_TARGET,
    )

from workflows.move_models import (
    AFTER_COMMIT_UNTIL_DONE,
    BEFORE_COMMIT,
    BOUNDED_HISTORY,
    CUTOVER_PAUSES,
    RESOLVE_CUTOVER,
    RESOLVE_ROLLBACK_CUTOVER,
    TARGET_LOST,
    MigrateChunkInput,
    MigrateChunkResult,
    MigrateChunkResume,
    Progress,
    Stage,
    describe_failure,
    migration_id_for,
)

__all__ = [
    "BOUNDED_HISTORY",
    "CUTOVER_PAUSES",
    "TARGET_LOST",
    "MigrateChunkInput",
    "MigrateChunkResult",
    "MigrateChunkResume",
    "MigrateChunkWorkflow",
    "Progress",
    "Stage",
    "describe_failure",
    "migration_id_for",
]

_SHORT = timedelta(seconds=10)
"""Start-to-close of quick activities: a dead worker's call is retried elsewhere this soon."""
_WAIT = ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
_MAX_STEP_PAUSE_S = 300.0
"""Longest pause between two tries of an after-commit step that failed for good."""
_T = TypeVar("_T")



@workflow.defn
class MigrateChunkWorkflow:
    def __init__(self) -> None:
        self._progress = Progress()
        self._rollback_requested = False
        self._complete_requested = False
        self._phase_started: dict[str, Any] = {}
        self._phase_seconds: dict[str, float] = {}
        self._heartbeat = timedelta(seconds=30)
        self._in_doubt = False
        """A cutover activity was started and has not returned a result (it may have
        committed): the catalog decides between rolling forward and undoing."""
        self._v2 = False
        self._stage = Stage.COPY
        self._streams: dict[Direction, asyncio.Task[Any] | None] = {}
        self._result_kw: dict[str, Any] = {}
        self._lost_declared = False
        self._target_lost = False
        self._waiting: tuple[str, datetime] | None = None

    # -- operator surface -------------------------------------------------------------------------

    @workflow.query
    def progress(self) -> Progress:
        return self._progress

    @workflow.update
    async def rollback(self) -> str:
        """Move the chunk back to its source through the reverse stream (rollback window only)."""
        self._rollback_requested = True
        return "rollback requested"

    @rollback.validator
    def _validate_rollback(self) -> None:
        if not self._progress.rollback_open or self._complete_requested:
            raise ApplicationError(
                f"rollback is only possible during the rollback window (phase is "
                f"{self._progress.phase})", non_retryable=True,
            )

    @workflow.update
    async def complete(self) -> str:
        """Close the rollback window now and keep the move: the reverse stream stops and the
        cleanup starts (the source copy is deleted; ``rollback`` is no longer possible)."""
        self._complete_requested = True
        return "rollback window closed: the move is kept; cleanup follows"

    @complete.validator
    def _validate_complete(self) -> None:
        if not self._progress.rollback_open or self._rollback_requested:
            raise ApplicationError(
                f"complete only closes an open rollback window (phase is "
                f"{self._progress.phase})", non_retryable=True,
            )

    @workflow.update
    async def target_lost(self) -> str:
        """Declare the target lost for good: the move aborts at its next checkpoint (clean on
        the source side) and fails with ``TargetLost``, without waiting for the give-up time."""
        self._lost_declared = True
        return f"target {self._progress.target} declared lost: the move aborts"

    @target_lost.validator
    def _validate_target_lost(self) -> None:
        if self._progress.phase not in BEFORE_COMMIT or self._progress.pause_ms is not None:
            raise ApplicationError(
                f"a target can only be declared lost before the cutover commits (phase is "
                f"{self._progress.phase})", non_retryable=True,
            )

    # -- helpers ----------------------------------------------------------------------------------

    async def _phase(self, spec_or_id: MoveSpec | str, phase: MigrationPhase,
                     retry: RetryPolicy = MOVE_QUICK) -> None:
        if self._v2 and self._progress.phase == phase.value:
            return  # re-entered after a pause or in a continued run: already recorded
        now = workflow.now()
        prev = self._progress.phase
        if prev in self._phase_started:
            self._phase_seconds[prev] = (now - self._phase_started[prev]).total_seconds()
        self._phase_started[phase.value] = now
        self._progress.phase = phase.value
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase.value)])
        if phase == MigrationPhase.DONE:
            return  # finish_migration already closed the record with its outcome
        spec, mid = ((None, spec_or_id) if isinstance(spec_or_id, str)
                     else (spec_or_id, spec_or_id.migration_id))
        await workflow.execute_activity_method(
            CatalogActivities.set_phase,
            PhaseInput(migration_id=mid, phase=phase,
                       lease_ttl_s=spec.lease_ttl_s if spec is not None else None),
            start_to_close_timeout=_SHORT, retry_policy=retry,
        )

    @staticmethod
    def _raise_if_cancelled() -> None:
        """Before the commit point a cancel must abort, even one whose CancelledError never
        surfaced (an activity that completed just as its cancellation was requested hands
        the workflow its result instead)."""
        if workflow.cancellation_reason() is not None:
            raise asyncio.CancelledError()

    @staticmethod
    async def _stop(handle: asyncio.Task[Any] | None) -> None:
        """Cancel a long-running activity and wait until it has stopped."""
        if handle is None or handle.done():
            return
        handle.cancel()
        try:
            await handle
        except (asyncio.CancelledError, ActivityError, CancelledError):
            pass  # the cancellation we asked for (or a failure): either way it has stopped

    def _start_stream(self, spec: MoveSpec, direction: Direction) -> asyncio.Task[Any]:
        return workflow.start_activity_method(
            ReplicateActivities.replicate, ReplicateInput(spec=spec, direction=direction),
            start_to_close_timeout=timedelta(days=30), heartbeat_timeout=self._heartbeat,
            retry_policy=self._pausing(FOREVER) if direction == Direction.FORWARD else FOREVER,
            cancellation_type=_WAIT,
        )

    # -- long moves, long faults (patch BOUNDED_HISTORY) --------------------------------------

    def _pausing(self, policy: RetryPolicy) -> RetryPolicy:
        """``policy``, except that an unreachable shard ends the attempt so the workflow sees
        it and pauses the move (before the commit point, forward direction only)."""
        if not self._v2:
            return policy
        return dataclasses.replace(policy, non_retryable_error_types=[
            *(policy.non_retryable_error_types or []), SHARD_UNAVAILABLE])

    @staticmethod
    def _unavailable(exc: BaseException) -> str | None:
        """The shard a ``ShardUnavailable`` failure names, anywhere in the cause chain."""
        cur: BaseException | None = exc
        while isinstance(cur, FailureError):
            if isinstance(cur, ApplicationError) and cur.type == SHARD_UNAVAILABLE:
                return str(cur.details[0]) if cur.details else None
            cur = cur.cause
        return None

    def _history_full(self, inp: MigrateChunkInput) -> bool:
        if not self._v2:
            return False
        info = workflow.info()
        return (info.is_continue_as_new_suggested()
                or info.get_current_history_length() >= inp.history_events_limit)

    async def _continue_as_new(self, inp: MigrateChunkInput, spec: MoveSpec,
                               running: list[asyncio.Task[Any]]) -> NoReturn:
        """Stop what runs (each resumes from its checkpoint) and start the next run."""
        for handle in [*running, self._streams.get(Direction.FORWARD)]:
            await self._stop(handle)
        nxt = self._progress.run + 1
        waiting_for, waiting_since = self._waiting or (None, None)
        update: dict[str, Any] = {"run": nxt}
        if self._stage == Stage.CUTOVER:
            # Only the lag wait continues as new, and it runs before its attempt's cutover:
            # that attempt has not been made.
            update["cutover_attempts"] = max(0, self._progress.cutover_attempts - 1)
        resume = MigrateChunkResume(
            migration_id=spec.migration_id, spec=spec, stage=self._stage,
            progress=self._progress.model_copy(update=update),
            phase_started=dict(self._phase_started), phase_seconds=dict(self._phase_seconds),
            documents=self._result_kw.get("documents"), verified=self._result_kw.get("verified"),
            verification=self._result_kw.get("verification"),
            waiting_for=waiting_for, waiting_since=waiting_since,
            target_declared_lost=self._lost_declared,
        )
        workflow.logger.info("continuing as new (run %d, stage %s, %d events)", nxt, self._stage,
                             workflow.info().get_current_history_length())
        workflow.continue_as_new(inp.model_copy(update={"resume": resume}))

    def _lost(self, spec: MoveSpec, since: datetime | None, inp: MigrateChunkInput) -> ApplicationError:
        """The error a move gives up with; the abort then spares the unreachable target."""
        self._target_lost = True
        if self._lost_declared:
            why = "declared lost by an operator"
        else:
            why = (f"unreachable since {since:%Y-%m-%d %H:%M:%S} UTC; gave up after "
                   f"{inp.target_give_up_s:g} s")
        return ApplicationError(f"target {spec.target} {why}", spec.target, type=TARGET_LOST,
                                non_retryable=True)

    async def _wait_for_shard(self, inp: MigrateChunkInput, spec: MoveSpec, shard: str,
                              since: datetime) -> None:
        """Pause until ``shard`` answers again (probing with a growing interval). For the
        target, give up at ``since + target_give_up_s`` or when it is declared lost."""
        is_target = shard == spec.target
        give_up = since + timedelta(seconds=inp.target_give_up_s) if is_target else None
        self._waiting = (shard, since)
        self._progress.waiting_for = shard
        what = (f"waiting for {'target' if is_target else 'source'} {shard} (unreachable since "
                f"{since:%Y-%m-%d %H:%M:%S} UTC"
                + (f"; giving up at {give_up:%Y-%m-%d %H:%M:%S} UTC)" if give_up else ")"))
        self._progress.detail = what
        workflow.logger.warning("%s", what)
        while True:
            if is_target and self._lost_declared:
                raise self._lost(spec, since, inp)
            window = inp.lag_window_s
            if give_up is not None:
                left = (give_up - workflow.now()).total_seconds()
                if left <= 0:
                    raise self._lost(spec, since, inp)
                window = min(window, max(left, 1.0))
            probe = workflow.start_activity_method(
                ReplicateActivities.wait_reachable,
                ReachableInput(shard=shard, window_s=window,
                               poll_s=min(inp.poll_s, 1.0), max_poll_s=min(window, 10.0)),
                start_to_close_timeout=timedelta(seconds=window + 30),
                heartbeat_timeout=self._heartbeat, retry_policy=MOVE_QUICK,
                cancellation_type=_WAIT,
            )

            def answered(p: asyncio.Task[Any] = probe) -> bool:
                return p.done() or (is_target and self._lost_declared)

            try:
                await workflow.wait_condition(answered)
            except asyncio.CancelledError:
                # Cancelled while the target is unreachable: abort without it.
                self._target_lost = is_target
                await self._stop(probe)
                raise
            if not probe.done():
                await self._stop(probe)
                continue
            answer = probe.result()
            if answer.reachable:
                workflow.logger.info("%s answers again", shard)
                self._waiting = None
                self._progress.waiting_for = self._progress.detail = None
                return
            self._progress.detail = f"{what}: {answer.error}"
            if self._history_full(inp):
                await self._continue_as_new(inp, spec, [])

    async def _sample_copy(self, spec: MoveSpec, first: bool) -> Any:
        """One ``copy_progress`` sample, or None if it failed (progress is best-effort)."""
        try:
            return await workflow.execute_activity_method(
                ImportActivities.copy_progress, CopyProgressInput(spec=spec, count_source=first),
                start_to_close_timeout=_SHORT, retry_policy=PROGRESS,
            )
        except ActivityError as exc:
            workflow.logger.info("progress sample skipped: %s", describe_failure(exc))
            return None

    async def _cutover(self, inp: MigrateChunkInput, spec: MoveSpec,
                       direction: Direction, *, pausing: bool = False) -> CutoverResult:
        """Run one cutover activity to its end, even if the workflow is cancelled meanwhile.

        ``pausing``: an unreachable shard ends the activity at once (``ShardUnavailable``)
        instead of using up its attempts, so the move can pause rather than abort."""
        policy = CUTOVER_RETRY
        handle = workflow.start_activity_method(
            CutoverActivities.cutover,
            CutoverInput(spec=spec, direction=direction, max_lag_bytes=inp.max_lag_bytes,
                         catchup_timeout_s=inp.catchup_timeout_s,
                         rollback_window_s=inp.rollback_window_s),
            # A worker that dies inside the pause leaves the source frozen: a short heartbeat
            # timeout gets the retry (whose first step undoes or finishes the switch) going
            # within seconds, inside the router's retry deadline.
            start_to_close_timeout=timedelta(seconds=inp.catchup_timeout_s + 30),
            heartbeat_timeout=timedelta(seconds=inp.cutover_heartbeat_s),
            retry_policy=self._pausing(policy) if pausing else policy,
        )
        self._in_doubt = True  # until a result says committed or not
        try:
            result = await asyncio.shield(handle)
        except asyncio.CancelledError:
            result = await handle
            self._cancel_pending = True
        self._in_doubt = False
        return result

    async def _resolve(self, spec: MoveSpec, direction: Direction) -> CutoverResult:
        """The catalog's answer to a cutover whose activity failed for good: committed (the
        new owner's fence is then active) or not (a half-done attempt is then undone)."""
        return await workflow.execute_activity_method(
            CutoverActivities.resolve, CutoverInput(spec=spec, direction=direction),
            start_to_close_timeout=timedelta(minutes=2), heartbeat_timeout=timedelta(seconds=20),
            retry_policy=FOREVER,
        )

    async def _wait_lag(self, inp: MigrateChunkInput, spec: MoveSpec, direction: Direction,
                        stream: asyncio.Task[Any]) -> None:
        if self._v2:
            return await self._wait_caught_up(inp, spec, direction, stream)
        while True:
            if stream.done():
                stream.result()  # surfaces a failed applier
            lag = await workflow.execute_activity_method(
                ReplicateActivities.lag, LagInput(spec=spec, direction=direction),
                start_to_close_timeout=_SHORT, retry_policy=MOVE_QUICK,
            )
            self._progress.lag_bytes = lag.lag_bytes if lag.streaming else None
            self._progress.lag_s = lag.lag_s
            if lag.streaming and lag.lag_bytes <= inp.max_lag_bytes:
                return
            await workflow.sleep(inp.poll_s)

    async def _wait_caught_up(self, inp: MigrateChunkInput, spec: MoveSpec, direction: Direction,
                              stream: asyncio.Task[Any]) -> None:
        """Until the stream is within ``max_lag_bytes``: one ``wait_caught_up`` activity per
        ``lag_window_s`` (it polls inside). Forward only: an unreachable shard pauses the
        move and restarts the applier (from its state row) once it answers; a long wait
        continues as new."""
        forward = direction == Direction.FORWARD
        while True:
            waiter: asyncio.Task[Any] | None = None
            try:
                if stream.done():
                    stream.result()  # surfaces a failed applier
                if forward and self._lost_declared:
                    raise self._lost(spec, None, inp)
                waiter = workflow.start_activity_method(
                    ReplicateActivities.wait_caught_up,
                    WaitLagInput(spec=spec, direction=direction, max_lag_bytes=inp.max_lag_bytes,
                                 poll_s=inp.poll_s, window_s=inp.lag_window_s),
                    start_to_close_timeout=timedelta(seconds=inp.lag_window_s + 60),
                    heartbeat_timeout=self._heartbeat,
                    retry_policy=self._pausing(MOVE_QUICK) if forward else MOVE_QUICK,
                    cancellation_type=_WAIT,
                )
                def ended(w: asyncio.Task[Any] = waiter, s: asyncio.Task[Any] = stream) -> bool:
                    return w.done() or s.done() or (forward and self._lost_declared)

                await workflow.wait_condition(ended)
                if not waiter.done():
                    await self._stop(waiter)
                    continue  # the applier ended (surfaced above) or the target was declared lost
                lag = waiter.result()
            except ActivityError as exc:
                down = self._unavailable(exc) if forward else None
                if down is None:
                    raise
                await self._stop(waiter)
                await self._stop(stream)
                await self._wait_for_shard(inp, spec, down, workflow.now())
                stream = self._streams[Direction.FORWARD] = self._start_stream(spec, direction)
                continue
            self._progress.lag_bytes = lag.lag_bytes if lag.streaming else None
            self._progress.lag_s = lag.lag_s
            if lag.streaming and lag.lag_bytes <= inp.max_lag_bytes:
                return
            if forward and self._history_full(inp):
                await self._continue_as_new(inp, spec, [])

    async def _copy(self, inp: MigrateChunkInput, spec: MoveSpec,
                    running: list[asyncio.Task[Any]]) -> tuple[Any, Any]:
        """Snapshot and bulk import (concurrently) to their end; (snapshot, import) results.

        Patched runs pause on an unreachable shard and start both again from their
        checkpoints (staged parts, imported parts) once it answers."""
        while True:
            snap = workflow.start_activity_method(
                SnapshotActivities.snapshot,
                SnapshotInput(spec=spec, part_rows=inp.part_rows, throttle=inp.copy_throttle),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=self._pausing(MOVE_DATA), cancellation_type=_WAIT,
            )
            imp = workflow.start_activity_method(
                ImportActivities.bulk_import, ImportInput(spec=spec),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=self._pausing(MOVE_DATA), cancellation_type=_WAIT,
            )
            running += [snap, imp]
            try:
                await self._poll_copy(inp, spec, snap, imp)
                return snap.result(), imp.result()
            except ActivityError as exc:
                down = self._unavailable(exc) if self._v2 else None
                if down is None:
                    raise
                await self._stop(snap)
                await self._stop(imp)
                running.clear()
                await self._wait_for_shard(inp, spec, down, workflow.now())

    async def _verify(self, inp: MigrateChunkInput, spec: MoveSpec) -> VerifyResult:
        """Verify to its end. Patched runs pause on an unreachable shard like the copy does
        (the forward stream stopped meanwhile and started again from its state row), then
        verify again from the start: an attempt holds nothing across a pause."""
        while True:
            try:
                result: VerifyResult = await workflow.execute_activity_method(
                    VerifyActivities.verify, VerifyInput(spec=spec, buckets=inp.verify_buckets),
                    start_to_close_timeout=timedelta(hours=6),
                    heartbeat_timeout=self._heartbeat, retry_policy=self._pausing(MOVE_DATA),
                    cancellation_type=_WAIT,
                )
                return result
            except ActivityError as exc:
                down = self._unavailable(exc) if self._v2 else None
                if down is None:
                    raise
                await self._stop(self._streams.get(Direction.FORWARD))
                await self._wait_for_shard(inp, spec, down, workflow.now())
                self._streams[Direction.FORWARD] = self._start_stream(spec, Direction.FORWARD)

    async def _poll_copy(self, inp: MigrateChunkInput, spec: MoveSpec, snap: asyncio.Task[Any],
                         imp: asyncio.Task[Any]) -> None:
        first = True
        poll = inp.poll_s
        while not (snap.done() and imp.done()):
            if snap.done():
                # Raises if the snapshot failed; else its row count is the exact total (of
                # this attempt's parts: a resumed export counts only what it exported).
                rows = snap.result().rows
                self._progress.rows_total = max(rows, self._progress.rows_total or 0) \
                    if self._v2 else rows
                if self._progress.phase == MigrationPhase.SNAPSHOT.value:
                    await self._phase(spec, MigrationPhase.IMPORT)
            if imp.done():
                imp.result()
            if self._v2:
                if self._lost_declared:
                    raise self._lost(spec, None, inp)
                if self._history_full(inp):
                    await self._continue_as_new(inp, spec, [snap, imp])
                cp = await self._sample_copy(spec, first)
            else:
                cp = await workflow.execute_activity_method(
                    ImportActivities.copy_progress, CopyProgressInput(spec=spec, count_source=first),
                    start_to_close_timeout=_SHORT, retry_policy=MOVE_QUICK,
                )
            if cp is not None:
                if first and not snap.done():
                    self._progress.rows_total = cp.rows_total  # an estimate until then
                self._progress.rows_copied = cp.rows_imported
                self._progress.parts_copied = cp.parts_imported
                self._progress.parts_total = cp.parts_total
            first = False
            if self._v2:
                pending = [t for t in (snap, imp) if not t.done()]
                if pending:  # (both may have ended during the sample)
                    await workflow.wait(pending, timeout=poll,
                                        return_when=asyncio.FIRST_COMPLETED)
                poll = min(poll * 1.5, max(inp.progress_poll_max_s, inp.poll_s))
            else:
                await workflow.wait([snap, imp], timeout=inp.poll_s,
                                    return_when=asyncio.ALL_COMPLETED)

    # -- the run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: MigrateChunkInput) -> MigrateChunkResult:
        self._v2 = workflow.patched(BOUNDED_HISTORY)
        info = workflow.info()
        # A continued run keeps the migration id of the first (it names everything the move made).
        mid = inp.resume.migration_id if inp.resume else migration_id_for(info.workflow_id,
                                                                          info.run_id)
        self._progress.migration_id = mid
        self._progress.target = inp.target
        self._cancel_pending = False
        self._heartbeat = timedelta(seconds=inp.heartbeat_timeout_s)
        workflow.upsert_search_attributes([
            SA_KIND.value_set(inp.kind.value), SA_COLLECTION.value_set(inp.collection),
            SA_CHUNK.value_set(str(inp.chunk_id)), SA_TARGET.value_set(inp.target),
        ])

        if inp.dry_run:
            planned = await workflow.execute_activity_method(
                CutoverActivities.plan,
                PlanInput(migration_id=mid, collection=inp.collection, chunk_id=inp.chunk_id,
                          target=inp.target, max_lag_bytes=inp.max_lag_bytes,
                          catchup_timeout_s=inp.catchup_timeout_s,
                          rollback_window_s=inp.rollback_window_s),
                start_to_close_timeout=_SHORT, retry_policy=MOVE_QUICK,
            )
            self._progress.phase = "dry_run"
            return MigrateChunkResult(migration_id=mid, outcome=MigrationOutcome.DRY_RUN,
                                      target=inp.target, plan=planned.steps, detail=planned.reason,
                                      dry_run=True)

        if inp.resume is None:
            spec = await self._register(inp, mid)
        else:
            spec = self._resume(inp.resume)
        self._progress.source = spec.source
        workflow.upsert_search_attributes([SA_SOURCE.value_set(spec.source)])
        if inp.resume is None:
            self._phase_started["registered"] = workflow.now()
            self._progress.phase = "registered"
        else:
            workflow.upsert_search_attributes([SA_PHASE.value_set(self._progress.phase)])

        streams: dict[Direction, asyncio.Task[Any] | None] = {Direction.FORWARD: None,
                                                             Direction.REVERSE: None}
        self._streams = streams
        committed = False
        result_kw: dict[str, Any] = self._result_kw
        running: list[asyncio.Task[Any]] = []
        try:
            if inp.resume is not None and inp.resume.waiting_for is not None:
                assert inp.resume.waiting_since is not None
                await self._wait_for_shard(inp, spec, inp.resume.waiting_for,
                                           inp.resume.waiting_since)
            # -- snapshot + bulk import ---------------------------------------------------------
            if self._stage == Stage.COPY:
                self._raise_if_cancelled()  # a cancel the registration finished through
                if self._progress.phase != MigrationPhase.IMPORT.value:  # not a continued run's
                    await self._phase(spec, MigrationPhase.SNAPSHOT)
                snapshot_result, import_result = await self._copy(inp, spec, running)
                self._progress.rows_copied = import_result.rows
                self._progress.parts_copied = self._progress.parts_total = import_result.parts
                result_kw["documents"] = snapshot_result.rows
                self._stage = Stage.REPLICATE

            # -- replicate until caught up -------------------------------------------------------
            self._raise_if_cancelled()
            if self._stage == Stage.REPLICATE:
                await self._phase(spec, MigrationPhase.REPLICATE)
            forward = streams[Direction.FORWARD] = self._start_stream(spec, Direction.FORWARD)
            if self._stage == Stage.REPLICATE:
                await self._wait_lag(inp, spec, Direction.FORWARD, forward)

                # -- verify ----------------------------------------------------------------------
                self._raise_if_cancelled()
                if inp.verify:
                    await self._phase(spec, MigrationPhase.VERIFY)
                    verified = await self._verify(inp, spec)
                    result_kw["verified"] = verified.verified
                    result_kw["documents"] = verified.documents
                    result_kw["verification"] = verified
                self._stage = Stage.CUTOVER

            # -- cutover ---------------------------------------------------------------------------
            await self._phase(spec, MigrationPhase.CUTOVER)
            cut: CutoverResult | None = None
            # (a continued run goes on counting the attempts of the runs before)
            for attempt in range(self._progress.cutover_attempts + 1, inp.cutover_attempts + 1):
                self._progress.cutover_attempts = attempt
                self._raise_if_cancelled()
                stream = streams[Direction.FORWARD]
                assert stream is not None  # started above, restarted after a pause
                await self._wait_lag(inp, spec, Direction.FORWARD, stream)
                self._raise_if_cancelled()
                pausing = self._v2 and workflow.patched(CUTOVER_PAUSES)
                try:
                    cut = await self._cutover(inp, spec, Direction.FORWARD, pausing=pausing)
                except ActivityError as exc:
                    down = self._unavailable(exc) if pausing else None
                    if down is None:
                        raise
                    # A shard went away inside the cutover: settle the attempt from the
                    # catalog (committed: done; else the source is unfrozen), then pause like
                    # any other phase and try again once the shard answers.
                    cut = await self._until_done(inp, "resolving the cutover",
                                                 lambda: self._resolve(spec, Direction.FORWARD))
                    self._in_doubt = False
                    if cut.committed:
                        break
                    if self._cancel_pending:
                        raise asyncio.CancelledError() from None
                    await self._stop(streams[Direction.FORWARD])
                    await self._wait_for_shard(inp, spec, down, workflow.now())
                    streams[Direction.FORWARD] = self._start_stream(spec, Direction.FORWARD)
                    continue
                if cut.committed or self._cancel_pending:
                    break
                workflow.logger.info("cutover attempt %d did not commit: %s", attempt, cut.reason)
                await workflow.sleep(inp.cutover_retry_s)
            assert cut is not None, "no cutover attempt left"
            result_kw["cutover_attempts"] = self._progress.cutover_attempts
            if not cut.committed:
                if self._cancel_pending:
                    raise asyncio.CancelledError()
                raise ApplicationError(
                    f"cutover did not commit in {inp.cutover_attempts} attempts: {cut.reason}",
                    non_retryable=True,
                )
            committed = True
            self._progress.pause_ms = result_kw["pause_ms"] = cut.pause_ms
        except (asyncio.CancelledError, CancelledError, ActivityError, ApplicationError) as exc:
            if committed:
                raise
            # Nothing of the move may still run while it is undone (or rolled forward).
            for handle in [*running, streams[Direction.FORWARD]]:
                await self._stop(handle)
            resolved = await self._resolve_in_doubt(inp, spec, exc)
            if resolved is None or not resolved.committed:
                await self._abort(spec, exc)
                raise
            # The switch committed although its activity failed: the move is done; finish it.
            result_kw["cutover_attempts"] = self._progress.cutover_attempts
            self._progress.pause_ms = result_kw["pause_ms"] = resolved.pause_ms
            self._progress.detail = result_kw["detail"] = (
                f"rolled forward: the cutover's switch committed, then its activity failed "
                f"({describe_failure(exc)})")[:500]
            workflow.logger.warning("%s", self._progress.detail)

        # -- after the commit point: the move is done whatever happens -------------------------
        # A cancel from here on finishes the move: every await is made immune to it.
        await self._steady(lambda: self._stop(streams[Direction.FORWARD]))
        outcome = MigrationOutcome.COMPLETED
        if inp.rollback_window_s > 0 and not self._cancel_pending:
            await self._until_done(inp, "recording the rollback window", lambda: self._phase(
                spec, MigrationPhase.ROLLBACK_WINDOW, FOREVER))
            reverse = streams[Direction.REVERSE] = self._start_stream(spec, Direction.REVERSE)
            self._progress.rollback_open = True
            try:
                # A reverse stream that fails for good (its slot lost) closes the window early.
                # ``complete`` closes the window early. (No patch: the condition only differs
                # once that update was accepted, which no history of an older build holds.)
                await workflow.wait_condition(
                    lambda: self._rollback_requested or self._complete_requested
                    or reverse.done(),
                    timeout=timedelta(seconds=inp.rollback_window_s))
            except TimeoutError:
                pass  # the window closed without a rollback request: keep the move
            except asyncio.CancelledError:
                self._cancel_pending = True
            self._progress.rollback_open = False
            if self._complete_requested and not self._rollback_requested:
                self._progress.detail = result_kw["detail"] = (
                    "rollback window closed early by an operator (complete)")
            try:
                if self._rollback_requested and not self._cancel_pending:
                    back = await self._roll_back(inp, spec, reverse)
                    if back is not None and back.committed:
                        outcome = MigrationOutcome.ROLLED_BACK
                        result_kw["rollback_pause_ms"] = back.pause_ms
            except asyncio.CancelledError:
                self._cancel_pending = True  # stop trying to roll back; finish the move
            except ActivityError as exc:
                # Only the reverse stream can fail here without the switch having started
                # (a reverse cutover that fails for good is resolved from the catalog).
                # Rolling back is impossible now; the move itself stands.
                self._progress.detail = result_kw["detail"] = f"rollback impossible: {describe_failure(exc)}"
                workflow.logger.warning("%s", self._progress.detail)
            if reverse.done() and not self._rollback_requested:
                try:
                    reverse.result()
                except ActivityError as exc:
                    self._progress.detail = result_kw["detail"] = (
                        f"rollback window closed early, the reverse stream failed: "
                        f"{describe_failure(exc)}")
                    workflow.logger.warning("%s", self._progress.detail)
            await self._steady(lambda: self._stop(streams[Direction.REVERSE]))

        await self._until_done(inp, "recording the cleanup phase", lambda: self._phase(
            spec, MigrationPhase.CLEANUP, FOREVER))
        await self._until_done(inp, "cleanup", lambda: workflow.execute_activity_method(
            CleanupActivities.cleanup,
            CleanupInput(spec=spec, outcome=outcome, delete_batch=inp.delete_batch,
                         delete_pause_s=inp.delete_pause_s),
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=self._heartbeat,
            retry_policy=FOREVER, cancellation_type=_WAIT,
        ))
        await self._until_done(inp, "finishing the record", lambda: workflow.execute_activity_method(
            CatalogActivities.finish, FinishInput(spec=spec, outcome=outcome),
            start_to_close_timeout=_SHORT, retry_policy=FOREVER,
        ))
        await self._phase(spec, MigrationPhase.DONE)
        self._progress.outcome = outcome.value
        return MigrateChunkResult(
            migration_id=mid, outcome=outcome, source=spec.source, target=spec.target,
            phase_seconds=dict(self._phase_seconds), **result_kw,
        )

    async def _register(self, inp: MigrateChunkInput, mid: str) -> MoveSpec:
        info = workflow.info()
        try:
            spec = await workflow.execute_activity_method(
                CatalogActivities.register,
                RegisterInput(migration_id=mid, kind=inp.kind, collection=inp.collection,
                              chunk_id=inp.chunk_id, target=inp.target, holder=info.workflow_id,
                              lease_ttl_s=inp.lease_ttl_s),
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=REGISTER_RETRY,
                cancellation_type=_WAIT,
            )
        except (asyncio.CancelledError, CancelledError, ActivityError) as exc:
            if isinstance(exc, ActivityError) and not isinstance(exc.cause, CancelledError):
                raise  # a refused registration (bad input) leaves nothing behind
            # Cancelled while registering (say, while waiting for a move lease): an earlier
            # attempt may have recorded the move, taken leases and fenced the target.
            leftover = await workflow.execute_activity_method(
                CatalogActivities.registered, RegisteredInput(migration_id=mid),
                start_to_close_timeout=_SHORT, retry_policy=MOVE_QUICK,
            )
            if leftover is not None:
                await self._abort(leftover, asyncio.CancelledError())
            raise asyncio.CancelledError() from None
        return spec

    def _resume(self, resume: MigrateChunkResume) -> MoveSpec:
        """Pick up where the previous run stopped (continue-as-new)."""
        self._progress = resume.progress.model_copy()
        self._stage = resume.stage
        self._phase_started = dict(resume.phase_started)
        self._phase_seconds = dict(resume.phase_seconds)
        self._lost_declared = resume.target_declared_lost
        if resume.documents is not None:
            self._result_kw["documents"] = resume.documents
        if resume.verified is not None:
            self._result_kw["verified"] = resume.verified
        if resume.verification is not None:
            self._result_kw["verification"] = resume.verification
        return resume.spec

    async def _roll_back(self, inp: MigrateChunkInput, spec: MoveSpec,
                         stream: asyncio.Task[Any] | None) -> CutoverResult | None:
        back: CutoverResult | None = None
        for _ in range(inp.cutover_attempts):
            assert stream is not None
            await self._wait_lag(inp, spec, Direction.REVERSE, stream)  # raises if it failed
            try:
                back = await self._cutover(inp, spec, Direction.REVERSE)
            except ActivityError as exc:
                if not workflow.patched(RESOLVE_ROLLBACK_CUTOVER):
                    raise ApplicationError(
                        "the rollback cutover failed for good and its outcome is unknown: check "
                        f"the chunk's owner in the catalog before acting ({describe_failure(exc)})",
                        non_retryable=True,
                    ) from exc
                # Its outcome is in the catalog: rolled back, or still on the target.
                back = await self._until_done(
                    inp, "resolving the rollback cutover",
                    lambda: self._resolve(spec, Direction.REVERSE))
            if back.committed:
                break
            await workflow.sleep(inp.cutover_retry_s)
        return back

    async def _steady(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``make()`` to its end; a cancel meanwhile is remembered, not obeyed."""
        while True:
            try:
                return await make()
            except asyncio.CancelledError:
                self._cancel_pending = True

    async def _until_done(self, inp: MigrateChunkInput, what: str,
                          make: Callable[[], Awaitable[_T]]) -> _T:
        """After the commit point: ``make()`` until it succeeds, immune to cancels.

        Retryable failures are retried by Temporal without an attempt limit (a few history
        events in all); a try that fails for good anyway (a non-retryable error, a timeout)
        is made again after a pause that doubles up to ``_MAX_STEP_PAUSE_S``, and the error is
        shown in ``progress.detail``. Giving up would leave slots (WAL retained without
        bound), publications, staging files and an active record that blocks the chunk.
        """
        pause = inp.after_commit_retry_s
        failures = 0
        while True:
            try:
                return await self._steady(make)
            except ActivityError as exc:
                if not workflow.patched(AFTER_COMMIT_UNTIL_DONE):
                    raise
                failures += 1
                self._progress.detail = (
                    f"{what} failed ({failures}x), trying again in {pause:.0f}s: "
                    f"{describe_failure(exc)}")[:500]
                workflow.logger.warning("%s", self._progress.detail)
                await self._steady(functools.partial(workflow.sleep, pause))
                pause = min(pause * 2, _MAX_STEP_PAUSE_S)

    async def _resolve_in_doubt(self, inp: MigrateChunkInput, spec: MoveSpec,
                                exc: BaseException) -> CutoverResult | None:
        """Before undoing a move whose cutover activity failed without a result: ask the
        catalog whether its switch committed (None: no cutover was in doubt)."""
        if not self._in_doubt or not workflow.patched(RESOLVE_CUTOVER):
            return None
        if isinstance(exc, asyncio.CancelledError | CancelledError):
            self._cancel_pending = True
        self._progress.detail = (f"the cutover failed ({describe_failure(exc)}); asking the "
                                 "catalog whether its switch committed")[:500]
        return await self._until_done(inp, "resolving the cutover",
                                      lambda: self._resolve(spec, Direction.FORWARD))

    async def _abort(self, spec: MoveSpec, exc: BaseException) -> None:
        """Before the commit point: undo everything, then record the outcome."""
        cancelled = isinstance(exc, asyncio.CancelledError | CancelledError)
        self._progress.phase = "aborting"
        detail = "cancelled" if cancelled else describe_failure(exc)
        await workflow.execute_activity_method(
            CleanupActivities.cleanup,
            CleanupInput(spec=spec, outcome=MigrationOutcome.ABORTED, target_lost=self._target_lost),
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=self._heartbeat,
            retry_policy=MOVE_DATA,
        )
        await workflow.execute_activity_method(
            CatalogActivities.finish,
            FinishInput(spec=spec, outcome=MigrationOutcome.ABORTED, detail=detail[:500]),
            start_to_close_timeout=_SHORT, retry_policy=MOVE_QUICK,
        )
        workflow.upsert_search_attributes([SA_PHASE.value_set("aborted")])
        self._progress.phase = "aborted"
        self._progress.outcome = MigrationOutcome.ABORTED.value

