"""Chunk moves as child workflows, shared by the fleet workflows (drain, rebalance).

Deterministic code only: it runs inside workflows. What it guarantees:

* **One id per move, never started twice.** Each planned move runs as a child
  ``MigrateChunkWorkflow`` with the id ``{parent id}/{chunk id}`` (``.rN`` in round N > 1,
  ``.tK`` for the K-th target tried for that chunk in a round). The parent's workflow id
  survives continue-as-new, so ids are the same in every run of the parent, and each id names
  one decision: a replayed or continued parent never starts a move twice. A child id that is
  already *running* when the parent starts it (a parent reset by an operator, or a move
  started by hand under that id) is not started again: ``fleet.await_move`` waits for that
  move's own result.
* **Bounded history (continue-as-new).** Every child adds about a dozen events to the
  parent's history, so a drain of thousands of chunks would reach Temporal's limits. Before it
  starts a move the runner asks whether this run has had enough (``moves_per_run`` children
  started, ``history_events`` events, or the server's continue-as-new suggestion). From then on
  it starts nothing; it waits for the running children to end and hands back the moves it did
  not start, which the parent carries into its next run (``FleetState``) with every counter.
  Running children are waited for, not handed over: they are started with
  ``ParentClosePolicy.REQUEST_CANCEL`` (a terminated move could leave its source frozen), so
  one still running when its parent's run closes would be cancelled, and the next run could
  not await it anyway.
* **A lost target is retried elsewhere.** A move whose target stayed unreachable past its
  give-up time (or was declared lost) aborts clean and fails with ``TargetLost``. The runner
  then remembers that target as lost for the whole operation, asks the parent to re-plan the
  chunk onto another eligible shard (``fleet.replan``: active, not lost, same engine, room
  left, within the parent's limits) and moves it there, up to ``max_retargets`` times per
  chunk. Moves still waiting to start whose target is lost are re-planned before they start.
* **Failures are recorded, not raised**; a cancel lets every running move finish its own
  cancellation (abort before its commit point, completion after it) before it propagates.

Changes to the command sequence of this code are behind ``workflow.patched`` markers, and
``tests/workflows/histories`` holds histories recorded before them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio import workflow
from temporalio.exceptions import (
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from activities.fleet import AwaitedMove, AwaitMoveInput, FleetActivities, ReplanResult
    from activities.models import PlannedMove
    from catalog.models import MigrationKind
    from workflows.common import FLEET_RETRY
    from workflows.migrate_chunk import (
        MigrateChunkInput,
        MigrateChunkResult,
        MigrateChunkWorkflow,
        describe_failure,
    )

TARGET_LOST = "TargetLost"
"""Failure type of a move that gave up on its target (aborted clean on the source side)."""

PATCH_CONTINUE_AS_NEW = "fleet-continue-as-new"
PATCH_RETARGET = "fleet-retry-elsewhere"
PATCH_AWAIT_EXISTING = "fleet-await-existing-move"
PATCH_PLAN_PAGES = "fleet-plan-pages"

MOVES_KEPT = 200
"""Move records a fleet workflow keeps (and carries across runs); later ones are counted in
``moves_omitted``, so the carried input stays far below Temporal's payload limit."""
FAILURES_KEPT = 100

_RESERVED = {"collection", "chunk_id", "target", "kind", "dry_run"}


def check_move_options(options: dict[str, Any]) -> None:
    """Refuse options a child move cannot take (non-retryable, so the parent fails at once)."""
    reserved = sorted(_RESERVED & set(options))
    if reserved:
        raise ApplicationError(f"move options may not set {reserved}", non_retryable=True)
    try:
        MigrateChunkInput(collection="c", chunk_id=1, target="t", **options)
    except ValidationError as exc:
        raise ApplicationError(f"invalid move options: {exc}".replace("\n", " "),
                               non_retryable=True) from None


def target_lost(exc: BaseException) -> ApplicationError | None:
    """The ``TargetLost`` error in a failed move's chain, if it gave up on its target."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, ApplicationError) and cur.type == TARGET_LOST:
            return cur
        cur = cur.cause if isinstance(cur, FailureError) else None
    return None


class ChildMove(BaseModel):
    """One chunk move a fleet workflow ran, and how it ended."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    collection: str
    chunk_id: int
    source: str
    target: str
    bytes: int
    outcome: str
    """``completed``, ``failed``, or ``retargeted`` (its target was lost; the chunk was
    re-planned onto another shard, recorded as a later move)."""
    pause_ms: float | None = None
    documents: int = 0
    detail: str | None = None


class MovesProgress(BaseModel):
    """The move counters of a fleet workflow's ``progress`` query (carried across runs)."""

    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    chunks_retargeted: int = 0
    """Moves re-planned onto another shard because their target was lost."""
    bytes_total: int = 0
    bytes_done: int = 0
    running: list[str] = []
    failures: list[str] = []
    """The first ``FAILURES_KEPT`` failures (``chunks_failed`` counts them all)."""
    lost_targets: list[str] = []
    """Shards a move gave up on; nothing more is moved onto them by this operation."""
    runs: int = 1
    """Runs of this workflow so far (it continues as new to keep its history bounded)."""


class FleetState(BaseModel):
    """What a fleet workflow carries into its next run when it continues as new."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = 1
    pending: list[PlannedMove] = []
    """Moves of ``round`` planned but not started yet."""
    round_moved: int = 0
    """Moves of ``round`` completed in earlier runs."""
    targets: list[str] = []
    """Shards the round's moves may go to (for a re-plan)."""
    progress: MovesProgress = MovesProgress()
    moves: list[ChildMove] = []
    moves_omitted: int = 0
    plan_cursor: int | None = None
    """Where the round's stored plan goes on (its moves before it were fetched; those of
    them not started are in ``pending``). None: the plan is not stored (older runs)."""


class RunLimits(BaseModel):
    """When a fleet workflow continues as new, and how often a chunk is retried elsewhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    moves_per_run: int = Field(default=500, ge=1)
    """Children started per run at most, then continue-as-new (about 12 history events each)."""
    history_events: int = Field(default=10_000, ge=10)
    """History length after which no more children start in this run (Temporal's own limit is
    50k events; the server may suggest continuing earlier, which is obeyed too)."""
    max_retargets: int = Field(default=2, ge=0, le=10)
    """How many other shards a chunk is re-planned onto when its target is lost."""
    max_running_per_shard: int | None = Field(default=None, ge=1, le=100)
    """Moves of this operation running at once per shard (source or target); set to the
    workers' lease limit (``FleetSettings.max_moves_per_shard``), a move starts only when
    both its shards have room, instead of starting and then waiting in its registration for
    a lease (retried with a backoff of up to 20 s) while it holds one of ``max_parallel``.
    None: every move starts in plan order as ``max_parallel`` allows."""


Replan = Callable[[PlannedMove, list[str]], Awaitable[ReplanResult]]
"""Re-plan a move onto another shard, excluding the given ones (an activity in the parent)."""


class RoundResult(BaseModel):
    moved: int
    """Moves completed."""
    left: list[PlannedMove] = []
    """Moves not started because the run should continue as new."""


class MoveRunner:
    """Runs planned moves as children for one run of a fleet workflow."""

    def __init__(self, *, kind: MigrationKind, options: dict[str, Any], max_parallel: int,
                 limits: RunLimits, progress: MovesProgress, state: FleetState,
                 replan: Replan) -> None:
        self.kind = kind
        self.options = options
        self.max_parallel = max_parallel
        self.limits = limits
        self.progress = progress
        self.record: list[ChildMove] = list(state.moves)
        self.omitted = state.moves_omitted
        self.replan = replan
        self.started = 0
        """Children started in this run."""
        self._stopping = False
        self._free = max_parallel
        self._busy: dict[str, int] = {}
        """Moves of this run running per shard (with ``limits.max_running_per_shard``)."""

    @contextlib.asynccontextmanager
    async def _admit(self, m: PlannedMove, sem: asyncio.Semaphore) -> AsyncIterator[None]:
        """A place for ``m``: one of ``max_parallel`` and, with a per-shard limit, room on both
        its shards (earlier moves of the plan first; a move whose shards are full lets later
        ones with room go ahead)."""
        limit = self.limits.max_running_per_shard
        if limit is None:
            async with sem:
                yield
            return
        shards = (m.source, m.target)

        def room() -> bool:
            return self._free > 0 and all(self._busy.get(s, 0) < limit for s in shards)

        while not room():  # another waiter may take the room first: look again
            await workflow.wait_condition(room)
        self._free -= 1
        for s in shards:
            self._busy[s] = self._busy.get(s, 0) + 1
        try:
            yield
        finally:
            self._free += 1
            for s in shards:
                self._busy[s] -= 1

    def planned(self, moves: list[PlannedMove]) -> None:
        """Count a new plan's moves in the totals."""
        self.planned_count(len(moves), sum(m.bytes for m in moves))

    def planned_count(self, moves: int, bytes_total: int) -> None:
        """Count a new plan's moves in the totals (a plan stored in the catalog)."""
        self.progress.chunks_total += moves
        self.progress.bytes_total += bytes_total

    def carry(self, *, round_: int, pending: list[PlannedMove], round_moved: int,
              targets: list[str], plan_cursor: int | None = None) -> FleetState:
        """The state the next run starts from (the running list is empty: nothing runs)."""
        progress = MovesProgress.model_validate(
            {**self.progress.model_dump(include=set(MovesProgress.model_fields)),
             "running": [], "runs": self.progress.runs + 1})
        return FleetState(round=round_, pending=pending, round_moved=round_moved,
                          targets=targets, progress=progress, moves=self.record,
                          moves_omitted=self.omitted, plan_cursor=plan_cursor)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        over = (self.started >= self.limits.moves_per_run
                or info.get_current_history_length() >= self.limits.history_events
                or info.is_continue_as_new_suggested())
        # Histories recorded before continue-as-new existed kept starting children here.
        return over and workflow.patched(PATCH_CONTINUE_AS_NEW)

    def _keep(self, move: ChildMove) -> None:
        if len(self.record) < MOVES_KEPT:
            self.record.append(move)
        else:
            self.omitted += 1

    def _failed(self, m: PlannedMove, child_id: str, detail: str) -> None:
        self.progress.chunks_failed += 1
        if len(self.progress.failures) < FAILURES_KEPT:
            self.progress.failures.append(f"{m.collection}/{m.chunk_id}: {detail}")
        self._keep(ChildMove(workflow_id=child_id, collection=m.collection,
                             chunk_id=m.chunk_id, source=m.source, target=m.target,
                             bytes=m.bytes, outcome="failed", detail=detail[:500]))

    def _lose(self, shard: str) -> None:
        if shard not in self.progress.lost_targets:
            self.progress.lost_targets.append(shard)

    async def _elsewhere(self, m: PlannedMove) -> ReplanResult:
        return await self.replan(m, list(self.progress.lost_targets))

    async def _start(self, m: PlannedMove, child_id: str) -> MigrateChunkResult | AwaitedMove:
        try:
            return await workflow.execute_child_workflow(
                MigrateChunkWorkflow.run,
                MigrateChunkInput(collection=m.collection, chunk_id=m.chunk_id,
                                  target=m.target, kind=self.kind, **self.options),
                id=child_id,
                # Never terminate a move: a terminated one could leave its source
                # frozen. One still running when the parent closes is asked to cancel.
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
            )
        except WorkflowAlreadyStartedError:
            if not workflow.patched(PATCH_AWAIT_EXISTING):
                raise
            # That move is running already (a reset parent, or started by hand under this
            # id): wait for its own outcome instead of starting it twice.
            awaited: AwaitedMove = await workflow.execute_activity_method(
                FleetActivities.await_move, AwaitMoveInput(workflow_id=child_id),
                start_to_close_timeout=timedelta(days=30),
                heartbeat_timeout=timedelta(minutes=2), retry_policy=FLEET_RETRY,
            )
            if awaited.outcome == "failed":
                raise ApplicationError(awaited.detail or "the move failed",
                                       type=awaited.failure_type) from None
            return awaited

    async def run(self, moves: list[PlannedMove], round_: int) -> RoundResult:
        """Run the moves, ``max_parallel`` at a time; failed moves are recorded, not raised.

        On a cancel every running move finishes its own cancellation (abort before its
        commit point, or completion after it) before this raises.
        """
        sem = asyncio.Semaphore(self.max_parallel)
        parent = workflow.info().workflow_id
        left: list[PlannedMove] = []

        async def one(m: PlannedMove) -> bool:
            async with self._admit(m, sem):
                if self._stopping or self._should_continue_as_new():
                    self._stopping = True
                    left.append(m)
                    return False
                base = f"{parent}/{m.chunk_id}" + ("" if round_ == 1 else f".r{round_}")
                attempt = 1
                while True:
                    if m.target in self.progress.lost_targets:
                        # Planned before its target was found lost: place it elsewhere first.
                        where = await self._elsewhere(m)
                        if where.move is None:
                            self._failed(m, base, f"{TARGET_LOST}: target {m.target} is lost "
                                                  f"and {where.reason}")
                            return False
                        self.progress.chunks_retargeted += 1
                        m = where.move
                    child_id = base if attempt == 1 else f"{base}.t{attempt}"
                    self.started += 1
                    self.progress.running.append(child_id)
                    try:
                        result = await self._start(m, child_id)
                    except (ChildWorkflowError, ApplicationError) as exc:
                        lost = target_lost(exc)
                        detail = f"{TARGET_LOST}: {lost.message}" if lost is not None \
                            else describe_failure(exc)
                        if (lost is not None and attempt <= self.limits.max_retargets
                                and workflow.patched(PATCH_RETARGET)):
                            self._lose(m.target)
                            where = await self._elsewhere(m)
                            if where.move is not None:
                                self.progress.chunks_retargeted += 1
                                self._keep(ChildMove(
                                    workflow_id=child_id, collection=m.collection,
                                    chunk_id=m.chunk_id, source=m.source, target=m.target,
                                    bytes=m.bytes, outcome="retargeted",
                                    detail=f"{detail} -> {where.move.target}"[:500]))
                                m = where.move
                                attempt += 1
                                continue
                            detail = f"{detail}; not re-planned: {where.reason}"
                        self._failed(m, child_id, detail)
                        return False
                    finally:
                        self.progress.running.remove(child_id)
                    if isinstance(result, AwaitedMove) and result.target:
                        m = m.model_copy(update={"target": result.target})
                    self.progress.chunks_done += 1
                    self.progress.bytes_done += m.bytes
                    self._keep(ChildMove(
                        workflow_id=child_id, collection=m.collection, chunk_id=m.chunk_id,
                        source=m.source, target=m.target, bytes=m.bytes,
                        outcome=str(getattr(result.outcome, "value", result.outcome)),
                        pause_ms=result.pause_ms, documents=result.documents,
                        detail=result.detail))
                    return True

        # return_exceptions: on a cancel, gather waits for every running move to finish its own
        # cancellation instead of returning at the first cancelled task (which would let the
        # parent end and its close policy reach moves halfway).
        done = await asyncio.gather(*(one(m) for m in moves), return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        # ``left`` in plan order, so the next run starts them as this one would have.
        order = {(m.collection, m.chunk_id): i for i, m in enumerate(moves)}
        left.sort(key=lambda m: order[(m.collection, m.chunk_id)])
        return RoundResult(moved=sum(1 for ok in done if ok), left=left)
