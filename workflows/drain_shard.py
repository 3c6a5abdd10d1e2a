"""``DrainShardWorkflow``: empty whole shards, chunk by chunk, then retire them.

It is the shape of two of the design's operations:

* **merge** (``kind=merge_shards``): bin-pack the chunks of underutilized shards onto the
  others, within the targets' declared capacity, then retire the emptied shards;
* **upgrade** (``kind=upgrade``): move every chunk of old-version shards (PostgreSQL 15) to
  shards of a newer major version (PostgreSQL 18), then retire the old ones.

The ``drain.plan`` activity validates the request, marks the shards ``draining`` (they keep
serving what they hold but receive nothing) and places every chunk. Each chunk then moves as a
child ``MigrateChunkWorkflow`` with the deterministic id ``{drain id}/{chunk id}`` (so a
replayed or retried drain never starts a move twice), at most ``max_parallel`` at a time; the
per-shard move leases of the catalog apply as for any move. After the moves the plan runs again
(a round), to pick up anything that is left; ``drain.finish`` then retires every shard that
holds nothing.

At length: the drain continues as new before its history grows large (``limits``: children
per run, history events, or the server's suggestion), carrying its round, the moves not started
yet and every counter in ``state``; running moves end before a run does (see
``workflows/child_moves.py``). A move that gives up on its target (``TargetLost``) is re-planned
onto another of the drain's targets, and nothing more goes to the lost one.

Stopping: a cancel (Temporal UI, ``temporal workflow cancel``) cancels the running moves
(each aborts cleanly before its commit point, or finishes after it) and puts the shards back to
``active``: chunks already moved stay moved. A drain whose moves fail does the same and fails
with the list of failures.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.fleet import DrainPlanRequest, FleetActivities, ReplanInput, ReplanResult
    from activities.fleet_plans import (
        DropPlanInput,
        FleetPlanActivities,
        PlanPageInput,
        StoredPlan,
        StorePlanInput,
    )
    from activities.models import (
        BoundedDurations,
        DrainFinishInput,
        DrainFinishResult,
        DrainPlan,
        DrainRestoreInput,
        PlannedMove,
    )
    from catalog.models import MigrationKind
    from catalog.store import check_shard_id
    from workflows.child_moves import (
        PATCH_PLAN_PAGES,
        ChildMove,
        FleetState,
        MoveRunner,
        MovesProgress,
        RunLimits,
        check_move_options,
    )
    from workflows.common import FLEET_RETRY, SA_KIND, SA_PHASE, SA_SOURCE


class DrainShardInput(BoundedDurations):
    """Which shards to empty, where to, and how the moves run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    shards: list[str] = Field(min_length=1)
    targets: list[str] | None = None
    """Shards that may receive the chunks (default: every other active shard; for an upgrade,
    those of a newer major version)."""
    kind: MigrationKind = MigrationKind.MERGE_SHARDS
    max_parallel: int = Field(default=2, ge=1, le=64)
    """Moves running at once (the catalog's per-shard lease limit applies on top)."""
    rounds: int = Field(default=3, ge=1, le=20)
    """Plan-and-move rounds before giving up on chunks that keep failing to move."""
    move: dict[str, Any] = {}
    """Options of every chunk move (``MigrateChunkInput`` fields such as ``part_rows``,
    ``poll_s``, ``rollback_window_s``)."""
    limits: RunLimits = RunLimits()
    """When to continue as new; how often a chunk whose target is lost is re-planned."""
    state: FleetState | None = None
    """Progress carried from the previous run (set by the workflow when it continues as new)."""
    dry_run: bool = False
    """Plan only: the result lists the moves (``outcome`` ``dry_run``); no shard changes
    state and nothing moves."""

    @field_validator("kind")
    @classmethod
    def _drain_kind(cls, v: MigrationKind) -> MigrationKind:
        if v not in (MigrationKind.MERGE_SHARDS, MigrationKind.UPGRADE):
            raise ValueError("a drain is a merge_shards or an upgrade")
        return v

    @field_validator("shards")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        for s in v:
            check_shard_id(s)
        if len(set(v)) != len(v):
            raise ValueError("each shard may be named once")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        for s in v or []:
            check_shard_id(s)
        return v


class DrainProgress(MovesProgress):
    """Answer of the ``progress`` query."""

    shards: list[str] = []
    kind: str = ""
    phase: str = "starting"
    round: int = 0
    targets: list[str] = []


class DrainShardResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    shards: list[str]
    retired: list[str]
    moves: list[ChildMove]
    chunks_left: dict[str, int] = {}
    moves_omitted: int = 0
    """Moves beyond the records kept (``child_moves.MOVES_KEPT``), counted only."""
    lost_targets: list[str] = []
    runs: int = 1
    outcome: str = "completed"
    """``completed``, or ``dry_run`` for a plan only (see ``planned``)."""
    planned: list[PlannedMove] = []
    """A dry run's plan."""
    target_bytes_after: dict[str, int] = {}
    """A dry run's estimate of each target's bytes once the planned moves are done."""


PAGE_SIZE = 500
"""Moves of a stored plan fetched at once (about 75 KB as a payload)."""


@workflow.defn
class DrainShardWorkflow:
    def __init__(self) -> None:
        self._progress = DrainProgress()
        self._kind = MigrationKind.MERGE_SHARDS
        self._paged = False
        self._plan_id = ""

    @workflow.query
    def progress(self) -> DrainProgress:
        return self._progress

    async def _set_phase(self, phase: str) -> None:
        self._progress.phase = phase
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase)])

    @workflow.run
    async def run(self, inp: DrainShardInput) -> DrainShardResult:
        check_move_options(inp.move)
        state = inp.state or FleetState()
        self._progress = DrainProgress(**state.progress.model_dump())
        self._progress.shards = list(inp.shards)
        self._progress.kind = inp.kind.value
        self._progress.targets = list(state.targets)
        self._kind = inp.kind
        runner = MoveRunner(kind=inp.kind, options=inp.move, max_parallel=inp.max_parallel,
                            limits=inp.limits, progress=self._progress, state=state,
                            replan=self._replan)
        workflow.upsert_search_attributes([SA_KIND.value_set(inp.kind.value),
                                           SA_SOURCE.value_set(",".join(inp.shards))])
        if inp.dry_run:
            return await self._dry_run(inp)
        # Plans stored in the catalog and read in pages; histories recorded before kept the
        # whole plan in the activity's result and the carried state.
        self._paged = workflow.patched(PATCH_PLAN_PAGES)
        info = workflow.info()
        self._plan_id = f"{info.workflow_id}@{info.first_execution_run_id}"
        try:
            for round_ in range(state.round, inp.rounds + 1):
                self._progress.round = round_
                first = round_ == state.round
                moved_before = state.round_moved if first else 0
                if first and state.plan_cursor is not None:
                    # A stored plan's round, continued: the carried moves, then the next pages.
                    moved = await self._run_pages(inp, runner, round_, state.plan_cursor,
                                                  list(state.pending), moved_before)
                elif self._paged and not (first and state.pending):
                    await self._set_phase("planning")
                    stored: StoredPlan = await workflow.execute_activity_method(
                        FleetPlanActivities.plan_stored,
                        StorePlanInput(request=self._plan_request(inp), plan_id=self._plan_id,
                                       round=round_),
                        start_to_close_timeout=timedelta(minutes=30),
                        heartbeat_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
                    )
                    if not stored.moves:
                        break
                    self._progress.targets = stored.targets
                    runner.planned_count(stored.moves, stored.bytes_total)
                    moved = await self._run_pages(inp, runner, round_, 0, [], 0)
                else:
                    if first and state.pending:
                        moves = state.pending  # planned by an earlier run, not started yet
                    else:
                        await self._set_phase("planning")
                        plan: DrainPlan = await workflow.execute_activity_method(
                            FleetActivities.plan, self._plan_request(inp),
                            start_to_close_timeout=timedelta(minutes=30),
                            heartbeat_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
                        )
                        if not plan.moves:
                            break
                        self._progress.targets = plan.targets
                        runner.planned(plan.moves)
                        moves = plan.moves
                    await self._set_phase("moving")
                    done = await runner.run(moves, round_)
                    moved = moved_before + done.moved
                    if done.left:
                        self._continue_as_new(inp, runner.carry(
                            round_=round_, pending=done.left, round_moved=moved,
                            targets=self._progress.targets))
                if not moved:
                    break  # nothing moved in a whole round: more rounds would not help
            await self._set_phase("retiring")
            fin: DrainFinishResult = await workflow.execute_activity_method(
                FleetActivities.finish, DrainFinishInput(shards=inp.shards),
                start_to_close_timeout=timedelta(seconds=30), retry_policy=FLEET_RETRY,
            )
            await self._drop_plan()
        except (asyncio.CancelledError, CancelledError):
            await self._restore(inp, "cancelled")
            raise
        except (ActivityError, ApplicationError):
            await self._restore(inp, "failed")
            raise
        if fin.chunks_left:
            await self._restore(inp, "failed")
            raise ApplicationError(
                f"drain of {inp.shards} incomplete: chunks left {fin.chunks_left}; "
                f"failed moves: {self._progress.failures}", non_retryable=True,
            )
        await self._set_phase("done")
        return DrainShardResult(shards=list(inp.shards), retired=fin.retired,
                                moves=list(runner.record), chunks_left=fin.chunks_left,
                                moves_omitted=runner.omitted,
                                lost_targets=list(self._progress.lost_targets),
                                runs=self._progress.runs)

    async def _dry_run(self, inp: DrainShardInput) -> DrainShardResult:
        """The plan, measured and validated like a real drain's, with no shard marked."""
        await self._set_phase("planning")
        plan: DrainPlan = await workflow.execute_activity_method(
            FleetActivities.plan,
            DrainPlanRequest(shards=inp.shards, targets=inp.targets, kind=inp.kind,
                             dry_run=True),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
        )
        self._progress.targets = plan.targets
        self._progress.chunks_total = len(plan.moves)
        self._progress.bytes_total = plan.bytes_total
        await self._set_phase("dry_run")
        return DrainShardResult(shards=list(inp.shards), retired=[], moves=[],
                                outcome="dry_run", planned=plan.moves,
                                target_bytes_after=plan.target_bytes_after)

    def _continue_as_new(self, inp: DrainShardInput, state: FleetState) -> None:
        """Start the next run with the moves not started yet (nothing is running now)."""
        if workflow.cancellation_reason() is not None:
            raise asyncio.CancelledError()  # a cancel wins: restore instead of continuing
        workflow.logger.info("drain continues as new: %d moves left in round %d",
                             len(state.pending), state.round)
        workflow.continue_as_new(inp.model_copy(update={"state": state}))

    async def _replan(self, m: PlannedMove, exclude: list[str]) -> ReplanResult:
        """Another of the drain's targets for a chunk whose target was lost."""
        return await workflow.execute_activity_method(
            FleetActivities.replan,
            ReplanInput(collection=m.collection, chunk_id=m.chunk_id, source=m.source,
                        kind=self._kind, candidates=self._progress.targets or None,
                        exclude=exclude),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
        )

    async def _restore(self, inp: DrainShardInput, phase: str) -> None:
        await workflow.execute_activity_method(
            FleetActivities.restore, DrainRestoreInput(shards=inp.shards),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=FLEET_RETRY,
        )
        await self._drop_plan()
        await self._set_phase(phase)

    def _plan_request(self, inp: DrainShardInput) -> DrainPlanRequest:
        return DrainPlanRequest(shards=inp.shards, targets=inp.targets, kind=inp.kind,
                                exclude=list(self._progress.lost_targets))

    async def _run_pages(self, inp: DrainShardInput, runner: MoveRunner, round_: int,
                         cursor: int, pending: list[PlannedMove], moved: int) -> int:
        """Run a stored round from ``cursor`` on (after the carried ``pending`` moves), a page
        at a time; continues as new when the run has had enough. Returns the round's moves."""
        await self._set_phase("moving")
        size = min(PAGE_SIZE, inp.limits.moves_per_run)
        while True:
            if pending:
                page, pending = pending, []
            else:
                page = await workflow.execute_activity_method(
                    FleetPlanActivities.plan_page,
                    PlanPageInput(plan_id=self._plan_id, round=round_, offset=cursor,
                                  limit=size),
                    start_to_close_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
                )
                if not page:
                    return moved
                cursor += len(page)
            done = await runner.run(page, round_)
            moved += done.moved
            if done.left:
                self._continue_as_new(inp, runner.carry(
                    round_=round_, pending=done.left, round_moved=moved,
                    targets=self._progress.targets, plan_cursor=cursor))

    async def _drop_plan(self) -> None:
        """The operation's stored plans are no longer needed (it ended)."""
        if self._paged:
            await workflow.execute_activity_method(
                FleetPlanActivities.drop_plan, DropPlanInput(plan_id=self._plan_id),
                start_to_close_timeout=timedelta(seconds=60), retry_policy=FLEET_RETRY,
            )
