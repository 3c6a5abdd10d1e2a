"""Many chunks at once: ``shardshift drain`` (merges, ``--upgrade``), ``merge`` (which shards
to drain, chosen by bin packing), ``rebalance`` (now or on a Temporal Schedule) and
``split-shard``."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleUpdate,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.context import MoveContext
from activities.merge_choice import MergeRefused, choose_merge
from catalog import Catalog
from catalog.errors import CatalogError
from catalog.models import MigrationKind
from cli import schedule as sched
from cli.common import CliError, catalog_dsn, move_options
from cli.render import (
    format_drain_progress,
    format_rebalance_progress,
    print_drain_result,
    print_merge_choice,
    print_rebalance_result,
    print_schedule_status,
)
from cli.temporal import client as temporal_client
from cli.temporal import ui_url, watch_or_report
from settings import Settings, get_settings
from shards.staging import Staging
from workflows import DrainShardInput, DrainShardWorkflow, RebalanceInput, RebalanceWorkflow
from workflows.child_moves import RunLimits


def _limits(settings: Settings) -> RunLimits:
    """A move starts when both its shards have room under the workers' lease limit."""
    return RunLimits(max_running_per_shard=settings.fleet.max_moves_per_shard)


# -- drain ------------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    return asyncio.run(_drain(args))


async def _drain(args: argparse.Namespace) -> int:
    settings = get_settings()
    kind = MigrationKind.UPGRADE if args.upgrade else MigrationKind.MERGE_SHARDS
    try:
        inp = DrainShardInput(shards=args.shards, targets=args.to or None, kind=kind,
                              max_parallel=args.parallel, dry_run=args.dry_run,
                              move=move_options(args), limits=_limits(settings))
    except ValueError as exc:
        raise CliError(f"invalid drain: {exc}".replace("\n", " ")) from exc
    await _check_drain(settings, inp.shards, inp.targets or [])
    wf_id = args.id or f"{'upgrade' if args.upgrade else 'drain'}-{'-'.join(args.shards)}" + (
        "-dry-run" if args.dry_run else "")
    return await _start_drain(settings, args, inp, wf_id)


async def _start_drain(settings: Settings, args: argparse.Namespace, inp: DrainShardInput,
                       wf_id: str) -> int:
    """Start a drain and watch it to its result (unless ``--no-wait``)."""
    client = await temporal_client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    try:
        handle = await client.start_workflow(DrainShardWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except WorkflowAlreadyStartedError:
        raise CliError(f"workflow {wf_id} is already running (stop it: temporal workflow "
                       f"cancel --workflow-id {wf_id})") from None
    ui = ui_url(settings, wf_id)
    print(f"started {wf_id} (run {handle.result_run_id}) on task queue {task_queue}")
    if ui:
        print(f"watch: {ui}")
    if args.no_wait and not args.dry_run:
        return 0
    # Watch the current run, not the first: a long drain continues as new.
    current = client.get_workflow_handle_for(DrainShardWorkflow.run, wf_id)
    result = await watch_or_report(current, DrainShardWorkflow.progress, format_drain_progress,
                                   f"drain {wf_id}")
    if result is None:
        return 1
    print_drain_result(result)
    return 0


# -- merge --------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    return asyncio.run(_merge(args))


async def _merge(args: argparse.Namespace) -> int:
    """Choose the shards to drain (``activities.merge_choice``), say so, then drain them onto
    the others (``--dry-run``: only say so)."""
    settings = get_settings()
    try:
        move = move_options(args)
        DrainShardInput(shards=["x"], max_parallel=args.parallel, move=move)
    except ValueError as exc:
        raise CliError(f"invalid merge: {exc}".replace("\n", " ")) from exc
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        ctx = MoveContext(cat, Staging.from_settings(settings), max_threads=4, db=settings.db)
        try:
            choice = await choose_merge(ctx, args.among,
                                        traffic_span_s=settings.fleet.traffic_span_s)
        except (MergeRefused, CatalogError) as exc:
            raise CliError(str(exc)) from None
        finally:
            await ctx.close()
    print_merge_choice(choice)
    if not choice.drained:
        print("nothing to merge: every shard is needed to hold the data within its capacity")
        return 0
    if args.dry_run:
        return 0
    inp = DrainShardInput(shards=choice.drained, targets=choice.kept,
                          kind=MigrationKind.MERGE_SHARDS, max_parallel=args.parallel,
                          move=move, limits=_limits(settings))
    wf_id = args.id or f"merge-{'-'.join(choice.drained)}"
    return await _start_drain(settings, args, inp, wf_id)


async def _check_drain(settings: Settings, shards: list[str], targets: list[str]) -> None:
    """Refuse unknown shards before starting a workflow (the workflow checks the rest)."""
    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        for sid in [*shards, *targets]:
            try:
                await cat.shard(sid)
            except CatalogError as exc:
                raise CliError(str(exc)) from None


# -- rebalance and split-shard ----------------------------------------------------------------


async def _check_rebalance(settings: Settings, collections: list[str], shards: list[str]) -> None:
    """Refuse unknown collections and shards before starting (or scheduling) a workflow."""
    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        for name in collections:
            try:
                await cat.chunk_map(name)
            except CatalogError as exc:
                raise CliError(str(exc)) from None
        for sid in shards:
            try:
                info = await cat.shard(sid)
            except CatalogError as exc:
                raise CliError(str(exc)) from None
            if info.state.value != "active":
                raise CliError(f"shard {sid} is {info.state.value}; only active shards are "
                               "rebalanced")


def cmd_rebalance(args: argparse.Namespace) -> int:
    return asyncio.run(_rebalance(args))


async def _rebalance(args: argparse.Namespace) -> int:
    settings = get_settings()
    client = await temporal_client(settings)
    task_queue = args.task_queue or settings.temporal.task_queue
    if getattr(args, "pause", False) or getattr(args, "resume", False):
        await sched.pause(client, args.schedule_id, resume=args.resume,
                          note=args.note or ("resumed" if args.resume else "paused")
                          + " with shardshift rebalance")
        print(f"{'resumed' if args.resume else 'paused'} schedule {args.schedule_id}"
              + ("" if args.resume else " (runs already started continue; resume: "
                 "shardshift rebalance --resume)"))
        return 0
    if getattr(args, "schedule_info", False):
        info = await sched.schedule_status(client, args.schedule_id)
        if info is None:
            raise CliError(f"no schedule {args.schedule_id}")
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_schedule_status(info)
        return 0
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
            max_moves_per_shard=getattr(args, "max_moves_per_shard", None)
            or settings.fleet.max_moves_per_shard,
            move=move_options(args), limits=_limits(settings),
        )
    except ValueError as exc:
        raise CliError(f"invalid rebalance: {exc}".replace("\n", " ")) from exc
    await _check_rebalance(settings, inp.collections or [], inp.shards or [])
    window = getattr(args, "window", None)
    if window is not None and getattr(args, "schedule", None) is None:
        raise CliError("--window needs --schedule EVERY (the window limits when it runs)")
    if getattr(args, "schedule", None) is not None:
        try:
            spec = sched.schedule_spec(args.schedule, window, args.time_zone)
        except ValueError as exc:
            raise CliError(f"invalid schedule: {exc}") from None
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(RebalanceWorkflow.run, inp,
                                               id=args.schedule_id, task_queue=task_queue),
            spec=spec,
            # A rebalance still running when the next is due: skip the next one.
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        try:
            await client.create_schedule(args.schedule_id, schedule)
            verb = "created"
        except Exception as exc:  # the SDK raises its own "already exists" type
            if "already" not in str(exc).lower():
                raise
            handle = client.get_schedule_handle(args.schedule_id)

            async def replace(update: Any) -> Any:
                return ScheduleUpdate(schedule=schedule)

            await handle.update(replace)
            verb = "updated"
        print(f"{verb} schedule {args.schedule_id}: RebalanceWorkflow every {args.schedule} "
              f"({sched.describe_window(window)}"
              + (f" {spec.time_zone_name}" if window is not None else "")
              + f") on task queue {task_queue} (pause: shardshift rebalance --pause; delete: "
              "shardshift rebalance --unschedule)")
        return 0
    wf_id = args.id or (f"split-{split_shard}" if split_shard else "rebalance") + (
        "-dry-run" if args.dry_run else "")
    try:
        handle = await client.start_workflow(RebalanceWorkflow.run, inp, id=wf_id,
                                             task_queue=task_queue)
    except Exception as exc:
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
    print_rebalance_result(result, dry_run=args.dry_run)
    return 0
