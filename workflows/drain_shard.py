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

Stopping: a cancel (Temporal UI, ``temporal workflow cancel``) cancels the running moves
(each aborts cleanly before its commit point, or finishes after it) and puts the shards back to
``active``: chunks already moved stay moved. A drain whose moves fail does the same and fails
with the list of failures.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.fleet import FleetActivities
    from activities.models import (
        DrainFinishInput,
        DrainFinishResult,
        DrainPlan,
        DrainPlanInput,
        DrainRestoreInput,
        PlannedMove,
    )
    from catalog.models import MigrationKind
    from workflows.migrate_chunk import (
        MigrateChunkInput,
        MigrateChunkResult,
        MigrateChunkWorkflow,
        describe_failure,
    )

SA_KIND = SearchAttributeKey.for_keyword("ShardshiftKind")
SA_SOURCE = SearchAttributeKey.for_keyword("ShardshiftSource")
SA_PHASE = SearchAttributeKey.for_keyword("ShardshiftPhase")

_QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                     maximum_attempts=20)
_RESERVED = {"collection", "chunk_id", "target", "kind", "dry_run"}


class DrainShardInput(BaseModel):
    """Which shards to empty, where to, and how the moves run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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

    @field_validator("kind")
    @classmethod
    def _drain_kind(cls, v: MigrationKind) -> MigrationKind:
        if v not in (MigrationKind.MERGE_SHARDS, MigrationKind.UPGRADE):
            raise ValueError("a drain is a merge_shards or an upgrade")
        return v

    @field_validator("shards")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each shard may be named once")
        return v


class DrainedMove(BaseModel):
    model_config = ConfigDict(frozen=True)

    workflow_id: str
    collection: str
    chunk_id: int
    source: str
    target: str
    bytes: int
    outcome: str
    """``completed`` or ``failed``."""
    pause_ms: float | None = None
    documents: int = 0
    detail: str | None = None


class DrainProgress(BaseModel):
    """Answer of the ``progress`` query."""

    shards: list[str] = []
    kind: str = ""
    phase: str = "starting"
    round: int = 0
    targets: list[str] = []
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    running: list[str] = []
    failures: list[str] = []


class DrainShardResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    shards: list[str]
    retired: list[str]
    moves: list[DrainedMove]
    chunks_left: dict[str, int] = {}


@workflow.defn
class DrainShardWorkflow:
    def __init__(self) -> None:
        self._progress = DrainProgress()
        self._moves: list[DrainedMove] = []

    @workflow.query
    def progress(self) -> DrainProgress:
        return self._progress

    async def _set_phase(self, phase: str) -> None:
        self._progress.phase = phase
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase)])

    @workflow.run
    async def run(self, inp: DrainShardInput) -> DrainShardResult:
        reserved = sorted(_RESERVED & set(inp.move))
        if reserved:
            raise ApplicationError(f"move options may not set {reserved}", non_retryable=True)
        try:
            MigrateChunkInput(collection="c", chunk_id=0, target="t", **inp.move)
        except ValidationError as exc:
            raise ApplicationError(f"invalid move options: {exc}".replace("\n", " "),
                                   non_retryable=True) from None
        self._progress.shards = list(inp.shards)
        self._progress.kind = inp.kind.value
        workflow.upsert_search_attributes([SA_KIND.value_set(inp.kind.value),
                                           SA_SOURCE.value_set(",".join(inp.shards))])
        try:
            for round_ in range(1, inp.rounds + 1):
                self._progress.round = round_
                await self._set_phase("planning")
                plan: DrainPlan = await workflow.execute_activity_method(
                    FleetActivities.plan,
                    DrainPlanInput(shards=inp.shards, targets=inp.targets, kind=inp.kind),
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=timedelta(minutes=5), retry_policy=_QUICK,
                )
                if not plan.moves:
                    break
                self._progress.targets = plan.targets
                self._progress.chunks_total += len(plan.moves)
                self._progress.bytes_total += plan.bytes_total
                await self._set_phase("moving")
                sem = asyncio.Semaphore(inp.max_parallel)
                # return_exceptions: on a cancel, gather waits for every running move to
                # finish its own cancellation (abort or complete) instead of returning at
                # the first cancelled task, which would let the drain end and its close
                # policy terminate moves halfway.
                done = await asyncio.gather(*(self._move(inp, m, round_, sem)
                                              for m in plan.moves), return_exceptions=True)
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
                if not any(done):
                    break  # nothing moved in a whole round: more rounds would not help
            await self._set_phase("retiring")
            fin: DrainFinishResult = await workflow.execute_activity_method(
                FleetActivities.finish, DrainFinishInput(shards=inp.shards),
                start_to_close_timeout=timedelta(seconds=30), retry_policy=_QUICK,
            )
        except (asyncio.CancelledError, CancelledError):
            await self._restore(inp, "cancelled")
            raise
        except ApplicationError:
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
                                moves=list(self._moves), chunks_left=fin.chunks_left)

    async def _restore(self, inp: DrainShardInput, phase: str) -> None:
        await workflow.execute_activity_method(
            FleetActivities.restore, DrainRestoreInput(shards=inp.shards),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=_QUICK,
        )
        await self._set_phase(phase)

    async def _move(self, inp: DrainShardInput, m: PlannedMove, round_: int,
                    sem: asyncio.Semaphore) -> bool:
        """One chunk as a child move; True when it completed."""
        async with sem:
            base = f"{workflow.info().workflow_id}/{m.chunk_id}"
            child_id = base if round_ == 1 else f"{base}.r{round_}"
            self._progress.running.append(child_id)
            try:
                result: MigrateChunkResult = await workflow.execute_child_workflow(
                    MigrateChunkWorkflow.run,
                    MigrateChunkInput(collection=m.collection, chunk_id=m.chunk_id,
                                      target=m.target, kind=inp.kind, **inp.move),
                    id=child_id,
                    # Never terminate a move: a terminated one could leave its source frozen.
                    # A move still running when the drain closes is asked to cancel instead
                    # (it aborts before its commit point, or finishes after it).
                    parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                )
            except ChildWorkflowError as exc:
                detail = describe_failure(exc)
                self._progress.chunks_failed += 1
                self._progress.failures.append(f"{m.collection}/{m.chunk_id}: {detail}")
                self._moves.append(DrainedMove(
                    workflow_id=child_id, collection=m.collection, chunk_id=m.chunk_id,
                    source=m.source, target=m.target, bytes=m.bytes, outcome="failed",
                    detail=detail[:500]))
                return False
            finally:
                self._progress.running.remove(child_id)
            self._progress.chunks_done += 1
            self._progress.bytes_done += m.bytes
            self._moves.append(DrainedMove(
                workflow_id=child_id, collection=m.collection, chunk_id=m.chunk_id,
                source=m.source, target=m.target, bytes=m.bytes,
                outcome=result.outcome.value, pause_ms=result.pause_ms,
                documents=result.documents, detail=result.detail))
            return True
