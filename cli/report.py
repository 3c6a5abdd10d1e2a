"""``shardshift report ID [--json] [--plot FILE.png]``: what one move, drain or rebalance did.

For a move (its workflow id or its migration id) the summary comes from the catalog: the
migration record (outcome, pause) and the timeline its activities recorded
(``catalog.timeline``: rows copied, replication lag, phase starts, verify and cutover marks).
For a drain or rebalance (its workflow id): the bytes per shard its activities measured before
its first plan and after its last measurement, and the moves it ran.

An id is resolved in this order: a migration id in the catalog; a workflow Temporal knows
(the migration id of a move is derived from its first run); without Temporal, the catalog's
records alone (the newest move or operation under that workflow id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from activities.models import Direction
from catalog import Catalog, UnknownMigrationError
from catalog.models import MigrationRecord
from catalog.timeline import LoadStage, MarkName, MoveSample, SampleKind, ShardLoad
from cli.common import CliError, catalog_dsn
from cli.render import human_bytes
from cli.report_models import (
    CopyPoint,
    FleetMove,
    FleetReport,
    LagPoint,
    Mark,
    MoveReport,
    PhaseSpan,
    ShardBytes,
)
from cli.temporal import client as temporal_client
from settings import Settings, get_settings
from workflows.migrate_chunk import migration_id_for

TEMPORAL_TIMEOUT_S = 5.0
"""How long the report waits for Temporal before resolving an id from the catalog alone."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")
"""The alphabet of migration ids and of the workflow ids the catalog records loads under."""
_RUN_SUFFIX = re.compile(r"\.[0-9a-f]{12}")
_CHILD_SUFFIX = re.compile(r"_[0-9]+\.[0-9a-f]{12}")


def _t(at: datetime, start: datetime) -> float:
    return round((at - start).total_seconds(), 3)


def move_report(record: MigrationRecord, samples: list[MoveSample], *,
                workflow_id: str | None = None, now: datetime | None = None) -> MoveReport:
    """A move's summary and timeline from its catalog record and recorded samples."""
    start = record.started_at
    end = record.finished_at
    marks = sorted((s for s in samples if s.kind == SampleKind.MARK), key=lambda s: s.at)
    phase_marks = [m for m in marks if m.name.startswith("phase.")]
    phases: list[PhaseSpan] = []
    for i, m in enumerate(phase_marks):
        nxt = phase_marks[i + 1].at if i + 1 < len(phase_marks) else end
        phases.append(PhaseSpan(phase=m.name.removeprefix("phase."), started_at=m.at,
                                seconds=None if nxt is None else
                                round(max(0.0, (nxt - m.at).total_seconds()), 3)))
    copies = [CopyPoint(at=s.at, t=_t(s.at, start), rows=s.rows, rate=s.rate)
              for s in samples if s.kind == SampleKind.COPY]
    lags = [LagPoint(at=s.at, t=_t(s.at, start), direction=s.name, lag_bytes=s.lag_bytes,
                     lag_s=s.lag_s) for s in samples if s.kind == SampleKind.LAG]
    rates = [c.rate for c in copies if c.rate is not None]
    lag_bytes = [p.lag_bytes for p in lags if p.lag_bytes is not None]
    lag_s = [p.lag_s for p in lags if p.lag_s is not None]
    rows = next((c.rows for c in reversed(copies) if c.rows is not None), None)
    until = end or now or datetime.now(UTC)
    return MoveReport(
        migration_id=record.migration_id, workflow_id=workflow_id, move_kind=record.kind.value,
        collection=record.collection, chunk_id=record.chunk_id, source=record.source,
        target=record.target, phase=record.phase.value,
        outcome=record.outcome.value if record.outcome else None, detail=record.detail,
        started_at=start, finished_at=end, seconds=round((until - start).total_seconds(), 3),
        phases=phases, rows=rows,
        copy_rate_peak=max(rates) if rates else None,
        lag_bytes_peak=max(lag_bytes) if lag_bytes else None,
        lag_s_peak=max(lag_s) if lag_s else None,
        cutover_attempts=sum(1 for m in marks if m.name == MarkName.CUTOVER_START
                             and m.detail == Direction.FORWARD),
        # A commit's detail is its direction, then (since December 2026) its steps' times.
        pause_ms=next((m.value for m in reversed(marks) if m.name == MarkName.CUTOVER_COMMIT
                       and (m.detail or "").split(":", 1)[0] == Direction.FORWARD
                       and m.value is not None), record.pause_ms),
        marks=[Mark(at=m.at, t=_t(m.at, start), name=m.name, value=m.value, detail=m.detail)
               for m in marks],
        copy_samples=copies, lag_samples=lags,
    )


def fleet_report(operation_id: str, loads: list[ShardLoad], moves: list[MigrationRecord], *,
                 status: str | None = None) -> FleetReport:
    """A drain's or rebalance's bytes per shard before and after, and its moves."""
    before = {x.shard_id: x for x in loads if x.stage == LoadStage.BEFORE}
    after = {x.shard_id: x for x in loads if x.stage == LoadStage.AFTER}
    return FleetReport(
        kind=loads[0].kind if loads else "unknown", operation_id=operation_id,
        first_run_id=loads[0].first_run_id if loads else "", status=status,
        measured_before=min((x.measured_at for x in before.values()), default=None),
        measured_after=max((x.measured_at for x in after.values()), default=None),
        shards=[ShardBytes(shard=s, before=before[s].bytes if s in before else None,
                           after=after[s].bytes if s in after else None)
                for s in sorted(set(before) | set(after))],
        moves=[FleetMove(migration_id=m.migration_id, collection=m.collection,
                         chunk_id=m.chunk_id, source=m.source, target=m.target,
                         outcome=m.outcome.value if m.outcome else None, pause_ms=m.pause_ms)
               for m in sorted(moves, key=lambda m: m.started_at)],
    )


def workflow_base(workflow_id: str) -> str:
    """The part of a move's migration id that comes from its workflow id."""
    return migration_id_for(workflow_id, "0" * 12).rsplit(".", 1)[0]


# -- printing -----------------------------------------------------------------------------------


def print_move_report(r: MoveReport) -> None:
    print(f"move {r.migration_id}" + (f" (workflow {r.workflow_id})" if r.workflow_id else ""))
    print(f"  {r.move_kind} of {r.collection}/{r.chunk_id}: {r.source} -> {r.target}")
    outcome = r.outcome or f"running (phase {r.phase})"
    print(f"  outcome            {outcome}" + (f" ({r.detail})" if r.detail else ""))
    print(f"  took               {r.seconds:.1f} s")
    for p in r.phases:
        took = "running" if p.seconds is None else f"{p.seconds:.2f} s"
        print(f"    {p.phase:<16} {took}")
    print(f"  rows copied        {'-' if r.rows is None else r.rows}"
          + ("" if r.copy_rate_peak is None else f" (peak {r.copy_rate_peak:.0f} rows/s)"))
    lag = "-" if r.lag_bytes_peak is None else human_bytes(r.lag_bytes_peak)
    if r.lag_s_peak is not None:
        lag += f", {r.lag_s_peak * 1000:.0f} ms"
    print(f"  lag peak           {lag}")
    pause = "-" if r.pause_ms is None else f"{r.pause_ms:.1f} ms"
    print(f"  cutover pause      {pause} (attempts: {r.cutover_attempts})")
    print(f"  samples            {len(r.copy_samples)} copy, {len(r.lag_samples)} lag, "
          f"{len(r.marks)} marks")


def print_fleet_report(r: FleetReport) -> None:
    print(f"{r.kind} {r.operation_id}" + (f" ({r.status})" if r.status else ""))
    print(f"  {'SHARD':<24} {'BEFORE':>12} {'AFTER':>12}")
    for s in r.shards:
        before = "-" if s.before is None else human_bytes(s.before)
        after = "-" if s.after is None else human_bytes(s.after)
        print(f"  {s.shard:<24} {before:>12} {after:>12}")
    for m in r.moves:
        pause = "-" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
        print(f"  moved {m.collection}/{m.chunk_id} {m.source} -> {m.target} "
              f"{m.outcome or 'running'} pause {pause}")


# -- resolving an id ----------------------------------------------------------------------------


class _Found(BaseModel):
    kind: str
    """move or fleet."""
    key: str
    """The migration id (move) or the workflow id (fleet)."""
    workflow_id: str | None = None
    first_run_id: str | None = None
    status: str | None = None


async def _describe(settings: Settings, workflow_id: str) -> _Found | None:
    """What Temporal knows of a workflow id, or None (unknown id, or no Temporal)."""
    try:
        async with asyncio.timeout(TEMPORAL_TIMEOUT_S):
            client = await temporal_client(settings)
            desc = await client.get_workflow_handle(workflow_id).describe()
    except Exception:  # noqa: BLE001 - unknown id or unreachable: the catalog answers
        return None
    first = desc.raw_description.workflow_execution_info.first_run_id or desc.run_id
    status = desc.status.name.lower() if desc.status else None
    if desc.workflow_type == "MigrateChunkWorkflow":
        return _Found(kind="move", key=migration_id_for(workflow_id, first),
                      workflow_id=workflow_id, first_run_id=first, status=status)
    if desc.workflow_type in ("DrainShardWorkflow", "RebalanceWorkflow"):
        return _Found(kind="fleet", key=workflow_id, workflow_id=workflow_id,
                      first_run_id=first, status=status)
    raise CliError(f"{workflow_id} is a {desc.workflow_type}, not a move, drain or rebalance")


async def resolve(cat: Catalog, settings: Settings, ident: str, *,
                  use_temporal: bool = True) -> _Found:
    catalog_id = _ID.fullmatch(ident) is not None  # else only Temporal can know it
    if catalog_id:
        try:
            await cat.migration(ident)
            return _Found(kind="move", key=ident)
        except UnknownMigrationError:
            pass  # not a migration id: a workflow id, then
    found = await _describe(settings, ident) if use_temporal else None
    if found is not None:
        return found
    if catalog_id and await cat.shard_loads(ident):
        return _Found(kind="fleet", key=ident, workflow_id=ident)
    base = workflow_base(ident)
    moves = [m for m in await cat.migrations_with_prefix(base + ".")
             if _RUN_SUFFIX.fullmatch(m.migration_id[len(base):])]
    if moves:
        return _Found(kind="move", key=moves[0].migration_id, workflow_id=ident)
    raise CliError(f"no move, drain or rebalance with the id {ident!r} (in the catalog"
                   + (" or Temporal)" if use_temporal else ")"))


async def build(cat: Catalog, settings: Settings, ident: str, *,
                use_temporal: bool = True) -> MoveReport | FleetReport:
    """The report of a move, drain or rebalance (``ident``: a workflow or migration id)."""
    found = await resolve(cat, settings, ident, use_temporal=use_temporal)
    if found.kind == "move":
        try:
            record = await cat.migration(found.key)
        except UnknownMigrationError:
            raise CliError(f"{ident}: Temporal knows the move, but the catalog has no record "
                           f"{found.key} (it never registered)") from None
        return move_report(record, await cat.move_samples(found.key),
                           workflow_id=found.workflow_id)
    loads = await cat.shard_loads(found.key, found.first_run_id)
    base = workflow_base(found.key)
    moves = [m for m in await cat.migrations_with_prefix(base + "_", limit=1000)
             if _CHILD_SUFFIX.fullmatch(m.migration_id[len(base):])]
    if loads:
        first = min(x.measured_at for x in loads)
        moves = [m for m in moves if m.started_at >= first]
    return fleet_report(found.key, loads, moves, status=found.status)


# -- the command --------------------------------------------------------------------------------


def check_plot_path(path: Path) -> Path:
    """Refuse a plot path that cannot be written before anything is read."""
    if path.suffix.lower() != ".png":
        raise CliError(f"--plot {path}: the plot is a PNG file (name it *.png)")
    if not path.parent.is_dir():
        raise CliError(f"--plot {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise CliError(f"--plot {path}: is a directory")
    return path


def write_plot(report: MoveReport | FleetReport, path: Path) -> Path:
    from cli.plot import plot_fleet, plot_move  # noqa: PLC0415 - matplotlib only when asked

    if isinstance(report, MoveReport):
        plot_move(report, path)
    else:
        plot_fleet(report, path)
    report.plot = str(path)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    return asyncio.run(_report(args))


async def _report(args: argparse.Namespace) -> int:
    settings = get_settings()
    plot = check_plot_path(args.plot) if args.plot else None
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        await cat.ensure_schema()
        report = await build(cat, settings, args.id)
    if plot is not None:
        write_plot(report, plot)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        if isinstance(report, MoveReport):
            print_move_report(report)
        else:
            print_fleet_report(report)
        if plot is not None:
            print(f"  plot               {plot}")
    return 0


__all__ = ["FleetReport", "MoveReport", "build", "check_plot_path", "cmd_report",
           "fleet_report", "move_report", "resolve", "workflow_base",
           "write_plot"]
