"""The cutover heartbeats while it prepares its pause (``activities.cutover._Attempt.freeze_old``).

Opening the session that waits for the freeze marker and reading the old owner's WAL position
come before the freeze; on a loaded host a new connection can outlast the cutover's short
heartbeat timeout (2 s), and a missed heartbeat cancels the attempt. Both steps heartbeat
while they wait. Here they wait on purpose until the activity has heartbeated (no clock in
the assertion: a step that never heartbeats leaves its wait to the guard and fails).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

import activities.cutover as ac
from activities.models import CutoverInput, MoveSpec
from shards.models import Fence, FenceState, KeyRange

GUARD_S = 60.0
"""Only against a hang (a step that never heartbeats): no timing is asserted."""


class _Watch:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _Engine:
    def __init__(self, beats: list[str], seen: asyncio.Event) -> None:
        self.beats, self.seen = beats, seen
        self.freezer: _Watch | None = None

    async def wal_lsn(self) -> str:
        await _until_beat(self.beats, self.seen, "reading the WAL position")
        return "0/10"

    async def connect_async(self) -> _Watch:
        await _until_beat(self.beats, self.seen, "opening the session that freezes")
        self.freezer = _Watch()
        return self.freezer

    async def freeze_fence(self, collection: str, chunk_id: int, token: int, *,
                           conn: Any = None) -> Fence:
        assert conn is self.freezer  # the session opened before the pause
        return Fence(collection=collection, chunk_id=chunk_id, range=KeyRange(lo=0, hi=10),
                     token=token + 1, state=FenceState.FROZEN)


async def _until_beat(beats: list[str], seen: asyncio.Event, what: str) -> None:
    """Return once the activity heartbeated ``what`` (the step waits on purpose)."""
    while what not in beats:
        seen.clear()
        await asyncio.wait_for(seen.wait(), GUARD_S)


@pytest.mark.asyncio
async def test_freeze_old_heartbeats_while_opening_the_wait_session_and_reading_the_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    beats: list[str] = []
    seen = asyncio.Event()
    watch = _Watch()

    async def slow_open(dsn: str, names: Any) -> _Watch:
        await _until_beat(beats, seen, "opening the session that waits for the marker")
        return watch

    monkeypatch.setattr(ac.StreamWatch, "open", staticmethod(slow_open))
    spec = MoveSpec(migration_id="m-heartbeat", collection="c", chunk_id=1,
                    key_range=KeyRange(lo=0, hi=10), source="s1", target="s2", token=3)
    run = ac._Run.of(CutoverInput(spec=spec))
    engine = _Engine(beats, seen)
    attempt = ac._Attempt(ac.CutoverActivities(ctx=None),  # type: ignore[arg-type]
                          run, old_dsn="old", new_dsn="new", old_engine=engine,  # type: ignore[arg-type]
                          new_engine=engine)  # type: ignore[arg-type]

    env = ActivityEnvironment()

    def on_heartbeat(*details: Any) -> None:
        beats.extend(str(d) for d in details)
        seen.set()

    env.on_heartbeat = on_heartbeat
    fence, before = await env.run(attempt.freeze_old)
    assert (fence.token, fence.state, before) == (4, FenceState.FROZEN, "0/10")
    assert beats.index("opening the session that waits for the marker") \
        < beats.index("opening the session that freezes") \
        < beats.index("reading the WAL position") < beats.index("freezing")
    assert attempt.watch is watch
    assert attempt.freezer is engine.freezer
    await attempt.close()
    assert watch.closed
    assert engine.freezer is not None and engine.freezer.closed
