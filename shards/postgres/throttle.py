"""A throttle for the bulk copy that protects the source shard.

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
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from shards.postgres.stream_control import StopRequested

ACTIVE_SESSIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    " AND application_name NOT LIKE 'shardshift-%'"
)
"""Client sessions of the source running a statement, shardshift's own left out."""


class ThrottleSettings(BaseModel):
    """Limits of one copy (None: no limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rows_per_s: float | None = Field(default=None, gt=0)
    bytes_per_s: float | None = Field(default=None, gt=0)
    max_active: int | None = Field(default=None, ge=0)
    """Pause while the source has more active client sessions than this."""
    check_s: float = Field(default=1.0, gt=0)

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


__all__ = ["ACTIVE_SESSIONS_SQL", "CopyThrottle", "ThrottleSettings"]
