"""Throttles of a move's reads of its source shard: the bulk copy and the change apply.

Copy (:class:`CopyThrottle`)
----------------------------
Two limits, both optional, applied between the batches of the snapshot export (the copy's
only reader of the source):

* **Rate** (``rows_per_s``, ``bytes_per_s``): after each batch the copy waits until the rows
  and bytes read so far are within the limits averaged since the copy started, so the
  average never exceeds them by more than one batch.
* **Load** (``max_active``): at most every ``check_s``, count the source's client sessions
  that are running a statement (``pg_stat_activity``, ``state = 'active'``, shardshift's own
  sessions left out); while the count is above ``max_active`` the copy waits, probing every
  ``check_s``. Chosen because it is what a busy OLTP source shows first, it is cheap to read
  and it means the same on PostgreSQL 15 and 18.

Waiting holds the export's snapshot open (the source keeps the rows it must still read),
which is the price of not reading them now. The throttle never fails the copy: a probe that
cannot connect is skipped (the copy's own connection will report a source that is down).
``stop`` ends any wait at once (:class:`~shards.postgres.apply.StopRequested`).

Apply (:class:`ApplyThrottle`)
------------------------------
The same load signal (more than ``max_active`` active client sessions, probed at most every
``check_s``) pauses the change applier between batches: it stops reading the stream, so the
source's walsender stops decoding once the socket's buffers are full. Three things end or
prevent a pause, so that it can never make the move fall arbitrarily behind or stall it:

* **The lag bound** (``max_apply_lag_bytes``): the source's WAL position minus what the applier
  has caught up to (the lag ``wait_caught_up`` and the cutover's admission measure, and the
  WAL the slot retains). Above it the applier applies despite the load, until the lag is under
  the bound again: the stream stays within about that much of the source.
* **The cutover** (the chunk's fence on the source frozen): the cutover's catch-up wait for the
  freeze marker is never throttled. The probe reads the chunk's fence with the sessions, and
  the probe's session LISTENs on :data:`FENCE_CHANNEL`, which
  ``PostgresShard.freeze`` notifies after the freeze commits: a pause in progress ends as soon
  as the notification arrives (not at the next ``check_s``), and a probe after the freeze
  sees it frozen. A freeze whose notification was lost is seen by the next probe.
* **A hold** that the applier has not reached (a verify or a repair waiting for the stream to
  reach an LSN): holds are the control plane's, and their waiters have timeouts.

``stop`` ends a pause within one wait (the applier's control interval). The apply throttle
never fails the stream: a probe that fails counts as "not loaded" and is tried again after
``check_s``. The rate limits do not apply to the apply (its reads are the walsender's).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from shards.postgres.pgoutput import lsn_from_str
from shards.postgres.stream_control import StopRequested

log = logging.getLogger(__name__)

FENCE_CHANNEL = "shardshift_fence"
"""Notified (payload ``collection/chunk_id``) by a shard whose chunk fence was just frozen:
the cutover's pause has started, so a throttled applier must run."""

DEFAULT_MAX_APPLY_LAG_BYTES = 256 * 1024 * 1024

ACTIVE_SESSIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    " AND application_name NOT LIKE 'shardshift-%'"
)
"""Client sessions of the source running a statement, shardshift's own left out."""


class ThrottleSettings(BaseModel):
    """Limits of one move's reads of its source (None: no limit): the copy's rate and load
    limits, and the apply's load limit with its lag bound."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rows_per_s: float | None = Field(default=None, gt=0)
    bytes_per_s: float | None = Field(default=None, gt=0)
    max_active: int | None = Field(default=None, ge=0)
    """Pause while the source has more active client sessions than this."""
    check_s: float = Field(default=1.0, gt=0)
    max_apply_lag_bytes: int = Field(default=DEFAULT_MAX_APPLY_LAG_BYTES, gt=0)
    """The change applier pauses for load only while its stream is at most this many bytes
    of source WAL behind (so a pause never holds more WAL than this on the source)."""

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.rows_per_s, self.bytes_per_s, self.max_active))


class CopyThrottle:
    """Paces one copy; call :meth:`after` after every batch read from the source.

    Args:
        settings: the limits.
        source_dsn: the source, for the load probe (needed with ``max_active``).
        stop: ends any wait (the copy's cancellation).
        on_wait: told why the copy waits (``None`` once it runs again): the progress line.
        clock, sleep: injectable for tests of the arithmetic (``sleep(seconds)`` returns
            True when stopped).
    """

    def __init__(self, settings: ThrottleSettings, *, source_dsn: str | None = None,
                 stop: threading.Event | None = None,
                 on_wait: Callable[[str | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
        if settings.max_active is not None and source_dsn is None:
            raise ValueError("a load throttle needs the source's DSN")
        self.settings = settings
        self.source_dsn = source_dsn
        self.stop = stop or threading.Event()
        self.on_wait = on_wait
        self.clock = clock
        self.sleep = sleep or self.stop.wait
        self.started = clock()
        self.rows = 0
        self.bytes = 0
        self.waited_s = 0.0
        """Total time spent waiting (rate and load)."""
        self.load_waits = 0
        """Probes that found the source too busy."""
        self._next_probe = self.started

    def after(self, rows: int, nbytes: int) -> None:
        """Account for a batch just read, then wait as the limits require."""
        self.rows += rows
        self.bytes += nbytes
        self._pace()
        self._load()

    def before(self) -> None:
        """Before reading more (a part): wait while the source is too busy."""
        self._load()

    def rate_delay(self) -> float:
        """Seconds to wait now so that the averages stay within the rate limits."""
        s = self.settings
        need = 0.0
        if s.rows_per_s is not None:
            need = max(need, self.rows / s.rows_per_s)
        if s.bytes_per_s is not None:
            need = max(need, self.bytes / s.bytes_per_s)
        return max(0.0, need - (self.clock() - self.started))

    def _wait(self, seconds: float, why: str) -> None:
        if self.on_wait is not None:
            self.on_wait(why)
        t0 = self.clock()
        stopped = self.sleep(seconds)
        self.waited_s += self.clock() - t0
        if stopped or self.stop.is_set():
            raise StopRequested("stopped while the copy was throttled")

    def _pace(self) -> None:
        delay = self.rate_delay()
        if delay > 0:
            self._wait(delay, "throttled: copy rate limit")
            if self.on_wait is not None:
                self.on_wait(None)

    def _load(self) -> None:
        s = self.settings
        if s.max_active is None or self.clock() < self._next_probe:
            return
        waited = False
        while True:
            active = self.active_sessions()
            self._next_probe = self.clock() + s.check_s
            if active is None or active <= s.max_active:
                break
            waited = True
            self.load_waits += 1
            self._wait(s.check_s, f"throttled: source has {active} active sessions "
                                  f"(limit {s.max_active})")
        if waited and self.on_wait is not None:
            self.on_wait(None)

    def active_sessions(self) -> int | None:
        """The source's active client sessions, or None when the probe failed."""
        assert self.source_dsn is not None
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self.source_dsn, autocommit=True, connect_timeout=5,
                                 application_name="shardshift-throttle") as conn:
                row = conn.execute(ACTIVE_SESSIONS_SQL).fetchone()
                return int(row[0]) if row else 0
        return None


@dataclass(frozen=True, slots=True)
class SourceLoad:
    """One probe of the source for the apply throttle."""

    active: int
    """Active client sessions (as :data:`ACTIVE_SESSIONS_SQL`)."""
    wal_lsn: int
    """The source's current WAL position."""
    frozen: bool
    """The chunk's fence on the source is frozen (a cutover's pause is under way)."""


_FENCE_SQL = (
    "SELECT state = 'frozen' FROM shardshift.chunk_fence WHERE collection = %s AND chunk_id = %s"
)


class ApplyThrottle:
    """Decides, between the change applier's batches, whether it pauses (see the module's
    "Apply" section).

    Args:
        settings: ``max_active`` (None: never pause), ``check_s``, ``max_apply_lag_bytes``.
        source_dsn: the stream's source (the probe's connection).
        collection, chunk_id: the chunk whose frozen fence ends any pause.
        stop: once set, never pause and end a wait at once.
        probe: injectable for tests of the decision (returns None for a failed probe);
            defaults to one query on a session of the source kept open while the applier runs.
        clock, sleep: injectable for tests (``sleep(seconds)`` returns True when stopped).
    """

    def __init__(self, settings: ThrottleSettings, *, source_dsn: str | None = None,
                 collection: str | None = None, chunk_id: int | None = None,
                 stop: threading.Event | None = None,
                 probe: Callable[[], SourceLoad | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
        if settings.max_active is not None and probe is None and (
                source_dsn is None or collection is None or chunk_id is None):
            raise ValueError("an apply throttle needs the source's DSN and the chunk")
        self.settings = settings
        self.source_dsn = source_dsn
        self.collection = collection
        self.chunk_id = chunk_id
        self.stop = stop or threading.Event()
        self.clock = clock
        self._sleep = sleep
        self._probe = probe or self._probe_source
        self._conn: psycopg.Connection[Any] | None = None
        self._has_fences = False
        self._next_probe = clock()
        self._last: SourceLoad | None = None
        self._paused_since: float | None = None
        self.reason: str | None = None
        """Why the applier is paused now (None: it runs)."""
        self.pauses = 0
        """Times the applier went from running to paused."""
        self.paused_s = 0.0
        """Total time spent paused (closed pauses)."""
        self.probes = 0

    @property
    def enabled(self) -> bool:
        return self.settings.max_active is not None

    def should_pause(self, caught_up_lsn: int, *, hold_pending: bool = False) -> bool:
        """Whether the applier should leave the stream unread now.

        Args:
            caught_up_lsn: every source transaction before it is on the target (the lag is
                the source's WAL position minus this); 0 (not known yet: nothing applied and
                no position received) never pauses.
            hold_pending: a hold is set that the applier has not reached yet.
        """
        s = self.settings
        if s.max_active is None or self.stop.is_set() or hold_pending or caught_up_lsn <= 0:
            return self._set(None)
        now = self.clock()
        if now >= self._next_probe:
            self._last = self._probe()
            self.probes += 1
            self._next_probe = self.clock() + s.check_s
        load = self._last
        if load is None or load.frozen or load.active <= s.max_active:
            return self._set(None)
        lag = load.wal_lsn - caught_up_lsn
        if lag > s.max_apply_lag_bytes:
            return self._set(None)
        return self._set(f"throttled: source has {load.active} active sessions "
                         f"(limit {s.max_active}), stream {max(lag, 0)} bytes behind "
                         f"(bound {s.max_apply_lag_bytes})")

    def _set(self, reason: str | None) -> bool:
        now = self.clock()
        if reason is not None and self._paused_since is None:
            self._paused_since = now
            self.pauses += 1
            log.info("change apply %s", reason)
        elif reason is None and self._paused_since is not None:
            self.paused_s += now - self._paused_since
            self._paused_since = None
            log.info("change apply resumes")
        self.reason = reason
        return reason is not None

    def wait(self, seconds: float) -> None:
        """Wait while paused, at most ``seconds``: returns early on ``stop`` or when the
        chunk's fence changes (the next :meth:`should_pause` probes again at once)."""
        if self.stop.is_set():
            return
        if self._sleep is not None:
            self._sleep(seconds)
            return
        conn = self._conn
        if conn is None or conn.closed:
            self.stop.wait(seconds)
            return
        try:
            for _ in conn.notifies(timeout=seconds, stop_after=1):
                self._next_probe = self.clock()  # a fence changed: look now
        except psycopg.Error:
            self._close()
            self.stop.wait(seconds)

    def _connect(self) -> psycopg.Connection[Any]:
        assert self.source_dsn is not None
        conn = psycopg.connect(self.source_dsn, autocommit=True, connect_timeout=5,
                               application_name="shardshift-throttle")
        try:
            # LISTEN before the first read of the fence: a freeze after that read notifies.
            conn.execute(f"LISTEN {FENCE_CHANNEL}")
            row = conn.execute("SELECT to_regclass('shardshift.chunk_fence') IS NOT NULL"
                               ).fetchone()
            self._has_fences = bool(row and row[0])
        except BaseException:
            conn.close()
            raise
        return conn

    def _probe_source(self) -> SourceLoad | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            row = conn.execute(
                f"SELECT ({ACTIVE_SESSIONS_SQL}), pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            frozen = False
            if self._has_fences:
                fence = conn.execute(_FENCE_SQL, (self.collection, self.chunk_id)).fetchone()
                frozen = bool(fence and fence[0])
            return SourceLoad(active=int(row[0]), wal_lsn=lsn_from_str(row[1]), frozen=frozen)
        except psycopg.Error as exc:
            log.info("apply throttle: probe of the source failed (%s); not pausing", exc)
            self._close()
            return None

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """End the probe's session (the applier calls it when it stops)."""
        self._set(None)
        self._close()


__all__ = ["ACTIVE_SESSIONS_SQL", "DEFAULT_MAX_APPLY_LAG_BYTES", "FENCE_CHANNEL",
           "ApplyThrottle", "CopyThrottle", "SourceLoad", "ThrottleSettings"]
