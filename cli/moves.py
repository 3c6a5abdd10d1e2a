"""One chunk at a time: ``shardshift migrate``, ``moves`` and ``rollback``."""

from __future__ import annotations

import argparse
import asyncio
from typing import IO, Any

from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from catalog import Catalog
from catalog.errors import CatalogError
from cli.common import CliError, catalog_dsn, copy_throttle
from cli.render import format_progress, print_migrations, print_moves, print_result
from cli.temporal import client as temporal_client
from cli.temporal import ensure_worker, ui_url, watch, watch_or_report
from settings import Settings, get_settings
from shards.postgres.throttle import ThrottleSettings
from workflows import MigrateChunkInput, MigrateChunkWorkflow
from workflows.common import SA_CHUNK, SA_COLLECTION, SA_PHASE, SA_SOURCE, SA_TARGET


async def watch_migration(handle: Any, *, interval: float = 0.5, out: IO[str] | None = None,
                          tty: bool | None = None) -> Any:
    """Watch a ``MigrateChunkWorkflow`` to its end (see ``cli.temporal.watch``)."""
    return await watch(handle, MigrateChunkWorkflow.progress, format_progress,
                       interval=interval, out=out, tty=tty)


# -- migrate ----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(args))


async def _migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    throttle = copy_throttle(args)
    try:
        inp = MigrateChunkInput(
            collection=args.collection, chunk_id=args.chunk, target=args.to,
            dry_run=args.dry_run, rollback_window_s=args.rollback_window,
            target_give_up_s=args.give_up,
            copy_throttle=None if throttle is None else ThrottleSettings(**throttle))
    except ValueError as exc:
        raise CliError(f"invalid move: {exc}".replace("\n", " ")) from exc
    wf_id = args.id or f"move-{args.collection}-{args.chunk}" + ("-dry-run" if args.dry_run else "")
    await _check_move(settings, args.collection, args.chunk, args.to)
    client = await temporal_client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    # Without a worker nothing would happen: refuse to wait for it; --no-wait queues the move.
    await ensure_worker(client, task_queue, required=not args.no_wait)
    try:
        handle = await client.start_workflow(MigrateChunkWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except WorkflowAlreadyStartedError:
        raise CliError(
            f"workflow {wf_id} is already running: chunk {args.chunk} of {args.collection} is "
            f"being moved (watch: shardshift watch {wf_id}; stop: shardshift cancel {wf_id})"
        ) from None
    ui = ui_url(settings, wf_id)
    print(f"started {wf_id} (run {handle.result_run_id}) on task queue {task_queue}")
    if ui:
        print(f"watch: {ui}")
    if args.no_wait:
        return 0
    result = await watch_or_report(handle, MigrateChunkWorkflow.progress, format_progress,
                                   f"move {wf_id}")
    if result is None:
        return 1
    print_result(result)
    ok = result.outcome.value in ("completed", "rolled_back") or (args.dry_run and result.plan)
    return 0 if ok else 1


async def _check_move(settings: Settings, collection: str, chunk_id: int, target: str) -> None:
    """Refuse a move the catalog cannot accept before starting a workflow for it."""
    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        try:
            chunk = await cat.chunk(collection, chunk_id)
            shard = await cat.shard(target)
        except CatalogError as exc:
            raise CliError(str(exc)) from None
    if chunk.shard_id == target:
        raise CliError(f"chunk {chunk_id} of {collection} is already on {target}")
    if shard.state.value != "active":
        raise CliError(f"shard {target} is {shard.state.value}; it takes no chunks")


# -- moves ------------------------------------------------------------------------------------


def cmd_moves(args: argparse.Namespace) -> int:
    return asyncio.run(_moves_catalog(args) if args.catalog else _moves_temporal(args))


async def _moves_temporal(args: argparse.Namespace) -> int:
    settings = get_settings()
    client = await temporal_client(settings)
    query = "WorkflowType = 'MigrateChunkWorkflow'"
    for sa, value in ((SA_COLLECTION.name, args.collection), (SA_PHASE.name, args.phase)):
        if value:
            if "'" in value:
                raise CliError(f"invalid filter value {value!r}")
            query += f" AND {sa} = '{value}'"
    rows = []
    async for wf in client.list_workflows(query, limit=args.limit):
        sa = wf.typed_search_attributes
        rows.append((
            wf.id, wf.status.name.lower() if wf.status else "?",
            sa.get(SA_PHASE) or "-", sa.get(SA_COLLECTION) or "-", sa.get(SA_CHUNK) or "-",
            f"{sa.get(SA_SOURCE) or '?'} -> {sa.get(SA_TARGET) or '?'}",
            wf.start_time.strftime("%Y-%m-%d %H:%M:%S") if wf.start_time else "-",
        ))
    if not rows:
        print(f"no moves found (query: {query})")
        return 0
    print_moves(rows)
    return 0


async def _moves_catalog(args: argparse.Namespace) -> int:
    settings = get_settings()
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        await cat.ensure_schema()
        records = await cat.migrations(collection=args.collection, limit=args.limit)
    records = [m for m in records if not args.phase or m.phase.value == args.phase]
    if not records:
        print("no migrations in the catalog")
        return 0
    print_migrations(records)
    return 0


# -- rollback ---------------------------------------------------------------------------------


def cmd_rollback(args: argparse.Namespace) -> int:
    return asyncio.run(_rollback(args))


async def _rollback(args: argparse.Namespace) -> int:
    settings = get_settings()
    client = await temporal_client(settings)
    handle = client.get_workflow_handle_for(MigrateChunkWorkflow.run, args.id)
    try:
        desc = await handle.describe()
    except RPCError as exc:
        raise CliError(f"rollback of {args.id} failed: {exc}") from exc
    # The update waits for a worker to run it: without one it would hang.
    await ensure_worker(client, desc.task_queue or settings.temporal.task_queue, required=True)
    try:
        answer = await handle.execute_update(MigrateChunkWorkflow.rollback)
    except WorkflowUpdateFailedError as exc:
        raise CliError(f"rollback of {args.id} refused: {exc.cause or exc}") from exc
    except RPCError as exc:
        raise CliError(f"rollback of {args.id} failed: {exc}") from exc
    print(f"{args.id}: {answer} (the workflow moves the chunk back, then cleans up; "
          f"watch: shardshift watch {args.id})")
    return 0
