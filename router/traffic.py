"""Operations per chunk, counted by each router and published to the catalog as deltas.

Counting costs one dictionary increment per routed operation that addresses a chunk (keyed
reads and writes; a scatter query is counted on no chunk, as it says nothing about which one
is hot). Every ``traffic_report_s`` the router swaps its counters for empty ones and sends
what it counted since the last report to the catalog (``RouteSource.report_traffic``), which
adds them to the current time window's row per chunk: reports from every router sum there,
and a planner reads a chunk's operations per second as the sum over recent windows divided
by their span (``Catalog.refresh_ops_rates``).

Counts are observations: what a failed report (catalog down) did not deliver is sent with the
next one, within a bound on pending chunks (``MAX_PENDING_CHUNKS``); reporting never slows
or fails a routed operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

log = logging.getLogger(__name__)

MAX_PENDING_CHUNKS = 100_000
"""Counters kept at most between two reports (a router that cannot report stops counting new
chunks rather than grow)."""


class TrafficSink(Protocol):
    async def report_traffic(self, collection: str, ops: dict[int, int], *,
                             window_s: float) -> None:
        """Add ``ops`` (chunk id -> operations) to the current window of ``collection``."""
        ...


class TrafficCounter:
    """Operations per (collection, chunk) since the last report."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[int, int]] = {}
        self._size = 0

    def count(self, collection: str, chunk_id: int, n: int = 1) -> None:
        per = self._counts.get(collection)
        if per is None:
            per = self._counts[collection] = {}
        old = per.get(chunk_id)
        if old is None:
            if self._size >= MAX_PENDING_CHUNKS:
                return
            self._size += 1
            per[chunk_id] = n
        else:
            per[chunk_id] = old + n

    def take(self) -> dict[str, dict[int, int]]:
        """Everything counted since the last ``take``; the counters start again from zero."""
        out, self._counts, self._size = self._counts, {}, 0
        return out

    def merge(self, counts: dict[str, dict[int, int]]) -> None:
        """Put back counts a failed report did not deliver."""
        for collection, per in counts.items():
            for chunk_id, n in per.items():
                self.count(collection, chunk_id, n)


async def publish(counter: TrafficCounter, sink: TrafficSink, interval_s: float,
                  stop: asyncio.Event) -> None:
    """Report the counters every ``interval_s``; once ``stop`` is set, report what is left
    and return (a report in flight is never cut off, so no count is lost to a close)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        await report_once(counter, sink, interval_s, retry=not stop.is_set())


async def report_once(counter: TrafficCounter, sink: TrafficSink, window_s: float, *,
                      retry: bool = False) -> None:
    counts = counter.take()
    failed: dict[str, dict[int, int]] = {}
    for collection, per in counts.items():
        try:
            await sink.report_traffic(collection, per, window_s=window_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - observations: a failed report must not stop routing
            log.info("router: reporting traffic of %s failed (%s)", collection,
                     type(exc).__name__)
            failed[collection] = per
    if retry and failed:
        counter.merge(failed)  # sent with the next report (within the pending bound)
