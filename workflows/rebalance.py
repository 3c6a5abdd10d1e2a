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

A **shard split** is the same workflow with ``kind=split_shard`` and ``shards=[hot, new]``
(``shardshift split-shard HOT --to NEW``): half of the hot shard's data moves to the new one,
chunks split first where they are too large.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.fleet import FleetActivities
    from activities.models import (
        AllocateIdsInput,
        PlannedMove,
        PlannedSplit,
        RebalancePlan,
        RebalancePlanInput,
        SplitInput,
    )
    from catalog.models import MigrationKind
    from workflows.child_moves import ChildMove, MovesProgress, check_move_options, run_moves

SA_KIND = SearchAttributeKey.for_keyword("ShardshiftKind")
SA_PHASE = SearchAttributeKey.for_keyword("ShardshiftPhase")

_QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                     maximum_attempts=20)


class RebalanceInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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


@workflow.defn
class RebalanceWorkflow:
    def __init__(self) -> None:
        self._progress = RebalanceProgress()
        self._moves: list[ChildMove] = []

    @workflow.query
    def progress(self) -> RebalanceProgress:
        return self._progress

    def _set_phase(self, phase: str) -> None:
        self._progress.phase = phase
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase)])

    async def _plan(self, inp: RebalanceInput, max_moves: int) -> RebalancePlan:
        return await workflow.execute_activity_method(
            FleetActivities.rebalance_plan,
            RebalancePlanInput(tolerance=inp.tolerance, max_moves=max_moves,
                               max_moves_per_shard=inp.max_moves_per_shard, split=inp.split,
                               collections=inp.collections, shards=inp.shards),
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(minutes=5),
            retry_policy=_QUICK,
        )

    @workflow.run
    async def run(self, inp: RebalanceInput) -> RebalanceResult:
        check_move_options(inp.move)
        if inp.kind not in (MigrationKind.REBALANCE, MigrationKind.SPLIT_SHARD):
            raise ApplicationError("a rebalance is a rebalance or a split_shard",
                                   non_retryable=True)
        workflow.upsert_search_attributes([SA_KIND.value_set(inp.kind.value)])
        splits: list[PlannedSplit] = []
        before: dict[str, int] | None = None
        for round_ in range(1, inp.rounds + 1):
            self._progress.round = round_
            self._set_phase("planning")
            left = inp.max_moves - len(self._moves)
            plan = await self._plan(inp, left)
            self._progress.loads = plan.loads
            before = plan.loads if before is None else before
            if inp.dry_run:
                self._set_phase("done")
                return RebalanceResult(loads_before=plan.loads, loads_after=plan.loads_after,
                                       splits=plan.splits, planned=plan.moves)
            for sp in plan.splits:
                self._set_phase("splitting")
                ids = await workflow.execute_activity_method(
                    FleetActivities.allocate_ids, AllocateIdsInput(n=2),
                    start_to_close_timeout=timedelta(seconds=30), retry_policy=_QUICK)
                await workflow.execute_activity_method(
                    FleetActivities.split,
                    SplitInput(collection=sp.collection, chunk_id=sp.chunk_id, child_ids=ids),
                    start_to_close_timeout=timedelta(seconds=60), retry_policy=_QUICK)
                splits.append(sp)
                self._progress.splits_done += 1
            if plan.moves:
                self._set_phase("moving")
                await run_moves(plan.moves, kind=inp.kind, options=inp.move,
                                max_parallel=inp.max_parallel, round_=round_,
                                progress=self._progress, record=self._moves)
            if not plan.splits and not plan.moves:
                break
            if len(self._moves) >= inp.max_moves:
                break
        self._set_phase("measuring")
        final = await self._plan(inp, 0)
        self._progress.loads = final.loads
        self._set_phase("done")
        return RebalanceResult(loads_before=before or final.loads, loads_after=final.loads,
                               moves=list(self._moves), splits=splits)
