"""Change stream and change apply against real PostgreSQL 18 and 15 shards.

Each test moves one chunk ``[0, 2^63)`` (chunk 1) of a fresh collection; chunk 0
``[-2^63, 0)`` stays on the source and receives writes too, so every test also proves that
only the chunk's range travels. Slots, publications and origins are dropped by a fixture
finalizer even when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import signal
import string
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from infra.stack import Stack
from router.hashing import khash
from settings import as_role
from shards.errors import FenceRejectedError
from shards.models import KHASH_END, KHASH_MIN, FenceRef, FenceState, KeyRange
from shards.postgres import PostgresShard
from shards.postgres.apply import ApplierStats, ChangeApplier, StreamSpec
from shards.postgres.pgoutput import lsn_from_str, lsn_to_str
from shards.postgres.replication import (
    SlotExistsError,
    cleanup_stream_objects,
    create_publication,
    create_slot,
    current_lsn,
    emit_marker,
    migration_prefix,
)
from shards.postgres.schema import collection_table
from shards.postgres.stream_control import (
    HoldTooLateError,
    StreamWatch,
    measure_lag,
    read_state,
    release_hold,
    request_hold,
    wait_caught_up,
    wait_for_fence,
    wait_held,
)
from shards.postgres.throttle import ThrottleSettings
from tests.workflows.helpers import wait_until

CHUNK = 1
OTHER = 0
RANGE = KeyRange(lo=0, hi=KHASH_END)
OTHER_RANGE = KeyRange(lo=KHASH_MIN, hi=0)
TOKEN = 5

# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Move:
    """One chunk stream under test: source, target, names, the applier threads it runs."""

    collection: str
    source: PostgresShard
    target: PostgresShard
    spec: StreamSpec
    appliers: list[tuple[threading.Thread, threading.Event, dict[str, Any]]] = field(
        default_factory=list
    )

    @property
    def names(self):
        return self.spec.names

    def start_applier(self, spec: StreamSpec | None = None, *, source: PostgresShard | None = None,
                      target: PostgresShard | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run a ChangeApplier in a thread; the returned dict gets ``stats`` or ``error``."""
        applier = ChangeApplier(
            spec or self.spec, (source or self.source).dsn, (target or self.target).dsn,
            **kwargs,
        )
        stop = threading.Event()
        box: dict[str, Any] = {"applier": applier}

        def main() -> None:
            try:
                box["stats"] = applier.run(stop)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                box["error"] = exc

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        self.appliers.append((thread, stop, box))
        return box

    def stop_appliers(self) -> None:
        for thread, stop, _ in self.appliers:
            stop.set()
            thread.join(timeout=30)
        self.appliers.clear()


def doc_key(i: int) -> int:
    return i  # the shard key value; its khash decides the chunk


def chunk_of(key: int) -> int:
    return CHUNK if RANGE.contains(khash(key)) else OTHER


async def setup_shards(source: PostgresShard, target: PostgresShard, collection: str) -> None:
    for shard in (source, target):
        await shard.ensure_schema()
        await shard.create_collection(collection)
    await source.put_fence(collection, CHUNK, RANGE, TOKEN, FenceState.ACTIVE)
    await source.put_fence(collection, OTHER, OTHER_RANGE, TOKEN, FenceState.ACTIVE)
    await target.put_fence(collection, CHUNK, RANGE, TOKEN, FenceState.RECEIVING)


def chunk_rows(dsn: str, collection: str, key_range: KeyRange = RANGE) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            psycopg.sql.SQL(
                "SELECT khash, id, doc::text FROM {} WHERE khash >= %s"
                " AND (%s::bigint IS NULL OR khash < %s) ORDER BY khash, id"
            ).format(collection_table(collection)),
            (key_range.lo, key_range.sql_hi, key_range.sql_hi),
        ).fetchall()


def copy_at_snapshot(source_dsn: str, target_dsn: str, collection: str, snapshot: str) -> int:
    """The snapshot phase, reduced: read the chunk at the slot's snapshot, write the target."""
    table = collection_table(collection)
    with psycopg.connect(source_dsn) as src, psycopg.connect(target_dsn) as dst:
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        src.execute(psycopg.sql.SQL("SET TRANSACTION SNAPSHOT {}").format(psycopg.sql.Literal(snapshot)))
        rows = src.execute(
            psycopg.sql.SQL("SELECT khash, id, doc::text FROM {} WHERE khash >= %s").format(table),
            (RANGE.lo,),
        ).fetchall()
        src.rollback()
        with dst.cursor() as cur, cur.copy(
            psycopg.sql.SQL("COPY {} (khash, id, doc) FROM STDIN").format(table)
        ) as copy:
            for row in rows:
                copy.write_row(row)
        dst.commit()
    return len(rows)


def prepare_stream(move: Move) -> str:
    """Publication, slot with exported snapshot, copy at the snapshot; returns the slot's LSN."""
    create_publication(move.source.dsn, move.names, move.collection, CHUNK, RANGE)
    with create_slot(move.source.dsn, move.names) as slot:
        assert slot.snapshot_name
        copy_at_snapshot(move.source.dsn, move.target.dsn, move.collection, slot.snapshot_name)
    return slot.consistent_lsn


def source_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return current_lsn(conn)


async def wait_applied(move: Move, dsn: str | None = None, timeout: float = 30.0) -> None:
    """Wait until the target has applied everything the source committed so far."""
    lsn = source_lsn(dsn or move.source.dsn)
    await asyncio.to_thread(wait_caught_up, move.target.dsn, move.names, lsn, timeout)


class Writer:
    """Random fenced inserts, replaces, patches and deletes on both chunks of the source."""

    def __init__(self, shard: PostgresShard, collection: str, seed: int, keys: range) -> None:
        self.shard = shard
        self.collection = collection
        self.rng = random.Random(seed)
        self.keys = list(keys)
        self.live: set[int] = set()
        self.ops = 0

    async def step(self) -> None:
        key = self.rng.choice(self.keys)
        ref = FenceRef(chunk_id=chunk_of(key), token=TOKEN)
        h = khash(doc_key(key))
        if key not in self.live:
            await self.shard.insert(self.collection, ref, h,
                                    {"_id": key, "k": doc_key(key), "n": 0, "pad": "x" * 50})
            self.live.add(key)
        else:
            choice = self.rng.random()
            if choice < 0.4:
                await self.shard.patch(self.collection, ref, h, key, {"$inc": {"n": 1}},
                                       protected=("_id", "k"))
            elif choice < 0.7:
                await self.shard.replace(self.collection, ref, h,
                                         {"_id": key, "k": doc_key(key), "n": -1,
                                          "s": self.rng.random()})
            else:
                await self.shard.delete(self.collection, ref, h, key)
                self.live.discard(key)
        self.ops += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()


async def until_ops(writers: list[Writer], tasks: list[asyncio.Task[None]], n: int,
                    box: dict[str, Any] | None = None, timeout: float = 60.0) -> None:
    """Wait until the writers made ``n`` operations in all (failing fast on any error)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sum(w.ops for w in writers) < n:
        for task in tasks:
            if task.done():
                task.result()
        if box is not None:
            assert_running(box)
        assert asyncio.get_running_loop().time() < deadline, "writers too slow"
        await asyncio.sleep(0.01)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def pg18_pair(pg18_dsns: list[str]) -> AsyncIterator[tuple[PostgresShard, PostgresShard]]:
    async with PostgresShard("s1", pg18_dsns[0]) as a, PostgresShard("s2", pg18_dsns[1]) as b:
        yield a, b


@pytest.fixture
def cleanup(request: pytest.FixtureRequest) -> Iterator[list[tuple[str, str]]]:
    """Register (dsn, migration_id) pairs; every replication object of them is dropped at the
    end, and the test fails if any is left."""
    registered: list[tuple[str, str]] = []
    moves: list[Move] = []
    request.node.moves = moves
    yield registered
    for move in moves:
        move.stop_appliers()
    for dsn, mid in registered:
        cleanup_stream_objects(dsn, mid)
    for dsn, mid in registered:
        assert leftovers(dsn, mid) == (0, 0, 0)


def leftovers(dsn: str, migration_id: str) -> tuple[int, int, int]:
    prefix = migration_prefix(migration_id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        slots = conn.execute("SELECT count(*) FROM pg_replication_slots"
                             " WHERE starts_with(slot_name::text, %s)", (prefix,)).fetchone()
        pubs = conn.execute("SELECT count(*) FROM pg_publication"
                            " WHERE starts_with(pubname::text, %s)", (prefix,)).fetchone()
        origins = conn.execute("SELECT count(*) FROM pg_replication_origin"
                               " WHERE starts_with(roname, %s)", (prefix,)).fetchone()
    assert slots and pubs and origins
    return slots[0], pubs[0], origins[0]


def new_move(request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
             source: PostgresShard, target: PostgresShard, collection: str,
             part: str = "fwd") -> Move:
    mid = f"test/{collection}"
    cleanup.extend([(source.dsn, mid), (target.dsn, mid)])
    spec = StreamSpec(migration_id=mid, part=part, collection=collection, chunk_id=CHUNK,
                      key_range=RANGE)
    move = Move(collection, source, target, spec)
    request.node.moves.append(move)
    return move


def assert_running(box: dict[str, Any]) -> None:
    assert "error" not in box, f"applier failed: {box.get('error')!r}"


# -- tests -------------------------------------------------------------------------------------


async def test_stream_from_snapshot_under_concurrent_writes(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    writers = [Writer(source, collection_name, seed, range(seed * 400, seed * 400 + 400))
               for seed in range(4)]
    stop = asyncio.Event()
    # Writes run before, during and after the slot and its snapshot are made.
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    await until_ops(writers, tasks, 300)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier()
    await until_ops(writers, tasks, 2500, box)
    stop.set()
    await asyncio.gather(*tasks)
    await wait_applied(move)
    assert_running(box)

    src = chunk_rows(source.dsn, collection_name)
    assert len(src) > 50
    assert chunk_rows(target.dsn, collection_name) == src
    # Only the chunk travelled: the other chunk's documents exist on the source only.
    assert chunk_rows(source.dsn, collection_name, OTHER_RANGE)
    assert chunk_rows(target.dsn, collection_name, OTHER_RANGE) == []
    stats: ApplierStats = box["applier"].stats
    assert stats.applied_txns > 0 and stats.batches <= stats.applied_txns
    lag = await asyncio.to_thread(measure_lag, source.dsn, target.dsn, move.names)
    assert lag.commit_lag_s is not None and lag.commit_lag_s < 5


async def test_resume_after_crash_between_commit_and_feedback(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    writer = Writer(source, collection_name, 7, range(300))
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))

    class Crash(Exception):
        pass

    crashes = {"n": 0}

    def crash_after_third_commit(end_lsn: int) -> None:
        crashes["n"] += 1
        if crashes["n"] == 3:
            raise Crash(f"crash after committing through {end_lsn}")

    first = move.start_applier(after_commit=crash_after_third_commit)
    thread = move.appliers[-1][0]
    await asyncio.to_thread(thread.join, 30)
    assert isinstance(first.get("error"), Crash)
    crashed_at = first["applier"].stats.applied_lsn
    # The target committed the third batch; the source was never told.
    state = read_state(target.dsn, move.names)
    assert state is not None and state.applied_lsn is not None
    assert lsn_from_str(state.applied_lsn) == crashed_at
    with psycopg.connect(source.dsn) as conn:
        row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                           " WHERE slot_name = %s", (move.names.slot,)).fetchone()
    assert row and lsn_from_str(row[0]) < crashed_at

    await until_ops([writer], [task], 1500)  # writes keep coming while no applier runs
    second = move.start_applier()
    await until_ops([writer], [task], 2500, second)
    stop.set()
    await task
    await wait_applied(move)
    assert_running(second)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)

    # Exactly once: the restart resumed from the origin, re-applying nothing.
    s1: ApplierStats = first["applier"].stats
    s2: ApplierStats = second["applier"].stats
    assert s2.started_lsn == crashed_at
    applied1, applied2 = list(s1.applied_commit_lsns), list(s2.applied_commit_lsns)
    assert applied1 and applied2
    assert not set(applied1) & set(applied2)
    assert min(applied2) > max(applied1)
    assert len(set(applied2)) == len(applied2)


def _applier_process(spec_json: str, source: str, target: str) -> None:
    ChangeApplier(StreamSpec.model_validate_json(spec_json), source, target).run()


async def test_resume_after_sigkill_mid_stream(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """A hard kill (no cleanup, no final feedback, possibly mid-batch) loses nothing."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    writers = [Writer(source, collection_name, seed, range(seed * 500, seed * 500 + 500))
               for seed in range(3)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_applier_process,
                       args=(move.spec.model_dump_json(), source.dsn, target.dsn), daemon=True)
    proc.start()
    try:
        await until_ops(writers, tasks, 600)
        deadline = time.monotonic() + 30
        while True:  # killed while it is applying, not before it started
            state = read_state(target.dsn, move.names)
            if state is not None and state.applied_lsn is not None:
                break
            assert time.monotonic() < deadline, "applier process never applied anything"
            await asyncio.sleep(0.02)
        await until_ops(writers, tasks, 1200)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.join, 10)
    assert proc.exitcode == -signal.SIGKILL
    await until_ops(writers, tasks, 1800)
    box = move.start_applier()
    await until_ops(writers, tasks, 2600, box)
    stop.set()
    await asyncio.gather(*tasks)
    await wait_applied(move)
    assert_running(box)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)


def run_origin_ahead(target_dsn: str, origin: str, ahead: str) -> str:
    """Leave a stream's origin at ``ahead`` the way a killed applier does; returns the origin's
    progress afterwards.

    A batch sets ``pg_replication_origin_xact_setup(ahead)`` and aborts (its applier dies). The
    session's origin LSN stays set, and the backend's exit-time cleanup of its temp table
    commits with it, so the origin says ``ahead`` although no data past the state row landed.
    """
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        conn.execute("CREATE TEMP TABLE ss_apply (x int) ON COMMIT DELETE ROWS")
        conn.execute("BEGIN")
        conn.execute("SELECT pg_replication_origin_xact_setup(%s::pg_lsn, now())", (ahead,))
        conn.execute("ROLLBACK")
    # The backend drops its temp table at exit, in a transaction carrying the origin.
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_replication_origin_progress(%s, false)::text",
                               (origin,)).fetchone()
        assert row is not None
        if row[0] == ahead or time.monotonic() > deadline:
            return row[0]
        time.sleep(0.02)


NO_TRIGGER = "PostgreSQL no longer advances the origin this way; the test needs another trigger"


async def test_origin_run_ahead_by_an_aborted_batch_is_rewound(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """The data-loss bug a SIGKILLed applier hit once in ~10 runs, made deterministic.

    The origin runs ahead of the state row (:func:`run_origin_ahead`). A new applier must
    resume from the state row, not from the origin, or the transactions in between are lost."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    writer = Writer(source, collection_name, 5, range(0, 300))
    for _ in range(50):
        await writer.step()
    box = move.start_applier()
    deadline = time.monotonic() + 30
    while read_state(target.dsn, move.names) is None:  # its schema and state row exist
        assert time.monotonic() < deadline, box
        await asyncio.sleep(0.02)
    await wait_applied(move)
    move.stop_appliers()
    assert_running(box)
    applied = read_state(target.dsn, move.names)
    assert applied is not None and applied.applied_lsn is not None
    for _ in range(80):  # never applied: the next applier must bring these
        await writer.step()
    ahead = lsn_to_str(source_lsn(source.dsn))
    assert await asyncio.to_thread(run_origin_ahead, target.dsn, move.names.origin, ahead) \
        == ahead, NO_TRIGGER
    box = move.start_applier()
    await wait_applied(move)
    assert_running(box)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)


async def test_origin_run_ahead_before_the_first_batch_is_rewound(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """The same run-ahead when the applier died in its FIRST batch: the state row has no
    applied LSN yet, and that "nothing applied" is the truth too. The next applier must stream
    from the slot's start, not from the origin (a reverse stream, never verified, would lose
    these writes for good)."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier()  # makes the origin and the state row, applies nothing
    deadline = time.monotonic() + 30
    while read_state(target.dsn, move.names) is None:
        assert time.monotonic() < deadline, box
        await asyncio.sleep(0.02)
    move.stop_appliers()
    assert_running(box)
    state = read_state(target.dsn, move.names)
    assert state is not None and state.applied_lsn is None
    writer = Writer(source, collection_name, 6, range(0, 300))
    for _ in range(80):  # never applied: the next applier must bring these
        await writer.step()
    ahead = lsn_to_str(source_lsn(source.dsn))
    assert await asyncio.to_thread(run_origin_ahead, target.dsn, move.names.origin, ahead) \
        == ahead, NO_TRIGGER
    box = move.start_applier()
    await wait_applied(move)
    assert_running(box)
    src = chunk_rows(source.dsn, collection_name)
    assert src, "the writer wrote nothing in the chunk"
    assert chunk_rows(target.dsn, collection_name) == src


async def test_applier_skips_transactions_resent_below_its_origin(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """The server resends from the slot's confirmed position when asked for less than the
    origin holds; the applier must drop exactly what its origin already has."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    keys = [k for k in range(1000) if chunk_of(k) == CHUNK][:40]
    writer = Writer(source, collection_name, 11, range(0))
    writer.keys = keys
    for _ in range(100):  # one source transaction in the chunk per step
        await writer.step()
    end = source_lsn(source.dsn)

    def crash(_lsn: int) -> None:
        raise RuntimeError("crash after the first target commit, before any feedback")

    box = move.start_applier(after_commit=crash, max_batch_changes=30)
    await asyncio.to_thread(move.appliers[-1][0].join, 30)
    assert isinstance(box.get("error"), RuntimeError)
    first: ApplierStats = box["applier"].stats
    assert 0 < first.applied_txns < 100

    rerun = ChangeApplier(move.spec, source.dsn, target.dsn)
    deadline = time.monotonic() + 15

    def done(a: ChangeApplier) -> bool:
        seen = a.stats.skipped_txns + a.stats.applied_txns
        return (seen >= 100 and a.caught_up_lsn >= end) or time.monotonic() > deadline

    stats = await asyncio.to_thread(rerun.run, None, until=done, start_lsn=0)
    assert stats.skipped_txns == first.applied_txns
    assert stats.skipped_txns + stats.applied_txns == 100
    assert not set(first.applied_commit_lsns) & set(stats.applied_commit_lsns)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)


async def test_freeze_and_messages_are_markers_with_lsn(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier()
    writer = Writer(source, collection_name, 3, range(50))
    for _ in range(100):
        await writer.step()

    with psycopg.connect(source.dsn, autocommit=True) as conn:
        marker_lsn = emit_marker(conn, move.names, "verify-1")
        before_freeze = current_lsn(conn)
    fence, after_freeze = await source.freeze(collection_name, CHUNK, TOKEN)
    assert fence.state == FenceState.FROZEN and fence.token == TOKEN + 1
    with pytest.raises(FenceRejectedError):
        await writer.shard.insert(collection_name, FenceRef(chunk_id=CHUNK, token=TOKEN),
                                  khash(10**6), {"_id": 10**6, "k": 10**6})

    state = await asyncio.to_thread(
        wait_for_fence, target.dsn, move.names, token=TOKEN + 1, state="frozen",
        after_lsn=before_freeze, timeout=15,
    )
    assert state.fence_lsn is not None
    assert before_freeze <= lsn_from_str(state.fence_lsn) < lsn_from_str(after_freeze)
    # Everything accepted before the freeze is on the target once the freeze marker is.
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    assert state.last_marker is not None and state.last_marker["content"] == "verify-1"
    assert lsn_from_str(state.last_marker["lsn"]) == lsn_from_str(marker_lsn)
    # The other waiting style (LSN read after the freeze) agrees.
    await asyncio.to_thread(wait_for_fence, target.dsn, move.names, token=TOKEN + 1,
                            through_lsn=after_freeze, timeout=15)
    # Fence changes are markers only: the target's own fence row is untouched.
    assert (await target.fence(collection_name, CHUNK)).state == FenceState.RECEIVING  # type: ignore[union-attr]
    kinds = [type(m).__name__ for _, m in box["applier"].stats.markers]
    assert kinds == ["MessageMarker", "FenceMarker"]
    assert_running(box)


async def test_hold_at_lsn_and_release(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier()
    writer = Writer(source, collection_name, 5, range(200))
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    await until_ops([writer], [task], 300, box)

    # Verify-phase protocol: pause, take a source snapshot at L, move the hold to L.
    paused = await asyncio.to_thread(request_hold, target.dsn, move.names, None)
    await asyncio.to_thread(wait_held, target.dsn, move.names, paused, 15)
    verify = move.spec.model_copy(update={"part": "vfy"})
    with create_slot(source.dsn, verify.names) as slot:
        assert slot.snapshot_name
        with psycopg.connect(source.dsn) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute(psycopg.sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                psycopg.sql.Literal(slot.snapshot_name)))
            at_snapshot = conn.execute(psycopg.sql.SQL(
                "SELECT khash, id, doc::text FROM {} WHERE khash >= 0 ORDER BY khash, id"
            ).format(collection_table(collection_name))).fetchall()
    with pytest.raises(HoldTooLateError):
        request_hold(target.dsn, move.names, "0/10")
    await asyncio.to_thread(request_hold, target.dsn, move.names, slot.consistent_lsn)
    await asyncio.to_thread(wait_held, target.dsn, move.names, slot.consistent_lsn, 15)
    await until_ops([writer], [task], 900, box)  # the source moves on while the target holds
    assert chunk_rows(target.dsn, collection_name) == at_snapshot
    assert chunk_rows(source.dsn, collection_name) != at_snapshot

    release_hold(target.dsn, move.names)
    stop.set()
    await task
    await wait_applied(move)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    assert_running(box)


def slot_feedback(dsn: str, slot: str) -> tuple[int, float]:
    """The slot's confirmed position and when its walsender last heard from the applier
    (``pg_stat_replication.reply_time``, epoch seconds; 0 before any reply)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(s.confirmed_flush_lsn, '0/0')::text,"
            " coalesce(extract(epoch FROM r.reply_time), 0)::float8"
            " FROM pg_replication_slots s LEFT JOIN pg_stat_replication r"
            " ON r.pid = s.active_pid WHERE s.slot_name = %s", (slot,),
        ).fetchone()
    assert row is not None, f"no slot {slot}"
    return lsn_from_str(row[0]), float(row[1])


async def test_the_source_learns_only_what_a_flushed_commit_covers(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """Batches commit without waiting for the target's WAL flush; until a commit that waits
    covers them, the source is not told they are applied (a target crash may still lose
    them, and the source must then send them again)."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    # No commit waits on its own for the length of the test: only the hold below makes one.
    box = move.start_applier(flush_interval=3600, heartbeat_interval=3600)
    writer = Writer(source, collection_name, 13, range(200))
    for _ in range(400):
        await writer.step()
    # (Not wait_applied: without heartbeats the state row's caught-up position stays at the
    # last batch, short of the source's current position.)
    expected = chunk_rows(source.dsn, collection_name)
    await wait_until(lambda: chunk_rows(target.dsn, collection_name) == expected,
                     what="the writes on the target")
    stats: ApplierStats = box["applier"].stats
    assert stats.batches > 0 and stats.async_commits == stats.batches
    first_applied = min(stats.applied_commit_lsns)

    # The applier reports to the walsender at least every reply_interval while idle: once a
    # report sent after the rows were visible has arrived, its flush position is what the
    # applier would confirm.
    visible_at = time.time()
    await wait_until(lambda: slot_feedback(source.dsn, move.names.slot)[1] > visible_at,
                     what="a status update after the batches")
    confirmed, _ = slot_feedback(source.dsn, move.names.slot)
    assert confirmed < first_applied, "the source was told of batches not yet flushed"

    # A hold is committed waiting for the flush: it makes every batch before it durable.
    held_at = await asyncio.to_thread(request_hold, target.dsn, move.names, None)
    await asyncio.to_thread(wait_held, target.dsn, move.names, held_at, 15)
    await wait_until(
        lambda: slot_feedback(source.dsn, move.names.slot)[0] >= stats.applied_lsn,
        what="the feedback after the flushed commit")
    release_hold(target.dsn, move.names)
    assert_running(box)


async def bidirectional(request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
                        a: PostgresShard, b: PostgresShard, collection: str) -> None:
    """A->B and B->A at once, both under origins: each write arrives once and never returns."""
    for shard in (a, b):
        await shard.ensure_schema()
        await shard.create_collection(collection)
        await shard.put_fence(collection, CHUNK, RANGE, TOKEN, FenceState.ACTIVE)
    fwd = new_move(request, cleanup, a, b, collection, "fwd")
    rev = new_move(request, cleanup, b, a, collection, "rev")
    for m in (fwd, rev):
        create_publication(m.source.dsn, m.names, collection, CHUNK, RANGE)
        with create_slot(m.source.dsn, m.names, export_snapshot=False):
            pass
    box_f = fwd.start_applier()
    box_r = rev.start_applier()
    keys_a = [k for k in range(4000) if chunk_of(k) == CHUNK][:60]
    keys_b = [k for k in range(4000, 8000) if chunk_of(k) == CHUNK][:60]
    ref = FenceRef(chunk_id=CHUNK, token=TOKEN)
    for ka, kb in zip(keys_a, keys_b, strict=True):
        await a.insert(collection, ref, khash(ka), {"_id": ka, "k": ka, "n": 1, "from": "a"})
        await b.insert(collection, ref, khash(kb), {"_id": kb, "k": kb, "n": 1, "from": "b"})
    for ka in keys_a[:20]:
        await a.patch(collection, ref, khash(ka), ka, {"$inc": {"n": 1}}, protected=("_id",))
    for kb in keys_b[:10]:
        await b.delete(collection, ref, khash(kb), kb)
    await wait_applied(fwd, a.dsn)
    await wait_applied(rev, b.dsn)
    await wait_applied(fwd, a.dsn)  # anything echoed by B would have come back by now
    rows_a, rows_b = chunk_rows(a.dsn, collection), chunk_rows(b.dsn, collection)
    assert rows_a == rows_b
    assert len(rows_a) == 60 + 50
    sa: ApplierStats = box_f["applier"].stats
    sb: ApplierStats = box_r["applier"].stats
    # Each side applied exactly the other side's own transactions: no echo came back.
    assert sa.applied_txns == 60 + 20
    assert sb.applied_txns == 60 + 10
    assert_running(box_f)
    assert_running(box_r)


async def test_bidirectional_without_loops_pg18(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    await bidirectional(request, cleanup, pg18_pair[0], pg18_pair[1], collection_name)


@pytest.mark.pg15
async def test_bidirectional_without_loops_pg15_and_pg18(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], pg15_dsn: str, collection_name: str,
) -> None:
    async with PostgresShard("s15", pg15_dsn) as old:
        await bidirectional(request, cleanup, old, pg18_pair[0], collection_name)


@pytest.mark.pg15
async def test_stream_from_pg15_to_pg18(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], pg15_dsn: str, collection_name: str,
) -> None:
    async with PostgresShard("s15", pg15_dsn) as source:
        target = pg18_pair[1]
        await setup_shards(source, target, collection_name)
        move = new_move(request, cleanup, source, target, collection_name)
        writers = [Writer(source, collection_name, seed, range(seed * 300, seed * 300 + 300))
                   for seed in range(3)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        await until_ops(writers, tasks, 200)
        await asyncio.to_thread(prepare_stream, move)
        box = move.start_applier()
        await until_ops(writers, tasks, 1500, box)
        stop.set()
        await asyncio.gather(*tasks)
        fence, after = await source.freeze(collection_name, CHUNK, TOKEN)
        await asyncio.to_thread(wait_for_fence, target.dsn, move.names, token=fence.token,
                                through_lsn=after, timeout=15)
        assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
        assert chunk_rows(target.dsn, collection_name, OTHER_RANGE) == []
        assert_running(box)


async def test_cleanup_by_migration_id_leaves_nothing(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    other = new_move(request, cleanup, source, target, collection_name + "x")
    await setup_shards(source, target, collection_name + "x")
    await asyncio.to_thread(prepare_stream, move)
    await asyncio.to_thread(prepare_stream, other)
    with pytest.raises(SlotExistsError):
        with create_slot(source.dsn, move.names):
            pass
    box = move.start_applier()
    writer = Writer(source, collection_name, 1, range(50))
    for _ in range(50):
        await writer.step()
    await wait_applied(move)
    assert leftovers(source.dsn, move.spec.migration_id) == (1, 1, 0)
    assert leftovers(target.dsn, move.spec.migration_id) == (0, 0, 1)

    # Cleanup while the applier still streams: the walsender is terminated, the slot dropped.
    report = await asyncio.to_thread(cleanup_stream_objects, source.dsn, move.spec.migration_id)
    assert report.slots == [move.names.slot] and report.publications == [move.names.publication]
    await asyncio.to_thread(move.appliers[-1][0].join, 30)
    assert "error" in box  # its stream was cut
    await asyncio.to_thread(cleanup_stream_objects, target.dsn, move.spec.migration_id)
    assert leftovers(source.dsn, move.spec.migration_id) == (0, 0, 0)
    assert leftovers(target.dsn, move.spec.migration_id) == (0, 0, 0)
    assert read_state(target.dsn, move.names) is None
    # Another migration's objects are untouched (its id shares a prefix with this one).
    assert leftovers(source.dsn, other.spec.migration_id) == (1, 1, 0)


# -- the apply throttle ------------------------------------------------------------------------


class BusyClients:
    """``n`` sessions of the source running ``pg_sleep`` (active client sessions, as a busy
    OLTP source shows them) until :meth:`release`."""

    def __init__(self, dsn: str, n: int) -> None:
        self.dsn = dsn
        self.n = n
        self.conns: list[psycopg.AsyncConnection[Any]] = []
        self.sleepers: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        for _ in range(self.n):
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                         application_name="a-busy-client")
            self.conns.append(conn)
            self.sleepers.append(asyncio.create_task(conn.execute("SELECT pg_sleep(600)")))

    @property
    def busy(self) -> bool:
        return bool(self.sleepers) and not any(t.done() for t in self.sleepers)

    async def release(self) -> None:
        for conn in self.conns:
            conn.cancel()
        await asyncio.gather(*self.sleepers, return_exceptions=True)
        for conn in self.conns:
            await conn.close()
        self.conns.clear()
        self.sleepers.clear()


@pytest.fixture
async def busy_source(stack: Stack, pg18_pair: tuple[PostgresShard, PostgresShard]
                      ) -> AsyncIterator[BusyClients]:
    """Two busy sessions of the router role on the source (the applier probes as the mover,
    as workers do)."""
    clients = BusyClients(as_role(pg18_pair[0].dsn, stack.role_name("router")), 2)
    try:
        yield clients
    finally:
        await clients.release()


async def test_apply_pauses_while_the_source_is_busy_and_resumes(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
    busy_source: BusyClients,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier(throttle=ThrottleSettings(max_active=1, check_s=0.1))
    applier: ChangeApplier = box["applier"]
    writer = Writer(source, collection_name, 11, range(300))
    for _ in range(100):
        await writer.step()
    await wait_applied(move)                 # not busy: the stream runs
    assert applier.throttle is not None and applier.throttle.pauses == 0

    await busy_source.start()                # 2 active client sessions > 1
    await wait_until(lambda: applier.throttle is not None and applier.throttle.reason,
                     what="the applier to pause")
    assert "2 active sessions (limit 1)" in str(applier.throttle.reason)
    on_target = chunk_rows(target.dsn, collection_name)
    for _ in range(200):
        await writer.step()
    probes = applier.throttle.probes
    await wait_until(lambda: applier.throttle is not None and applier.throttle.probes >= probes + 3,
                     what="three more probes of the busy source")
    # Nothing of what the source committed meanwhile reached the target.
    assert chunk_rows(target.dsn, collection_name) == on_target
    assert chunk_rows(source.dsn, collection_name) != on_target
    assert_running(box)

    await busy_source.release()
    await wait_applied(move)                 # it resumes, and nothing was lost
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    assert applier.throttle.reason is None and applier.throttle.pauses >= 1
    assert_running(box)
    move.stop_appliers()
    stats: ApplierStats = box["stats"]
    assert stats.throttle_pauses >= 1 and stats.throttled_s > 0


async def test_apply_lag_bound_keeps_applying_despite_the_load(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
    busy_source: BusyClients,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    await busy_source.start()
    box = move.start_applier(throttle=ThrottleSettings(max_active=1, check_s=0.1,
                                                       max_apply_lag_bytes=1))
    applier: ChangeApplier = box["applier"]
    writer = Writer(source, collection_name, 12, range(300))
    for _ in range(300):
        await writer.step()
    await wait_applied(move)                 # a stream more than a byte behind is applied
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    assert busy_source.busy and applier.throttle is not None and applier.throttle.probes > 0
    assert_running(box)


async def test_apply_throttle_never_delays_the_freeze_marker(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
    busy_source: BusyClients,
) -> None:
    """A cutover's freeze ends a pause at once: the freeze notifies the throttle's session.
    The probe interval here is far longer than the test, so only that notification can."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    await busy_source.start()
    box = move.start_applier(throttle=ThrottleSettings(max_active=1, check_s=3600))
    applier: ChangeApplier = box["applier"]
    # Paused once it knows where the stream is (until then it runs).
    await wait_until(lambda: applier.throttle is not None and applier.throttle.reason,
                     what="the applier to pause")
    writer = Writer(source, collection_name, 13, range(100))
    for _ in range(100):
        await writer.step()
    with psycopg.connect(source.dsn, autocommit=True) as conn:
        before_freeze = current_lsn(conn)
    await source.freeze(collection_name, CHUNK, TOKEN)
    await asyncio.to_thread(wait_for_fence, target.dsn, move.names, token=TOKEN + 1,
                            state="frozen", after_lsn=before_freeze, timeout=30)
    # Every write the source accepted is on the target, while the source is still busy.
    assert busy_source.busy
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    assert applier.throttle is not None and applier.throttle.reason is None
    assert_running(box)


# -- the applier's batches: several changes per key, a row expected absent, small batches ------


def _key_in_chunk(start: int) -> int:
    k = start
    while not RANGE.contains(khash(k)):
        k += 1
    return k


def _ids(start: int, n: int) -> list[int]:
    keys: list[int] = []
    k = start
    while len(keys) < n:
        k = _key_in_chunk(k)
        keys.append(k)
        k += 1
    return keys


def _doc(key: int, **fields: object) -> str:
    return json.dumps({"_id": {"$numberInt": str(key)}, **fields})


def _id(key: int) -> str:
    return f'{{"$numberInt": "{key}"}}'


async def test_one_transaction_with_many_changes_per_key_applies_as_in_order(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    a, b, c, d, e, big = _ids(10_000, 6)
    table = collection_table(collection_name)
    ins = psycopg.sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s::jsonb)").format(table)
    upd = psycopg.sql.SQL("UPDATE {} SET doc = %s::jsonb WHERE khash = %s AND id = %s").format(table)
    dele = psycopg.sql.SQL("DELETE FROM {} WHERE khash = %s AND id = %s").format(table)
    rng = random.Random(7)
    blob = "".join(rng.choice(string.ascii_letters) for _ in range(20_000))  # TOASTed
    with psycopg.connect(source.dsn) as conn:
        for k in (c, d):
            conn.execute(ins, (khash(k), _id(k), _doc(k, n=0)))
        conn.execute(ins, (khash(big), _id(big), _doc(big, blob=blob)))
    await asyncio.to_thread(prepare_stream, move)  # c, d, big copied at the snapshot
    with psycopg.connect(source.dsn) as conn:  # one source transaction: one batch
        conn.execute(ins, (khash(a), _id(a), _doc(a, n=1)))
        conn.execute(upd, (_doc(a, n=2), khash(a), _id(a)))
        conn.execute(dele, (khash(a), _id(a)))                # a: insert, update, delete
        conn.execute(ins, (khash(b), _id(b), _doc(b, n=1)))
        conn.execute(upd, (_doc(b, n=2), khash(b), _id(b)))   # b: insert, update
        conn.execute(upd, (_doc(c, n=1), khash(c), _id(c)))
        conn.execute(dele, (khash(c), _id(c)))                # c: update, delete
        conn.execute(dele, (khash(d), _id(d)))
        conn.execute(ins, (khash(d), _id(d), _doc(d, n=9)))   # d: delete, insert again
        conn.execute(ins, (khash(e), _id(e), _doc(e, n=1)))
        conn.execute(dele, (khash(e), _id(e)))
        conn.execute(ins, (khash(e), _id(e), _doc(e, n=2)))   # e: insert, delete, insert
        # big: an update that leaves the TOASTed document unchanged
        conn.execute(psycopg.sql.SQL("UPDATE {} SET khash = khash WHERE khash = %s AND id = %s")
                     .format(table), (khash(big), _id(big)))
    box = move.start_applier()
    await wait_applied(move)
    assert_running(box)
    rows = chunk_rows(target.dsn, collection_name)
    assert rows == chunk_rows(source.dsn, collection_name)
    by_id = {row[1]: row[2] for row in rows}
    assert _id(a) not in by_id and _id(c) not in by_id
    assert '"n": 2' in by_id[_id(b)] and '"n": 9' in by_id[_id(d)] and '"n": 2' in by_id[_id(e)]
    assert blob in by_id[_id(big)]
    assert box["applier"].stats.plain_insert_fallbacks == 0


async def test_a_row_the_batch_expected_absent_is_upserted(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """A target that holds a row the source then inserts (written behind the applier's back)
    still ends equal to the source: the plain insert falls back to the upsert, nothing else
    of the batch is lost."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    keys = _ids(20_000, 50)
    table = collection_table(collection_name)
    ins = psycopg.sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s::jsonb)").format(table)
    with psycopg.connect(target.dsn) as conn:
        conn.execute(ins, (khash(keys[10]), _id(keys[10]), _doc(keys[10], stale=1)))
    with psycopg.connect(source.dsn) as conn:
        for k in keys:
            conn.execute(ins, (khash(k), _id(k), _doc(k, n=k)))
    box = move.start_applier()
    await wait_applied(move)
    assert_running(box)
    rows = chunk_rows(target.dsn, collection_name)
    assert rows == chunk_rows(source.dsn, collection_name)
    assert len(rows) == 50 and all("stale" not in row[2] for row in rows)
    assert box["applier"].stats.plain_insert_fallbacks == 1


async def test_small_batches_read_while_the_target_applies(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """A backlog of many transactions applied in small batches (the stream is read while the
    target works on each): the target ends equal to the source, every change applied once."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    keys = _ids(30_000, 400)
    ref = FenceRef(chunk_id=CHUNK, token=TOKEN)
    changes = 0
    for k in keys:
        await source.insert(collection_name, ref, khash(k), {"_id": k, "k": k, "n": 0})
        changes += 1
    for k in keys[::2]:
        await source.patch(collection_name, ref, khash(k), k, {"$inc": {"n": 1}},
                           protected=("_id", "k"))
        changes += 1
    for k in keys[::5]:
        await source.delete(collection_name, ref, khash(k), k)
        changes += 1
    box = move.start_applier(max_batch_changes=37)
    await wait_applied(move)
    assert_running(box)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    stats = box["applier"].stats
    assert stats.applied_changes == changes
    assert stats.batches > 10


async def test_keys_and_documents_with_any_text_arrive_byte_for_byte(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """Ids and documents travel from the stream into the target's COPY as the bytes the
    source sent: backslashes, tabs, newlines, carriage returns, quotes and text outside
    ASCII (in ids and inside documents, inserted and updated) arrive exactly as written."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    nasty = ["back\\slash", "tab\there", "new\nline", "cr\rhere", 'quote"s', "\\N",
             "é ü ß", "日本語", "emoji 😀", "\\\\t\t\\n", "\x01\x1f ctl"]
    keys = _ids(40_000, len(nasty))
    table = collection_table(collection_name)
    ins = psycopg.sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s::jsonb)").format(table)
    upd = psycopg.sql.SQL("UPDATE {} SET doc = %s::jsonb WHERE khash = %s AND id = %s").format(table)
    with psycopg.connect(source.dsn) as conn:
        for k, text in zip(keys, nasty, strict=True):
            conn.execute(ins, (khash(k), f"{k}|{text}", _doc(k, s=text, **{text: 1})))
        conn.commit()
        for k, text in list(zip(keys, nasty, strict=True))[::2]:
            conn.execute(upd, (_doc(k, s=text + text, n=2, **{text: 1}), khash(k), f"{k}|{text}"))
    box = move.start_applier()
    await wait_applied(move)
    assert_running(box)
    rows = chunk_rows(target.dsn, collection_name)
    assert rows == chunk_rows(source.dsn, collection_name)
    assert len(rows) == len(nasty)
    by_id = {row[1].split("|", 1)[1]: json.loads(row[2]) for row in rows}
    for i, text in enumerate(nasty):
        assert by_id[text]["s"] == (text + text if i % 2 == 0 else text)
        assert by_id[text][text] == 1


async def test_stream_watch_wakes_on_the_appliers_notification_of_the_freeze(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
) -> None:
    """The cutover's wait for its freeze marker is woken by the applier (a notification sent
    with the batch that applied the fence change), not by a polling interval: with a fallback
    interval of 600 s the wait still ends once the freeze is applied, and everything the
    source accepted before the freeze is then on the target."""
    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    box = move.start_applier()
    writer = Writer(source, collection_name, 5, range(40))
    for _ in range(60):
        await writer.step()

    async with await StreamWatch.open(target.dsn, move.names) as watch:
        before = await source.wal_lsn()
        # The applier has not applied this freeze yet (it has not happened): not reached.
        with pytest.raises(TimeoutError):
            await watch.wait_for_fence(token=TOKEN + 1, after_lsn=before, timeout=0.0)
        fence = await source.freeze_fence(collection_name, CHUNK, TOKEN)
        assert (fence.token, fence.state) == (TOKEN + 1, FenceState.FROZEN)
        # A liveness bound far below the fallback interval.
        state = await asyncio.wait_for(
            watch.wait_for_fence(token=TOKEN + 1, after_lsn=before, timeout=600, interval=600),
            timeout=60)
    assert state.fence_state == "frozen" and state.fence_lsn is not None
    assert lsn_from_str(state.fence_lsn) >= lsn_from_str(before)
    assert chunk_rows(target.dsn, collection_name) == chunk_rows(source.dsn, collection_name)
    # A retried freeze (already frozen) is idempotent and changes nothing.
    assert await source.freeze_fence(collection_name, CHUNK, TOKEN) == fence
    assert_running(box)


async def test_c_and_python_decoders_read_the_same_stream_alike(
    request: pytest.FixtureRequest, cleanup: list[tuple[str, str]],
    pg18_pair: tuple[PostgresShard, PostgresShard], collection_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same slot read twice, through the C accelerator and through the pure-Python path
    (``SHARDSHIFT_PURE_PYTHON=1``; nothing confirmed, so the second read gets the same
    stream): the same transactions, changes and markers. The stream has inserts, updates,
    deletes, documents kept as unchanged TOAST, rows outside the decoder's range, logical
    messages and the freeze (tests/properties/test_pgoutput_fast.py adds origin-skipped
    transactions, which PostgreSQL 16+ filters on the server)."""
    from shards.postgres import _accel
    from shards.postgres.change_stream import ChangeStream
    from shards.postgres.pgoutput import Transaction, Upsert

    source, target = pg18_pair
    await setup_shards(source, target, collection_name)
    move = new_move(request, cleanup, source, target, collection_name)
    await asyncio.to_thread(prepare_stream, move)
    writer = Writer(source, collection_name, 11, range(300))
    for _ in range(600):
        await writer.step()
    # A large document (stored out of line) in the decoder's range, then an UPDATE that
    # leaves it as it is: pgoutput sends it as "unchanged TOAST".
    big = next(k for k in range(10**6, 10**6 + 1000) if 0 <= khash(k) < 2**62)
    rng = random.Random(5)
    pad = "".join(rng.choice(string.ascii_letters) for _ in range(20_000))
    await source.insert(collection_name, FenceRef(chunk_id=CHUNK, token=TOKEN), khash(big),
                        {"_id": big, "k": big, "pad": pad})
    with psycopg.connect(source.dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("UPDATE {} SET doc = doc WHERE khash = %s").format(
            collection_table(collection_name)), (khash(big),))
        emit_marker(conn, move.names, "m-1")
    _, after_freeze = await source.freeze(collection_name, CHUNK, TOKEN)
    end = lsn_from_str(after_freeze)
    # A narrower range than the publication's: the decoder drops rows outside it.
    narrow = KeyRange(lo=RANGE.lo, hi=2**62)

    def read(pure: bool) -> tuple[str, list[Transaction]]:
        if pure:
            monkeypatch.setenv(_accel.PURE_PYTHON_ENV, "1")
        else:
            monkeypatch.delenv(_accel.PURE_PYTHON_ENV, raising=False)
        stream = ChangeStream(source.dsn, move.names, collection_name, CHUNK, narrow)
        txns: list[Transaction] = []
        with stream:
            while stream.received_lsn < end:
                txns.extend(t for t in stream.poll(1.0, max_changes=97)
                            if isinstance(t, Transaction))
        return stream.decoder_path, txns

    monkeypatch.delenv(_accel.PURE_PYTHON_ENV, raising=False)
    built = _accel.accelerator() is not None
    c_path, c_txns = await asyncio.to_thread(read, False)
    py_path, py_txns = await asyncio.to_thread(read, True)
    assert py_path == "python"
    assert c_path == ("c" if built else "python")
    assert c_txns == py_txns
    changes = [c for t in c_txns for c in t.changes]
    assert any(type(c) is Upsert and c.doc is None for c in changes)  # unchanged TOAST
    assert any(type(c) is Upsert and c.fresh for c in changes)
    assert any(type(c) is not Upsert for c in changes)  # deletes
    assert all(RANGE.lo <= c.khash < narrow.hi for c in changes)  # type: ignore[union-attr]
    assert [type(m).__name__ for t in c_txns for m in t.markers] == ["MessageMarker",
                                                                     "FenceMarker"]
