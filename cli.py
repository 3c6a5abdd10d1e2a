"""``shardshift``: the operator's command line.

    shardshift infra up [--shards N] [--pg15 K] [--headless]
    shardshift infra status [--json]
    shardshift infra down [--destroy]
    shardshift router serve [--host H] [--port P]
    shardshift worker
    shardshift collection create NAME --shard-key F [--index name:field[,field]...]
                                      [--chunks-per-shard N] [--shards S1,S2]
    shardshift migrate --collection C --chunk K --to SHARD [--dry-run]
                       [--rollback-window S] [--give-up S] [--no-wait] [--id WORKFLOW_ID]
    shardshift moves [--collection C] [--phase P] [--catalog]
    shardshift rollback --id WORKFLOW_ID
    shardshift demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from infra import InfraError, Stack
from settings import Settings, get_settings


def _stack(settings: Settings, args: argparse.Namespace) -> Stack:
    infra = settings.infra
    updates: dict[str, object] = {}
    if getattr(args, "shards", None) is not None:
        updates["shards"] = args.shards
    if getattr(args, "pg15", None) is not None:
        updates["pg15_shards"] = args.pg15
    if getattr(args, "headless", False):
        updates["headless"] = True
    return Stack(settings.state_dir, infra.model_copy(update=updates))


def _print_status(stack: Stack, as_json: bool) -> bool:
    rows = stack.status()
    if as_json:
        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return bool(rows) and all(r.healthy for r in rows)
    if not rows:
        print(f"no local stack in {stack.state_dir} (run: shardshift infra up)")
        return False
    print(f"{'SERVER':<10} {'ROLE':<9} {'ADDRESS':<17} {'VERSION':<28} {'HEALTH':<8} DETAIL")
    for r in rows:
        health = "healthy" if r.healthy else "DOWN"
        print(f"{r.name:<10} {r.role:<9} {r.address:<17} {r.version[:28]:<28} {health:<8} {r.detail[:70]}")
    return all(r.healthy for r in rows)


def cmd_infra(args: argparse.Namespace) -> int:
    settings = get_settings()
    stack = _stack(settings, args)
    if args.action == "up":
        stack.up()
        return 0 if _print_status(stack, False) else 1
    if args.action == "down":
        if args.destroy:
            stack.destroy()
            print(f"stack stopped and {stack.state_dir} removed")
        else:
            stack.down()
            print("stack stopped")
        return 0
    return 0 if _print_status(stack, args.json) else 1


def catalog_dsn(settings: Settings) -> str:
    """The catalog as the control plane (``settings.db.catalog_user``): at
    ``settings.catalog_dsn``, else the local stack's catalog instance. (The router service
    swaps in its read-only role itself.)"""
    return settings.db.catalog(settings.catalog_dsn or Stack.from_settings(settings).catalog_address)


def cmd_router(args: argparse.Namespace) -> int:
    from router.service import serve  # noqa: PLC0415

    settings = get_settings()
    print(f"router HTTP service on http://{args.host}:{args.port} (OpenAPI: /docs)")
    serve(catalog_dsn(settings), settings, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workload.demo import run_demo  # noqa: PLC0415 - heavy imports only for this command

    return run_demo(get_settings())


class CliError(Exception):
    """A failure the operator can act on: printed as one line, exit code 2."""


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import main as worker_main  # noqa: PLC0415

    worker_main()
    return 0


# -- Temporal ---------------------------------------------------------------------------------


async def _client(settings: Settings) -> Any:
    from worker import connect  # noqa: PLC0415

    try:
        return await connect(settings.temporal)
    except Exception as exc:  # noqa: BLE001 - a connection failure becomes one line
        raise CliError(
            f"cannot reach Temporal at {settings.temporal.address} "
            f"(namespace {settings.temporal.namespace}): {exc} "
            "(local stack: ./dev shardshift infra up)"
        ) from exc


def _bar(done: int, total: int | None, width: int = 24) -> str:
    frac = min(1.0, done / total) if total else (1.0 if total == 0 else 0.0)
    n = int(round(frac * width))
    return "[" + "#" * n + "." * (width - n) + "]"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_progress(p: Any, elapsed: float) -> str:
    """One line for a ``Progress``: phase, rows copied/total with a bar, lag, pause."""
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<15}"]
    total = p.rows_total
    rows = f"{p.rows_copied}/{total}" if total is not None else f"{p.rows_copied}/?"
    parts.append(f"{_bar(p.rows_copied, total)} {rows} rows")
    if p.lag_bytes is not None:
        lag = f"lag {_bytes(p.lag_bytes)}"
        if p.lag_s is not None:
            lag += f" ({p.lag_s * 1000:.0f} ms)"
        parts.append(lag)
    if p.cutover_attempts > 1:
        parts.append(f"cutover attempt {p.cutover_attempts}")
    if p.pause_ms is not None:
        parts.append(f"pause {p.pause_ms:.1f} ms")
    if p.rollback_open:
        parts.append("rollback window OPEN")
    if getattr(p, "waiting_for", None):
        parts.append(p.detail or f"waiting for {p.waiting_for}")
    return "  ".join(parts)


async def watch_migration(handle: Any, *, interval: float = 0.5, out: IO[str] | None = None,
                          tty: bool | None = None) -> Any:
    """Watch a ``MigrateChunkWorkflow`` to its end (see ``watch``)."""
    from workflows.migrate_chunk import MigrateChunkWorkflow  # noqa: PLC0415

    return await watch(handle, MigrateChunkWorkflow.progress, format_progress,
                       interval=interval, out=out, tty=tty)


async def watch(handle: Any, query: Any, fmt: Callable[[Any, float], str], *,
                interval: float = 0.5, out: IO[str] | None = None,
                tty: bool | None = None) -> Any:
    """Poll a progress query every ``interval`` seconds until the workflow ends.

    On a terminal the line is redrawn in place; otherwise a plain line is printed whenever
    the phase changes (and every 5 s), and once more with the final state. Returns the
    workflow's result (raises its failure).
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    result = asyncio.ensure_future(handle.result())
    start = time.monotonic()
    last_phase, last_print = None, 0.0
    try:
        while True:
            finished = result.done()
            try:
                p = await handle.query(query)
            except Exception:  # noqa: BLE001 - not started yet, or already closed
                p = None
            now = time.monotonic()
            if p is not None:
                line = fmt(p, now - start)
                if tty:
                    out.write("\r\x1b[2K" + line)
                    out.flush()
                elif finished or p.phase != last_phase or now - last_print >= 5.0:
                    out.write(line + "\n")
                    out.flush()
                    last_phase, last_print = p.phase, now
            if finished:
                break  # the line above is the final state
            await asyncio.wait([result], timeout=interval)
    finally:
        if tty:
            out.write("\n")
            out.flush()
        if not result.done():
            result.cancel()
    return result.result()


async def watch_or_report(handle: Any, query: Any, fmt: Callable[[Any, float], str],
                          what: str) -> Any | None:
    """``watch`` to the end; a failed workflow is reported (its innermost cause) as None."""
    from temporalio.client import WorkflowFailureError  # noqa: PLC0415

    try:
        return await watch(handle, query, fmt)
    except WorkflowFailureError as exc:
        cause = exc.cause
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        print(f"{what} failed: {cause or exc}", file=sys.stderr)
        return None


def print_result(r: Any, *, indent: str = "") -> None:
    """The result of a ``MigrateChunkWorkflow``: outcome, documents, pause, phase times."""
    print(f"{indent}outcome            {r.outcome.value}" + (f" ({r.detail})" if r.detail else ""))
    print(f"{indent}migration id       {r.migration_id}")
    if r.plan:
        print(f"{indent}plan (dry run, to {r.target}):")
        for i, step in enumerate(r.plan, 1):
            print(f"{indent}  {i}. {step.name:<16} {step.description}")
        return
    print(f"{indent}source -> target   {r.source} -> {r.target}")
    print(f"{indent}documents moved    {r.documents}"
          + ("" if r.verified is None else f" (verified: {'yes' if r.verified else 'NO'})"))
    pause = "-" if r.pause_ms is None else f"{r.pause_ms:.1f} ms"
    print(f"{indent}cutover pause      {pause} (attempts: {r.cutover_attempts})")
    if r.rollback_pause_ms is not None:
        print(f"{indent}rollback pause     {r.rollback_pause_ms:.1f} ms")
    if r.phase_seconds:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in r.phase_seconds.items())
        print(f"{indent}time per phase     {phases}")


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(args))


async def _migrate(args: argparse.Namespace) -> int:
    from temporalio.exceptions import WorkflowAlreadyStartedError  # noqa: PLC0415

    from workflows import MigrateChunkInput, MigrateChunkWorkflow  # noqa: PLC0415

    settings = get_settings()
    try:
        inp = MigrateChunkInput(collection=args.collection, chunk_id=args.chunk, target=args.to,
                                dry_run=args.dry_run, rollback_window_s=args.rollback_window,
                                target_give_up_s=args.give_up)
    except ValueError as exc:
        raise CliError(f"invalid move: {exc}".replace("\n", " ")) from exc
    wf_id = args.id or f"move-{args.collection}-{args.chunk}" + ("-dry-run" if args.dry_run else "")
    await _check_move(settings, args.collection, args.chunk, args.to)
    client = await _client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    try:
        handle = await client.start_workflow(MigrateChunkWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except WorkflowAlreadyStartedError:
        raise CliError(
            f"workflow {wf_id} is already running: chunk {args.chunk} of {args.collection} is "
            f"being moved (watch: temporal workflow query --workflow-id {wf_id} --name progress; "
            f"stop: temporal workflow cancel --workflow-id {wf_id})"
        ) from None
    ui = _ui_url(settings, wf_id)
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
    from catalog import Catalog  # noqa: PLC0415
    from catalog.errors import CatalogError  # noqa: PLC0415

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


def format_drain_progress(p: Any, elapsed: float) -> str:
    """One line for a ``DrainProgress``: phase, chunks moved of total with a bar, bytes."""
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<9}"]
    if p.chunks_total:
        parts.append(f"{_bar(p.chunks_done, p.chunks_total)} {p.chunks_done}/{p.chunks_total}"
                     f" chunks ({_bytes(p.bytes_done)} of {_bytes(p.bytes_total)})")
    if p.running:
        parts.append(f"moving {len(p.running)}")
    if p.chunks_failed:
        parts.append(f"FAILED {p.chunks_failed}")
    if p.round > 1:
        parts.append(f"round {p.round}")
    return "  ".join(parts)


def cmd_drain(args: argparse.Namespace) -> int:
    return asyncio.run(_drain(args))


async def _drain(args: argparse.Namespace) -> int:
    from temporalio.exceptions import WorkflowAlreadyStartedError  # noqa: PLC0415

    from catalog.models import MigrationKind  # noqa: PLC0415
    from workflows import DrainShardInput, DrainShardWorkflow  # noqa: PLC0415

    settings = get_settings()
    kind = MigrationKind.UPGRADE if args.upgrade else MigrationKind.MERGE_SHARDS
    try:
        inp = DrainShardInput(shards=args.shards, targets=args.to or None, kind=kind,
                              max_parallel=args.parallel)
    except ValueError as exc:
        raise CliError(f"invalid drain: {exc}".replace("\n", " ")) from exc
    await _check_drain(settings, inp.shards, inp.targets or [])
    wf_id = args.id or f"{'upgrade' if args.upgrade else 'drain'}-{'-'.join(args.shards)}"
    client = await _client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    try:
        handle = await client.start_workflow(DrainShardWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except WorkflowAlreadyStartedError:
        raise CliError(f"workflow {wf_id} is already running (stop it: temporal workflow "
                       f"cancel --workflow-id {wf_id})") from None
    ui = _ui_url(settings, wf_id)
    print(f"started {wf_id} (run {handle.result_run_id}) on task queue {task_queue}")
    if ui:
        print(f"watch: {ui}")
    if args.no_wait:
        return 0
    # Watch the current run, not the first: a long drain continues as new.
    current = client.get_workflow_handle_for(DrainShardWorkflow.run, wf_id)
    result = await watch_or_report(current, DrainShardWorkflow.progress, format_drain_progress,
                                   f"drain {wf_id}")
    if result is None:
        return 1
    print(f"retired            {', '.join(result.retired) or '-'}")
    for m in result.moves:
        pause = "-" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
        print(f"  {m.collection}/{m.chunk_id:<8} {m.source} -> {m.target}  {m.outcome:<9}"
              f" {m.documents} docs  pause {pause}")
    return 0


async def _check_drain(settings: Settings, shards: list[str], targets: list[str]) -> None:
    """Refuse unknown shards before starting a workflow (the workflow checks the rest)."""
    from catalog import Catalog  # noqa: PLC0415
    from catalog.errors import CatalogError  # noqa: PLC0415

    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        for sid in [*shards, *targets]:
            try:
                await cat.shard(sid)
            except CatalogError as exc:
                raise CliError(str(exc)) from None


def format_rebalance_progress(p: Any, elapsed: float) -> str:
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<9}"]
    if p.loads:
        parts.append("load " + " ".join(f"{s}={_bytes(b)}" for s, b in sorted(p.loads.items())))
    if p.chunks_total:
        parts.append(f"{_bar(p.chunks_done, p.chunks_total)} {p.chunks_done}/{p.chunks_total}"
                     " moves")
    if p.splits_done:
        parts.append(f"{p.splits_done} split(s)")
    if p.chunks_failed:
        parts.append(f"FAILED {p.chunks_failed}")
    return "  ".join(parts)


def _every(text: str) -> Any:
    from datetime import timedelta  # noqa: PLC0415

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), text[-1]
        seconds = value * units[unit]
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and s, m, h or d (e.g. 1h)") from None
    if seconds < 60:
        raise argparse.ArgumentTypeError("schedule rebalancing at most once a minute")
    return timedelta(seconds=seconds)


def cmd_rebalance(args: argparse.Namespace) -> int:
    return asyncio.run(_rebalance(args))


async def _rebalance(args: argparse.Namespace) -> int:
    from temporalio.client import (  # noqa: PLC0415
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleIntervalSpec,
        ScheduleOverlapPolicy,
        SchedulePolicy,
        ScheduleSpec,
    )
    from temporalio.service import RPCError, RPCStatusCode  # noqa: PLC0415

    from catalog.models import MigrationKind  # noqa: PLC0415
    from workflows import RebalanceInput, RebalanceWorkflow  # noqa: PLC0415

    settings = get_settings()
    client = await _client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    if getattr(args, "unschedule", False):
        try:
            await client.get_schedule_handle(args.schedule_id).delete()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            raise CliError(f"no schedule {args.schedule_id}") from None
        print(f"deleted schedule {args.schedule_id}")
        return 0
    split_shard = getattr(args, "split_shard", None)  # `split-shard HOT --to NEW`
    try:
        inp = RebalanceInput(
            kind=MigrationKind.SPLIT_SHARD if split_shard else MigrationKind.REBALANCE,
            tolerance=args.tolerance, max_moves=args.max_moves, max_parallel=args.parallel,
            split=not getattr(args, "no_split", False), collections=args.collection,
            shards=[split_shard, args.to] if split_shard else args.shard, dry_run=args.dry_run,
        )
    except ValueError as exc:
        raise CliError(f"invalid rebalance: {exc}".replace("\n", " ")) from exc
    if getattr(args, "schedule", None) is not None:
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(RebalanceWorkflow.run, inp,
                                               id=args.schedule_id, task_queue=task_queue),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=args.schedule)]),
            # A rebalance still running when the next is due: skip the next one.
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        try:
            await client.create_schedule(args.schedule_id, schedule)
            verb = "created"
        except Exception as exc:  # noqa: BLE001 - the SDK raises its own "already exists" type
            if "already" not in str(exc).lower():
                raise
            handle = client.get_schedule_handle(args.schedule_id)

            async def replace(update: Any) -> Any:
                from temporalio.client import ScheduleUpdate  # noqa: PLC0415

                return ScheduleUpdate(schedule=schedule)

            await handle.update(replace)
            verb = "updated"
        print(f"{verb} schedule {args.schedule_id}: RebalanceWorkflow every {args.schedule} "
              f"on task queue {task_queue} (delete: shardshift rebalance --unschedule)")
        return 0
    wf_id = args.id or (f"split-{split_shard}" if split_shard else "rebalance") + (
        "-dry-run" if args.dry_run else "")
    try:
        handle = await client.start_workflow(RebalanceWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except Exception as exc:  # noqa: BLE001
        if "already" not in str(exc).lower():
            raise
        raise CliError(f"workflow {wf_id} is already running") from None
    print(f"started {wf_id} (run {handle.result_run_id}) on task queue {task_queue}")
    # Watch the current run, not the first: a long rebalance continues as new.
    current = client.get_workflow_handle_for(RebalanceWorkflow.run, wf_id)
    result = await watch_or_report(current, RebalanceWorkflow.progress,
                                   format_rebalance_progress, f"rebalance {wf_id}")
    if result is None:
        return 1
    print("load before        " + " ".join(f"{s}={_bytes(b)}"
                                          for s, b in sorted(result.loads_before.items())))
    print(("load planned       " if args.dry_run else "load after         ")
          + " ".join(f"{s}={_bytes(b)}" for s, b in sorted(result.loads_after.items())))
    for sp in result.splits:
        print(f"  split {sp.collection}/{sp.chunk_id} on {sp.shard}")
    for m in result.planned:
        print(f"  plan  {m.collection}/{m.chunk_id} {m.source} -> {m.target} ({_bytes(m.bytes)})")
    for m in result.moves:
        print(f"  moved {m.collection}/{m.chunk_id} {m.source} -> {m.target} {m.outcome}")
    return 0


def _ui_url(settings: Settings, wf_id: str) -> str | None:
    if not settings.temporal.address.startswith(("127.0.0.1:", "localhost:")):
        return None
    try:
        ui_port = Stack.from_settings(settings).temporal.ui_port
    except Exception:  # noqa: BLE001 - best effort
        ui_port = settings.infra.ui_port
    return f"http://127.0.0.1:{ui_port}/namespaces/{settings.temporal.namespace}/workflows/{wf_id}"


def cmd_moves(args: argparse.Namespace) -> int:
    return asyncio.run(_moves_catalog(args) if args.catalog else _moves_temporal(args))


async def _moves_temporal(args: argparse.Namespace) -> int:
    from workflows.migrate_chunk import (  # noqa: PLC0415
        SA_CHUNK,
        SA_COLLECTION,
        SA_PHASE,
        SA_SOURCE,
        SA_TARGET,
    )

    settings = get_settings()
    client = await _client(settings)
    query = "WorkflowType = 'MigrateChunkWorkflow'"
    for sa, value in (("ShardshiftCollection", args.collection), ("ShardshiftPhase", args.phase)):
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
    print(f"{'WORKFLOW ID':<40} {'STATUS':<11} {'PHASE':<15} {'COLLECTION':<22} "
          f"{'CHUNK':<6} {'SOURCE -> TARGET':<22} STARTED")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:<11} {r[2]:<15} {r[3]:<22} {r[4]:<6} {r[5]:<22} {r[6]}")
    return 0


async def _moves_catalog(args: argparse.Namespace) -> int:
    from catalog import Catalog  # noqa: PLC0415

    settings = get_settings()
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        await cat.ensure_schema()
        records = await cat.migrations(collection=args.collection, limit=args.limit)
    records = [m for m in records if not args.phase or m.phase.value == args.phase]
    if not records:
        print("no migrations in the catalog")
        return 0
    print(f"{'MIGRATION ID':<44} {'COLLECTION':<22} {'CHUNK':<6} {'SOURCE -> TARGET':<22} "
          f"{'PHASE':<15} {'OUTCOME':<11} PAUSE")
    for m in records:
        pause = "-" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
        print(f"{m.migration_id:<44} {m.collection:<22} {m.chunk_id:<6} "
              f"{m.source + ' -> ' + m.target:<22} {m.phase.value:<15} "
              f"{(m.outcome.value if m.outcome else 'active'):<11} {pause}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    return asyncio.run(_rollback(args))


async def _rollback(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowUpdateFailedError  # noqa: PLC0415
    from temporalio.service import RPCError  # noqa: PLC0415

    from workflows.migrate_chunk import MigrateChunkWorkflow  # noqa: PLC0415

    client = await _client(get_settings())
    handle = client.get_workflow_handle_for(MigrateChunkWorkflow.run, args.id)
    try:
        answer = await handle.execute_update(MigrateChunkWorkflow.rollback)
    except WorkflowUpdateFailedError as exc:
        raise CliError(f"rollback of {args.id} refused: {exc.cause or exc}") from exc
    except RPCError as exc:
        raise CliError(f"rollback of {args.id} failed: {exc}") from exc
    print(f"{args.id}: {answer} (the workflow moves the chunk back, then cleans up; "
          f"watch: shardshift moves)")
    return 0


# -- collections ------------------------------------------------------------------------------


def _index(spec: str) -> Any:
    from shards.models import IndexDefinition  # noqa: PLC0415

    name, sep, fields = spec.partition(":")
    if not sep or not name or not fields:
        raise CliError(f"invalid --index {spec!r}: expected name:field[,field...]")
    try:
        return IndexDefinition(name=name, fields=tuple(f for f in fields.split(",") if f))
    except ValueError as exc:
        raise CliError(f"invalid --index {spec!r}: {exc}".replace("\n", " ")) from exc


def cmd_collection(args: argparse.Namespace) -> int:
    return asyncio.run(_collection_create(args))


async def _collection_create(args: argparse.Namespace) -> int:
    from catalog import Catalog  # noqa: PLC0415
    from catalog.admin import provision_collection  # noqa: PLC0415
    from catalog.errors import CatalogError  # noqa: PLC0415
    from workload.demo import close_engines, open_engines, register_stack_shards  # noqa: PLC0415

    settings = get_settings()
    indexes = [_index(s) for s in args.index or []]
    wanted = [s for s in (args.shards or "").split(",") if s] or None
    stack = Stack.from_settings(settings)
    async with Catalog(catalog_dsn(settings), max_size=4) as cat:
        await cat.ensure_schema()
        if stack.record() is not None:
            await register_stack_shards(cat, stack)
        registered = {s.shard_id: s for s in await cat.list_shards()}
        if wanted:
            missing = sorted(set(wanted) - set(registered))
            if missing:
                raise CliError(f"unknown shards {missing}; registered: {sorted(registered)}")
            ids = wanted
        else:
            ids = sorted(s.shard_id for s in registered.values() if s.state.value == "active")
        if not ids:
            raise CliError("no shards registered in the catalog (run: shardshift infra up)")
        engines = await open_engines([registered[i] for i in ids], max_size=2, db=settings.db)
        try:
            cmap = await provision_collection(
                cat, engines, args.name, args.shard_key, indexes,
                chunks_per_shard=args.chunks_per_shard,
            )
        except (CatalogError, ValueError) as exc:
            raise CliError(f"cannot create collection {args.name!r}: {exc}") from exc
        finally:
            await close_engines(engines)
    print(f"collection {args.name} (shard key {args.shard_key!r}, "
          f"{len(cmap.collection.indexes)} indexes): {len(cmap.chunks)} chunks")
    print(f"{'CHUNK':<6} {'SHARD':<10} {'TOKEN':<6} RANGE")
    for c in cmap.chunks:
        print(f"{c.chunk_id:<6} {c.shard_id:<10} {c.token:<6} [{c.range.lo}, {c.range.hi})")
    return 0


# -- doctor ---------------------------------------------------------------------------------


class TemporalMoveProbe:
    """``activities.doctor.MoveProbe`` over Temporal: does a workflow run this migration?

    The record's lease holders (and the workflow id its migration id was derived from) are
    described; a running one is this migration's when its run (or the first run of its
    chain) derives the migration id, or when its ``progress`` query says so. Visibility (the
    running ``MigrateChunkWorkflow`` executions) is the last resort. An error propagates:
    the doctor then treats the migration as running.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._listed: set[str] | None = None

    async def __call__(self, record: Any, workflow_ids: Any) -> bool:
        from datetime import timedelta  # noqa: PLC0415

        from temporalio.client import WorkflowExecutionStatus  # noqa: PLC0415
        from temporalio.service import RPCError, RPCStatusCode  # noqa: PLC0415

        from workflows.migrate_chunk import MigrateChunkWorkflow, migration_id_for  # noqa: PLC0415

        mid = record.migration_id
        for wid in dict.fromkeys([*workflow_ids, mid.rsplit(".", 1)[0]]):
            try:
                desc = await self.client.get_workflow_handle(wid).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    continue
                raise
            if desc.status != WorkflowExecutionStatus.RUNNING:
                continue
            runs = {desc.run_id, getattr(desc.raw_info, "first_run_id", "") or desc.run_id}
            if mid in {migration_id_for(wid, r) for r in runs}:
                return True
            if desc.workflow_type == "MigrateChunkWorkflow":
                progress = await self.client.get_workflow_handle(wid).query(
                    MigrateChunkWorkflow.progress, rpc_timeout=timedelta(seconds=5))
                if progress.migration_id == mid:
                    return True
        if self._listed is None:
            self._listed = set()
            query = "WorkflowType = 'MigrateChunkWorkflow' AND ExecutionStatus = 'Running'"
            async for wf in self.client.list_workflows(query):
                first = getattr(wf.raw_info, "first_run_id", "") or wf.run_id
                self._listed |= {migration_id_for(wf.id, wf.run_id),
                                 migration_id_for(wf.id, first)}
        return mid in self._listed


def cmd_doctor(args: argparse.Namespace) -> int:
    return asyncio.run(_doctor(args))


async def _doctor(args: argparse.Namespace) -> int:
    from activities.doctor import Doctor, format_report  # noqa: PLC0415
    from catalog import Catalog  # noqa: PLC0415
    from shards.staging import Staging  # noqa: PLC0415

    settings = get_settings()
    client: Any = None
    try:
        client = await _client(settings)
    except CliError as exc:
        # Without Temporal nothing can be proven dead: every active migration counts as
        # running (and is reported), everything else is still examined.
        reason = str(exc)

        async def probe(record: Any, workflow_ids: Any) -> bool:
            raise RuntimeError(reason)
    else:
        probe = TemporalMoveProbe(client)
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        doctor = Doctor(cat, Staging(settings.staging), probe, collections=args.collection,
                        db=settings.db)
        report = await doctor.run(repair=args.repair)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(format_report(report, repair=args.repair), end="")
    return 0 if report.clean else 1


def _doctor_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor", help="find what failed moves left behind (slots, fences, records, leases, "
                       "staging); --repair fixes what is safe",
        description="Lists replication slots, publications and origins, fences, partial "
                    "copies, import rows, staging directories, leases and migration records "
                    "that no running move owns, with what --repair would do. Exit code 0 "
                    "when nothing is left (or everything was repaired), 1 otherwise.")
    doctor.add_argument("--repair", action="store_true",
                        help="fix what is safe to fix; explain the rest")
    doctor.add_argument("--json", action="store_true",
                        help='{"findings": [{kind, shard, object, detail, action, repaired}], '
                             '"clean": bool}')
    doctor.add_argument("--collection", action="append", metavar="C",
                        help="only this collection (repeatable; objects tied to no collection "
                             "are then skipped)")
    doctor.set_defaults(func=cmd_doctor)


def _workflow_args(parser: argparse.ArgumentParser, default_id: str) -> None:
    """``--id`` and ``--task-queue``, shared by every command that starts a workflow."""
    parser.add_argument("--id", metavar="WORKFLOW_ID", help=f"workflow id (default: {default_id})")
    parser.add_argument("--task-queue", help="default: settings' temporal.task_queue")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardshift", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    infra = sub.add_parser("infra", help="the local stack: Temporal + PostgreSQL instances")
    infra_sub = infra.add_subparsers(dest="action", required=True)
    up = infra_sub.add_parser("up", help="create/start every server and wait until healthy")
    up.add_argument("--shards", type=int, help="number of PostgreSQL 18 shards (default 3)")
    up.add_argument("--pg15", type=int, metavar="K", help="add K PostgreSQL 15 shards")
    up.add_argument("--headless", action="store_true", help="no Temporal Web UI")
    down = infra_sub.add_parser("down", help="stop every server of the stack")
    down.add_argument("--destroy", action="store_true", help="also delete all data")
    status = infra_sub.add_parser("status", help="each server, version, port and health")
    status.add_argument("--json", action="store_true")
    infra.set_defaults(func=cmd_infra)

    router = sub.add_parser("router", help="the router's HTTP service")
    router_sub = router.add_subparsers(dest="action", required=True)
    serve = router_sub.add_parser("serve", help="serve the HTTP/JSON API (bearer-token auth)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    router.set_defaults(func=cmd_router)

    worker = sub.add_parser("worker", help="run a Temporal worker (workflows + activities)")
    worker.set_defaults(func=cmd_worker)

    coll = sub.add_parser("collection", help="collections in the catalog")
    coll_sub = coll.add_subparsers(dest="action", required=True)
    create = coll_sub.add_parser(
        "create", help="create a collection: catalog entry, tables, indexes, fences",
        description="Registers the local stack's shards in the catalog if missing, then "
                    "provisions the collection over them.")
    create.add_argument("name")
    create.add_argument("--shard-key", required=True, metavar="FIELD")
    create.add_argument("--index", action="append", metavar="NAME:FIELD[,FIELD]",
                        help="a secondary index (repeatable)")
    create.add_argument("--chunks-per-shard", type=int, default=1, metavar="N")
    create.add_argument("--shards", metavar="S1,S2",
                        help="shards to place chunks on (default: every active shard)")
    coll.set_defaults(func=cmd_collection)

    migrate = sub.add_parser("migrate", help="move one chunk to another shard (a workflow)")
    migrate.add_argument("--collection", required=True)
    migrate.add_argument("--chunk", required=True, type=int, metavar="K")
    migrate.add_argument("--to", required=True, metavar="SHARD")
    migrate.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    migrate.add_argument("--rollback-window", type=float, default=0.0, metavar="S",
                         help="seconds after the cutover during which `rollback` is accepted")
    migrate.add_argument("--give-up", type=float, default=1800.0, metavar="S",
                         help="how long an unreachable target is waited for before the move "
                              "aborts with TargetLost (default 1800)")
    migrate.add_argument("--no-wait", action="store_true", help="start it and return")
    _workflow_args(migrate, "move-COLLECTION-CHUNK")
    migrate.set_defaults(func=cmd_migrate)

    moves = sub.add_parser("moves", help="list chunk migrations (Temporal visibility)")
    moves.add_argument("--collection")
    moves.add_argument("--phase", help="only moves in this phase (e.g. replicate)")
    moves.add_argument("--catalog", action="store_true",
                       help="read the catalog's migration records instead")
    moves.add_argument("--limit", type=int, default=50)
    moves.set_defaults(func=cmd_moves)

    rollback = sub.add_parser("rollback", help="move a chunk back during its rollback window")
    rollback.add_argument("--id", required=True, metavar="WORKFLOW_ID")
    rollback.set_defaults(func=cmd_rollback)

    drain = sub.add_parser(
        "drain", help="empty shards chunk by chunk and retire them (merge, or --upgrade)")
    drain.add_argument("shards", nargs="+", metavar="SHARD", help="the shards to empty")
    drain.add_argument("--to", nargs="+", metavar="SHARD",
                       help="where the chunks may go (default: every other active shard; "
                            "with --upgrade, those of a newer major version)")
    drain.add_argument("--upgrade", action="store_true",
                       help="a major-version upgrade: only newer-version shards receive")
    drain.add_argument("--parallel", type=int, default=2, metavar="N",
                       help="chunk moves at once (default 2)")
    drain.add_argument("--no-wait", action="store_true", help="start it and return")
    _workflow_args(drain, "drain-SHARDS or upgrade-SHARDS")
    drain.set_defaults(func=cmd_drain)

    reb = sub.add_parser("rebalance", help="even out the data across active shards (now, "
                                           "or on a Temporal Schedule)")
    reb.add_argument("--tolerance", type=float, default=0.2,
                     help="spread allowed between shards, as a fraction of the mean (0.2)")
    reb.add_argument("--max-moves", type=int, default=4, help="moves per run at most (4)")
    reb.add_argument("--parallel", type=int, default=2, metavar="N", help="moves at once (2)")
    reb.add_argument("--no-split", action="store_true",
                     help="never split a chunk too large to move usefully")
    reb.add_argument("--collection", nargs="+", help="only these collections")
    reb.add_argument("--shard", nargs="+", help="only across these active shards")
    reb.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    reb.add_argument("--schedule", type=_every, metavar="EVERY",
                     help="create (or update) a Temporal Schedule running it every EVERY "
                          "(e.g. 1h, 30m) instead of running it now")
    reb.add_argument("--unschedule", action="store_true", help="delete the schedule")
    reb.add_argument("--schedule-id", default="shardshift-rebalance")
    _workflow_args(reb, "rebalance")
    reb.set_defaults(func=cmd_rebalance)

    split = sub.add_parser("split-shard", help="move half of a hot shard's data to a new "
                                               "shard (splitting chunks where needed)")
    split.add_argument("split_shard", metavar="SHARD", help="the hot shard")
    split.add_argument("--to", required=True, metavar="SHARD", help="the new or emptier shard")
    split.add_argument("--tolerance", type=float, default=0.1)
    split.add_argument("--max-moves", type=int, default=64)
    split.add_argument("--parallel", type=int, default=2, metavar="N")
    split.add_argument("--collection", nargs="+", help="only these collections")
    split.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    _workflow_args(split, "split-SHARD")
    split.set_defaults(func=cmd_rebalance)

    _doctor_parser(sub)

    demo = sub.add_parser("demo", help="the main job: a live chunk migration under load")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (InfraError, CliError) as exc:
        print(f"shardshift: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _operator_error(exc):
            raise
        print(f"shardshift: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    finally:
        # Free Temporal clients caught in exception reference cycles now: the SDK's native
        # runtime must not be torn down during interpreter finalization (it aborts).
        import gc  # noqa: PLC0415

        gc.collect()


def _operator_error(exc: BaseException) -> bool:
    """Errors of the catalog, a database or Temporal: one line for the operator, not a trace."""
    kinds: list[type] = []
    for module, name in (("catalog.errors", "CatalogError"), ("psycopg", "Error"),
                         ("temporalio.service", "RPCError")):
        mod = sys.modules.get(module)
        if mod is not None:
            kinds.append(getattr(mod, name))
    return isinstance(exc, tuple(kinds))


if __name__ == "__main__":
    sys.exit(main())
