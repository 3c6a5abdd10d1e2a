"""A move's timeline, recorded by its activities into the catalog (``catalog.timeline``).

Never from workflow code: a workflow must stay deterministic and replays, and a sample taken
in ``run`` would be taken again on every replay. Activities record what they see where they
see it: the bulk import its rows (``copy``), the replicate activity its lag (``lag``), the
catalog, verify and cutover activities their moments (marks).

Cheap and harmless:

* **Batched.** A :class:`Sampler` takes at most one sample per series per interval (1 s at
  first, then ``elapsed / POINTS`` so a long activity thins out its own samples) from any
  thread, and a background task writes them every ``flush_s`` in one catalog transaction.
* **Bounded.** The catalog keeps per move at most ``MAX_SAMPLES_PER_KIND`` samples of a kind
  (thinning the oldest by half past it) and ``MAX_MARKS`` marks; the sampler's own buffer is
  bounded too (the oldest samples go when the catalog cannot take them for a long time).
* **Never in the way.** A write that fails or takes longer than ``WRITE_TIMEOUT_S`` costs a
  log line and those samples, never the move; marks of a cutover are written after its
  pause, not inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from temporalio import activity

from catalog import Catalog
from catalog.timeline import LoadStage, MoveSample, SampleKind

log = logging.getLogger("shardshift.timeline")

WRITE_TIMEOUT_S = 5.0
"""Longest one write of samples may take before it is given up (the catalog may be down)."""
POINTS = 600
"""A sampler aims at about this many samples per series over its activity's life."""


def utcnow() -> datetime:
    return datetime.now(UTC)


async def record(catalog: Catalog, migration_id: str, samples: Sequence[MoveSample]) -> bool:
    """Write samples and marks now, best effort: True when the catalog took them."""
    if not samples:
        return True
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await catalog.record_move_samples(migration_id, samples)
        return True
    except Exception as exc:  # noqa: BLE001 - a timeline never fails a move
        log.warning("timeline of %s: %d samples not recorded: %s: %s", migration_id,
                    len(samples), type(exc).__name__, exc)
        return False


async def mark(catalog: Catalog, migration_id: str, name: str, *, at: datetime | None = None,
               value: float | None = None, detail: str | None = None) -> None:
    """Record one mark of a move's timeline (best effort)."""
    await record(catalog, migration_id, [MoveSample(
        at=at or utcnow(), kind=SampleKind.MARK, name=name, value=value,
        detail=None if detail is None else detail[:500])])


class Sampler:
    """Samples of one running activity, taken from any thread, written in batches.

    ``async with Sampler(catalog, migration_id) as s:`` starts the writer; leaving the block
    writes what is left (within ``WRITE_TIMEOUT_S``).
    """

    def __init__(self, catalog: Catalog, migration_id: str, *, flush_s: float = 2.0,
                 min_interval_s: float = 1.0, max_buffer: int = 1000) -> None:
        self.catalog = catalog
        self.migration_id = migration_id
        self.flush_s = flush_s
        self.min_interval_s = min_interval_s
        self._buffer: deque[MoveSample] = deque(maxlen=max_buffer)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last: dict[tuple[SampleKind, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def due(self, kind: SampleKind, name: str = "", *, force: bool = False) -> bool:
        """Whether a sample of this series may be taken now (and, if so, take the slot).
        ``force``: it is taken anyway (a first or last sample), and counts as the latest."""
        now = time.monotonic()
        interval = max(self.min_interval_s, (now - self._started) / POINTS)
        with self._lock:
            last = self._last.get((kind, name))
            if not force and last is not None and now - last < interval:
                return False
            self._last[(kind, name)] = now
            return True

    def add(self, sample: MoveSample) -> None:
        """Queue a sample (thread-safe); it is written with the next batch."""
        with self._lock:
            self._buffer.append(sample)

    async def flush(self) -> None:
        with self._lock:
            batch = list(self._buffer)
            self._buffer.clear()
        if batch and await record(self.catalog, self.migration_id, batch):
            self.written += len(batch)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"timeline-{self.migration_id}")
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A cancelled activity still writes what it saw (shielded: the write is short).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self.flush())


# -- fleet operations: bytes per shard before and after ------------------------------------------


async def first_run_id() -> str:
    """The first run of the calling activity's workflow chain (continue-as-new keeps it);
    the current run's id when Temporal cannot say."""
    info = activity.info()
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            desc = await activity.client().get_workflow_handle(
                info.workflow_id or "", run_id=info.workflow_run_id).describe()
        first = desc.raw_description.workflow_execution_info.first_run_id
        return first or info.workflow_run_id or ""
    except Exception as exc:  # noqa: BLE001 - best effort: the run id is a fine key
        log.info("first run of %s unknown (%s); keying its loads by this run",
                 info.workflow_id, exc)
        return info.workflow_run_id or ""


async def record_loads(catalog: Catalog, kind: str, stage: LoadStage,
                       loads: Mapping[str, int]) -> None:
    """Record the calling fleet activity's bytes per shard (best effort)."""
    if not activity.in_activity() or not loads:
        return
    info = activity.info()
    try:
        chain = await first_run_id()
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await catalog.record_shard_loads(info.workflow_id or "", chain, kind=kind,
                                             stage=stage, loads=loads)
    except Exception as exc:  # noqa: BLE001 - a measurement never fails the operation
        log.warning("loads of %s (%s) not recorded: %s: %s", info.workflow_id, stage.value,
                    type(exc).__name__, exc)


__all__ = ["POINTS", "WRITE_TIMEOUT_S", "Sampler", "first_run_id", "mark", "record",
           "record_loads", "utcnow"]
