"""The fault matrix: chunk moves under load with a fault injected in each phase.

    python -m bench.faults [--quick] [--phases replicate,cutover] [--faults worker_kill,...]
                           [--long-s 200] [--short-s 5] [--shards 8] [--json-out runs.json]

Starts a private stack of its own (catalog, ``--shards`` PostgreSQL 18 shards, a Temporal dev
server; all removed at the end, also on Ctrl-C), and for every (phase, fault) cell runs one
move under load as ``bench.faultkit`` describes: the move is pinned in the phase, the fault
injected, the move's end awaited, and the run judged (outcome, lost writes, leaked slots,
invalid layout).

Phases: snapshot, import, replicate, verify, cutover, rollback_window, cleanup. Faults:
worker_kill, target_stop / source_stop / catalog_stop (``--short-s``), their ``_long``
variants (``--long-s``, past the activities' retry budget), target_lost, walsender_kill,
temporal_restart, router_restart. A cell that cannot be meaningful is ``n/a`` (losing the
target after the commit point loses the chunk by definition; no walsender exists in import
and cleanup).

Overlap: runs use disjoint shard pairs, so up to ``--shards / 2`` run at once; a fault that
hits the whole stack (the catalog or Temporal) is injected *once* into a group of runs held
in different phases (import, replicate, verify, rollback window, cleanup) on different pairs,
so each run's outcome is still attributable to one (phase, fault); snapshot and cutover get
an injection of their own.

Prints a table phase x fault -> outcome on stderr and ONE JSON line on stdout: ``runs``,
``completed``, ``aborted_clean``, ``failed``, ``lost_writes``, ``leaked_slots`` (slots,
publications and origins left), ``invalid_layouts`` (runs with a catalog/fence violation),
``client_errors``, ``faults``, ``phases``, ``seconds``, ``details`` (the per-run JSON file,
when ``--json-out`` is given). Exit code 0 when every run completed or aborted clean and the
three counts are 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.faultkit import (
    GLOBAL_FAULTS,
    PHASES,
    Fault,
    MoveRun,
    Rig,
    RunConfig,
    RunResult,
    applicable,
)

CO_INJECTABLE = ["import", "replicate", "verify", "rollback_window", "cleanup"]
"""Phases a move can wait in for a shared injection (their pins hold, or last long)."""

QUICK = [
    ("replicate", Fault.WORKER_KILL), ("import", Fault.TARGET_STOP),
    ("cutover", Fault.WORKER_KILL), ("verify", Fault.WALSENDER_KILL),
    ("snapshot", Fault.SOURCE_STOP), ("rollback_window", Fault.ROUTER_RESTART),
    ("cleanup", Fault.CATALOG_STOP), ("replicate", Fault.TEMPORAL_RESTART),
]
"""``--quick``: every phase once, most fault kinds once, short outages only."""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def plan(phases: list[str], faults: list[Fault]) -> tuple[list[list[tuple[str, Fault]]],
                                                         list[RunResult]]:
    """Batches of cells (a batch of global-fault cells shares one injection) and n/a cells."""
    batches: list[list[tuple[str, Fault]]] = []
    skipped: list[RunResult] = []
    for fault in faults:
        cells = []
        for phase in phases:
            why = applicable(phase, fault)
            if why:
                skipped.append(RunResult(phase=phase, fault=fault.value, outcome="n/a", why=why))
            else:
                cells.append((phase, fault))
        if fault in GLOBAL_FAULTS:
            group = [c for c in cells if c[0] in CO_INJECTABLE]
            if group:
                batches.append(group)
            batches += [[c] for c in cells if c[0] not in CO_INJECTABLE]
        else:
            batches += [[c] for c in cells]
    # Local faults first (they overlap freely), the stack-wide ones after.
    batches.sort(key=lambda b: b[0][1] in GLOBAL_FAULTS)
    return batches, skipped


async def run_matrix(rig: Rig, cfg: RunConfig, batches: list[list[tuple[str, Fault]]],
                     parallel: int) -> list[RunResult]:
    pairs = rig.pairs()[:max(1, parallel)]
    free = list(pairs)
    cond = asyncio.Condition()
    results: list[RunResult] = []
    tasks: list[asyncio.Task[None]] = []
    counter = iter(range(1, 10**6))

    async def solo(phase: str, fault: Fault, pair: tuple[str, str]) -> None:
        run = MoveRun(rig, cfg, phase, fault, pair, f"{next(counter)}", log)
        results.append(await run.run())

    async def shared(cells: list[tuple[str, Fault]], taken: list[tuple[str, str]]) -> None:
        """One stack-wide fault injected once into runs held in different phases."""
        fault = cells[0][1]
        runs = [MoveRun(rig, cfg, ph, f, pair, f"{next(counter)}", log)
                for (ph, f), pair in zip(cells, taken, strict=False)]
        go = asyncio.Event()
        readies = [asyncio.Event() for _ in runs]
        tasks_ = [asyncio.create_task(r.run(go, rd)) for r, rd in zip(runs, readies, strict=True)]
        try:
            await inject_shared(runs, readies, tasks_, go, fault)
        except BaseException:
            for t in tasks_:
                t.cancel()
            await asyncio.gather(*tasks_, return_exceptions=True)
            raise
        finally:
            for r in runs:
                r.fault_over.set()
        results.extend(await asyncio.gather(*tasks_))

    async def inject_shared(runs: list[MoveRun], readies: list[asyncio.Event],
                            tasks_: list[asyncio.Task[RunResult]], go: asyncio.Event,
                            fault: Fault) -> None:
        waiting = [asyncio.create_task(rd.wait()) for rd in readies]
        # Wait until every run is held in its phase (or has failed before getting there).
        while not all(rd.is_set() or t.done() for rd, t in zip(readies, tasks_, strict=True)):
            await asyncio.wait([*waiting, *tasks_], return_when=asyncio.FIRST_COMPLETED,
                               timeout=1.0)
        for w in waiting:
            w.cancel()
        # Each run's phase at the moment of the fault, then the fault; the pins are released
        # (``go``) while it lasts, as a solo run's are.
        for r in runs:
            p = await r.progress()
            r.result.landed = p.phase if p else None
        log(f"shared {fault.value} into {[(r.phase, r.result.landed) for r in runs]}")
        if fault == Fault.TEMPORAL_RESTART:
            rig.down.add("temporal")
            await asyncio.to_thread(rig.stack.temporal.stop)
            go.set()
            await rig.restart_temporal()
        else:
            await rig.stop_pg("catalog")
            go.set()
            await asyncio.sleep(cfg.long_s if fault == Fault.CATALOG_STOP_LONG else cfg.short_s)
            await rig.start_pg("catalog")
        for r in runs:
            r.fault_over.set()

    async def launch(batch: list[tuple[str, Fault]], taken: list[tuple[str, str]]) -> None:
        try:
            if len(batch) == 1:
                await solo(batch[0][0], batch[0][1], taken[0])
            else:
                await shared(batch, taken)
        finally:
            async with cond:
                free.extend(taken)
                cond.notify_all()

    try:
        await _dispatch(batches, pairs, free, cond, tasks, launch)
        await asyncio.gather(*tasks)
    finally:
        # Interrupted (Ctrl-C): every run still going is cancelled and awaited here, inside
        # the stack's lifetime (each kills its worker process on the way out).
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def _dispatch(batches: list[list[tuple[str, Fault]]], pairs: list[tuple[str, str]],
                    free: list[tuple[str, str]], cond: asyncio.Condition,
                    tasks: list[asyncio.Task[None]], launch: Any) -> None:
    """Start each batch once its shard pairs are free (a stack-wide fault: all of them)."""
    for batch in batches:
        exclusive = batch[0][1] in GLOBAL_FAULTS
        # A stack-wide fault runs alone; a group of more runs than pairs is split.
        for i in range(0, len(batch), len(pairs)):
            part = batch[i:i + len(pairs)]
            async with cond:
                def room(ex: bool = exclusive) -> bool:
                    return len(free) == len(pairs) if ex else bool(free)

                await cond.wait_for(room)
                taken = free[:len(part)] if exclusive else [free[0]]
                for p in taken:
                    free.remove(p)
            tasks.append(asyncio.create_task(launch(part, taken)))
            if exclusive:
                async with cond:  # the next batch waits for this one to give the pairs back
                    await cond.wait_for(lambda: len(free) == len(pairs))


def table(results: list[RunResult], phases: list[str], faults: list[Fault]) -> str:
    short = {"completed": "ok", "aborted_clean": "abort", "failed": "FAIL", "n/a": "n/a"}
    by = {(r.phase, r.fault): r for r in results}
    width = max(14, *(len(f.value) + 1 for f in faults))
    lines = ["phase".ljust(16) + "".join(f.value.ljust(width) for f in faults)]
    for ph in phases:
        row = ph.ljust(16)
        for f in faults:
            r = by.get((ph, f.value))
            if r is None:
                cell = "-"
            else:
                cell = short.get(r.outcome, r.outcome)
                flags = ("L" if r.lost_writes else "") + ("S" if r.leaked else "") + \
                    ("I" if r.violations else "")
                if flags:
                    cell += f"[{flags}]"
                if r.landed and r.outcome != "n/a" and r.landed != ph:
                    cell += f"@{r.landed}"
            row += cell.ljust(width)
        lines.append(row)
    lines.append("ok: completed, abort: aborted clean, FAIL: see why; [L] lost writes, [S] leaked "
                 "slots/publications/origins, [I] invalid layout; @phase: where the fault landed "
                 "when not in the wanted phase")
    fails = [r for r in results if r.outcome == "failed"]
    for r in fails:
        lines.append(f"  FAIL {r.phase}/{r.fault}: {r.why}"
                     + (f"; lost {r.lost_samples}" if r.lost_writes else "")
                     + (f"; leaked {r.leaked}" if r.leaked else "")
                     + (f"; layout {r.violations[:2]}" if r.violations else ""))
    return "\n".join(lines)


def summary(results: list[RunResult], faults: list[Fault], phases: list[str], seconds: float,
            details: str | None) -> dict[str, Any]:
    ran = [r for r in results if r.outcome != "n/a"]
    return {
        "runs": len(ran),
        "completed": sum(r.outcome == "completed" for r in ran),
        "aborted_clean": sum(r.outcome == "aborted_clean" for r in ran),
        "failed": sum(r.outcome == "failed" for r in ran),
        "lost_writes": sum(r.lost_writes for r in ran),
        "leaked_slots": sum(len(r.leaked) for r in ran),
        "invalid_layouts": sum(1 for r in ran if r.violations),
        "client_errors": sum(r.client_errors for r in ran),
        "faults": [f.value for f in faults],
        "phases": phases,
        "not_applicable": len(results) - len(ran),
        "seconds": round(seconds, 1),
        "details": details,
    }


async def doctor_after(rig: Rig, work: Path) -> dict[str, Any]:
    """``shardshift doctor`` on the stack once every run has ended: what the failures left
    (by design only what a lost target kept: its fence, partial rows, stream state), the
    repair, and a second look that must find nothing."""
    from activities.doctor import Doctor
    from shards.staging import Staging
    from worker import TemporalMoveProbe

    staging = Staging(str(work / "doctor-staging"))  # runs stage under their own dirs
    found = await Doctor(rig.catalog, staging, TemporalMoveProbe(rig.client)).run(repair=True)
    left = await Doctor(rig.catalog, staging, TemporalMoveProbe(rig.client)).run()
    kinds: dict[str, int] = {}
    for f in found.findings:
        kinds[f.kind.value] = kinds.get(f.kind.value, 0) + 1
    for f in left.findings:
        log(f"doctor: left {f.kind.value} {f.shard} {f.object}: {f.detail}")
    log(f"doctor: {len(found.findings)} finding(s) {kinds}, "
        f"{sum(f.repaired for f in found.findings)} repaired; after: {len(left.findings)} left")
    return {"doctor_found": len(found.findings), "doctor_found_kinds": kinds,
            "doctor_repaired": sum(f.repaired for f in found.findings),
            "doctor_left": len(left.findings)}


async def amain(args: argparse.Namespace, phases: list[str], faults: list[Fault],
                cells: list[tuple[str, Fault]] | None,
                ) -> tuple[list[RunResult], float, dict[str, Any]]:
    from catalog.local_stack import private_stack
    from infra.private import new_state_dir

    cfg = RunConfig(short_s=args.short_s, long_s=args.long_s, give_up_s=args.give_up_s,
                    settle_s=args.settle_s, preload=args.preload)
    if cells is not None:
        batches, skipped = [], []
        for ph, f in cells:
            why = applicable(ph, f)
            if why:
                skipped.append(RunResult(phase=ph, fault=f.value, outcome="n/a", why=why))
            else:
                batches.append([(ph, f)])
        batches.sort(key=lambda b: b[0][1] in GLOBAL_FAULTS)
    else:
        batches, skipped = plan(phases, faults)
    # SIGTERM ends the run as Ctrl-C does: the main task is cancelled, every run kills its
    # worker, the stack is stopped and removed on the way out.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    log(f"{sum(len(b) for b in batches)} runs in {len(batches)} batches, {len(skipped)} n/a")
    work = new_state_dir("shardshift-faults-work-")
    t0 = time.monotonic()
    try:
        with private_stack(args.shards, prefix="shardshift-faults-") as stack:
            rig = await Rig.open(stack, work)
            try:
                results = await run_matrix(rig, cfg, batches, args.shards // 2)
                doctor = await doctor_after(rig, work)
            finally:
                await rig.close()
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return results + skipped, time.monotonic() - t0, doctor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--faults", default=",".join(f.value for f in Fault))
    parser.add_argument("--quick", action="store_true",
                        help="a short subset: every phase once, short outages (a few minutes)")
    parser.add_argument("--short-s", type=float, default=5.0, help="a brief outage (s)")
    parser.add_argument("--long-s", type=float, default=200.0,
                        help="a long outage, past the activities' retry budget (s)")
    parser.add_argument("--give-up-s", type=float, default=60.0,
                        help="target_give_up_s of target_lost runs (when the workflow has it)")
    parser.add_argument("--settle-s", type=float, default=240.0,
                        help="how long a move may take to end after its fault is over (s)")
    parser.add_argument("--preload", type=int, default=20_000,
                        help="documents preloaded in each moving chunk")
    parser.add_argument("--shards", type=int, default=10,
                        help="PostgreSQL shards of the private stack (runs use disjoint pairs)")
    parser.add_argument("--json-out", type=Path, help="per-run details (JSON)")
    args = parser.parse_args(argv)
    if args.shards < 2:
        parser.error("--shards must be at least 2")
    if args.quick:
        cells: list[tuple[str, Fault]] | None = list(QUICK)
        phases = PHASES
        faults = list(dict.fromkeys(f for _, f in QUICK))
    else:
        cells = None
        phases = [p for p in args.phases.split(",") if p]
        bad = sorted(set(phases) - set(PHASES))
        if bad:
            parser.error(f"unknown phases {bad}; choose from {PHASES}")
        try:
            faults = [Fault(f) for f in args.faults.split(",") if f]
        except ValueError as exc:
            parser.error(f"{exc}; choose from {[f.value for f in Fault]}")

    # Pools and listeners warn on every reconnect while a server is down, which faults do on
    # purpose: keep stderr for the progress lines.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    try:
        results, seconds, doctor = asyncio.run(amain(args, phases, faults, cells))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: runs cancelled, workers killed, stack removed")
        return 130
    details = None
    if args.json_out:
        args.json_out.write_text(json.dumps([r.model_dump() for r in results], indent=2))
        details = str(args.json_out)
    print(table(results, phases, faults), file=sys.stderr)
    out = summary(results, faults, phases, seconds, details) | doctor
    print(json.dumps(out))
    ok = (out["failed"] == 0 and out["lost_writes"] == 0 and out["leaked_slots"] == 0
          and out["invalid_layouts"] == 0 and out["doctor_left"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
