"""``shardshift status``: the fleet at a glance (shards, moves in flight, schedules, workers).

What it reads, and how much:

* the catalog, in three reads whatever the fleet's size: the shards, ``shard_usage`` (chunks
  and active migrations per shard, aggregated in SQL) and the active migration records;
* each active or draining shard's server once, in parallel (``live_usage``: documents and
  live bytes from a count or the server's statistics and a sample; never per chunk);
* Temporal, when it answers: running workflows from visibility (moves, drains, rebalances),
  each running move's ``progress`` query (phase, rows, lag), the Schedules that start
  shardshift's workflows with their next run, and the workers polling the task queue.

Anything that cannot be read is said (``errors`` in JSON, a line of text) rather than
failing the whole report: a status is most needed when part of the fleet is down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from catalog import Catalog
from catalog.models import MigrationRecord, ShardInfo, ShardState, ShardUsage
from cli.common import CliError, catalog_dsn
from cli.render import bar, human_bytes
from cli.temporal import client as temporal_client
from cli.temporal import workers
from settings import DatabaseSettings, Settings, get_settings
from shards.names import check_collection
from shards.postgres.server import LiveUsage, live_usage, server_key
from workflows import MigrateChunkWorkflow
from workflows.common import SA_CHUNK, SA_COLLECTION, SA_PHASE, SA_SOURCE, SA_TARGET

FLEET_WORKFLOWS = ("MigrateChunkWorkflow", "DrainShardWorkflow", "RebalanceWorkflow")
QUERY_TIMEOUT_S = 3.0
MEASURE_TIMEOUT_S = 30.0


def cmd_status(args: argparse.Namespace) -> int:
    if args.collection is not None:
        try:
            check_collection(args.collection)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    report = asyncio.run(fleet_status(get_settings(), args.collection))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_status(report)
    return 0


async def fleet_status(settings: Settings, collection: str | None) -> dict[str, Any]:
    """The report ``status`` prints: ``{"shards", "moves", "operations", "schedules",
    "workers", "errors"}`` (JSON-ready)."""
    errors: list[str] = []
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        shards = await cat.list_shards()
        usage = await cat.shard_usage(collection)
        records = await cat.migrations(collection=collection, active_only=True, limit=10_000)
    live = await _measure(shards, settings.db, collection)
    temporal = await _temporal(settings, collection, errors)
    return {
        "shards": _shard_rows(shards, usage, live, collection),
        "moves": _move_rows(records, temporal["moves"], temporal["reachable"]),
        "operations": temporal["operations"],
        "schedules": temporal["schedules"],
        "workers": temporal["workers"],
        "errors": errors,
    }


# -- shards -------------------------------------------------------------------------------------


async def _measure(shards: Sequence[ShardInfo], db: DatabaseSettings,
                   collection: str | None) -> dict[str, LiveUsage | str]:
    """Each measured server once (several shard ids may share one in tests), in parallel:
    its ``LiveUsage``, or why it could not be read."""
    servers: dict[str, str] = {}
    for s in shards:
        if s.state != ShardState.RETIRED:
            servers.setdefault(server_key(s.address), db.mover(s.address))

    async def one(dsn: str) -> LiveUsage | str:
        try:
            return await asyncio.wait_for(asyncio.to_thread(live_usage, dsn, collection),
                                          MEASURE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported per shard
            text = str(exc).strip().splitlines()
            return text[0] if text else type(exc).__name__

    results = await asyncio.gather(*(one(dsn) for dsn in servers.values()))
    by_server = dict(zip(servers, results, strict=True))
    return {s.shard_id: by_server[server_key(s.address)] for s in shards
            if s.state != ShardState.RETIRED}


def _shard_rows(shards: Sequence[ShardInfo], usage: dict[str, ShardUsage],
                live: dict[str, LiveUsage | str], collection: str | None) -> list[dict[str, Any]]:
    rows = []
    for s in shards:
        u = usage.get(s.shard_id) or ShardUsage(shard_id=s.shard_id)
        measured = live.get(s.shard_id)
        ok = isinstance(measured, LiveUsage)
        live_bytes = measured.live_bytes if isinstance(measured, LiveUsage) else None
        rows.append({
            "shard_id": s.shard_id, "state": s.state.value, "engine": s.engine,
            "major_version": s.major_version,
            "server_version": measured.major_version if isinstance(measured, LiveUsage) else None,
            "address": s.address, "chunks": u.chunks, "collections": u.collections,
            "documents": measured.documents if isinstance(measured, LiveUsage) else None,
            "live_bytes": live_bytes,
            "live_exact": measured.exact if isinstance(measured, LiveUsage) else None,
            "capacity_bytes": s.capacity_bytes,
            "load": (live_bytes / s.capacity_bytes
                     if live_bytes is not None and s.capacity_bytes else None),
            "moves_in": u.moves_in, "moves_out": u.moves_out,
            "reachable": ok if s.state != ShardState.RETIRED else None,
            "error": None if ok or measured is None else measured,
            "collection": collection,
        })
    return rows


# -- Temporal -----------------------------------------------------------------------------------


async def _temporal(settings: Settings, collection: str | None,
                    errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"reachable": False, "moves": [], "operations": [], "schedules": [],
                           "workers": None}
    try:
        client = await temporal_client(settings)
    except CliError as exc:
        errors.append(str(exc))
        return out
    out["reachable"] = True
    task_queue = settings.temporal.task_queue
    try:
        out["workers"] = {"task_queue": task_queue,
                          "pollers": await workers(client, task_queue)}
    except Exception as exc:  # noqa: BLE001 - reported, the rest still shown
        errors.append(f"task queue {task_queue}: {exc}")
    query = ("ExecutionStatus = 'Running' AND WorkflowType IN ("
             + ", ".join(f"'{t}'" for t in FLEET_WORKFLOWS) + ")")
    try:
        running = [wf async for wf in client.list_workflows(query, limit=1000)]
    except Exception as exc:  # noqa: BLE001
        errors.append(f"running workflows: {exc}")
        running = []
    moves = [wf for wf in running if wf.workflow_type == "MigrateChunkWorkflow"
             and (collection is None
                  or wf.typed_search_attributes.get(SA_COLLECTION) == collection)]
    answers = await asyncio.gather(*(_progress(client, wf.id) for wf in moves))
    for wf, progress in zip(moves, answers, strict=True):
        sa = wf.typed_search_attributes
        out["moves"].append({
            "workflow_id": wf.id, "collection": sa.get(SA_COLLECTION),
            "chunk_id": int(sa.get(SA_CHUNK) or 0) or None, "source": sa.get(SA_SOURCE),
            "target": sa.get(SA_TARGET), "phase": sa.get(SA_PHASE) or "starting",
            "started_at": wf.start_time, "progress": progress,
        })
    for wf in running:
        if wf.workflow_type != "MigrateChunkWorkflow":
            out["operations"].append({
                "workflow_id": wf.id, "workflow_type": wf.workflow_type,
                "phase": wf.typed_search_attributes.get(SA_PHASE) or "starting",
                "started_at": wf.start_time,
            })
    try:
        out["schedules"] = await _schedules(client)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"schedules: {exc}")
    return out


async def _progress(client: Any, workflow_id: str) -> dict[str, Any] | None:
    handle = client.get_workflow_handle_for(MigrateChunkWorkflow.run, workflow_id)
    try:
        p = await asyncio.wait_for(handle.query(MigrateChunkWorkflow.progress), QUERY_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - no worker, or just closed: the row says so
        return None
    answer: dict[str, Any] = p.model_dump(mode="json")
    return answer


async def _schedules(client: Any) -> list[dict[str, Any]]:
    """Schedules whose action starts one of shardshift's workflows, with their next run."""
    out = []
    async for entry in await client.list_schedules():
        action = getattr(entry.schedule, "action", None) if entry.schedule else None
        wf_type = getattr(action, "workflow", None)
        if wf_type not in FLEET_WORKFLOWS:
            continue
        desc = await client.get_schedule_handle(entry.id).describe()
        spec = desc.schedule.spec
        every = [i.every.total_seconds() for i in spec.intervals]
        nxt = desc.info.next_action_times
        recent = desc.info.recent_actions
        out.append({
            "schedule_id": entry.id, "workflow_type": wf_type,
            "every_s": every[0] if len(every) == 1 else every or None,
            "paused": desc.schedule.state.paused,
            "next_run": nxt[0] if nxt else None,
            "last_run": recent[-1].started_at if recent else None,
            "running": [a.workflow_id for a in desc.info.running_actions],
        })
    return out


# -- moves --------------------------------------------------------------------------------------


def _move_rows(records: Sequence[MigrationRecord], running: list[dict[str, Any]],
               temporal_reachable: bool) -> list[dict[str, Any]]:
    """Catalog records joined with the running workflows by migration id; a workflow not
    registered yet, and a record whose workflow is gone (``shardshift doctor``), both show."""
    by_mid = {m["progress"]["migration_id"]: m for m in running
              if m["progress"] and m["progress"].get("migration_id")}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in records:
        wf = by_mid.get(r.migration_id)
        if wf is not None:
            seen.add(wf["workflow_id"])
        p = (wf or {}).get("progress") or {}
        rows.append({
            "workflow_id": wf["workflow_id"] if wf else None, "migration_id": r.migration_id,
            "kind": r.kind.value, "collection": r.collection, "chunk_id": r.chunk_id,
            "source": r.source, "target": r.target, "phase": p.get("phase") or r.phase.value,
            "rows_copied": p.get("rows_copied"), "rows_total": p.get("rows_total"),
            "lag_bytes": p.get("lag_bytes"), "lag_s": p.get("lag_s"),
            "rollback_open": p.get("rollback_open"), "waiting_for": p.get("waiting_for"),
            "detail": p.get("detail") or r.detail, "started_at": r.started_at,
            "workflow": ("running" if wf else
                         "not found (shardshift doctor)" if temporal_reachable else "unknown"),
        })
    for m in running:
        if m["workflow_id"] in seen:
            continue
        p = m["progress"] or {}
        rows.append({
            "workflow_id": m["workflow_id"], "migration_id": p.get("migration_id") or None,
            "kind": None, "collection": m["collection"], "chunk_id": m["chunk_id"],
            "source": p.get("source") or m["source"], "target": p.get("target") or m["target"],
            "phase": p.get("phase") or m["phase"], "rows_copied": p.get("rows_copied"),
            "rows_total": p.get("rows_total"), "lag_bytes": p.get("lag_bytes"),
            "lag_s": p.get("lag_s"), "rollback_open": p.get("rollback_open"),
            "waiting_for": p.get("waiting_for"), "detail": p.get("detail"),
            "started_at": m["started_at"],
            "workflow": "running" if m["progress"] else "running (no answer to progress)",
        })
    return rows


# -- text -----------------------------------------------------------------------------------------


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else "-"


def print_status(report: dict[str, Any]) -> None:
    shards = report["shards"]
    measured = [s["live_bytes"] for s in shards if s["live_bytes"] is not None]
    largest = max(measured, default=0)
    scope = f" (collection {shards[0]['collection']})" if shards and shards[0]["collection"] else ""
    print(f"SHARDS{scope}")
    print(f"{'SHARD':<24} {'STATE':<9} {'ENGINE':<12} {'CHUNKS':>6} {'DOCS':>10} {'LIVE':>10}  "
          f"{'LOAD':<36} {'IN':>3} {'OUT':>3}")
    for s in shards:
        engine = f"{s['engine']} {s['server_version'] or s['major_version']}"
        if s["live_bytes"] is None:
            live, docs = "-", "-"
            load = "retired" if s["state"] == "retired" else f"UNREACHABLE: {s['error']}"[:60]
        else:
            live, docs = human_bytes(s["live_bytes"]), str(s["documents"])
            if s["capacity_bytes"]:
                load = (f"{bar(s['live_bytes'], s['capacity_bytes'], 16)} "
                        f"{s['load'] * 100:5.1f}% of {human_bytes(s['capacity_bytes'])}")
            else:
                load = f"{bar(s['live_bytes'], largest, 16)} (no capacity; vs largest)"
        print(f"{s['shard_id'][:24]:<24} {s['state']:<9} {engine:<12} {s['chunks']:>6} "
              f"{docs:>10} {live:>10}  {load:<36} {s['moves_in']:>3} {s['moves_out']:>3}")
    if not shards:
        print("  (no shards registered: shardshift shard add, or shardshift collection create "
              "on the local stack)")
    print()
    moves = report["moves"]
    print(f"MOVES IN FLIGHT ({len(moves)})")
    for m in moves:
        parts = [f"{m['workflow_id'] or m['migration_id']}",
                 f"{m['collection']}/{m['chunk_id']}", f"{m['source']} -> {m['target']}",
                 f"{m['phase']}"]
        if m["rows_total"] is not None or m["rows_copied"]:
            parts.append(f"{bar(m['rows_copied'] or 0, m['rows_total'], 12)} "
                         f"{m['rows_copied'] or 0}/{m['rows_total'] or '?'} rows")
        if m["lag_bytes"] is not None:
            lag = f"lag {human_bytes(m['lag_bytes'])}"
            if m["lag_s"] is not None:
                lag += f" ({m['lag_s'] * 1000:.0f} ms)"
            parts.append(lag)
        if m["rollback_open"]:
            parts.append("rollback window OPEN")
        if m["waiting_for"]:
            parts.append(f"waiting for {m['waiting_for']}")
        if m["workflow"] != "running":
            parts.append(f"workflow: {m['workflow']}")
        print("  " + "  ".join(str(p) for p in parts))
    for op in report["operations"]:
        print(f"  {op['workflow_id']}  {op['workflow_type']}  {op['phase']}  "
              f"(watch: shardshift watch {op['workflow_id']})")
    print()
    print(f"SCHEDULES ({len(report['schedules'])})")
    for sc in report["schedules"]:
        every = sc["every_s"]
        every_text = f"every {every:g}s" if isinstance(every, float) else f"every {every}"
        print(f"  {sc['schedule_id']}  {sc['workflow_type']}  {every_text}  "
              f"{'PAUSED' if sc['paused'] else 'next ' + _when(sc['next_run'])}"
              f"  last {_when(sc['last_run'])}")
    w = report["workers"]
    print()
    if w is not None:
        hint = "" if w["pollers"] else " (start one: shardshift worker)"
        print(f"WORKERS  {w['pollers']} polling task queue {w['task_queue']}{hint}")
    for e in report["errors"]:
        print(f"NOT READ  {e}")
