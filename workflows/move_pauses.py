"""The move's state and its steps before the commit point: pauses, long moves, long faults.

``MovePauses`` is the bottom base class of ``MigrateChunkWorkflow`` (``workflows/migrate_chunk.py``):
it holds the workflow's state and the steps that copy, replicate and verify, which pause on an
unreachable shard and continue as new when a run's history grows long. Deterministic workflow
code only; every side effect is an activity.

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
from datetime import datetime, timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    TimeoutError,
    TimeoutType,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.availability import SHARD_UNAVAILABLE
    from activities.bulk_import import ImportActivities
    from activities.catalog_ops import CatalogActivities
    from activities.models import (
        CopyProgressInput,
        Direction,
        ImportInput,
        LagInput,
        MoveSpec,
        PhaseInput,
        ReachableInput,
        ReleaseStagingInput,
        ReplicateInput,
        SnapshotInput,
        StagingHome,
        VerifyInput,
        VerifyResult,
        WaitLagInput,
    )
    from activities.replicate import ReplicateActivities
    from activities.snapshot import SnapshotActivities
    from activities.staging import StagingActivities
    from activities.verify import VerifyActivities
    from catalog.models import MigrationPhase
    from shards.postgres.throttle import ThrottleSettings
    from workflows.common import FOREVER, MOVE_DATA, MOVE_QUICK, PROGRESS, SA_PHASE

from workflows.move_models import (
    TARGET_LOST,
    MigrateChunkInput,
    MigrateChunkResume,
    Progress,
    Stage,
    describe_failure,
)

SHORT = timedelta(seconds=10)
"""Start-to-close of quick activities: a dead worker's call is retried elsewhere this soon."""
WAIT = ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
"""Cancellation type of long-running activities: a cancel waits until the activity stopped."""


class MovePauses:
    """The move's state, its shared helpers, and the steps before the commit point."""

    def __init__(self) -> None:
        self._progress = Progress()
        self._rollback_requested = False
        self._complete_requested = False
        self._phase_started: dict[str, Any] = {}
        self._phase_seconds: dict[str, float] = {}
        self._heartbeat = timedelta(seconds=30)
        self._throttle: ThrottleSettings | None = None
        """The move's ``copy_throttle``: also the forward stream's apply throttle."""
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
        self._pinned = False
        """Patch ``PINNED_STAGING``: the copy runs where its staging area is."""
        self._home_chosen = False
        self._staging_queue: str | None = None
        self._staging_gen = 0
        self._cancel_pending = False
        """A cancel arrived while the move could not obey it (a cutover in flight, or after
        the commit point): remembered, then acted on."""

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
            start_to_close_timeout=SHORT, retry_policy=retry,
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
        # The throttle protects the move's source, so only the forward stream gets it; and it
        # is passed only when set, so a move without one schedules the very same input.
        throttled = self._throttle is not None and direction == Direction.FORWARD
        extra: dict[str, Any] = {"throttle": self._throttle} if throttled else {}
        return workflow.start_activity_method(
            ReplicateActivities.replicate, ReplicateInput(spec=spec, direction=direction, **extra),
            start_to_close_timeout=timedelta(days=30), heartbeat_timeout=self._heartbeat,
            retry_policy=self._pausing(FOREVER) if direction == Direction.FORWARD else FOREVER,
            cancellation_type=WAIT,
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
            staging_queue=self._staging_queue, staging_gen=self._staging_gen,
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
                cancellation_type=WAIT,
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
                ImportActivities.copy_progress,
                CopyProgressInput(spec=spec, count_source=first,
                                  staging_id=self._staging_id(spec)),
                start_to_close_timeout=SHORT, retry_policy=PROGRESS,
                **self._pin(SHORT),
            )
        except ActivityError as exc:
            workflow.logger.info("progress sample skipped: %s", describe_failure(exc))
            return None

    async def _wait_lag(self, inp: MigrateChunkInput, spec: MoveSpec, direction: Direction,
                        stream: asyncio.Task[Any]) -> None:
        if self._v2:
            return await self._wait_caught_up(inp, spec, direction, stream)
        while True:
            if stream.done():
                stream.result()  # surfaces a failed applier
            lag = await workflow.execute_activity_method(
                ReplicateActivities.lag, LagInput(spec=spec, direction=direction),
                start_to_close_timeout=SHORT, retry_policy=MOVE_QUICK,
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
                    cancellation_type=WAIT,
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
        checkpoints (staged parts, imported parts) once it answers. With staging private to
        each host (patch ``PINNED_STAGING``) both run on one worker's own task queue; when
        that worker stops taking tasks the copy is redone on another one."""
        while True:
            await self._choose_home(spec)
            start = timedelta(seconds=inp.pinned_start_timeout_s)
            sid = self._staging_id(spec)
            snap = workflow.start_activity_method(
                SnapshotActivities.snapshot,
                SnapshotInput(spec=spec, part_rows=inp.part_rows, throttle=inp.copy_throttle,
                              staging_id=sid),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=self._pausing(MOVE_DATA), cancellation_type=WAIT,
                **self._pin(start),
            )
            imp = workflow.start_activity_method(
                ImportActivities.bulk_import, ImportInput(spec=spec, staging_id=sid),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=self._pausing(MOVE_DATA), cancellation_type=WAIT,
                **self._pin(start),
            )
            running += [snap, imp]
            try:
                await self._poll_copy(inp, spec, snap, imp)
                await self._release_staging(spec)
                return snap.result(), imp.result()
            except ActivityError as exc:
                if self._pinned_worker_lost(exc):
                    await self._stop(snap)
                    await self._stop(imp)
                    running.clear()
                    lost = self._staging_queue
                    self._staging_gen += 1
                    self._home_chosen = False
                    self._progress.detail = (f"copy redone on another worker: {lost} took no "
                                             f"task for {inp.pinned_start_timeout_s:g} s")
                    workflow.logger.warning("%s", self._progress.detail)
                    continue
                down = self._unavailable(exc) if self._v2 else None
                if down is None:
                    raise
                await self._stop(snap)
                await self._stop(imp)
                running.clear()
                await self._wait_for_shard(inp, spec, down, workflow.now())

    # -- the copy's home (patch PINNED_STAGING) -------------------------------------------------

    async def _choose_home(self, spec: MoveSpec) -> None:
        """Ask any worker where the copy runs (its own queue if its staging is private)."""
        if not (self._v2 and self._pinned) or self._home_chosen:
            return
        home: StagingHome = await workflow.execute_activity_method(
            StagingActivities.staging_home, start_to_close_timeout=SHORT,
            retry_policy=MOVE_QUICK,
        )
        self._staging_queue = home.task_queue
        self._home_chosen = True
        if home.task_queue is not None:
            workflow.logger.info("copy of %s pinned to %s (staging id %s)", spec.migration_id,
                                 home.task_queue, self._staging_id(spec) or spec.migration_id)

    def _staging_id(self, spec: MoveSpec) -> str | None:
        """None (the migration id) until the copy is redone elsewhere: then a fresh id, so
        the new worker's part plan never mixes with the lost one's import progress."""
        return f"{spec.migration_id}.g{self._staging_gen}" if self._staging_gen else None

    def _pin(self, start: timedelta) -> dict[str, Any]:
        """Where a copy activity runs: the pinned queue (and how long it may wait there)."""
        if self._staging_queue is None:
            return {}
        return {"task_queue": self._staging_queue, "schedule_to_start_timeout": start}

    def _pinned_worker_lost(self, exc: BaseException) -> bool:
        """A pinned copy activity that no worker started in time: its worker is gone."""
        if self._staging_queue is None:
            return False
        cur: BaseException | None = exc
        while cur is not None:
            if isinstance(cur, TimeoutError) and cur.type == TimeoutType.SCHEDULE_TO_START:
                return True
            cur = cur.cause if isinstance(cur, FailureError) else None
        return False

    async def _release_staging(self, spec: MoveSpec) -> None:
        """Remove the pinned copy's parts on its worker (best-effort: the doctor finds any
        left behind). Shared staging is removed by the cleanup."""
        if self._staging_queue is None:
            return
        sid = self._staging_id(spec) or spec.migration_id
        try:
            await workflow.execute_activity_method(
                StagingActivities.release_staging, ReleaseStagingInput(staging_id=sid),
                start_to_close_timeout=SHORT * 6, retry_policy=PROGRESS, **self._pin(SHORT),
            )
        except ActivityError as exc:
            workflow.logger.warning("staged parts of %s left on %s: %s", sid,
                                    self._staging_queue, describe_failure(exc))

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
                    cancellation_type=WAIT,
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
                    start_to_close_timeout=SHORT, retry_policy=MOVE_QUICK,
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

    # -- continue-as-new bookkeeping ------------------------------------------------------------

    def _resume(self, resume: MigrateChunkResume) -> MoveSpec:
        """Pick up where the previous run stopped (continue-as-new)."""
        self._progress = resume.progress.model_copy()
        self._stage = resume.stage
        self._phase_started = dict(resume.phase_started)
        self._phase_seconds = dict(resume.phase_seconds)
        self._lost_declared = resume.target_declared_lost
        self._staging_queue = resume.staging_queue
        self._staging_gen = resume.staging_gen
        self._home_chosen = resume.staging_queue is not None
        if resume.documents is not None:
            self._result_kw["documents"] = resume.documents
        if resume.verified is not None:
            self._result_kw["verified"] = resume.verified
        if resume.verification is not None:
            self._result_kw["verification"] = resume.verification
        return resume.spec
