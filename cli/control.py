"""Running work by workflow id: ``shardshift watch ID``, ``cancel ID`` and ``complete ID``.

Any move, drain or rebalance (and a drain's or rebalance's child moves, ``drain-x/42``) is
found by its workflow id; its type says which progress query, progress line and result apply.

* ``watch`` re-attaches: the progress line until the workflow ends, then its result (one that
  has ended already: its result at once). Ctrl-C detaches again; the workflow runs on.
* ``cancel`` first says what a cancel means where the workflow is now, then requests it. A
  move before its commit point (the catalog switch of the cutover) aborts: the chunk stays on
  its source and what was copied is removed. A cutover in flight is never interrupted: it
  ends, and its outcome decides. After the commit point the move finishes (the rollback
  window, if open, closes without rolling back). A drain or rebalance cancels its running
  moves (each as above) and keeps what has moved; a drain puts its shards back to active.
* ``complete`` closes a move's open rollback window now (the ``complete`` update): the move
  is kept and its cleanup starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from cli.common import CliError
from cli.render import (
    format_drain_progress,
    format_progress,
    format_rebalance_progress,
    print_drain_result,
    print_rebalance_result,
    print_result,
)
from cli.temporal import client as temporal_client
from cli.temporal import ensure_worker, watch_or_report
from settings import get_settings
from workflows import DrainShardWorkflow, MigrateChunkWorkflow, RebalanceWorkflow

_BEFORE_COMMIT = {"starting", "registered", "snapshot", "import", "replicate", "verify"}


def _print_move(result: Any) -> int:
    print_result(result)
    return 0 if result.outcome.value in ("completed", "rolled_back") or result.plan else 1


def _print_drain(result: Any) -> int:
    print_drain_result(result)
    return 0


def _print_rebalance(result: Any) -> int:
    print_rebalance_result(result, dry_run=bool(result.planned))
    return 0


KINDS: dict[str, tuple[Any, Callable[[Any, float], str], Callable[[Any], int], str]] = {
    "MigrateChunkWorkflow": (MigrateChunkWorkflow, format_progress, _print_move, "move"),
    "DrainShardWorkflow": (DrainShardWorkflow, format_drain_progress, _print_drain, "drain"),
    "RebalanceWorkflow": (RebalanceWorkflow, format_rebalance_progress, _print_rebalance,
                          "rebalance"),
}


async def _find(client: Any, wf_id: str) -> tuple[Any, Any]:
    """(description, kind entry) of the latest run of ``wf_id``."""
    try:
        desc = await client.get_workflow_handle(wf_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no workflow {wf_id!r} (list them: shardshift moves, "
                           "shardshift status)") from None
        raise
    kind = KINDS.get(desc.workflow_type)
    if kind is None:
        raise CliError(f"{wf_id} is a {desc.workflow_type}, not a move, drain or rebalance")
    return desc, kind


def _status(desc: Any) -> str:
    return desc.status.name.lower() if desc.status is not None else "unknown"


# -- watch ----------------------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    return asyncio.run(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    client = await temporal_client(get_settings())
    desc, (cls, fmt, show, what) = await _find(client, args.id)
    # The latest run (a long move, drain or rebalance continues as new under the same id).
    handle = client.get_workflow_handle_for(cls.run, args.id)
    if desc.status == WorkflowExecutionStatus.RUNNING and not args.json:
        print(f"watching {what} {args.id} (Ctrl-C detaches; it keeps running)")
    if args.json:
        return await _watch_json(handle, what, args.id)
    result = await watch_or_report(handle, cls.progress, fmt, f"{what} {args.id}")
    if result is None:
        return 1
    code: int = show(result)
    return code


async def _watch_json(handle: Any, what: str, wf_id: str) -> int:
    """``watch --json``: no progress lines; one object when the workflow ends."""
    try:
        result = await handle.result()
    except Exception as exc:  # noqa: BLE001 - the failure is the answer
        cause: Any = exc
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        print(json.dumps({"workflow_id": wf_id, "kind": what, "status": "failed",
                          "error": str(cause or exc)}, indent=2))
        return 1
    print(json.dumps({"workflow_id": wf_id, "kind": what, "status": "completed",
                      "result": result.model_dump(mode="json")}, indent=2))
    return 0


# -- cancel ---------------------------------------------------------------------------------------


def cancel_effect(workflow_type: str, progress: Any | None) -> str:
    """What a cancel does to this workflow now, in words (from its ``progress`` answer)."""
    if workflow_type == "DrainShardWorkflow":
        running = f" ({len(progress.running)} running)" if progress is not None else ""
        return (f"the drain cancels its running moves{running}: each aborts if it is before "
                "its commit point (the chunk stays where it was) or finishes if it is past it; "
                "chunks already moved stay moved, and the drained shards go back to active")
    if workflow_type == "RebalanceWorkflow":
        running = f" ({len(progress.running)} running)" if progress is not None else ""
        return (f"the rebalance cancels its running moves{running}: each aborts if it is "
                "before its commit point or finishes if it is past it; chunks already moved "
                "and chunks already split stay as they are")
    if progress is None:
        return ("phase unknown (no answer to the progress query): before the commit point a "
                "cancel aborts the move and the chunk stays on its source; after it the move "
                "finishes")
    src, dst = progress.source or "the source", progress.target or "the target"
    if progress.phase in _BEFORE_COMMIT:
        return (f"in phase {progress.phase}, before the commit point: the move aborts; the "
                f"chunk stays on {src} and what was copied to {dst} is removed")
    if progress.phase == "cutover" and progress.pause_ms is None:
        return (f"in the cutover: an attempt in flight is never interrupted; if its switch "
                f"commits the move finishes on {dst} (no rollback window), otherwise it aborts "
                f"and the chunk stays on {src}")
    if progress.phase in ("aborting", "aborted", "dry_run"):
        return f"in phase {progress.phase}: nothing more to stop"
    window = (" the rollback window closes without rolling back;"
              if progress.rollback_open else "")
    return (f"in phase {progress.phase}, past the commit point: the move finishes;{window} "
            f"the chunk stays on {dst}")


def cmd_cancel(args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(args))


async def _cancel(args: argparse.Namespace) -> int:
    client = await temporal_client(get_settings())
    desc, (cls, fmt, show, what) = await _find(client, args.id)
    if desc.status != WorkflowExecutionStatus.RUNNING:
        raise CliError(f"{what} {args.id} is not running ({_status(desc)}): nothing to cancel")
    handle = client.get_workflow_handle_for(cls.run, args.id)
    try:
        progress = await asyncio.wait_for(handle.query(cls.progress), 5.0)
    except Exception:  # noqa: BLE001 - no worker to answer: said in the effect
        progress = None
    effect = cancel_effect(desc.workflow_type, progress)
    has_worker = await ensure_worker(client, desc.task_queue, required=False)
    await handle.cancel()
    if args.json:
        print(json.dumps({"workflow_id": args.id, "kind": what, "cancel_requested": True,
                          "phase": getattr(progress, "phase", None), "effect": effect,
                          "worker": has_worker}, indent=2))
    else:
        print(f"cancel requested for {what} {args.id}: {effect}")
        if not args.wait:
            print(f"follow it: shardshift watch {args.id}")
    if not args.wait:
        return 0
    result = await watch_or_report(handle, cls.progress, fmt, f"{what} {args.id}")
    if result is not None:
        code: int = show(result)  # past the commit point a cancelled move completes
        return code
    final = await handle.describe()
    return 0 if final.status == WorkflowExecutionStatus.CANCELED else 1


# -- complete -------------------------------------------------------------------------------------


def cmd_complete(args: argparse.Namespace) -> int:
    return asyncio.run(_complete(args))


async def _complete(args: argparse.Namespace) -> int:
    client = await temporal_client(get_settings())
    desc, (cls, fmt, show, what) = await _find(client, args.id)
    if desc.workflow_type != "MigrateChunkWorkflow":
        raise CliError(f"{args.id} is a {what}: complete closes a move's rollback window (give "
                       "the move's id, e.g. a drain's child DRAIN_ID/CHUNK)")
    if desc.status != WorkflowExecutionStatus.RUNNING:
        raise CliError(f"move {args.id} is not running ({_status(desc)}): no rollback window "
                       "to close")
    # The update waits for a worker to run it: without one it would hang.
    await ensure_worker(client, desc.task_queue, required=True)
    handle = client.get_workflow_handle_for(MigrateChunkWorkflow.run, args.id)
    try:
        answer = await handle.execute_update(MigrateChunkWorkflow.complete)
    except WorkflowUpdateFailedError as exc:
        raise CliError(f"complete of {args.id} refused: {exc.cause or exc}") from None
    if args.json:
        print(json.dumps({"workflow_id": args.id, "answer": answer}, indent=2))
    else:
        print(f"{args.id}: {answer}")
    if not args.wait:
        return 0
    result = await watch_or_report(handle, cls.progress, fmt, f"{what} {args.id}")
    if result is None:
        return 1
    done: int = show(result)
    return done
