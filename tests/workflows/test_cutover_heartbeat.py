"""The cutover heartbeats while it prepares its pause (``activities.cutover._Attempt.open_pause``).

Opening the sessions of the pause (the pause thread's: the freeze's on the old owner and the
one that waits for the freeze marker on the new owner; the activation's) and reading the old
owner's WAL position come before the freeze; on a loaded host a new connection can outlast
the cutover's short heartbeat timeout (2 s), and a missed heartbeat cancels the attempt. Each
step heartbeats while it waits. Here they wait on purpose until the activity has heartbeated
(no clock in the assertion: a step that never heartbeats leaves its wait to the guard and
fails). Then the freeze and the wait run on the pause thread, on those sessions.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

import activities.cutover as ac
from activities.models import CutoverInput, MoveSpec
from shards.models import Fence, FenceState, KeyRange

GUARD_S = 60.0
"""Only against a hang (a step that never heartbeats): no timing is asserted."""

OPEN_PAUSE = "opening the sessions that freeze and wait for the marker"


class _Beats:
    """The heartbeats seen so far, waitable from the event loop and from threads."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.cond = threading.Condition()

    def add(self, what: str) -> None:
        with self.cond:
            self.seen.append(what)
            self.cond.notify_all()

    def wait_blocking(self, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: what in self.seen, GUARD_S), what

    async def wait(self, what: str) -> None:
        await asyncio.to_thread(self.wait_blocking, what)


class _Session:
    closed = False

    def close(self) -> None:
        self.closed = True


class _AsyncSession:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _Watch(_Session):
    def __init__(self) -> None:
        self.waited_in: str | None = None

    def wait_for_fence(self, *, token: int, state: str, after_lsn: Any, timeout: float,
                       stop: threading.Event) -> str:
        assert (token, state, after_lsn) == (4, "frozen", "0/10")
        self.waited_in = threading.current_thread().name
        return "caught up"


class _Engine:
    def __init__(self, beats: _Beats) -> None:
        self.beats = beats
        self.activator: _AsyncSession | None = None

    async def connect_async(self) -> _AsyncSession:
        await self.beats.wait("opening the session that activates")
        self.activator = _AsyncSession()
        return self.activator

    async def wal_lsn(self) -> str:
        await self.beats.wait("reading the WAL position")
        return "0/10"


@pytest.mark.asyncio
async def test_open_pause_heartbeats_while_opening_its_sessions_and_reading_the_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    beats = _Beats()
    watch, freezer = _Watch(), _Session()
    frozen_in: list[tuple[str, Any]] = []

    def slow_open(dsn: str, names: Any) -> _Watch:
        beats.wait_blocking(OPEN_PAUSE)
        return watch

    def connect(dsn: str, **kw: Any) -> _Session:
        assert (dsn, kw) == ("old", {"autocommit": True})
        return freezer

    def freeze(conn: Any, collection: str, chunk_id: int, token: int) -> Fence:
        frozen_in.append((threading.current_thread().name, conn))
        return Fence(collection=collection, chunk_id=chunk_id, range=KeyRange(lo=0, hi=10),
                     token=token + 1, state=FenceState.FROZEN)

    monkeypatch.setattr(ac.BlockingStreamWatch, "open", staticmethod(slow_open))
    monkeypatch.setattr(ac.psycopg, "connect", connect)
    monkeypatch.setattr(ac.shard_engine, "freeze_fence_blocking", freeze)
    spec = MoveSpec(migration_id="m-heartbeat", collection="c", chunk_id=1,
                    key_range=KeyRange(lo=0, hi=10), source="s1", target="s2", token=3)
    run = ac._Run.of(CutoverInput(spec=spec))
    engine = _Engine(beats)
    attempt = ac._Attempt(ac.CutoverActivities(ctx=None),  # type: ignore[arg-type]
                          run, old_dsn="old", new_dsn="new", old_engine=engine,  # type: ignore[arg-type]
                          new_engine=engine)  # type: ignore[arg-type]

    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: [beats.add(str(d)) for d in details]

    async def pause() -> tuple[str, Fence, bool]:
        before = await attempt.open_pause()
        fence, waited = await attempt.freeze_old(before)
        return before, fence, await attempt.wait_for_catchup(waited)

    before, fence, caught_up = await env.run(pause)
    assert (before, fence.token, fence.state, caught_up) == ("0/10", 4, FenceState.FROZEN, True)
    seen = beats.seen
    assert seen.index(OPEN_PAUSE) < seen.index("opening the session that activates") \
        < seen.index("reading the WAL position") < seen.index("freezing")
    # The freeze and the wait ran on the pause thread, the freeze on the session opened first.
    assert [c for _, c in frozen_in] == [freezer]
    assert frozen_in[0][0].startswith("cutover-pause")
    assert watch.waited_in is not None and watch.waited_in.startswith("cutover-pause")
    assert attempt.steps["freeze_old"].done and attempt.steps["wait_for_catchup"].done
    assert attempt.activator is engine.activator
    await attempt.close()
    assert watch.closed and freezer.closed
    assert engine.activator is not None and engine.activator.closed
