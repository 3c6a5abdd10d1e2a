"""What the commands print: progress lines with bars, tables and results.

Nothing here talks to a server; each function formats (or prints) what it is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def bar(done: int, total: int | None, width: int = 24) -> str:
    frac = min(1.0, done / total) if total else (1.0 if total == 0 else 0.0)
    n = int(round(frac * width))
    return "[" + "#" * n + "." * (width - n) + "]"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- the local stack --------------------------------------------------------------------------


def print_status(rows: Sequence[Any], state_dir: Path, as_json: bool) -> bool:
    """``infra status``: one line per server; True when every server is healthy."""
    if as_json:
        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return bool(rows) and all(r.healthy for r in rows)
    if not rows:
        print(f"no local stack in {state_dir} (run: shardshift infra up)")
        return False
    print(f"{'SERVER':<10} {'ROLE':<9} {'ADDRESS':<17} {'VERSION':<28} {'HEALTH':<8} DETAIL")
    for r in rows:
        health = "healthy" if r.healthy else "DOWN"
        print(f"{r.name:<10} {r.role:<9} {r.address:<17} {r.version[:28]:<28} {health:<8} {r.detail[:70]}")
    return all(r.healthy for r in rows)


# -- one chunk move ---------------------------------------------------------------------------


def format_progress(p: Any, elapsed: float) -> str:
    """One line for a ``Progress``: phase, rows copied/total with a bar, lag, pause."""
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<15}"]
    total = p.rows_total
    rows = f"{p.rows_copied}/{total}" if total is not None else f"{p.rows_copied}/?"
    parts.append(f"{bar(p.rows_copied, total)} {rows} rows")
    if p.lag_bytes is not None:
        lag = f"lag {human_bytes(p.lag_bytes)}"
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
    v = getattr(r, "verification", None)
    if v is not None:
        print(f"{indent}verification       {v.buckets} buckets at {v.lsn}: "
              f"{v.mismatched_buckets} mismatched, {v.repaired_ranges} repaired"
              + (f" (report {v.verification_id}: shardshift verify --show {r.migration_id})"
                 if v.verification_id is not None else ""))


def print_moves(rows: Sequence[tuple[Any, ...]]) -> None:
    """``moves``: the ``MigrateChunkWorkflow`` executions Temporal lists."""
    print(f"{'WORKFLOW ID':<40} {'STATUS':<11} {'PHASE':<15} {'COLLECTION':<22} "
          f"{'CHUNK':<6} {'SOURCE -> TARGET':<22} STARTED")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:<11} {r[2]:<15} {r[3]:<22} {r[4]:<6} {r[5]:<22} {r[6]}")


def print_migrations(records: Sequence[Any]) -> None:
    """``moves --catalog``: the catalog's migration records."""
    print(f"{'MIGRATION ID':<44} {'COLLECTION':<22} {'CHUNK':<6} {'SOURCE -> TARGET':<22} "
          f"{'PHASE':<15} {'OUTCOME':<11} PAUSE")
    for m in records:
        pause = "-" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
        print(f"{m.migration_id:<44} {m.collection:<22} {m.chunk_id:<6} "
              f"{m.source + ' -> ' + m.target:<22} {m.phase.value:<15} "
              f"{(m.outcome.value if m.outcome else 'active'):<11} {pause}")


# -- drains, rebalances, splits ---------------------------------------------------------------


def format_drain_progress(p: Any, elapsed: float) -> str:
    """One line for a ``DrainProgress``: phase, chunks moved of total with a bar, bytes."""
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<9}"]
    if p.chunks_total:
        parts.append(f"{bar(p.chunks_done, p.chunks_total)} {p.chunks_done}/{p.chunks_total}"
                     f" chunks ({human_bytes(p.bytes_done)} of {human_bytes(p.bytes_total)})")
    if p.running:
        parts.append(f"moving {len(p.running)}")
    if p.chunks_failed:
        parts.append(f"FAILED {p.chunks_failed}")
    if p.round > 1:
        parts.append(f"round {p.round}")
    return "  ".join(parts)


def print_drain_result(result: Any) -> None:
    if getattr(result, "outcome", "completed") == "dry_run":
        print("outcome            dry_run (nothing changed)")
        for m in result.planned:
            print(f"  plan  {m.collection}/{m.chunk_id} {m.source} -> {m.target} "
                  f"({human_bytes(m.bytes)})")
        print("targets after      " + " ".join(
            f"{t}={human_bytes(b)}" for t, b in sorted(result.target_bytes_after.items())))
        return
    print(f"retired            {', '.join(result.retired) or '-'}")
    for m in result.moves:
        pause = "-" if m.pause_ms is None else f"{m.pause_ms:.1f} ms"
        print(f"  {m.collection}/{m.chunk_id:<8} {m.source} -> {m.target}  {m.outcome:<9}"
              f" {m.documents} docs  pause {pause}")


def print_merge_choice(choice: Any) -> None:
    """``shardshift merge``: which shards it keeps and drains, and why that many."""
    print(f"merge among {len(choice.considered)} shards: keep {len(choice.kept)}, "
          f"drain {len(choice.drained)} (at least {choice.lower_bound} needed for "
          f"{human_bytes(choice.bytes_total)} within the declared capacities)")
    for s in choice.considered:
        role = "drain" if s in choice.drained else "keep "
        print(f"  {role} {s:<20} {human_bytes(choice.bytes_by_shard.get(s, 0)):>10} of "
              f"{human_bytes(choice.capacity_by_shard.get(s, 0))}")
    if choice.drained:
        print(f"moves              {choice.moves} chunk(s), {human_bytes(choice.bytes_moved)}")


def format_rebalance_progress(p: Any, elapsed: float) -> str:
    parts = [f"{elapsed:6.1f}s", f"{p.phase:<9}"]
    if p.loads:
        parts.append("load " + " ".join(f"{s}={human_bytes(b)}" for s, b in sorted(p.loads.items())))
    if p.chunks_total:
        parts.append(f"{bar(p.chunks_done, p.chunks_total)} {p.chunks_done}/{p.chunks_total}"
                     " moves")
    if p.splits_done:
        parts.append(f"{p.splits_done} split(s)")
    if p.chunks_failed:
        parts.append(f"FAILED {p.chunks_failed}")
    return "  ".join(parts)


def print_rebalance_result(result: Any, *, dry_run: bool) -> None:
    print(f"outcome            {getattr(result, 'outcome', 'completed')}"
          + (" (nothing changed)" if dry_run else ""))
    print("load before        " + " ".join(f"{s}={human_bytes(b)}"
                                          for s, b in sorted(result.loads_before.items())))
    print(("load planned       " if dry_run else "load after         ")
          + " ".join(f"{s}={human_bytes(b)}" for s, b in sorted(result.loads_after.items())))
    for sp in result.splits:
        why = " (too hot for one shard)" if getattr(sp, "reason", "size") == "hot" else ""
        print(f"  split {sp.collection}/{sp.chunk_id} on {sp.shard}{why}")
    for m in result.planned:
        ops = getattr(m, "ops_per_s", 0.0)
        print(f"  plan  {m.collection}/{m.chunk_id} {m.source} -> {m.target} "
              f"({human_bytes(m.bytes)}" + (f", {ops:.1f} ops/s)" if ops else ")"))
    for m in result.moves:
        print(f"  moved {m.collection}/{m.chunk_id} {m.source} -> {m.target} {m.outcome}")


# -- collections ------------------------------------------------------------------------------


def print_chunk_map(name: str, shard_key: str, cmap: Any) -> None:
    """``collection create``: the collection and where each of its chunks lives."""
    print(f"collection {name} (shard key {shard_key!r}, "
          f"{len(cmap.collection.indexes)} indexes): {len(cmap.chunks)} chunks")
    print(f"{'CHUNK':<6} {'SHARD':<10} {'TOKEN':<6} RANGE")
    for c in cmap.chunks:
        print(f"{c.chunk_id:<6} {c.shard_id:<10} {c.token:<6} [{c.range.lo}, {c.range.hi})")


# -- verification reports, invariants, the rebalancer's schedule ------------------------------


def print_verifications(reports: Sequence[Any], *, detail: bool = False) -> None:
    """``verify``: one line per chunk (and with ``detail`` every field of each report)."""
    print(f"{'REPORT':<7} {'KIND':<9} {'CHUNK':<24} {'SHARD':<22} {'DOCS':>8} {'BUCKETS':>7} "
          f"{'MISMATCH':>8} {'REPAIRED':>8} {'ORPHANS':>7} {'DIGEST':<16} RESULT")
    for r in reports:
        where = r.shard_id if r.source is None else f"{r.source} -> {r.shard_id}"
        print(f"{r.verification_id or '-':<7} {r.kind.value:<9} "
              f"{r.collection + '/' + str(r.chunk_id):<24} {where:<22} {r.documents:>8} "
              f"{r.buckets:>7} {r.mismatched_buckets:>8} {r.repaired_ranges:>8} "
              f"{sum(r.orphans.values()):>7} {r.digest or '-':<16} "
              f"{'ok' if r.ok else 'NOT OK'}")
        if r.detail:
            print(f"        {r.detail}")
        if detail:
            print(f"        migration {r.migration_id or '-'}  lsn {r.lsn or '-'}  rounds "
                  f"{r.rounds}  {r.seconds:.2f}s  at {r.created_at:%Y-%m-%d %H:%M:%S}")


def print_violations(found: Sequence[Any], collection: str | None) -> None:
    """``catalog check``: each broken invariant, or that there is none."""
    scope = f"collection {collection}" if collection else "every collection"
    if not found:
        print(f"catalog check: {scope}: layout and fences consistent")
        return
    print(f"catalog check: {scope}: {len(found)} violation(s)")
    for v in found:
        print(f"  {v.kind.value:<15} {v.message}")


def print_schedule_status(info: dict[str, Any]) -> None:
    """``rebalance --schedule-info``: paused or not, when it runs next."""
    state = "PAUSED" + (f" ({info['note']})" if info.get("note") else "") if info["paused"] \
        else "active"
    print(f"schedule {info['schedule_id']}: {state}")
    if info["every"]:
        print("  every      " + ", ".join(f"{s:g}s" for s in info["every"]))
    if info["calendars"]:
        print(f"  window     {info['calendars']} calendar entries ({info['time_zone'] or 'UTC'})")
    print("  next runs  " + (", ".join(info["next_runs"]) or "-"))
    print("  last runs  " + (", ".join(info["recent_runs"]) or "-"))

