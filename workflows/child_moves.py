"""Chunk moves as child workflows, shared by the fleet workflows (drain, rebalance).

Each planned move runs as a child ``MigrateChunkWorkflow`` with a deterministic id
(``{parent id}/{chunk id}``, ``.rN`` in later rounds), so a replayed or retried parent never
starts a move twice. Deterministic code only: it runs inside workflows.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.models import PlannedMove
    from catalog.models import MigrationKind
    from workflows.migrate_chunk import (
        MigrateChunkInput,
        MigrateChunkResult,
        MigrateChunkWorkflow,
        describe_failure,
    )

_RESERVED = {"collection", "chunk_id", "target", "kind", "dry_run"}


def check_move_options(options: dict[str, Any]) -> None:
    """Refuse options a child move cannot take (non-retryable, so the parent fails at once)."""
    reserved = sorted(_RESERVED & set(options))
    if reserved:
        raise ApplicationError(f"move options may not set {reserved}", non_retryable=True)
    try:
        MigrateChunkInput(collection="c", chunk_id=0, target="t", **options)
    except ValidationError as exc:
        raise ApplicationError(f"invalid move options: {exc}".replace("\n", " "),
                               non_retryable=True) from None


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
    """``completed`` or ``failed``."""
    pause_ms: float | None = None
    documents: int = 0
    detail: str | None = None


class MovesProgress(BaseModel):
    """The move counters of a fleet workflow's ``progress`` query."""

    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    running: list[str] = []
    failures: list[str] = []


async def run_moves(moves: list[PlannedMove], *, kind: MigrationKind, options: dict[str, Any],
                    max_parallel: int, round_: int, progress: MovesProgress,
                    record: list[ChildMove]) -> int:
    """Run the moves as children, ``max_parallel`` at a time; returns how many completed.

    Failed moves are recorded, not raised. On a cancel every running move finishes its own
    cancellation (abort before its commit point, or completion after it) before this raises.
    """
    progress.chunks_total += len(moves)
    progress.bytes_total += sum(m.bytes for m in moves)
    sem = asyncio.Semaphore(max_parallel)
    parent = workflow.info().workflow_id

    async def one(m: PlannedMove) -> bool:
        async with sem:
            child_id = f"{parent}/{m.chunk_id}" + ("" if round_ == 1 else f".r{round_}")
            progress.running.append(child_id)
            try:
                result: MigrateChunkResult = await workflow.execute_child_workflow(
                    MigrateChunkWorkflow.run,
                    MigrateChunkInput(collection=m.collection, chunk_id=m.chunk_id,
                                      target=m.target, kind=kind, **options),
                    id=child_id,
                    # Never terminate a move: a terminated one could leave its source
                    # frozen. One still running when the parent closes is asked to cancel.
                    parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                )
            except ChildWorkflowError as exc:
                detail = describe_failure(exc)
                progress.chunks_failed += 1
                progress.failures.append(f"{m.collection}/{m.chunk_id}: {detail}")
                record.append(ChildMove(
                    workflow_id=child_id, collection=m.collection, chunk_id=m.chunk_id,
                    source=m.source, target=m.target, bytes=m.bytes, outcome="failed",
                    detail=detail[:500]))
                return False
            finally:
                progress.running.remove(child_id)
            progress.chunks_done += 1
            progress.bytes_done += m.bytes
            record.append(ChildMove(
                workflow_id=child_id, collection=m.collection, chunk_id=m.chunk_id,
                source=m.source, target=m.target, bytes=m.bytes,
                outcome=result.outcome.value, pause_ms=result.pause_ms,
                documents=result.documents, detail=result.detail))
            return True

    # return_exceptions: on a cancel, gather waits for every running move to finish its own
    # cancellation instead of returning at the first cancelled task (which would let the
    # parent end and its close policy reach moves halfway).
    done = await asyncio.gather(*(one(m) for m in moves), return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return sum(1 for ok in done if ok)
