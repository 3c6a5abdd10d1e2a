"""Chunk moves under load that survive faults: a worker SIGKILLed in every phase, the target
PostgreSQL stopped during the bulk import, the source's walsender terminated while replicating.

Every test ends with the same proof as ``test_migrate``: the move completed and verified, the
catalog places the chunk on the target, and the checker finds nothing lost, altered,
duplicated or resurrected, with zero client-visible errors (unknown outcomes are fine).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import psycopg
import pytest
from temporalio.client import Client, WorkflowHandle

from catalog.models import Chunk, MigrationOutcome
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import Settings
from shards.models import FenceState
from shards.postgres import PostgresShard
from shards.postgres import replication as repl
from shards.postgres.stream_control import release_hold, request_hold
from tests.router.conftest import Deployment, router_settings
from tests.workflows.conftest import WorkerHandle
from tests.workflows.procs import (
    WorkerProcess,
    chunk_keys,
    count_rows,
    phase_index,
    poll_progress,
    preload_chunk,
    timeline,
)
from tests.workflows.test_migrate import slots_left, wait_for
from workflows import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow
from workload.checker import CheckReport, check, collect_stored
from workload.generator import LoadGenerator

HEARTBEAT_S = 3.0
"""Short heartbeat timeout: a killed worker's long-running activities are retried after it."""
FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "heartbeat_timeout_s": HEARTBEAT_S}
BIG = {**FAST, "part_rows": 100}
"""For moves whose copy phases must last long enough to be hit (a preloaded chunk)."""
SMALL = {**FAST, "part_rows": 500}
PRELOAD = 8000
RESULT_TIMEOUT_S = 120.0
PARTS_Q = "SELECT count(*) FROM shardshift.import_parts WHERE migration_id = %s"


def acked(load: LoadGenerator) -> int:
    return sum(r.outcome == "ok" for r in load.records)


def pick(deployment: Deployment) -> tuple[Chunk, str, Chunk]:
    """(chunk to move, target shard, a bystander chunk on the third shard)."""
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    other = next(ch for ch in deployment.initial.chunks
                 if ch.shard_id not in (moving.shard_id, target))
    return moving, target, other


@asynccontextmanager
async def load_on(deployment: Deployment, moving: Chunk, other: Chunk) -> AsyncIterator[LoadGenerator]:
    """Writes and reads on the moving chunk (and a bystander) for the whole block; on a clean
    exit the load keeps running until more writes were acknowledged after the move."""
    from workload.generator import WorkloadConfig

    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as router:
        load = LoadGenerator(router, WorkloadConfig(
            collection=deployment.collection, rate=300, workers=6,
            only_keys=chunk_keys(moving, 30, "acct") + chunk_keys(other, 6, "o"),
        ))
        await load.start()
        try:
            await wait_for(lambda: acked(load) >= 100)
            yield load
            before = acked(load)
            await wait_for(lambda: acked(load) >= before + 100)
        finally:
            await load.stop()


async def start_move(client: Client, deployment: Deployment, moving: Chunk, target: str,
                     task_queue: str, **kw: object) -> WorkflowHandle[MigrateChunkWorkflow, MigrateChunkResult]:
    return await client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=deployment.collection, chunk_id=moving.chunk_id,
                          target=target, **kw),  # type: ignore[arg-type]
        id=f"fault-{deployment.collection}-{uuid.uuid4().hex[:6]}", task_queue=task_queue,
    )


async def assert_moved(deployment: Deployment, result: MigrateChunkResult, moving: Chunk,
                       target: str, load: LoadGenerator, *,
                       allow_client_errors: bool = False) -> CheckReport:
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert result.verified is True, result
    chunk = await deployment.catalog.chunk(deployment.collection, moving.chunk_id)
    assert chunk.shard_id == target and chunk.token == moving.token + 1
    stored = await collect_stored(deployment.shards, deployment.collection)
    report = check(load.records, stored)
    assert allow_client_errors or report.client_errors == 0, report.error_samples
    assert report.ok, report
    assert await deployment.shards[moving.shard_id].count(deployment.collection, moving.range) == 0
    assert slots_left([s.dsn for s in deployment.shards.values()], result.migration_id) == []
    return report


# -- 1. the worker process is SIGKILLed in each phase ------------------------------------------


@pytest.mark.parametrize("phase", ["snapshot", "import", "replicate", "cutover"])
async def test_worker_killed(phase: str, deployment: Deployment, worker_settings: Settings,
                             temporal_client: Client, tmp_path: Path) -> None:
    moving, target, other = pick(deployment)
    copy_phase = phase in ("snapshot", "import")
    if copy_phase:
        await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                                deployment.collection, moving, PRELOAD)
    log = tmp_path / "worker.log"
    first = WorkerProcess(worker_settings, log).start()
    second: WorkerProcess | None = None
    try:
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target,
                                      worker_settings.temporal.task_queue,
                                      **(BIG if copy_phase else SMALL))
            # The worker process is up and polling once it answers a query.
            first_answer = await poll_progress(handle, lambda p: bool(p.migration_id),
                                               timeout=60, what="a first answer")
            mid = first_answer.migration_id
            if phase == "import":
                # Precisely inside the import: as soon as the target committed its first part
                # (the import follows the export, so the phase may still read "snapshot").
                deadline = time.monotonic() + 60
                async with await psycopg.AsyncConnection.connect(
                    deployment.shards[target].dsn, autocommit=True
                ) as gate:
                    while True:
                        cur = await gate.execute(PARTS_Q, (mid,))
                        if (await cur.fetchone())[0] >= 1:
                            break
                        assert time.monotonic() < deadline, "import did not start"
                        await asyncio.sleep(0.002)
                    # Hold the importer between parts (its next progress row cannot be
                    # written), so the kill surely lands with parts still to import.
                    await gate.execute("BEGIN")
                    await gate.execute("LOCK TABLE shardshift.import_parts IN SHARE ROW EXCLUSIVE MODE")
                    first.kill()
                    await gate.execute("COMMIT")
                killed_at = "import"
            else:
                seen = await poll_progress(
                    handle, lambda p: phase_index(p.phase) >= phase_index(phase), timeout=120,
                    what=f"phase {phase}")
                first.kill()
                killed_at = seen.phase
                print(f"\nkilled worker in phase {killed_at} (wanted {phase}): {seen}")
                # At or after the wanted phase, and before the move was over.
                assert phase_index(phase) <= phase_index(killed_at) < phase_index("done"), seen
                if killed_at == "snapshot":
                    assert seen.parts_total is None or seen.parts_copied < seen.parts_total, seen
            second = WorkerProcess(worker_settings, log).start()
            try:
                result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            except TimeoutError:
                print("\n".join(await timeline(handle)))  # what the move was waiting for
                print(log.read_text()[-5000:] if log.exists() else "(no worker log)")
                raise
        print(f"phase seconds: {result.phase_seconds}")
        print("\n".join(await timeline(handle)))
        await assert_moved(deployment, result, moving, target, load)
        if phase == "import":
            # The kill interrupted the import (the gate held it between parts) and a retry on
            # the new worker finished it. (Progress rows are gone: cleanup removes them.)
            lines = await timeline(handle)
            assert any("migrate.bulk_import attempt=2" in line for line in lines), lines
    finally:
        first.kill()
        if second is not None:
            second.stop()


class WritesBlockedError(AssertionError):
    """Clients saw errors although the move itself was correct."""


async def test_worker_killed_inside_cutover_pause(deployment: Deployment, worker_settings: Settings,
                                                  temporal_client: Client, tmp_path: Path) -> None:
    """Deterministic version of the cutover kill: the applier is held so the freeze marker
    cannot arrive, the pause lasts (catch-up timeout 15 s), and the worker dies inside it."""
    moving, target, other = pick(deployment)
    source, target_dsn = deployment.shards[moving.shard_id], deployment.shards[target].dsn
    log = tmp_path / "worker.log"
    first = WorkerProcess(worker_settings, log).start()
    second: WorkerProcess | None = None
    try:
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target,
                                      worker_settings.temporal.task_queue,
                                      **{**SMALL, "catchup_timeout_s": 15.0})
            seen = await poll_progress(
                handle, lambda p: phase_index(p.phase) >= phase_index("cutover"), timeout=120,
                what="cutover")
            assert seen.phase == "cutover", seen
            names = repl.stream_names(seen.migration_id, "fwd")
            await asyncio.to_thread(request_hold, target_dsn, names, None)
            deadline = time.monotonic() + 20
            while True:
                fence = await source.fence(deployment.collection, moving.chunk_id)
                if fence is not None and fence.state == FenceState.FROZEN:
                    break
                chunk = await deployment.catalog.chunk(deployment.collection, moving.chunk_id)
                if chunk.shard_id == target:
                    pytest.skip("the hold came too late: the cutover committed first")
                assert time.monotonic() < deadline, "the source was never frozen"
                await asyncio.sleep(0.002)
            first.kill()
            await asyncio.to_thread(release_hold, target_dsn, names)
            second = WorkerProcess(worker_settings, log).start()
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        print(f"\nphase seconds: {result.phase_seconds}")
        # Correctness holds; only availability is broken (every other check must pass, so
        # the test fails for that reason alone).
        report = await assert_moved(deployment, result, moving, target, load,
                                    allow_client_errors=True)
        if report.client_errors:
            raise WritesBlockedError(
                f"{report.client_errors} client errors, e.g. {report.error_samples[:1]}; "
                f"cutover took {result.phase_seconds.get('cutover')} s")
    finally:
        first.kill()
        if second is not None:
            second.stop()


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
                                         temporal_client: Client) -> None:
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
        # walsender is the snapshot's); cut it twice: once right away, once after it has
        # reconnected (a resumed stream must survive a second loss).
        await poll_progress(handle, lambda p: phase_index(p.phase) >= phase_index("replicate"),
                            what="replicate")
        killed: list[int] = []
        for _ in range(2):
            deadline = time.monotonic() + 60
            while True:
                pid = await asyncio.to_thread(walsender)
                if pid is not None and pid not in killed:
                    break
                assert time.monotonic() < deadline, f"no (new) walsender on {slot}"
                await asyncio.sleep(0.01)
            p = await poll_progress(handle, lambda p: True)
            if phase_index(p.phase) > phase_index("verify"):
                break  # too late for the second cut: the cutover is under way
            assert await asyncio.to_thread(terminate, pid)
            killed.append(pid)
            print(f"\nterminated walsender {pid} in phase {p.phase}")
        assert killed
        result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    with suppress(Exception):
        print(f"phase seconds: {result.phase_seconds}")
    await assert_moved(deployment, result, moving, target, load)


# -- 4. the router restarts in each phase ---------------------------------------------------------


@pytest.mark.parametrize("phase", ["snapshot", "replicate", "cutover"])
async def test_router_restarted(phase: str, deployment: Deployment, worker: WorkerHandle,
                                temporal_client: Client) -> None:
    """A router restarted mid-move (a fresh instance with a cold chunk-map cache takes over,
    the old one drains what it has in flight) costs the clients nothing, in any phase."""
    moving, target, other = pick(deployment)
    await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                            deployment.collection, moving, PRELOAD)
    fresh: Router | None = None
    try:
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target,
                                      worker.task_queue, **BIG)
            seen = await poll_progress(handle, lambda p: phase_index(p.phase) >= phase_index(phase),
                                       timeout=120, what=phase)
            fresh = await Router(CatalogRouteSource(deployment.catalog), router_settings()).start()
            await load.swap_router(fresh)
            print(f"\nrouter restarted in phase {seen.phase}")
            result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        await assert_moved(deployment, result, moving, target, load)
    finally:
        if fresh is not None:
            await fresh.close()
