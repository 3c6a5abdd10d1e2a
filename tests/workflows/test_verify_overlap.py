"""Verify (phase 5) under overlapping attempts, cancellation, and a hold taken away mid-repair.

A verify attempt whose heartbeat timed out may still be running when Temporal starts the next
one. These tests run the real ``migrate.verify`` activity (``ActivityEnvironment``) against a
real forward stream of one chunk (source and target shards of the session stack, a running
``ChangeApplier``), and pause an attempt at an exact point without any hook in the code under
test: an ``ACCESS EXCLUSIVE`` lock on the target's table stops the attempt's target checksum
while the applier is held at the attempt's LSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from temporalio.testing import ActivityEnvironment

from activities.context import MoveContext
from activities.models import MoveSpec, VerifyInput, VerifyResult
from activities.verify import VerifyActivities
from router.hashing import khash
from shards.postgres.checksum import checksum_range, diff_checksums, recopy_range
from shards.postgres.pgoutput import lsn_from_str
from shards.postgres.replication import (
    create_slot,
    stream_names,
)
from shards.postgres.stream_control import (
    HoldLostError,
    StreamHold,
    check_held,
    read_state,
    release_hold,
    request_hold,
    wait_held,
)
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.workflows.streams import Streamed

# -- a streamed chunk ---------------------------------------------------------------------------


@pytest.fixture
async def move_context(deployment: Deployment) -> AsyncIterator[MoveContext]:
    staging = owned_state_dir("staging")
    ctx = MoveContext(deployment.catalog, Staging(staging), max_threads=8)
    try:
        yield ctx
    finally:
        await ctx.close()
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def table_locked(dsn: str, collection: str) -> Any:
    """Hold ACCESS EXCLUSIVE on the collection's table: a verify attempt's target checksum
    (and the applier, which is held anyway) waits here."""
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("LOCK TABLE docs.{} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(collection)))
        yield
        conn.rollback()


def checksum_waiting(dsn: str) -> bool:
    """A verify checksum on this shard is waiting for a lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardshift-checksum'"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


def slot_exists(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                            (slot,)).fetchone() is not None


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0,
                     what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.05)


@dataclass
class Attempt:
    env: ActivityEnvironment
    task: asyncio.Task[VerifyResult]
    heartbeats: list[Any]


class Attempts:
    """Verify attempts started by a test; any still running at its end are cancelled and
    awaited (a failing test leaves no activity behind)."""

    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx
        self.started: list[Attempt] = []

    def start(self, spec: MoveSpec) -> Attempt:
        env = ActivityEnvironment()
        beats: list[Any] = []
        env.on_heartbeat = lambda *details: beats.extend(details)
        task = asyncio.create_task(
            env.run(VerifyActivities(self.ctx).verify, VerifyInput(spec=spec, buckets=16))
        )
        self.started.append(Attempt(env, task, beats))
        return self.started[-1]


@pytest.fixture
async def attempts(move_context: MoveContext) -> AsyncIterator[Attempts]:
    a = Attempts(move_context)
    try:
        yield a
    finally:
        for attempt in a.started:
            if not attempt.task.done():
                attempt.env.cancel()
        await asyncio.gather(*(x.task for x in a.started), return_exceptions=True)


async def held_by_attempt(s: Streamed) -> str:
    """Wait until a verify attempt holds the applier at its snapshot's LSN; returns the LSN."""
    vslot = stream_names(s.spec.migration_id, "ver").slot

    def held() -> str | None:
        with psycopg.connect(s.source_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                               " WHERE slot_name = %s", (vslot,)).fetchone()
        if row is None or row[0] is None:
            return None  # a fresh slot's confirmed position is its consistent point L
        st = read_state(s.target_dsn, s.names)
        if st and st.held and st.hold_at_lsn == row[0]:
            return st.hold_at_lsn
        return None

    return await wait_until(held, what="verify holding the applier")


# -- tests --------------------------------------------------------------------------------------


async def test_overlapping_attempts_never_interleave(streamed: Streamed,
                                                     attempts: Attempts) -> None:
    """A second attempt waits for the first one to end; it never moves the first one's hold
    nor drops its snapshot slot, and both verify."""
    s = streamed
    vslot = stream_names(s.spec.migration_id, "ver").slot
    with table_locked(s.target_dsn, s.spec.collection):
        first = attempts.start(s.spec)
        lsn_a = await held_by_attempt(s)
        await wait_until(lambda: checksum_waiting(s.target_dsn), what="first attempt checksumming")
        second = attempts.start(s.spec)

        def second_waits_or_interferes() -> str | None:
            st = read_state(s.target_dsn, s.names)
            if st is None or st.hold_at_lsn != lsn_a or not slot_exists(s.source_dsn, vslot):
                return "interfered"
            if any("waiting" in str(b) for b in second.heartbeats):
                return "waits"
            return None

        seen = await wait_until(second_waits_or_interferes, what="second attempt's first move")
        assert seen == "waits", (
            "the second verify attempt acted while the first was still running "
            f"(hold now {read_state(s.target_dsn, s.names)}, first held at {lsn_a}, "
            f"first's slot there: {slot_exists(s.source_dsn, vslot)})")
        assert not first.task.done()
    a = await asyncio.wait_for(first.task, 60)
    b = await asyncio.wait_for(second.task, 60)
    assert a.verified and b.verified
    assert lsn_from_str(b.lsn) > lsn_from_str(lsn_a) == lsn_from_str(a.lsn)
    st = read_state(s.target_dsn, s.names)
    assert st is not None and st.hold_at_lsn is None
    assert not slot_exists(s.source_dsn, vslot)
    await s.write(s.keys[0], 1000)
    await asyncio.to_thread(s.caught_up)
    assert s.rows(s.target_dsn) == s.rows(s.source_dsn)
    assert "error" not in s.box, s.box


async def test_cancelled_attempt_stops_promptly(streamed: Streamed,
                                                attempts: Attempts) -> None:
    """A cancelled attempt stops within a bound even while its query waits on the server, and
    leaves no hold and no slot behind."""
    s = streamed
    vslot = stream_names(s.spec.migration_id, "ver").slot
    with table_locked(s.target_dsn, s.spec.collection):
        attempt = attempts.start(s.spec)
        await held_by_attempt(s)
        await wait_until(lambda: checksum_waiting(s.target_dsn), what="attempt checksumming")
        attempt.env.cancel()
        # A correctness bound (the lock is never released meanwhile), not a performance one.
        done, _ = await asyncio.wait({attempt.task}, timeout=15)
        assert done, "a cancelled verify attempt kept running (it ignores its stop event)"
        with pytest.raises(asyncio.CancelledError):
            attempt.task.result()
        st = read_state(s.target_dsn, s.names)
        assert st is not None and st.hold_at_lsn is None
        assert not slot_exists(s.source_dsn, vslot)
    await s.write(s.keys[1], 2000)
    await asyncio.to_thread(s.caught_up)
    assert s.rows(s.target_dsn) == s.rows(s.source_dsn)
    assert "error" not in s.box, s.box


async def test_repair_never_writes_behind_the_applier(streamed: Streamed) -> None:
    """A hold taken away between the compare and the repair (a stale attempt's release, an
    operator) must not let the repair write its older snapshot over newer applied data."""
    s = streamed
    c, rng = s.spec.collection, s.spec.key_range
    victim = s.keys[5]
    vnames = stream_names(s.spec.migration_id, "ver")
    # A drifted target row: the compare will find its bucket.
    with psycopg.connect(s.target_dsn) as conn:
        conn.execute(sql.SQL("UPDATE docs.{} SET doc = doc || '{{\"drift\": 1}}' WHERE khash = %s"
                             ).format(sql.Identifier(c)), (khash(victim),))
    request_hold(s.target_dsn, s.names, None)
    try:
        with create_slot(s.source_dsn, vnames) as slot:
            lsn = slot.consistent_lsn
            request_hold(s.target_dsn, s.names, lsn)
            wait_held(s.target_dsn, s.names, lsn, timeout=30)
            a = checksum_range(s.source_dsn, c, rng, buckets=16, snapshot=slot.snapshot_name)
            b = checksum_range(s.target_dsn, c, rng, buckets=16, held=StreamHold(s.names, lsn))
            bad = diff_checksums(a, b)
            assert len(bad) == 1 and bad[0].contains(khash(victim))
            # The hold goes away; the applier applies a newer write of the drifted bucket.
            release_hold(s.target_dsn, s.names)
            await s.write(victim, 4242)
            await asyncio.to_thread(s.caught_up)
            with pytest.raises(HoldLostError):
                recopy_range(s.source_dsn, s.target_dsn, c, bad[0],
                             snapshot=slot.snapshot_name, held=StreamHold(s.names, lsn))
            with pytest.raises(HoldLostError):
                checksum_range(s.target_dsn, c, rng, buckets=16, held=StreamHold(s.names, lsn))
    finally:
        release_hold(s.target_dsn, s.names)
    # The newer write survived.
    with psycopg.connect(s.target_dsn) as conn:
        row = conn.execute(sql.SQL("SELECT doc->'n' FROM docs.{} WHERE khash = %s").format(
            sql.Identifier(c)), (khash(victim),)).fetchone()
    assert row is not None and row[0] == {"$numberInt": "4242"}
    assert "error" not in s.box, s.box


async def test_a_pinned_hold_outlasts_a_release(streamed: Streamed) -> None:
    """While a repair's transaction pins the hold, a release (or a new hold) waits for it to
    end; the applier stays held meanwhile."""
    s = streamed
    paused = request_hold(s.target_dsn, s.names, None)
    wait_held(s.target_dsn, s.names, paused, timeout=30)
    releaser: threading.Thread | None = None
    try:
        with psycopg.connect(s.target_dsn) as conn:
            check_held(conn, StreamHold(s.names, paused), pin=True)
            releaser = threading.Thread(target=release_hold, args=(s.target_dsn, s.names))
            releaser.start()

            def release_waits() -> bool:
                with psycopg.connect(s.target_dsn, autocommit=True) as probe:
                    row = probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND NOT granted").fetchone()
                return bool(row and row[0])

            await wait_until(release_waits, what="the release waiting on the pinned hold")
            await s.write(s.keys[2], 3000)  # the applier must not apply it yet
            st = read_state(s.target_dsn, s.names)
            assert st is not None and st.held and st.hold_at_lsn == paused
            assert releaser.is_alive()
            conn.commit()
        await asyncio.to_thread(releaser.join, 30)
        assert not releaser.is_alive()
    finally:
        release_hold(s.target_dsn, s.names)
        if releaser is not None:
            releaser.join(30)
    st = read_state(s.target_dsn, s.names)
    assert st is not None and st.hold_at_lsn is None
    await asyncio.to_thread(s.caught_up)
    assert s.rows(s.target_dsn) == s.rows(s.source_dsn)
