"""The move's cutover and everything around its commit point: register, cutover and its
resolution, abort, the rollback window, and the after-commit path.

``MoveCommit`` is a base class of ``MigrateChunkWorkflow`` (``workflows/migrate_chunk.py``),
above ``MovePauses`` (``workflows/move_pauses.py``). Deterministic workflow code only; every
side effect is an activity.

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
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.catalog_ops import CatalogActivities
    from activities.cleanup import CleanupActivities
    from activities.cutover import CutoverActivities
    from activities.models import (
        CleanupInput,
        CutoverInput,
        CutoverResult,
        Direction,
        FinishInput,
        MoveSpec,
        RegisteredInput,
        RegisterInput,
    )
    from catalog.models import MigrationOutcome, MigrationPhase
    from workflows.common import (
        CUTOVER_RETRY,
        FOREVER,
        MOVE_DATA,
        MOVE_QUICK,
        REGISTER_RETRY,
        SA_PHASE,
    )

from workflows.move_models import (
    AFTER_COMMIT_UNTIL_DONE,
    CUTOVER_PAUSES,
    RESOLVE_CUTOVER,
    RESOLVE_ROLLBACK_CUTOVER,
    MigrateChunkInput,
    MigrateChunkResult,
    describe_failure,
)
from workflows.move_pauses import SHORT, WAIT, MovePauses

_MAX_STEP_PAUSE_S = 300.0
"""Longest pause between two tries of an after-commit step that failed for good."""
_T = TypeVar("_T")


class MoveCommit(MovePauses):
    """Register, cutover, abort, rollback window and the after-commit path of a move."""

    # -- before the commit point: register, cut over, abort ----------------------------------

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
                cancellation_type=WAIT,
            )
        except (asyncio.CancelledError, CancelledError, ActivityError) as exc:
            if isinstance(exc, ActivityError) and not isinstance(exc.cause, CancelledError):
                raise  # a refused registration (bad input) leaves nothing behind
            # Cancelled while registering (say, while waiting for a move lease): an earlier
            # attempt may have recorded the move, taken leases and fenced the target.
            leftover = await workflow.execute_activity_method(
                CatalogActivities.registered, RegisteredInput(migration_id=mid),
                start_to_close_timeout=SHORT, retry_policy=MOVE_QUICK,
            )
            if leftover is not None:
                await self._abort(leftover, asyncio.CancelledError())
            raise asyncio.CancelledError() from None
        return spec

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

    async def _forward_cutover(self, inp: MigrateChunkInput, spec: MoveSpec) -> CutoverResult:
        """The cutover phase's attempts until one commits (its result); raises if none does
        (cancelled, or ``cutover_attempts`` used up)."""
        streams = self._streams
        result_kw = self._result_kw
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
        return cut

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
            start_to_close_timeout=SHORT, retry_policy=MOVE_QUICK,
        )
        workflow.upsert_search_attributes([SA_PHASE.value_set("aborted")])
        self._progress.phase = "aborted"
        self._progress.outcome = MigrationOutcome.ABORTED.value

    # -- after the commit point ---------------------------------------------------------------

    async def _after_commit(self, inp: MigrateChunkInput, spec: MoveSpec,
                            mid: str) -> MigrateChunkResult:
        """After the commit point: the move is done whatever happens. A cancel from here on
        finishes the move: every await is made immune to it."""
        streams = self._streams
        result_kw = self._result_kw
        await self._steady(lambda: self._stop(streams[Direction.FORWARD]))
        outcome = MigrationOutcome.COMPLETED
        if inp.rollback_window_s > 0 and not self._cancel_pending:
            outcome = await self._rollback_window(inp, spec)

        await self._until_done(inp, "recording the cleanup phase", lambda: self._phase(
            spec, MigrationPhase.CLEANUP, FOREVER))
        await self._until_done(inp, "cleanup", lambda: workflow.execute_activity_method(
            CleanupActivities.cleanup,
            CleanupInput(spec=spec, outcome=outcome, delete_batch=inp.delete_batch,
                         delete_pause_s=inp.delete_pause_s),
            start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=self._heartbeat,
            retry_policy=FOREVER, cancellation_type=WAIT,
        ))
        await self._until_done(inp, "finishing the record", lambda: workflow.execute_activity_method(
            CatalogActivities.finish, FinishInput(spec=spec, outcome=outcome),
            start_to_close_timeout=SHORT, retry_policy=FOREVER,
        ))
        await self._phase(spec, MigrationPhase.DONE)
        self._progress.outcome = outcome.value
        return MigrateChunkResult(
            migration_id=mid, outcome=outcome, source=spec.source, target=spec.target,
            phase_seconds=dict(self._phase_seconds), **result_kw,
        )

    async def _rollback_window(self, inp: MigrateChunkInput, spec: MoveSpec) -> MigrationOutcome:
        """Keep the reverse stream running for ``rollback_window_s``; a ``rollback`` update
        moves the chunk back (``rolled_back``), ``complete`` or the end of the window keeps
        the move (``completed``)."""
        streams = self._streams
        result_kw = self._result_kw
        outcome = MigrationOutcome.COMPLETED
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
        return outcome

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
