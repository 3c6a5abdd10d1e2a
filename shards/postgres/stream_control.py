"""The stream's control surface, kept on the target: state rows, holds and waits.

Any process (the applier, the verify and cutover activities, the doctor) reads and steers a
stream through its target shard. This module holds the tables (:data:`APPLY_DDL`), the models
of a stream's row (:class:`StreamState`, :class:`Lag`, :class:`StreamHold`), the errors the
applier and its callers share, and the functions that request, release, check and wait for a
hold, a fence or a caught-up position. The applier that writes these rows is
``shards/postgres/apply.py`` (its docstring has the apply loop and its invariants).

Control surface (other processes, through the target)
------------------------------------------------------
``shardshift.stream_state`` holds one row per stream, keyed by the stream's name:

* ``applied_lsn`` / ``applied_commit_at``: end LSN and source commit time of the last
  applied source transaction (the truth the origin is reset to at start-up).
* ``caught_up_lsn``: every source transaction committing before it is applied (advances on
  idle keepalives too), ``source_lsn``: the source position last reported by the server,
  ``lag_s``: source commit to target commit of the last batch (0 when caught up).
* ``hold_at_lsn`` / ``held``: a hold request. With ``hold_at_lsn = L`` the applier applies
  every transaction whose commit record starts before L (exactly those an exported snapshot
  at L sees) and none after; once it knows no more such transactions can come (it has seen a
  later transaction or a server position at or past L) it sets ``held``. The target then
  equals the source as of L until :func:`release_hold`. :func:`request_hold` takes the same
  advisory lock as a batch, so a hold never races a batch that would overshoot it; a hold
  below what is already applied is refused (:class:`HoldTooLateError`). The verify phase
  pauses first (``request_hold(lsn=None)``: hold at the applied LSN), then takes its source
  snapshot at L, then moves the hold forward to L. Changing the hold (request or release)
  also takes the stream's *hold lock* exclusively. Whoever relies on the hold checks it
  where it acts (:func:`check_held`): a reader in the snapshot it reads (the state row
  commits with the data), a writer by pinning it in its own transaction (the hold lock,
  shared), so a repair written "at L" can never land behind the applier, and the applier
  itself, which never takes the hold lock, keeps answering its walsender meanwhile.
* ``fence_lsn`` / ``fence_token`` / ``fence_state``: the last change of the chunk's fence row
  on the source, with the commit LSN that carried it; the cutover waits here for the freeze
  (:func:`wait_for_fence`). ``last_marker``: the last logical message of the stream.
  ``shardshift.stream_markers`` keeps every marker (they are rare) for audit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict

from shards.postgres.pgoutput import lsn_from_str, lsn_to_str
from shards.postgres.replication import StreamNames, current_lsn

APPLY_DDL = r"""
CREATE TABLE IF NOT EXISTS shardshift.stream_state (
    stream            text PRIMARY KEY,      -- the stream's name (= its origin's name)
    migration_id      text NOT NULL,
    applied_lsn       pg_lsn,                -- end LSN of the last applied source transaction
    applied_commit_at timestamptz,           -- its commit time on the source
    caught_up_lsn     pg_lsn,                -- everything committing before it is applied
    source_lsn        pg_lsn,                -- latest position the source reported
    lag_s             double precision,      -- source commit -> target commit, last batch
    hold_at_lsn       pg_lsn,                -- hold request (NULL: none)
    held              boolean NOT NULL DEFAULT false,
    fence_lsn         pg_lsn,                -- commit LSN of the last fence change seen
    fence_token       bigint,
    fence_state       text,
    last_marker       jsonb,
    applier_pid       int,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS shardshift.stream_markers (
    stream      text   NOT NULL,
    commit_lsn  pg_lsn NOT NULL,
    ord         int    NOT NULL,
    kind        text   NOT NULL,            -- 'fence' | 'message'
    body        jsonb  NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, commit_lsn, ord)
);
"""

_DDL_LOCK = 0x5348_4152_4453_4846  # the engine's schema DDL lock (engine._DDL_LOCK)

STREAM_CHANNEL = "shardshift_stream"
"""Notified (payload: the stream's name) by an applier batch that applied a fence change, at
its commit: :class:`StreamWatch` wakes on it instead of polling."""


class ApplyError(Exception):
    """The applier cannot continue (its state disagrees with the target's)."""


class StreamStateError(ApplyError):
    """The stream's state on the target is gone or contradicts itself: no retry can fix it,
    so the move must be aborted (and may be started again)."""


class HoldTooLateError(ApplyError):
    """The applier has already applied past the requested hold LSN."""


class HoldLostError(ApplyError):
    """The applier is not held where the caller relies on it being held (the hold was moved
    or released, or never reached): whatever the caller was about to read or write at that
    point of the stream would be wrong, so it must start again."""


class StopRequested(Exception):  # a request, not a failure
    """The caller's stop event was set; the operation was abandoned (nothing half-written)."""


@dataclass(frozen=True, slots=True)
class StreamHold:
    """A hold someone relies on: the stream's applier held at exactly ``lsn``."""

    names: StreamNames
    lsn: str


class StreamState(BaseModel):
    """A stream's row of ``shardshift.stream_state`` (LSNs in ``pg_lsn`` text form)."""

    model_config = ConfigDict(frozen=True)

    stream: str
    migration_id: str
    applied_lsn: str | None
    applied_commit_at: datetime | None
    caught_up_lsn: str | None
    source_lsn: str | None
    lag_s: float | None
    hold_at_lsn: str | None
    held: bool
    fence_lsn: str | None
    fence_token: int | None
    fence_state: str | None
    last_marker: dict[str, Any] | None
    updated_at: datetime


class Lag(BaseModel):
    """How far a stream's target is behind its source."""

    model_config = ConfigDict(frozen=True)

    source_lsn: str
    caught_up_lsn: str | None
    lag_bytes: int
    commit_lag_s: float | None


def ensure_apply_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the stream state tables on a shard (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
        conn.execute(APPLY_DDL)


def batch_lock_sql() -> str:
    """The stream's batch lock: every batch, and every change of the hold."""
    return "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7411))"


def _hold_lock_sql(*, shared: bool) -> str:
    """The stream's hold lock: exclusive to change the hold, shared to rely on it while
    writing (:func:`check_held`). The applier never takes it, so relying on a hold for a while
    does not stall the applier's keepalives and heartbeats."""
    if shared:
        return "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 7412))"
    return "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7412))"


def _as_lsn(value: str | int) -> int:
    return value if isinstance(value, int) else lsn_from_str(value)


# -- control surface (any process) -------------------------------------------------------------

_STATE_COLUMNS = (
    "stream, migration_id, applied_lsn::text, applied_commit_at, caught_up_lsn::text,"
    " source_lsn::text, lag_s, hold_at_lsn::text, held, fence_lsn::text, fence_token,"
    " fence_state, last_marker, updated_at"
)


def _state(row: Sequence[Any]) -> StreamState:
    keys = ("stream", "migration_id", "applied_lsn", "applied_commit_at", "caught_up_lsn",
            "source_lsn", "lag_s", "hold_at_lsn", "held", "fence_lsn", "fence_token",
            "fence_state", "last_marker", "updated_at")
    return StreamState(**dict(zip(keys, row, strict=True)))


def read_state(target_dsn: str, names: StreamNames) -> StreamState | None:
    """The stream's state row on the target, or None before its applier first started."""
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT to_regclass('shardshift.stream_state') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM shardshift.stream_state WHERE stream = %s",  # noqa: S608 - fixed column list
            (names.origin,),
        ).fetchone()
        return _state(row) if row else None


@contextmanager
def _connection(target_dsn: str, conn: psycopg.Connection[Any] | None
                ) -> Iterator[psycopg.Connection[Any]]:
    if conn is not None:
        yield conn
        return
    with psycopg.connect(target_dsn, autocommit=True) as own:
        yield own


def request_hold(target_dsn: str, names: StreamNames, lsn: str | int | None = None, *,
                 conn: psycopg.Connection[Any] | None = None) -> str:
    """Ask the applier to hold at ``lsn`` (None: at what it has applied now); returns the hold.

    Args:
        conn: an autocommit connection to the target to make the request on (the verify
            session, so that only the attempt holding the verify lock moves the hold).

    Raises:
        HoldTooLateError: the applier has applied a transaction committing at or after ``lsn``.
        ApplyError: the stream has no state row (its applier never started).
    """
    with _connection(target_dsn, conn) as c, c.transaction():
        c.execute(batch_lock_sql(), (names.origin,))
        c.execute(_hold_lock_sql(shared=False), (names.origin,))
        row = c.execute(
            "SELECT applied_lsn::text FROM shardshift.stream_state WHERE stream = %s",
            (names.origin,),
        ).fetchone()
        if row is None:
            raise ApplyError(f"stream {names.origin} has no state on this shard")
        applied = lsn_from_str(row[0]) if row[0] else 0
        hold = applied if lsn is None else _as_lsn(lsn)
        if applied > hold:
            raise HoldTooLateError(
                f"stream {names.origin} has applied through {lsn_to_str(applied)}, past the "
                f"requested hold {lsn_to_str(hold)}; pause first (request_hold(lsn=None)), "
                "then take the snapshot and move the hold forward"
            )
        c.execute(
            "UPDATE shardshift.stream_state SET hold_at_lsn = %s::pg_lsn,"
            " held = (held AND hold_at_lsn = %s::pg_lsn) WHERE stream = %s",
            (lsn_to_str(hold), lsn_to_str(hold), names.origin),
        )
        return lsn_to_str(hold)


def release_hold(target_dsn: str, names: StreamNames, *,
                 conn: psycopg.Connection[Any] | None = None) -> None:
    """Let the applier continue past its hold.

    It waits for a repair pinned to the hold (:func:`check_held` with ``pin``) to end first.
    """
    with _connection(target_dsn, conn) as c, c.transaction():
        c.execute(_hold_lock_sql(shared=False), (names.origin,))
        c.execute(
            "UPDATE shardshift.stream_state SET hold_at_lsn = NULL, held = false"
            " WHERE stream = %s", (names.origin,),
        )


def check_held(conn: psycopg.Connection[Any], hold: StreamHold, *, pin: bool) -> None:
    """Raise :class:`HoldLostError` unless the applier holds at exactly ``hold.lsn``, as seen by
    ``conn``'s open transaction.

    In a ``REPEATABLE READ`` transaction the answer is about the transaction's snapshot, and
    the state row commits atomically with the data: a snapshot that sees the applier held at
    L sees the target exactly as of L (a checksum taken in it compares with the source at L).
    With ``pin`` (a transaction that is about to write) it first takes the stream's hold lock
    shared: until the transaction ends nobody can move or release the hold, and an applier
    held at L applies nothing while its hold stays at L, so what the transaction writes lands
    exactly at L, never behind the applier.
    """
    if pin:
        conn.execute(_hold_lock_sql(shared=True), (hold.names.origin,))
    row = conn.execute(
        "SELECT hold_at_lsn::text, held FROM shardshift.stream_state WHERE stream = %s",
        (hold.names.origin,),
    ).fetchone()
    want = _as_lsn(hold.lsn)
    if row is None or not row[1] or not row[0] or lsn_from_str(row[0]) != want:
        raise HoldLostError(
            f"stream {hold.names.origin}: the applier is not held at {lsn_to_str(want)} "
            f"(hold {row[0] if row else None}, held {row[1] if row else None}); "
            "refusing to read or write the target at that point"
        )


def _wait(target_dsn: str, names: StreamNames, ok: Callable[[StreamState], bool],
          timeout: float, what: str, interval: float = 0.02,
          stop: threading.Event | None = None) -> StreamState:
    deadline = time.monotonic() + timeout
    last: StreamState | None = None
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        while True:
            try:
                row = conn.execute(
                    f"SELECT {_STATE_COLUMNS} FROM shardshift.stream_state WHERE stream = %s",  # noqa: S608 - fixed column list
                    (names.origin,),
                ).fetchone()
            except psycopg.errors.UndefinedTable:
                # No applier has started on this shard yet (it creates the table): wait.
                row = None
            last = _state(row) if row else None
            if last is not None and ok(last):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {names.origin}: {what} not reached in {timeout}s "
                                   f"(state: {last})")
            if stop is not None and stop.wait(interval):
                raise StopRequested(f"stream {names.origin}: stopped waiting for {what}")
            if stop is None:
                time.sleep(interval)


def wait_held(target_dsn: str, names: StreamNames, lsn: str | int, timeout: float = 30.0,
              stop: threading.Event | None = None) -> StreamState:
    """Wait until the applier holds exactly at ``lsn`` (the target equals the source as of
    ``lsn`` while it stays held); :class:`StopRequested` as soon as ``stop`` is set."""
    want = _as_lsn(lsn)
    return _wait(
        target_dsn, names,
        lambda s: s.held and s.hold_at_lsn is not None and lsn_from_str(s.hold_at_lsn) == want,
        timeout, f"hold at {lsn_to_str(want)}", stop=stop,
    )


def wait_caught_up(target_dsn: str, names: StreamNames, lsn: str | int, timeout: float = 30.0
                   ) -> StreamState:
    """Wait until every source transaction committing before ``lsn`` is applied."""
    want = _as_lsn(lsn)
    return _wait(
        target_dsn, names,
        lambda s: s.caught_up_lsn is not None and lsn_from_str(s.caught_up_lsn) >= want,
        timeout, f"caught up through {lsn_to_str(want)}",
    )


def wait_for_fence(
    target_dsn: str,
    names: StreamNames,
    *,
    token: int,
    state: str = "frozen",
    after_lsn: str | int | None = None,
    through_lsn: str | int | None = None,
    timeout: float = 30.0,
    interval: float = 0.02,
) -> StreamState:
    """Wait until the applier has applied the source's fence change to ``(token, state)``.

    The cutover passes ``after_lsn``, a source LSN read *before* it froze the fence: a fence
    change at or after it is this freeze, not an older one (a freeze that was undone and
    redone reaches the same token twice). Or ``through_lsn``, an LSN read after the freeze:
    once everything before it is applied, the last fence change seen is the current one.
    """
    after = _as_lsn(after_lsn) if after_lsn is not None else None
    through = _as_lsn(through_lsn) if through_lsn is not None else None

    def ok(s: StreamState) -> bool:
        return _fence_reached(s, token, state, after, through)

    return _wait(target_dsn, names, ok, timeout, f"fence token {token} ({state})", interval)


def _fence_reached(s: StreamState, token: int, state: str, after: int | None,
                   through: int | None) -> bool:
    if s.fence_token != token or s.fence_state != state or s.fence_lsn is None:
        return False
    if after is not None and lsn_from_str(s.fence_lsn) < after:
        return False
    return through is None or (
        s.caught_up_lsn is not None and lsn_from_str(s.caught_up_lsn) >= through
    )


class StreamWatch:
    """A session on a stream's target that LISTENs on :data:`STREAM_CHANNEL`, opened before a
    wait (the cutover opens it before it freezes, so neither the connection nor the LISTEN
    is inside the writes' pause).

    :meth:`wait_for_fence` is :func:`wait_for_fence` woken by the applier's notification
    (sent with the batch that applied the fence change) instead of a polling interval. It
    reads the state row after every wake, so a notification is only a hint: one missed, or
    an applier that sends none (an older version), costs at most ``interval``, the fallback
    re-read, never a wrong answer.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], names: StreamNames) -> None:
        self._conn = conn
        self.names = names

    @classmethod
    async def open(cls, target_dsn: str, names: StreamNames) -> StreamWatch:
        conn = await psycopg.AsyncConnection.connect(target_dsn, autocommit=True)
        try:
            await conn.execute(f"LISTEN {STREAM_CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        return cls(conn, names)

    @property
    def connection(self) -> psycopg.AsyncConnection[Any]:
        """The session itself (autocommit), for a statement the waiter runs right after the
        wait on the same server (the cutover's activation of the new owner)."""
        return self._conn

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> StreamWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> StreamState | None:
        try:
            cur = await self._conn.execute(
                f"SELECT {_STATE_COLUMNS} FROM shardshift.stream_state WHERE stream = %s",  # noqa: S608 - fixed column list
                (self.names.origin,),
            )
        except psycopg.errors.UndefinedTable:
            return None  # no applier has started on this shard yet (it creates the table)
        row = await cur.fetchone()
        return _state(row) if row else None

    async def wait_for_fence(
        self, *, token: int, state: str = "frozen", after_lsn: str | int | None = None,
        through_lsn: str | int | None = None, timeout: float = 30.0, interval: float = 0.05,
    ) -> StreamState:
        """Until the applier has applied the source's fence change to ``(token, state)``
        (``after_lsn`` and ``through_lsn`` as in :func:`wait_for_fence`); ``TimeoutError``
        after ``timeout`` seconds."""
        after = _as_lsn(after_lsn) if after_lsn is not None else None
        through = _as_lsn(through_lsn) if through_lsn is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            last = await self._read()
            if last is not None and _fence_reached(last, token, state, after, through):
                return last
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"stream {self.names.origin}: fence token {token} ({state}) "
                                   f"not reached in {timeout}s (state: {last})")
            # Any notification on the channel (or one that arrived during the read: psycopg
            # keeps those) wakes us to read again; else the fallback interval does.
            async for _ in self._conn.notifies(timeout=min(interval, left), stop_after=1):
                break


def measure_lag(source_dsn: str, target_dsn: str, names: StreamNames) -> Lag:
    """Source WAL position vs the target's caught-up position, and the commit-time lag."""
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        source = current_lsn(conn)
    st = read_state(target_dsn, names)
    caught = lsn_from_str(st.caught_up_lsn) if st and st.caught_up_lsn else 0
    return Lag(
        source_lsn=lsn_to_str(source),
        caught_up_lsn=st.caught_up_lsn if st else None,
        lag_bytes=max(0, source - caught) if caught else source,
        commit_lag_s=st.lag_s if st else None,
    )


__all__ = [
    "APPLY_DDL",
    "STREAM_CHANNEL",
    "ApplyError",
    "HoldLostError",
    "HoldTooLateError",
    "Lag",
    "StopRequested",
    "StreamHold",
    "StreamState",
    "StreamStateError",
    "StreamWatch",
    "batch_lock_sql",
    "check_held",
    "ensure_apply_schema",
    "measure_lag",
    "read_state",
    "release_hold",
    "request_hold",
    "wait_caught_up",
    "wait_for_fence",
    "wait_held",
]
