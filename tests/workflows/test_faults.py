"""Chunk moves under load that survive faults: a worker SIGKILLed in every phase, the target
PostgreSQL stopped during the bulk import, the source's walsender terminated while replicating.

Every test ends with the same proof as ``test_migrate``: the move completed and verified, the
catalog places the chunk on the target, and the checker finds nothing lost, altered,
duplicated or resurrected, with zero client-visible errors (unknown outcomes are fine).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
from temporalio.client import Client, WorkflowHandle

from activities.replicate import HOLD_LAG_ENV, lag_held
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import Settings
from shards.models import FenceState
from shards.postgres import PostgresShard
from shards.postgres import replication as repl
from tests.router.conftest import Deployment, router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import FAULT_FAST, assert_moved, load_on, pick, start_move, wait_until
from tests.workflows.procs import (
    Gate,
    LagHold,
    WorkerProcess,
    activity_runs,
    count_rows,
    freeze_marker_gate,
    import_gate,
    phase_index,
    poll_progress,
    preload_chunk,
    snapshot_gate,
    timeline,
    wait_polling,
    wait_slot_creation_waiting,
    worker_running,
)
from workload.checker import max_write_gaps

BIG = {**FAULT_FAST, "part_rows": 100}
"""For moves whose copy phases must last long enough to be hit (a preloaded chunk)."""
SMALL = {**FAULT_FAST, "part_rows": 500}
PRELOAD = 8000
RESULT_TIMEOUT_S = 120.0
PARTS_Q = "SELECT count(*) FROM shardshift.import_parts WHERE migration_id = %s"


# -- 1. a worker process is SIGKILLed in each phase ---------------------------------------------
#
# Two worker processes poll the task queue, as in production; the one running the phase's
# activity is killed, and the other (warm, already polling) takes the retry over. Each phase
# has a gate that holds the move there until the kill has landed, and the history proves it
# did: the activity ran again, on the other worker. A fault that misses fails the test.

KILLED_IN = {"snapshot": "migrate.snapshot", "import": "migrate.bulk_import",
             "replicate": "migrate.replicate", "cutover": "migrate.cutover"}
"""The activity whose worker is killed in each phase."""


def two_workers(settings: Settings, tmp_path: Path, hold: LagHold) -> list[WorkerProcess]:
    # Both use one staging directory on this host: shared, so either may take a retry over
    # (workers with staging of their own are ``test_many_hosts``).
    shared = settings.model_copy(update={"staging_shared": True})
    return [WorkerProcess(shared, tmp_path / f"worker-{i}.log", hold.env).start()
            for i in range(2)]


async def killed_and_retried(handle: WorkflowHandle[Any, Any], activity: str,
                             workers: list[WorkerProcess], victim: WorkerProcess) -> None:
    """The kill landed inside ``activity``: it ran again, to its end, on the other worker."""
    runs = await activity_runs(handle, activity)
    (standby,) = [w for w in workers if w is not victim]
    assert any(attempt >= 2 and standby.runs(identity) for attempt, identity in runs), \
        (activity, runs, await timeline(handle))


@pytest.mark.parametrize("phase", ["snapshot", "import", "replicate"])
async def test_worker_killed(phase: str, deployment: Deployment, worker_settings: Settings,
                             temporal_client: Client, tmp_path: Path) -> None:
    """(The cutover's kill is ``test_worker_killed_inside_cutover_pause``.)"""
    moving, target, other = pick(deployment)
    source_dsn, target_dsn = deployment.shards[moving.shard_id].dsn, deployment.shards[target].dsn
    copy_phase = phase in ("snapshot", "import")
    if copy_phase:
        await asyncio.to_thread(preload_chunk, source_dsn, deployment.collection, moving, PRELOAD)
    hold = LagHold(tmp_path / "hold-lag", deployment.collection)
    if phase == "replicate":
        hold.hold()
    task_queue = worker_settings.temporal.task_queue
    workers = two_workers(worker_settings, tmp_path, hold)
    gate: Gate | None = None
    try:
        await wait_polling(temporal_client, task_queue, workers)
        if phase == "snapshot":
            gate = await snapshot_gate(source_dsn)
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target, task_queue,
                                      **(BIG if copy_phase else SMALL))
            mid = (await poll_progress(handle, lambda p: bool(p.migration_id), timeout=60,
                                       what="a first answer")).migration_id
            if phase == "snapshot":
                # The snapshot's slot waits for the gate's transaction: the export is to come.
                await wait_slot_creation_waiting(source_dsn)
            elif phase == "import":
                # As soon as the target committed its first part, hold the importer between
                # parts (its next progress row cannot be written): parts are still to import.
                await wait_until(lambda: asyncio.to_thread(count_rows, target_dsn, PARTS_Q, (mid,)),
                                 timeout=60, what="a first imported part")
                gate = await import_gate(target_dsn)
            else:
                await poll_progress(handle, lambda p: p.phase == "replicate", timeout=120,
                                    what="replicate")
            victim = await worker_running(handle, KILLED_IN[phase], workers)
            victim.kill()
            print(f"\nkilled worker {victim.pid} running {KILLED_IN[phase]}")
            if gate is not None:
                await gate.release()
            hold.release()
            try:
                result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            except TimeoutError:
                print("\n".join(await timeline(handle)))  # what the move was waiting for
                print("\n".join(w.log_tail(100) for w in workers))
                raise
        print(f"phase seconds: {result.phase_seconds}")
        await killed_and_retried(handle, KILLED_IN[phase], workers, victim)
        await assert_moved(deployment, result, moving, target, load)
    finally:
        hold.release()
        if gate is not None:
            await gate.release()
        for w in workers:
            w.kill()


class WritesBlockedError(AssertionError):
    """Clients saw errors although the move itself was correct."""


async def test_worker_killed_inside_cutover_pause(deployment: Deployment, worker_settings: Settings,
                                                  temporal_client: Client, tmp_path: Path) -> None:
    """The worker running the cutover dies while the source is frozen. The freeze marker
    cannot be applied (``freeze_marker_gate``), so the pause lasts (catch-up timeout 15 s) and
    the kill lands inside it every time. The other worker, already polling, takes the retry
    over after the cutover's heartbeat timeout; its first step undoes the freeze (or finishes
    the switch). Clients must see no error: the freeze must end within the router's retry
    deadline."""
    moving, target, other = pick(deployment)
    source, target_dsn = deployment.shards[moving.shard_id], deployment.shards[target].dsn
    task_queue = worker_settings.temporal.task_queue
    hold = LagHold(tmp_path / "hold-lag", deployment.collection)
    workers = two_workers(worker_settings, tmp_path, hold)
    try:
        await wait_polling(temporal_client, task_queue, workers)
        async with await freeze_marker_gate(target_dsn) as gate, \
                load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target, task_queue,
                                      **{**SMALL, "catchup_timeout_s": 15.0})

            async def frozen() -> bool:
                fence = await source.fence(deployment.collection, moving.chunk_id)
                return fence is not None and fence.state == FenceState.FROZEN

            await wait_until(frozen, timeout=120, what="the source frozen by the cutover")
            victim = await worker_running(handle, "migrate.cutover", workers)
            victim.kill()
            await gate.release()
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        gap_ms = max_write_gaps(load.records, lambda h: moving.range.contains(h)).get(True, 0.0)
        print(f"\nlongest write gap on the moving chunk {gap_ms / 1000:.1f}s; "
              f"phase seconds: {result.phase_seconds}")
        await killed_and_retried(handle, "migrate.cutover", workers, victim)
        # Correctness holds; only availability may be broken (every other check must pass,
        # so the test fails for that reason alone).
        report = await assert_moved(deployment, result, moving, target, load,
                                    allow_client_errors=True)
        if report.client_errors:
            raise WritesBlockedError(
                f"{report.client_errors} client errors, e.g. {report.error_samples[:1]}; "
                f"longest write gap on the moving chunk {gap_ms / 1000:.1f}s")
    finally:
        for w in workers:
            w.kill()


# -- 2. the target PostgreSQL stops during the bulk import -------------------------------------


async def test_target_down_during_import(stack: Stack, deployment: Deployment,
                                         worker: WorkerHandle, temporal_client: Client) -> None:
    moving, target, other = pick(deployment)
    source_dsn, target_dsn = deployment.shards[moving.shard_id].dsn, deployment.shards[target].dsn
    await asyncio.to_thread(preload_chunk, source_dsn, deployment.collection, moving, PRELOAD)
    pg = stack.instance_for_dsn(target_dsn)
    try:
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target,
                                      worker.task_queue, **BIG)
            mid = (await poll_progress(handle, lambda p: bool(p.migration_id))).migration_id
            deadline = time.monotonic() + 60
            while (done := await asyncio.to_thread(count_rows, target_dsn, PARTS_Q, (mid,))) < 1:
                assert time.monotonic() < deadline, "import did not start"
                await asyncio.sleep(0.005)
            await asyncio.to_thread(pg.stop, 30)
            stopped_at = time.time()
            # While the target is down the move must wait, not fail (and the load goes on).
            await asyncio.sleep(2.0)
            down = await poll_progress(handle, lambda p: True)
            assert down.outcome is None and phase_index(down.phase) <= phase_index("import"), down
            await asyncio.to_thread(pg.start, 60)
            # Keep the last view of the import's progress rows (cleanup removes them at the end).
            seen_rows: list[tuple] = []

            async def watch_parts() -> None:
                while True:
                    try:
                        with psycopg.connect(target_dsn, autocommit=True) as conn:
                            rows = conn.execute(
                                "SELECT part, rows, extract(epoch FROM done_at)"
                                " FROM shardshift.import_parts WHERE migration_id = %s"
                                " ORDER BY part", (mid,)).fetchall()
                        if len(rows) >= len(seen_rows):
                            seen_rows[:] = rows
                    except psycopg.OperationalError:
                        pass  # the target is (still) down: keep the last view
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch_parts())
            try:
                result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            finally:
                watcher.cancel()
        # The test's own pool to the target holds connections the restart closed (this pool
        # does not check its connections at checkout): open a fresh one.
        stale = deployment.shards[target]
        deployment.shards[target] = await PostgresShard(target, target_dsn, max_size=4).open()
        await stale.close()
        await assert_moved(deployment, result, moving, target, load)
    finally:
        await asyncio.to_thread(pg.start, 60)  # idempotent: the session's other tests need it
    # Resumed, not restarted: every part recorded exactly once, and the parts committed
    # before the stop were not loaded again (their records predate it).
    rows = seen_rows
    parts = [r[0] for r in rows]
    assert parts == list(range(len(parts))) and len(parts) >= PRELOAD // 100, parts
    assert sum(r[1] for r in rows) >= PRELOAD
    before_stop = [r[0] for r in rows if float(r[2]) < stopped_at]
    assert done <= len(before_stop) < len(parts), (done, before_stop, len(parts))


# -- 3. the applier's source connection is dropped while replicating ----------------------------


async def test_source_connection_dropped(deployment: Deployment, worker: WorkerHandle,
                                         temporal_client: Client,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The applier's walsender is terminated twice while the move replicates (held there by
    the lag-hold hook until both cuts landed): once right away, once after it has reconnected
    (a resumed stream must survive a second loss)."""
    monkeypatch.setenv(HOLD_LAG_ENV, deployment.collection)
    moving, target, other = pick(deployment)
    source_dsn = deployment.shards[moving.shard_id].dsn
    async with load_on(deployment, moving, other) as load:
        handle = await start_move(temporal_client, deployment, moving, target, worker.task_queue,
                                  **SMALL)
        mid = (await poll_progress(handle, lambda p: bool(p.migration_id))).migration_id
        slot = repl.stream_names(mid, "fwd").slot
        q = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s"

        def walsender() -> int | None:
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                row = conn.execute(q, (slot,)).fetchone()
                return row[0] if row else None

        def terminate(pid: int) -> bool:
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                return bool(conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0])

        # The applier streams as soon as the replicate phase starts (before it, the slot's
        # walsender is the snapshot's).
        await poll_progress(handle, lambda p: p.phase == "replicate", what="replicate")
        killed: list[int] = []
        def new_walsender() -> int | None:
            pid = walsender()
            return pid if pid not in killed else None

        for _ in range(2):
            pid = await wait_until(lambda: asyncio.to_thread(new_walsender), timeout=60,
                                   what=f"a (new) walsender on {slot}")
            assert await asyncio.to_thread(terminate, pid)
            killed.append(pid)
            p = await poll_progress(handle, lambda p: True)
            assert p.phase == "replicate", p
            print(f"\nterminated walsender {pid} in phase {p.phase}")
        monkeypatch.delenv(HOLD_LAG_ENV)
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    with suppress(Exception):
        print(f"phase seconds: {result.phase_seconds}")
    await assert_moved(deployment, result, moving, target, load)


# -- 4. the router restarts in each phase ---------------------------------------------------------


@pytest.mark.parametrize("phase", ["snapshot", "replicate", "cutover"])
async def test_router_restarted(phase: str, deployment: Deployment, worker: WorkerHandle,
                                temporal_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A router restarted mid-move (a fresh instance with a cold chunk-map cache takes over,
    the old one drains what it has in flight) costs the clients nothing, in any phase. Each
    phase is held until the restart happened: the snapshot's slot behind a transaction, the
    replicate phase by the lag-hold hook, the cutover inside its pause (the freeze marker
    cannot be applied)."""
    moving, target, other = pick(deployment)
    source_dsn, target_dsn = deployment.shards[moving.shard_id].dsn, deployment.shards[target].dsn
    await asyncio.to_thread(preload_chunk, source_dsn, deployment.collection, moving, PRELOAD)
    source = deployment.shards[moving.shard_id]
    fresh: Router | None = None
    gate: Gate | None = None
    try:
        if phase == "snapshot":
            gate = await snapshot_gate(source_dsn)
        elif phase == "replicate":
            monkeypatch.setenv(HOLD_LAG_ENV, deployment.collection)
        else:
            gate = await freeze_marker_gate(target_dsn)
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target,
                                      worker.task_queue, **BIG)
            if phase == "snapshot":
                await wait_slot_creation_waiting(source_dsn)
            elif phase == "cutover":
                async def frozen() -> bool:
                    fence = await source.fence(deployment.collection, moving.chunk_id)
                    return fence is not None and fence.state == FenceState.FROZEN

                await wait_until(frozen, timeout=120, what="the source frozen by the cutover")
            seen = await poll_progress(handle, lambda p: p.phase == phase, timeout=120,
                                       what=phase)
            fresh = await Router(CatalogRouteSource(deployment.catalog), router_settings()).start()
            await load.swap_router(fresh)
            print(f"\nrouter restarted in phase {seen.phase}")
            if gate is not None:
                await gate.release()
            monkeypatch.delenv(HOLD_LAG_ENV, raising=False)
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        await assert_moved(deployment, result, moving, target, load)
    finally:
        if gate is not None:
            await gate.release()
        if fresh is not None:
            await fresh.close()


# -- the lag-hold test hook (pure) -------------------------------------------------------------


def test_lag_hold_hook_by_name_and_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``SHARDSHIFT_TEST_HOLD_LAG`` names a collection, or ``@file`` listing collections (held
    while the file lists them: how a test releases worker processes it started)."""
    monkeypatch.delenv(HOLD_LAG_ENV, raising=False)
    assert not lag_held("c1")
    monkeypatch.setenv(HOLD_LAG_ENV, "c1")
    assert lag_held("c1") and not lag_held("c2")
    hold = LagHold(tmp_path / "hold", "c2")
    monkeypatch.setenv(HOLD_LAG_ENV, hold.env[HOLD_LAG_ENV])
    assert not lag_held("c2")
    hold.hold()
    assert lag_held("c2") and not lag_held("c1") and not lag_held("c")
    hold.release()
    assert not lag_held("c2")
