"""The bulk copy's throttle: its rate arithmetic (pure), and a real export that waits while
the source is busy and goes on when it is not."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shards.postgres.snapshot import export_chunk
from shards.postgres.throttle import CopyThrottle, ThrottleSettings
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.workflows.helpers import load_chunk, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False


def test_rate_limit_paces_the_average() -> None:
    clock = FakeClock()
    t = CopyThrottle(ThrottleSettings(rows_per_s=1000, bytes_per_s=1_000_000), clock=clock,
                     sleep=clock.sleep)
    t.after(500, 10)           # 500 rows at t=0: half a second ahead of the rows limit
    assert clock.slept == [0.5]
    clock.now += 2.0           # a slow batch: the average is under both limits
    t.after(1000, 10)
    assert clock.slept == [0.5]
    t.after(100, 3_999_980)    # the bytes limit binds: 4 MB in all needs 4 s, 2.5 s passed
    assert clock.slept == [0.5, pytest.approx(1.5)]
    assert t.waited_s == pytest.approx(2.0)


def test_no_limits_never_wait() -> None:
    clock = FakeClock()
    t = CopyThrottle(ThrottleSettings(), clock=clock, sleep=clock.sleep)
    t.after(10**9, 10**12)
    assert clock.slept == [] and not ThrottleSettings().enabled


@pytest.fixture
def staging() -> Iterator[Staging]:
    path = owned_state_dir("staging")
    try:
        yield Staging(str(path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_export_waits_while_the_source_is_busy(deployment: Deployment,
                                                     staging: Staging) -> None:
    d = deployment
    chunk = d.initial.chunks[0]
    dsn = d.shards[chunk.shard_id].dsn
    rows = await asyncio.to_thread(load_chunk, dsn, d.collection, chunk.range, 300)
    seen: list[str | None] = []
    progress: list[int] = []
    stop = threading.Event()
    throttle = CopyThrottle(ThrottleSettings(max_active=0, check_s=0.1), source_dsn=dsn,
                            stop=stop, on_wait=seen.append)
    busy = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                 application_name="a-busy-client")
    sleeper = asyncio.create_task(busy.execute("SELECT pg_sleep(600)"))
    box: dict[str, Any] = {}

    def run() -> None:
        box["result"] = export_chunk(dsn, d.collection, chunk.range, staging, f"thr-{d.collection}",
                                     target_part_rows=100, throttle=throttle,
                                     progress=lambda p: progress.append(p.rows_done))

    worker = asyncio.create_task(asyncio.to_thread(run))
    try:
        await wait_until(lambda: throttle.load_waits >= 3, what="the copy to wait for the source")
        assert seen and seen[0] is not None and "1 active sessions" in seen[0], seen
        assert progress == [] and not worker.done()  # nothing read while the source is busy
        busy.cancel()                                 # the busy client's statement ends
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeper
        await asyncio.wait_for(worker, 60)
    finally:
        stop.set()
        await busy.close()
        await asyncio.gather(worker, return_exceptions=True)
    assert box["result"].rows_exported == rows
    assert seen[-1] is None  # it said when it ran again
