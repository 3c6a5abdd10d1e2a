"""Workers on many machines: each worker process with staging of its own (a directory no other
worker sees, as on separate hosts), or all of them on one object store (moto's S3 server).

* Private staging: a move's export and import (and its progress samples) run on the task queue
  of the worker that ``migrate.staging_home`` named, never split between two workers.
* That worker killed after its export: the copy's next activity is not started there within
  ``pinned_start_timeout_s``, so the copy is redone on the surviving worker under a new staging
  id, and the move completes.
* S3 staging: nothing is pinned (every worker reads the same parts) and the migration's prefix
  is gone after the cleanup.

Every move runs under load and ends with the checker's proof (``assert_moved``): nothing lost,
altered, duplicated or resurrected.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from temporalio.client import Client, WorkflowHandle

from settings import Settings
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, moto_server
from tests.workflows.helpers import FAULT_FAST, assert_moved, load_on, pick, start_move, wait_until
from tests.workflows.procs import (
    WorkerProcess,
    activity_runs,
    count_rows,
    import_gate,
    poll_progress,
    preload_chunk,
    timeline,
    wait_polling,
    worker_running,
)

RESULT_TIMEOUT_S = 180.0
PINNED = {**FAULT_FAST, "pinned_start_timeout_s": 5.0}
PARTS_Q = "SELECT count(*) FROM shardshift.import_parts WHERE migration_id = %s"
LEFT_Q = "SELECT count(*) FROM shardshift.import_parts WHERE starts_with(migration_id, %s)"


@pytest.fixture
def own_dirs() -> Iterator[list[Path]]:
    dirs = [owned_state_dir(f"staging-host{i}") for i in range(2)]
    try:
        yield dirs
    finally:
        for d in dirs:
            for p in sorted(d.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            d.rmdir()


def hosts(settings: Settings, dirs: list[Path], tmp_path: Path,
          env: dict[str, str] | None = None) -> list[WorkerProcess]:
    """Two worker processes on one task queue, each with a staging directory of its own."""
    return [WorkerProcess(settings.model_copy(update={"staging_url": str(d)}),
                          tmp_path / f"host-{i}.log", extra_env=env).start()
            for i, d in enumerate(dirs)]


SEATS = {"SHARDSHIFT_FLEET__WORKER_MAX_COPIES": "1"}
"""Workers with one copy seat each (``fleet.worker_max_copies``): a seated copy runs on its
worker process's own queue (``.worker.``), private or shared staging alike."""


async def scheduled_queues(handle: WorkflowHandle[Any, Any], activity_type: str) -> list[str]:
    """The task queue each scheduling of ``activity_type`` named, in history order."""
    out = []
    async for ev in handle.fetch_history_events():
        if ev.HasField("activity_task_scheduled_event_attributes"):
            a = ev.activity_task_scheduled_event_attributes
            if a.activity_type.name == activity_type:
                out.append(a.task_queue.name)
    return out


def pid_of(identity: str) -> str:
    return identity.split("@", 1)[0]


def staged_dirs(dirs: list[Path]) -> list[str]:
    return sorted(p.name for d in dirs for p in d.iterdir() if p.name != "owner.pid")


async def test_private_staging_pins_each_copy_to_one_worker(
        deployment: Deployment, worker_settings: Settings, temporal_client: Client,
        tmp_path: Path, own_dirs: list[Path]) -> None:
    """Two chunks move at once under load; each one's export and import ran on one worker."""
    moving, target, _ = pick(deployment)
    second = next(ch for ch in deployment.initial.chunks
                  if ch.shard_id not in (moving.shard_id, target))
    second_target = moving.shard_id
    # (Preloaded documents' ids are fixed: one chunk only, or the checker sees duplicates.)
    await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                            deployment.collection, moving, 2000)
    queue = worker_settings.temporal.task_queue
    workers = hosts(worker_settings, own_dirs, tmp_path)
    try:
        await wait_polling(temporal_client, queue, workers)
        async with load_on(deployment, moving, second) as load:
            handles = [
                await start_move(temporal_client, deployment, moving, target, queue,
                                 **PINNED, part_rows=200),
                await start_move(temporal_client, deployment, second, second_target, queue,
                                 **PINNED, part_rows=200),
            ]
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(h.result() for h in handles)), RESULT_TIMEOUT_S)
            except TimeoutError:
                for h in handles:
                    print("\n".join(await timeline(h)))
                print("\n".join(w.log_tail(60) for w in workers))
                raise
        for handle in handles:
            copy_queues = {q for a in ("migrate.snapshot", "migrate.bulk_import",
                                       "migrate.copy_progress", "migrate.release_staging")
                           for q in await scheduled_queues(handle, a)}
            assert len(copy_queues) == 1 and ".host." in copy_queues.pop(), \
                "the copy runs on one worker's own queue"
            ran = {pid_of(i) for a in ("migrate.snapshot", "migrate.bulk_import")
                   for _, i in await activity_runs(handle, a)}
            assert len(ran) == 1, f"export and import ran on one worker, not {ran}"
            assert await scheduled_queues(handle, "migrate.cutover") == [queue] * len(
                await scheduled_queues(handle, "migrate.cutover")), "the rest is not pinned"
        await assert_moved(deployment, results[0], moving, target, load)
        await assert_moved(deployment, results[1], second, second_target, load)
        assert staged_dirs(own_dirs) == [], "each copy's parts were released on its worker"
    finally:
        for w in workers:
            w.kill()


@pytest.mark.parametrize("seats", [None, SEATS], ids=["unlimited", "one-seat"])
async def test_pinned_worker_killed_after_export(
        deployment: Deployment, worker_settings: Settings, temporal_client: Client,
        tmp_path: Path, own_dirs: list[Path], seats: dict[str, str] | None) -> None:
    """The worker holding the staged parts dies once its export is done (its import held
    between parts): the copy is redone on the other worker and the move completes. With
    copy seats the same: the dead worker's seat queue takes no task, and the survivor
    seats the redone copy."""
    moving, target, other = pick(deployment)
    source_dsn, target_dsn = deployment.shards[moving.shard_id].dsn, deployment.shards[target].dsn
    await asyncio.to_thread(preload_chunk, source_dsn, deployment.collection, moving, 6000)
    queue = worker_settings.temporal.task_queue
    workers = hosts(worker_settings, own_dirs, tmp_path, seats)
    gate = None
    try:
        await wait_polling(temporal_client, queue, workers)
        async with load_on(deployment, moving, other) as load:
            handle = await start_move(temporal_client, deployment, moving, target, queue,
                                      **PINNED, part_rows=100)
            mid = (await poll_progress(handle, lambda p: bool(p.migration_id), timeout=60,
                                       what="a first answer")).migration_id
            await wait_until(lambda: asyncio.to_thread(count_rows, target_dsn, PARTS_Q, (mid,)),
                             timeout=60, what="a first imported part")
            gate = await import_gate(target_dsn)
            # The export ends (the phase turns to import) while the import is held.
            await poll_progress(handle, lambda p: p.phase == "import", timeout=120,
                                what="the export done")
            victim = await worker_running(handle, "migrate.bulk_import", workers)
            assert staged_dirs(own_dirs) == [mid], "the parts are on one worker's disk"
            victim.kill()
            print(f"\nkilled pinned worker {victim.pid} after its export")
            await gate.release()
            try:
                result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
            except TimeoutError:
                print("\n".join(await timeline(handle)))
                print("\n".join(w.log_tail(80) for w in workers))
                raise
        (standby,) = [w for w in workers if w is not victim]
        homes = await activity_runs(handle, "migrate.staging_home")
        assert len(homes) == 2, homes
        snaps = await activity_runs(handle, "migrate.snapshot")
        assert victim.runs(snaps[0][1]) and standby.runs(snaps[-1][1]), snaps
        assert standby.runs((await activity_runs(handle, "migrate.bulk_import"))[-1][1])
        queues = await scheduled_queues(handle, "migrate.bulk_import")
        assert len(set(queues)) == 2, f"the import moved to the survivor's queue: {queues}"
        assert all((".worker." if seats else ".host.") in q for q in queues), queues
        await assert_moved(deployment, result, moving, target, load)
        assert count_rows(target_dsn, LEFT_Q, (mid,)) == 0, "import progress rows forgotten"
        leftover = staged_dirs(own_dirs)
        assert leftover in ([mid], []), leftover  # (the dead worker's copy is its host's)
    finally:
        if gate is not None:
            await gate.release()
        for w in workers:
            w.kill()


@pytest.mark.parametrize("seats", [None, SEATS], ids=["unlimited", "one-seat"])
async def test_move_with_s3_staging(deployment: Deployment, worker_settings: Settings,
                                    temporal_client: Client, tmp_path: Path,
                                    seats: dict[str, str] | None) -> None:
    """Two workers stage on one S3 bucket (moto's S3 server): the copy is not pinned, the
    move completes under load, and the migration's prefix is removed by its cleanup. With
    copy seats the copy is pinned to the seating worker's own queue (for its capacity only:
    any worker could read the parts)."""
    moving, target, other = pick(deployment)
    await asyncio.to_thread(preload_chunk, deployment.shards[moving.shard_id].dsn,
                            deployment.collection, moving, 2000)
    queue = worker_settings.temporal.task_queue
    bucket, prefix = "shardshift-staging", f"moves-{uuid.uuid4().hex[:6]}"
    with moto_server() as s3:
        maker = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                                  endpoint_override=s3.endpoint, scheme="http",
                                  allow_bucket_creation=True)
        maker.create_dir(bucket)
        env = {**s3.env(bucket, prefix), **(seats or {})}
        workers = [WorkerProcess(worker_settings, tmp_path / f"s3-worker-{i}.log", env).start()
                   for i in range(2)]
        try:
            await wait_polling(temporal_client, queue, workers)
            async with load_on(deployment, moving, other) as load:
                handle = await start_move(temporal_client, deployment, moving, target, queue,
                                          **PINNED, part_rows=200)
                try:
                    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
                except TimeoutError:
                    print("\n".join(await timeline(handle)))
                    print("\n".join(w.log_tail(60) for w in workers))
                    raise
            copy_queues = {q for a in ("migrate.snapshot", "migrate.bulk_import")
                           for q in await scheduled_queues(handle, a)}
            if seats:
                assert len(copy_queues) == 1 and ".worker." in copy_queues.pop(), copy_queues
            else:
                assert copy_queues == {queue}
            await assert_moved(deployment, result, moving, target, load)
            staging = Staging.from_settings(Settings(
                staging_url=env["SHARDSHIFT_STAGING_URL"],
                s3={"endpoint_url": s3.url, "region": REGION, "access_key_id": ACCESS_KEY,
                    "secret_access_key": SECRET_KEY}))
            assert staging.shared
            assert staging.parts(result.migration_id) == []
            assert staging.read_manifest(result.migration_id) is None
            for w in workers:
                assert SECRET_KEY not in w.log_path.read_text(errors="replace")
        finally:
            for w in workers:
                w.kill()
