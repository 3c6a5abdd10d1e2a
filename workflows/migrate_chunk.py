"""``MigrateChunkWorkflow``: move one chunk to another shard without downtime.

Phases (each recorded in the catalog's migration record and the ``ShardshiftPhase`` search
attribute): register -> snapshot + bulk import (concurrently, the import following the
export part by part) -> replicate (a long-running applier activity) -> verify -> cutover
(retried while it does not commit) -> rollback window (reverse stream; the ``rollback``
update moves the chunk back) -> cleanup -> done.

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
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, FailureError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.bulk_import import ImportActivities
    from activities.catalog_ops import CatalogActivities
    from activities.cleanup import CleanupActivities
    from activities.cutover import CutoverActivities
    from activities.models import (
        CleanupInput,
        CopyProgressInput,
        CutoverInput,
        CutoverResult,
        CutoverStep,
        Direction,
        FinishInput,
        ImportInput,
        LagInput,
        MoveSpec,
        PhaseInput,
        PlanInput,
        RegisteredInput,
        RegisterInput,
        ReplicateInput,
        SnapshotInput,
        VerifyInput,
        VerifyResult,
    )
    from activities.replicate import ReplicateActivities
    from activities.snapshot import SnapshotActivities
    from activities.verify import VerifyActivities
    from catalog.models import MigrationKind, MigrationOutcome, MigrationPhase

SA_KIND = SearchAttributeKey.for_keyword("ShardshiftKind")
SA_COLLECTION = SearchAttributeKey.for_keyword("ShardshiftCollection")
SA_CHUNK = SearchAttributeKey.for_keyword("ShardshiftChunk")
SA_SOURCE = SearchAttributeKey.for_keyword("ShardshiftSource")
SA_TARGET = SearchAttributeKey.for_keyword("ShardshiftTarget")
SA_PHASE = SearchAttributeKey.for_keyword("ShardshiftPhase")

_QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                     maximum_attempts=20)
_DATA = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
                    maximum_attempts=50)
_SHORT = timedelta(seconds=10)
"""Start-to-close of quick activities: a dead worker's call is retried elsewhere this soon."""
_WAIT = ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
_FOREVER = RetryPolicy(initial_interval=timedelta(seconds=1),
                       maximum_interval=timedelta(seconds=15))
_MAX_STEP_PAUSE_S = 300.0
"""Longest pause between two tries of an after-commit step that failed for good."""


class MigrateChunkInput(BaseModel):
    """What to move and how. Durations are seconds (settings a test can shorten)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    collection: str
    chunk_id: int
    target: str
    kind: MigrationKind = MigrationKind.MOVE
    part_rows: int = Field(default=50_000, ge=100)
    max_lag_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    """Cutover admission: the stream must be at most this far behind."""
    catchup_timeout_s: float = Field(default=2.0, gt=0)
    """Longest the writes may stay paused waiting for the target to apply the freeze."""
    cutover_attempts: int = Field(default=10, ge=1)
    cutover_retry_s: float = Field(default=2.0, ge=0)
    poll_s: float = Field(default=1.0, gt=0)
    """How often lag and copy progress are sampled."""
    rollback_window_s: float = Field(default=0.0, ge=0)
    """How long after the cutover a ``rollback`` update is accepted (0: no window)."""
    verify_buckets: int = Field(default=64, ge=1, le=65_536)
    verify: bool = True
    delete_batch: int = Field(default=5_000, ge=1)
    delete_pause_s: float = Field(default=0.0, ge=0)
    dry_run: bool = False
    cutover_heartbeat_s: float = Field(default=2.0, gt=0)
    """Heartbeat timeout of the cutover activity: bounds how long a crashed worker can leave
    the source frozen (plus the retry's recovery)."""
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    """Heartbeat timeout of the long-running activities (snapshot, import, replicate, verify,
    cleanup): how soon a crashed worker's activity is retried elsewhere."""
    after_commit_retry_s: float = Field(default=5.0, gt=0)
    """After the commit point a step that failed for good is tried again after this long,
    doubling up to 5 minutes, until it succeeds."""
    lease_ttl_s: float | None = Field(default=None, gt=0)
    """Lifetime of the move's leases (None: the catalog's default); renewed while it runs."""


class MigrateChunkResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    migration_id: str
    outcome: MigrationOutcome
    source: str | None = None
    target: str
    documents: int = 0
    pause_ms: float | None = None
    rollback_pause_ms: float | None = None
    cutover_attempts: int = 0
    verified: bool | None = None
    phase_seconds: dict[str, float] = {}
    plan: list[CutoverStep] = []
    detail: str | None = None


class Progress(BaseModel):
    """Answer of the ``progress`` query."""

    migration_id: str = ""
    phase: str = "starting"
    source: str | None = None
    target: str | None = None
    rows_total: int | None = None
    rows_copied: int = 0
    parts_copied: int = 0
    parts_total: int | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    pause_ms: float | None = None
    cutover_attempts: int = 0
    rollback_open: bool = False
    outcome: str | None = None
    detail: str | None = None


def describe_failure(exc: BaseException) -> str:
    """What a person needs from a failure chain: the innermost cause's type and message
    (an ``ActivityError`` only says "Activity task failed")."""
    cur: BaseException = exc
    while isinstance(cur, FailureError) and cur.cause is not None:
        cur = cur.cause
    kind = cur.type if isinstance(cur, ApplicationError) and cur.type else type(cur).__name__
    message = cur.message if isinstance(cur, FailureError) else str(cur)
    return f"{kind}: {message}"


def migration_id_for(workflow_id: str, run_id: str) -> str:
    """A catalog/staging-safe id, unique per run, stable across activity retries."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", workflow_id).lstrip("_.-") or "move"
    # Run ids are UUIDv7: the leading characters are a timestamp, the tail is random.
    return f"{base[:80]}.{run_id.replace('-', '')[-12:]}"


@workflow.defn
class MigrateChunkWorkflow:
    def __init__(self) -> None:
        self._progress = Progress()
        self._rollback_requested = False
        self._phase_started: dict[str, Any] = {}
        self._phase_seconds: dict[str, float] = {}
        self._heartbeat = timedelta(seconds=30)
        self._in_doubt = False
        """A cutover activity was started and has not returned a result (it may have
        committed): the catalog decides between rolling forward and undoing."""

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
        if not self._progress.rollback_open:
            raise ApplicationError(
                f"rollback is only possible during the rollback window (phase is "
                f"{self._progress.phase})", non_retryable=True,
            )

    # -- helpers ----------------------------------------------------------------------------------

    async def _phase(self, spec_or_id: MoveSpec | str, phase: MigrationPhase,
                     retry: RetryPolicy = _QUICK) -> None:
        now = workflow.now()
        prev = self._progress.phase
        if prev in self._phase_started:
            self._phase_seconds[prev] = (now - self._phase_started[prev]).total_seconds()
        self._phase_started[phase.value] = now
        self._progress.phase = phase.value
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase.value)])
        if phase == MigrationPhase.DONE:
            return  # finish_migration already closed the record with its outcome
        spec = None if isinstance(spec_or_id, str) else spec_or_id
        mid = spec.migration_id if spec is not None else spec_or_id
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
            retry_policy=_FOREVER, cancellation_type=_WAIT,
        )

    async def _cutover(self, inp: MigrateChunkInput, spec: MoveSpec,
                       direction: Direction) -> CutoverResult:
        """Run one cutover activity to its end, even if the workflow is cancelled meanwhile."""
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
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200),
                                     maximum_interval=timedelta(seconds=5), maximum_attempts=20),
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
            retry_policy=_FOREVER,
        )

    async def _wait_lag(self, inp: MigrateChunkInput, spec: MoveSpec, direction: Direction,
                        stream: asyncio.Task[Any]) -> None:
        while True:
            if stream.done():
                stream.result()  # surfaces a failed applier
            lag = await workflow.execute_activity_method(
                ReplicateActivities.lag, LagInput(spec=spec, direction=direction),
                start_to_close_timeout=_SHORT, retry_policy=_QUICK,
            )
            self._progress.lag_bytes = lag.lag_bytes if lag.streaming else None
            self._progress.lag_s = lag.lag_s
            if lag.streaming and lag.lag_bytes <= inp.max_lag_bytes:
                return
            await workflow.sleep(inp.poll_s)

    # -- the run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: MigrateChunkInput) -> MigrateChunkResult:
        info = workflow.info()
        mid = migration_id_for(info.workflow_id, info.run_id)
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
                start_to_close_timeout=_SHORT, retry_policy=_QUICK,
            )
            self._progress.phase = "dry_run"
            return MigrateChunkResult(migration_id=mid, outcome=MigrationOutcome.ABORTED,
                                      target=inp.target, plan=planned.steps, detail=planned.reason)

        try:
            spec = await workflow.execute_activity_method(
                CatalogActivities.register,
                RegisterInput(migration_id=mid, kind=inp.kind, collection=inp.collection,
                              chunk_id=inp.chunk_id, target=inp.target, holder=info.workflow_id,
                              lease_ttl_s=inp.lease_ttl_s),
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                         maximum_interval=timedelta(seconds=20)),
                cancellation_type=_WAIT,
            )
        except (asyncio.CancelledError, CancelledError, ActivityError) as exc:
            if isinstance(exc, ActivityError) and not isinstance(exc.cause, CancelledError):
                raise  # a refused registration (bad input) leaves nothing behind
            # Cancelled while registering (say, while waiting for a move lease): an earlier
            # attempt may have recorded the move, taken leases and fenced the target.
            leftover = await workflow.execute_activity_method(
                CatalogActivities.registered, RegisteredInput(migration_id=mid),
                start_to_close_timeout=_SHORT, retry_policy=_QUICK,
            )
            if leftover is not None:
                await self._abort(leftover, asyncio.CancelledError())
            raise asyncio.CancelledError() from None
        self._progress.source = spec.source
        workflow.upsert_search_attributes([SA_SOURCE.value_set(spec.source)])
        self._phase_started["registered"] = workflow.now()
        self._progress.phase = "registered"

        streams: dict[Direction, asyncio.Task[Any] | None] = {Direction.FORWARD: None,
                                                             Direction.REVERSE: None}
        committed = False
        result_kw: dict[str, Any] = {}
        running: list[asyncio.Task[Any]] = []
        try:
            # -- snapshot + bulk import ---------------------------------------------------------
            self._raise_if_cancelled()  # a cancel the registration finished through
            await self._phase(spec, MigrationPhase.SNAPSHOT)
            snap = workflow.start_activity_method(
                SnapshotActivities.snapshot, SnapshotInput(spec=spec, part_rows=inp.part_rows),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=_DATA, cancellation_type=_WAIT,
            )
            imp = workflow.start_activity_method(
                ImportActivities.bulk_import, ImportInput(spec=spec),
                start_to_close_timeout=timedelta(days=1), heartbeat_timeout=self._heartbeat,
                retry_policy=_DATA, cancellation_type=_WAIT,
            )
            running += [snap, imp]
            first = True
            while not (snap.done() and imp.done()):
                if snap.done():
                    # Raises if the snapshot failed; else its row count is the exact total.
                    self._progress.rows_total = snap.result().rows
                    if self._progress.phase == MigrationPhase.SNAPSHOT.value:
                        await self._phase(spec, MigrationPhase.IMPORT)
                if imp.done():
                    imp.result()
                cp = await workflow.execute_activity_method(
                    ImportActivities.copy_progress, CopyProgressInput(spec=spec, count_source=first),
                    start_to_close_timeout=_SHORT, retry_policy=_QUICK,
                )
                if first:
                    if not snap.done():
                        self._progress.rows_total = cp.rows_total  # an estimate until then
                    first = False
                self._progress.rows_copied = cp.rows_imported
                self._progress.parts_copied = cp.parts_imported
                self._progress.parts_total = cp.parts_total
                await workflow.wait([snap, imp], timeout=inp.poll_s,
                                    return_when=asyncio.ALL_COMPLETED)
            snapshot_result, import_result = snap.result(), imp.result()
            self._progress.rows_copied = import_result.rows
            self._progress.parts_copied = self._progress.parts_total = import_result.parts
            result_kw["documents"] = snapshot_result.rows

            # -- replicate until caught up -------------------------------------------------------
            self._raise_if_cancelled()
            await self._phase(spec, MigrationPhase.REPLICATE)
            streams[Direction.FORWARD] = self._start_stream(spec, Direction.FORWARD)
            await self._wait_lag(inp, spec, Direction.FORWARD, streams[Direction.FORWARD])

            # -- verify --------------------------------------------------------------------------
            self._raise_if_cancelled()
            if inp.verify:
                await self._phase(spec, MigrationPhase.VERIFY)
                verified: VerifyResult = await workflow.execute_activity_method(
                    VerifyActivities.verify, VerifyInput(spec=spec, buckets=inp.verify_buckets),
                    start_to_close_timeout=timedelta(hours=6),
                    heartbeat_timeout=self._heartbeat, retry_policy=_DATA,
                    cancellation_type=_WAIT,
                )
                result_kw["verified"] = verified.verified
                result_kw["documents"] = verified.documents

            # -- cutover ---------------------------------------------------------------------------
            await self._phase(spec, MigrationPhase.CUTOVER)
            cut: CutoverResult | None = None
            for attempt in range(1, inp.cutover_attempts + 1):
                self._progress.cutover_attempts = attempt
                self._raise_if_cancelled()
                await self._wait_lag(inp, spec, Direction.FORWARD, streams[Direction.FORWARD])
                self._raise_if_cancelled()
                cut = await self._cutover(inp, spec, Direction.FORWARD)
                if cut.committed or self._cancel_pending:
                    break
                workflow.logger.info("cutover attempt %d did not commit: %s", attempt, cut.reason)
                await workflow.sleep(inp.cutover_retry_s)
            assert cut is not None
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
                spec, MigrationPhase.ROLLBACK_WINDOW, _FOREVER))
            reverse = streams[Direction.REVERSE] = self._start_stream(spec, Direction.REVERSE)
            self._progress.rollback_open = True
            try:
                # A reverse stream that fails for good (its slot lost) closes the window early.
                await workflow.wait_condition(lambda: self._rollback_requested or reverse.done(),
                                              timeout=timedelta(seconds=inp.rollback_window_s))
            except TimeoutError:
                pass  # the window closed without a rollback request: keep the move
            except asyncio.CancelledError:
                self._cancel_pending = True
            self._progress.rollback_open = False
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
            spec, MigrationPhase.CLEANUP, _FOREVER))
        await self._until_done(inp, "cleanup", lambda: workflow.execute_activity_method(
            CleanupActivities.cleanup,
            CleanupInput(spec=spec, outcome=outcome, delete_batch=inp.delete_batch,
                         delete_pause_s=inp.delete_pause_s),
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=self._heartbeat,
            retry_policy=_FOREVER, cancellation_type=_WAIT,
        ))
        await self._until_done(inp, "finishing the record", lambda: workflow.execute_activity_method(
            CatalogActivities.finish, FinishInput(spec=spec, outcome=outcome),
            start_to_close_timeout=_SHORT, retry_policy=_FOREVER,
        ))
        await self._phase(spec, MigrationPhase.DONE)
        self._progress.outcome = outcome.value
        return MigrateChunkResult(
            migration_id=mid, outcome=outcome, source=spec.source, target=spec.target,
            phase_seconds=dict(self._phase_seconds), **result_kw,
        )

    async def _roll_back(self, inp: MigrateChunkInput, spec: MoveSpec,
                         stream: asyncio.Task[Any] | None) -> CutoverResult | None:
        back: CutoverResult | None = None
        for _ in range(inp.cutover_attempts):
            assert stream is not None
            await self._wait_lag(inp, spec, Direction.REVERSE, stream)  # raises if it failed
            try:
                back = await self._cutover(inp, spec, Direction.REVERSE)
            except ActivityError as exc:
                if not workflow.patched("resolve-rollback-cutover"):
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

    async def _steady(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``make()`` to its end; a cancel meanwhile is remembered, not obeyed."""
        while True:
            try:
                return await make()
            except asyncio.CancelledError:
                self._cancel_pending = True

    async def _until_done(self, inp: MigrateChunkInput, what: str,
                          make: Callable[[], Awaitable[Any]]) -> Any:
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
                if not workflow.patched("after-commit-until-done"):
                    raise
                failures += 1
                self._progress.detail = (
                    f"{what} failed ({failures}x), trying again in {pause:.0f}s: "
                    f"{describe_failure(exc)}")[:500]
                workflow.logger.warning("%s", self._progress.detail)
                await self._steady(lambda p=pause: workflow.sleep(p))
                pause = min(pause * 2, _MAX_STEP_PAUSE_S)

    async def _resolve_in_doubt(self, inp: MigrateChunkInput, spec: MoveSpec,
                                exc: BaseException) -> CutoverResult | None:
        """Before undoing a move whose cutover activity failed without a result: ask the
        catalog whether its switch committed (None: no cutover was in doubt)."""
        if not self._in_doubt or not workflow.patched("resolve-cutover"):
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
            CleanupInput(spec=spec, outcome=MigrationOutcome.ABORTED),
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=self._heartbeat,
            retry_policy=_DATA,
        )
        await workflow.execute_activity_method(
            CatalogActivities.finish,
            FinishInput(spec=spec, outcome=MigrationOutcome.ABORTED, detail=detail[:500]),
            start_to_close_timeout=_SHORT, retry_policy=_QUICK,
        )
        workflow.upsert_search_attributes([SA_PHASE.value_set("aborted")])
        self._progress.phase = "aborted"
        self._progress.outcome = MigrationOutcome.ABORTED.value
