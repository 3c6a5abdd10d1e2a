"""Copy seats: how many move copies (snapshot export + bulk import) one worker carries at once.

A worker's capacity for the heavy part of a move is configured
(``FleetSettings.worker_max_copies``), not Temporal's activity slots: a move runs its long
stream activity beside its copy, and slots held by activities waiting for other activities
could deadlock a worker. A seat belongs to a move (its workflow id, the same across
continue-as-new) and is:

* claimed by ``migrate.staging_home`` on the shared queue, without waiting long: a worker
  whose seats are all taken refuses (a retryable ``NoCopySeat`` with a short retry delay), so
  another worker, or this one a moment later, takes the copy, which then runs on this
  worker's own queue;
* held while the move's snapshot or import runs here; a copy activity that finds no seat of
  its move (its seat expired during a pause, or the move chose its home before seats were
  configured) waits for one, heartbeating, so the bound holds whatever the path;
* freed when the import ends or the staging is released, and otherwise ``idle_s`` after the
  last copy activity of its move stopped (a cancelled or killed move, a lost answer).

Waiting never needs another activity to run: a seat is freed by a running copy ending or by
time, so there is no cycle. Everything runs on the worker's event loop (no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from temporalio import activity


def seat_key() -> str:
    """The running activity's move: its workflow id (the same across continue-as-new)."""
    info = activity.info()
    return info.workflow_id or f"activity:{info.activity_id}"


NO_COPY_SEAT = "NoCopySeat"
"""The error type ``migrate.staging_home`` refuses with when every seat is taken."""


@dataclass
class _Seat:
    users: int = 0
    """Copy activities of the move running on this worker now."""
    idle_since: float | None = None
    """When the last of them stopped (or the seat was claimed): None while one runs."""
    done: bool = False
    """Released while a copy activity of it still ran: freed when that one stops."""


class CopySeats:
    """The copy seats of one worker process (``limit`` None: unlimited, only counted)."""

    def __init__(self, limit: int | None = None, *, idle_s: float = 60.0,
                 queue: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self.queue = queue
        """This worker's own task queue, where the copies it seated run."""
        self._clock = clock
        self._seats: dict[str, _Seat] = {}
        self._changed = asyncio.Event()
        self.running = 0
        """Moves whose snapshot or import runs on this worker now."""
        self.running_peak = 0
        """The most moves whose copy ran on this worker at one time (measured, not the limit)."""
        self.seated = 0
        """Seats taken (claimed or in use; an idle one counts until it expires)."""
        self.refused = 0
        """Claims refused (or given up) because every seat was taken."""
        _ALL.add(self)

    def holds(self, key: str) -> bool:
        self._expire()
        return key in self._seats

    def _drop(self, key: str) -> None:
        if self._seats.pop(key, None) is not None:
            self.seated = len(self._seats)
            self._notify()

    def _expire(self) -> None:
        cutoff = self._clock() - self.idle_s
        for key in [k for k, s in self._seats.items()
                    if s.users == 0 and s.idle_since is not None and s.idle_since <= cutoff]:
            self._drop(key)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def try_claim(self, key: str) -> bool:
        """A seat for move ``key`` (True if it has one already or one is free)."""
        self._expire()
        seat = self._seats.get(key)
        if seat is not None:
            seat.done = False
            if seat.users == 0:
                seat.idle_since = self._clock()  # a fresh claim restarts the idle clock
            return True
        if self.limit is not None and len(self._seats) >= self.limit:
            return False
        self._seats[key] = _Seat(idle_since=self._clock())
        self.seated = len(self._seats)
        return True

    async def claim(self, key: str, wait_s: float | None,
                    tick: Callable[[], None] | None = None) -> bool:
        """A seat for ``key``, waiting up to ``wait_s`` (None: as long as it takes) for one to
        free; ``tick`` is called at least every second while waiting (a heartbeat)."""
        deadline = None if wait_s is None else self._clock() + wait_s
        while not self.try_claim(key):
            left = 1.0 if deadline is None else min(1.0, deadline - self._clock())
            if left <= 0:
                self.refused += 1
                return False
            # Woken by a release; the timeout also lets idle seats expire.
            step = min(left, self._next_expiry())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(step, 0.01))
            if tick is not None:
                tick()
        return True

    def _next_expiry(self) -> float:
        idle = [s.idle_since for s in self._seats.values()
                if s.users == 0 and s.idle_since is not None]
        if not idle:
            return 1.0
        return max(0.0, min(idle) + self.idle_s - self._clock())

    def release(self, key: str) -> None:
        """The move's copy is over here: its seat is free (unless a copy activity of it still
        runs; then it is freed when that one stops)."""
        seat = self._seats.get(key)
        if seat is None:
            return
        if seat.users == 0:
            self._drop(key)
        else:
            seat.done = True

    @contextlib.asynccontextmanager
    async def use(self, key: str, tick: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Hold move ``key``'s seat while a copy activity of it runs (claiming one, waiting
        as long as it takes, if it has none)."""
        await self.claim(key, None, tick)
        seat = self._seats[key]
        seat.users += 1
        seat.idle_since = None
        if seat.users == 1:
            self.running += 1
            self.running_peak = max(self.running_peak, self.running)
        try:
            yield
        finally:
            seat.users -= 1
            if seat.users == 0:
                self.running -= 1
                seat.idle_since = self._clock()
                if seat.done:
                    self._drop(key)
                else:
                    self._notify()


_ALL: weakref.WeakSet[CopySeats] = weakref.WeakSet()


def _observe(value: Callable[[CopySeats], float | None]) -> Callable[[CallbackOptions],
                                                                     Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for seats in list(_ALL):
            v = value(seats)
            if v is not None:
                out.append(Observation(v, {"queue": seats.queue or ""}))
        return out
    return callback


_meter = metrics.get_meter("shardshift.worker")
_meter.create_observable_gauge(
    "shardshift.worker.copies.running", callbacks=[_observe(lambda s: s.running)],
    unit="{copy}", description="Moves whose snapshot or import runs on this worker now")
_meter.create_observable_gauge(
    "shardshift.worker.copies.peak", callbacks=[_observe(lambda s: s.running_peak)],
    unit="{copy}", description="The most moves whose copy ran on this worker at one time, "
                               "since it started")
_meter.create_observable_gauge(
    "shardshift.worker.copy_seats", callbacks=[_observe(lambda s: s.limit)],
    unit="{copy}", description="Copies this worker carries at once at most "
                               "(fleet.worker_max_copies; absent: no limit)")
_meter.create_observable_counter(
    "shardshift.worker.copy_seats.refused", callbacks=[_observe(lambda s: s.refused)],
    unit="{claim}", description="Copies this worker refused (staging_home) because every "
                                "seat was taken; another worker or a later retry took them")
_meter.create_observable_gauge(
    "shardshift.worker.copy_seats.taken", callbacks=[_observe(lambda s: s.seated)],
    unit="{copy}", description="Copy seats taken now (claimed or in use)")
