"""``RebalanceWorkflow``: even out the data across the active shards.

A Temporal Schedule runs it (``shardshift rebalance --schedule 1h``), or an operator does
(``shardshift rebalance``). Each round, ``rebalance.plan`` measures every active shard and
plans moves from the most to the least loaded one until the spread is within ``tolerance`` of
the mean, under a global limit (``max_moves`` per run) and a per-shard one
(``max_moves_per_shard``). A chunk too large to move usefully (larger than the gap it should
close) is split in the catalog first (a metadata change with a token bump; both halves stay
where they are), and the next round moves a half. The moves run as child
``MigrateChunkWorkflow`` s with ids ``{rebalance id}/{chunk id}``; chunks already moving are
left alone. A dry run returns the plan and changes nothing.

At length the rebalance continues as new like a drain (``limits``), carrying its round, the
moves not started yet, the splits done, the loads measured first and its counters; the global
limit (``max_moves``) counts the moves of every run and the per-shard limit the moves of the
round. A move that gives up on its target (``TargetLost``) is re-planned onto another shard in
scope that is active, not lost and under its per-shard limit.

A **shard split** is the same workflow with ``kind=split_shard`` and ``shards=[hot, new]``
(``shardshift split-shard HOT --to NEW``): half of the hot shard's data moves to the new one,
chunks split first where they are too large.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.fleet import FleetActivities, RebalancePlanRequest, ReplanInput, ReplanResult
    from activities.models import (
        AllocateIdsInput,
        BoundedDurations,
        PlannedMove,
        PlannedSplit,
        RebalancePlan,
        SplitInput,
    )
    from catalog.models import MigrationKind
    from catalog.store import check_shard_id
    from shards.names import check_collection
    from workflows.child_moves import (
        ChildMove,
        FleetState,
        MoveRunner,
        MovesProgress,
        RunLimits,
        check_move_options,
    )
    from workflows.common import FLEET_RETRY, SA_KIND, SA_PHASE


class RebalanceState(FleetState):
    """What a rebalance carries into its next run."""

    splits: list[PlannedSplit] = []
    loads_before: dict[str, int] | None = None
    round_counts: dict[str, int] = {}
    """Moves per shard (as source or target) in the carried round: its per-shard limit."""


class RebalanceInput(BoundedDurations):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: MigrationKind = MigrationKind.REBALANCE
    """``rebalance``, or ``split_shard``: the same planning between a hot shard and a new one
    (``shards=[hot, new]``), recorded as a shard split."""

    tolerance: float = Field(default=0.2, gt=0)
    """Spread allowed between the most and the least loaded shard, as a fraction of the mean."""
    max_moves: int = Field(default=4, ge=1, le=1000)
    """Moves per run at most (the global limit)."""
    max_moves_per_shard: int = Field(default=2, ge=1, le=100)
    max_parallel: int = Field(default=2, ge=1, le=64)
    split: bool = True
    """Split chunks too large to move usefully."""
    rounds: int = Field(default=3, ge=1, le=10)
    collections: list[str] | None = None
    """Balance only these collections' chunks (default: all)."""
    shards: list[str] | None = None
    """Balance only across these active shards (default: every active shard)."""
    dry_run: bool = False
    move: dict[str, Any] = {}
    """Options of every chunk move (``MigrateChunkInput`` fields)."""
    limits: RunLimits = RunLimits()
    """When to continue as new; how often a chunk whose target is lost is re-planned."""
    state: RebalanceState | None = None
    """Progress carried from the previous run (set by the workflow when it continues as new)."""

    @field_validator("collections")
    @classmethod
    def _collections(cls, v: list[str] | None) -> list[str] | None:
        for c in v or []:
            check_collection(c)
        return v

    @field_validator("shards")
    @classmethod
    def _shards(cls, v: list[str] | None) -> list[str] | None:
        for s in v or []:
            check_shard_id(s)
        return v


class RebalanceProgress(MovesProgress):
    phase: str = "starting"
    round: int = 0
    loads: dict[str, int] = {}
    splits_done: int = 0


class RebalanceResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    loads_before: dict[str, int]
    loads_after: dict[str, int]
    """Measured at the end (planned, for a dry run)."""
    moves: list[ChildMove] = []
    splits: list[PlannedSplit] = []
    planned: list[PlannedMove] = []
    """A dry run's plan."""
    moves_omitted: int = 0
    lost_targets: list[str] = []
    runs: int = 1
    outcome: str = "completed"
    """``completed``, or ``dry_run`` for a plan only (see ``planned``)."""


@workflow.defn
class RebalanceWorkflow:
    def __init__(self) -> None:
        self._progress = RebalanceProgress()
        self._counts: dict[str, int] = {}

    @workflow.query
    def progress(self) -> RebalanceProgress:
        return self._progress

    def _set_phase(self, phase: str) -> None:
        self._progress.phase = phase
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase)])

    async def _plan(self, inp: RebalanceInput, max_moves: int) -> RebalancePlan:
        return await workflow.execute_activity_method(
            FleetActivities.rebalance_plan,
            RebalancePlanRequest(tolerance=inp.tolerance, max_moves=max_moves,
                                 max_moves_per_shard=inp.max_moves_per_shard, split=inp.split,
                                 collections=inp.collections, shards=inp.shards,
                                 exclude=list(self._progress.lost_targets),
                                 dry_run=inp.dry_run),
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(minutes=5),
            retry_policy=FLEET_RETRY,
        )

    @workflow.run
    async def run(self, inp: RebalanceInput) -> RebalanceResult:
        check_move_options(inp.move)
        if inp.kind not in (MigrationKind.REBALANCE, MigrationKind.SPLIT_SHARD):
            raise ApplicationError("a rebalance is a rebalance or a split_shard",
                                   non_retryable=True)
        state = inp.state or RebalanceState()
        self._progress = RebalanceProgress(**state.progress.model_dump())
        self._progress.splits_done = len(state.splits)
        self._inp = inp
        self._counts = dict(state.round_counts)
        runner = MoveRunner(kind=inp.kind, options=inp.move, max_parallel=inp.max_parallel,
                            limits=inp.limits, progress=self._progress, state=state,
                            replan=self._replan)
        workflow.upsert_search_attributes([SA_KIND.value_set(inp.kind.value)])
        splits: list[PlannedSplit] = list(state.splits)
        before: dict[str, int] | None = state.loads_before
        for round_ in range(state.round, inp.rounds + 1):
            self._progress.round = round_
            carried = round_ == state.round and bool(state.pending)
            if carried:
                moves, planned_splits = state.pending, []
            else:
                self._set_phase("planning")
                left = inp.max_moves - (self._progress.chunks_done + self._progress.chunks_failed)
                plan = await self._plan(inp, left)
                self._progress.loads = plan.loads
                before = plan.loads if before is None else before
                if inp.dry_run:
                    self._set_phase("done")
                    return RebalanceResult(loads_before=plan.loads, loads_after=plan.loads_after,
                                           splits=plan.splits, planned=plan.moves,
                                           outcome="dry_run")
                for sp in plan.splits:
                    self._set_phase("splitting")
                    ids = await workflow.execute_activity_method(
                        FleetActivities.allocate_ids, AllocateIdsInput(n=2),
                        start_to_close_timeout=timedelta(seconds=30), retry_policy=FLEET_RETRY)
                    await workflow.execute_activity_method(
                        FleetActivities.split,
                        SplitInput(collection=sp.collection, chunk_id=sp.chunk_id,
                                   child_ids=ids),
                        start_to_close_timeout=timedelta(seconds=60), retry_policy=FLEET_RETRY)
                    splits.append(sp)
                    self._progress.splits_done += 1
                moves, planned_splits = plan.moves, plan.splits
                runner.planned(moves)
                self._counts = {}
                for m in moves:
                    for shard in (m.source, m.target):
                        self._counts[shard] = self._counts.get(shard, 0) + 1
            if moves:
                self._set_phase("moving")
                done = await runner.run(moves, round_)
                if done.left:
                    self._continue_as_new(inp, RebalanceState(
                        **runner.carry(round_=round_, pending=done.left, round_moved=0,
                                       targets=[]).model_dump(),
                        splits=splits, loads_before=before, round_counts=self._counts))
            if not carried and not planned_splits and not moves:
                break
            if self._progress.chunks_done + self._progress.chunks_failed >= inp.max_moves:
                break
        self._set_phase("measuring")
        final = await self._plan(inp, 0)
        self._progress.loads = final.loads
        self._set_phase("done")
        return RebalanceResult(loads_before=before or final.loads, loads_after=final.loads,
                               moves=list(runner.record), splits=splits,
                               moves_omitted=runner.omitted,
                               lost_targets=list(self._progress.lost_targets),
                               runs=self._progress.runs)

    def _continue_as_new(self, inp: RebalanceInput, state: RebalanceState) -> None:
        """Start the next run with the moves not started yet (nothing is running now)."""
        if workflow.cancellation_reason() is not None:
            raise asyncio.CancelledError()
        workflow.logger.info("rebalance continues as new: %d moves left in round %d",
                             len(state.pending), state.round)
        workflow.continue_as_new(inp.model_copy(update={"state": state}))

    async def _replan(self, m: PlannedMove, exclude: list[str]) -> ReplanResult:
        """Another shard in scope, under its per-shard limit, for a chunk whose target was
        lost."""
        full = [s for s, n in self._counts.items() if n >= self._inp.max_moves_per_shard]
        found: ReplanResult = await workflow.execute_activity_method(
            FleetActivities.replan,
            ReplanInput(collection=m.collection, chunk_id=m.chunk_id, source=m.source,
                        kind=self._inp.kind, candidates=self._inp.shards,
                        exclude=sorted({*exclude, *full})),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=5), retry_policy=FLEET_RETRY,
        )
        if found.move is not None:
            self._counts[found.move.target] = self._counts.get(found.move.target, 0) + 1
        return found
