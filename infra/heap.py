"""A long-running process's start-up objects, set aside from the garbage collector.

CPython's full (generation 2) collection walks every container object the process holds,
and for that time every thread waits, the event loop included. A worker that has imported
the SDK, pydantic's schemas, psycopg and pyarrow holds about 110,000 of them, nearly all for
good, and a full collection of that heap took 53-86 ms here (``bench.cutover --worker
process``, three in 20 moves): long enough to double a cutover's pause when one lands in it.
``gc.freeze()`` moves what exists at that moment to a generation the collector never walks,
so a later full collection visits only what the process made since (15 ms in the same run).
What is frozen is still freed by reference counting; only cycles among those start-up
objects would stay, and start-up made them to keep them.

The worker process (``worker.main``: ``shardshift worker``, ``python worker.py``) calls
:func:`settle_heap` once its Temporal workers are up (their workflow sandbox has imported
the workflows by then), ``router serve`` before it starts serving. A worker embedded in
another process (``run_worker`` in the demo, the tests, the in-process bench) leaves its
host's heap alone: the freeze is the process owner's decision.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("shardshift.heap")


def settle_heap(who: str) -> int:
    """Collect once, then freeze every object alive (``gc.freeze``); returns how many the
    collector will no longer walk. Call it once, when start-up is over."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: heap settled, %d start-up objects set aside from the garbage collector",
             who, frozen)
    return frozen


__all__ = ["settle_heap"]
