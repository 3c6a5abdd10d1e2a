"""Copy seats (``fleet.worker_max_copies``): a worker carries at most that many move copies at
once, on real PostgreSQL, the Temporal dev server and a real worker process.

* With one seat and two moves at once, the second copy waits for the seat: its
  ``staging_home`` is refused while the first copy is held between parts, and the worker's
  own high-water mark of copies running at once (``shardshift_worker_copies_peak`` on its
  ``/metrics``) stays 1. Both moves complete under load; the checker finds nothing lost.
* The seat of a move cancelled mid-copy is never released by the move: it expires
  ``copy_seat_idle_s`` after its last copy activity stopped, and the waiting move takes it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from infra.net import free_port_block
from settings import Settings
from tests.router.conftest import Deployment
from tests.workflows.helpers import FAULT_FAST, assert_moved, load_on, pick, start_move
from tests.workflows.procs import (
    WorkerProcess,
    import_gate,
    preload_chunk,
    timeline,
    wait_polling,
    worker_running,
)

RESULT_TIMEOUT_S = 180.0


def seated_worker(settings: Settings, log: Path, **env: str) -> tuple[WorkerProcess, str]:
    """A worker process with one copy seat, serving ``/metrics``; (process, metrics URL)."""
    port = free_port_block(1)
    extra = {"SHARDSHIFT_FLEET__WORKER_MAX_COPIES": "1",
             "SHARDSHIFT_TELEMETRY__METRICS_PORT": str(port), **env}
    return (WorkerProcess(settings, log, extra_env=extra).start(),
            f"http://127.0.0.1:{port}/metrics")


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name]
    assert len(found) == 1, text
    return found[0]


async def copies_peak(url: str) -> float:
    """The worker's own high-water mark of moves whose copy ran on it at one time."""
    return await metric(url, "shardshift_worker_copies_peak")


async def refused_home(handle: WorkflowHandle[Any, Any], times: int, timeout: float) -> None:
    """Until the move's ``staging_home`` failed ``times`` attempts with ``NoCopySeat``."""
    deadline = time.monotonic() + timeout
    while True:
        desc = await handle.describe()
        for pa in desc.raw_description.pending_activities:
            if (pa.activity_type.name == "migrate.staging_home" and pa.attempt > times
                    and pa.last_failure.application_failure_info.type == "NoCopySeat"):
                return
        assert time.monotonic() < deadline, f"staging_home not refused {times}x in {timeout}s"
        await asyncio.sleep(0.1)


async def test_one_seat_two_moves_the_second_copy_waits(
        deployment: Deployment, worker_settings: Settings, temporal_client: Client,
        tmp_path: Path) -> None:
    moving, target, second = pick(deployment)
    second_target = moving.shard_id
    await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                            deployment.collection, moving, 1500)
    queue = worker_settings.temporal.task_queue
    worker, metrics = seated_worker(worker_settings, tmp_path / "worker.log")
    gate = None
    try:
        await wait_polling(temporal_client, queue, [worker])
        async with load_on(deployment, moving, second) as load:
            # The first copy is held between parts (its target's import progress is locked).
            gate = await import_gate(deployment.shards[target].dsn)
            first = await start_move(temporal_client, deployment, moving, target, queue,
                                     **FAULT_FAST, part_rows=100)
            await worker_running(first, "migrate.bulk_import", [worker], timeout=120)
            other = await start_move(temporal_client, deployment, second, second_target, queue,
                                     **FAULT_FAST, part_rows=100)
            # The second copy is refused the seat (again and again) while the first holds it.
            await refused_home(other, 2, timeout=120)
            assert await copies_peak(metrics) == 1
            assert await metric(metrics, "shardshift_worker_copy_seats_refused_total") >= 2
            await gate.release()
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(first.result(), other.result()), RESULT_TIMEOUT_S)
            except TimeoutError:
                for h in (first, other):
                    print("\n".join(await timeline(h)))
                print(worker.log_tail(80))
                raise
        await assert_moved(deployment, results[0], moving, target, load)
        await assert_moved(deployment, results[1], second, second_target, load)
        assert await copies_peak(metrics) == 1, "never two copies on the worker at once"
    finally:
        if gate is not None:
            await gate.release()
        worker.kill()


async def test_the_seat_of_a_cancelled_move_expires(
        deployment: Deployment, worker_settings: Settings, temporal_client: Client,
        tmp_path: Path) -> None:
    moving, target, second = pick(deployment)
    second_target = moving.shard_id
    await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                            deployment.collection, moving, 1500)
    queue = worker_settings.temporal.task_queue
    worker, metrics = seated_worker(worker_settings, tmp_path / "worker.log",
                                    SHARDSHIFT_FLEET__COPY_SEAT_IDLE_S="3")
    gate = None
    try:
        await wait_polling(temporal_client, queue, [worker])
        async with load_on(deployment, second, moving) as load:
            gate = await import_gate(deployment.shards[target].dsn)
            first = await start_move(temporal_client, deployment, moving, target, queue,
                                     **FAULT_FAST, part_rows=100)
            await worker_running(first, "migrate.bulk_import", [worker], timeout=120)
            other = await start_move(temporal_client, deployment, second, second_target, queue,
                                     **FAULT_FAST, part_rows=100)
            await refused_home(other, 2, timeout=120)
            # The first move is cancelled mid-copy: it aborts clean and never frees its seat
            # itself (no import ended, no staging released); the seat expires.
            await first.cancel()
            await gate.release()
            try:
                await asyncio.wait_for(first.result(), RESULT_TIMEOUT_S)
            except WorkflowFailureError:
                pass  # cancelled: the move ends as cancelled; only its seat matters here
            try:
                result = await asyncio.wait_for(other.result(), RESULT_TIMEOUT_S)
            except TimeoutError:
                print("\n".join(await timeline(other)))
                print(worker.log_tail(80))
                raise
        await assert_moved(deployment, result, second, second_target, load)
        assert await copies_peak(metrics) == 1
        chunk = await deployment.catalog.chunk(deployment.collection, moving.chunk_id)
        assert chunk.shard_id == moving.shard_id, "the cancelled move stayed where it was"
    finally:
        if gate is not None:
            await gate.release()
        worker.kill()
