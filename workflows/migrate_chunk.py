"""``MigrateChunkWorkflow``: move one chunk to another shard without downtime.

Phases (each recorded in the catalog's migration record and the ``ShardshiftPhase`` search
attribute): register -> snapshot + bulk import (concurrently, the import following the
export part by part) -> replicate (a long-running applier activity) -> verify -> cutover
(retried while it does not commit) -> rollback window (reverse stream; the ``rollback``
update moves the chunk back, the ``complete`` update closes the window early and keeps the
move) -> cleanup -> done.

Orchestration only: every side effect is an activity; timers are input settings so tests
can shorten them.

Where the code lives: this module holds the workflow definition (its run, query and update
handlers); its steps are plain methods of two base classes. ``workflows/move_pauses.py``
(``MovePauses``: the state, copy, replicate and verify, pauses on an unreachable shard,
continue-as-new) and ``workflows/move_commit.py`` (``MoveCommit``: register, the cutover and
its resolution, abort, the rollback window and the after-commit path) each describe their
part. The models, helpers and patch ids are in ``workflows/move_models.py`` and re-exported
here.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.cutover import CutoverActivities
    from activities.models import Direction, PlanInput
    from catalog.models import MigrationOutcome, MigrationPhase
    from workflows.common import (
        MOVE_QUICK,
        SA_CHUNK,
        SA_COLLECTION,
        SA_KIND,
        SA_PHASE,
        SA_SOURCE,
        SA_TARGET,
    )

from workflows.move_commit import MoveCommit
from workflows.move_models import (
    BEFORE_COMMIT,
    BOUNDED_HISTORY,
    CUTOVER_PAUSES,
    PINNED_STAGING,
    TARGET_LOST,
    MigrateChunkInput,
    MigrateChunkResult,
    MigrateChunkResume,
    Progress,
    Stage,
    describe_failure,
    migration_id_for,
)
from workflows.move_pauses import SHORT

__all__ = [
    "BOUNDED_HISTORY",
    "CUTOVER_PAUSES",
    "PINNED_STAGING",
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


@workflow.defn
class MigrateChunkWorkflow(MoveCommit):
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

    # -- the run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: MigrateChunkInput) -> MigrateChunkResult:
        self._v2 = workflow.patched(BOUNDED_HISTORY)
        self._pinned = workflow.patched(PINNED_STAGING)
        info = workflow.info()
        # A continued run keeps the migration id of the first (it names everything the move made).
        mid = inp.resume.migration_id if inp.resume else migration_id_for(info.workflow_id,
                                                                          info.run_id)
        self._progress.migration_id = mid
        self._progress.target = inp.target
        self._cancel_pending = False
        self._heartbeat = timedelta(seconds=inp.heartbeat_timeout_s)
        self._throttle = inp.copy_throttle
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
                start_to_close_timeout=SHORT, retry_policy=MOVE_QUICK,
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
            cut = await self._forward_cutover(inp, spec)
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
        return await self._after_commit(inp, spec, mid)
