"""On-demand comparison of a move in flight: source and target at one LSN, read-only.

``shardshift verify`` uses it for a chunk whose move is replicating (VDiff-style). It takes
the same steps as a move's verify phase (``activities/verify.py``), without repairs:

1. Take the migration's verify lock on the target (:class:`VerifyLock`), waiting at most
   ``lock_wait_s``: while the move's own verify runs, the comparison is refused
   (:class:`VerifyBusyError`), and while the comparison runs, the move's verify waits for it,
   so the move cannot pass its verify phase (and reach its cutover) in the meantime.
2. Pause the applier, take an exported snapshot of the source through a short-lived slot of
   its own (``odv``: never the move's ``ver`` slot) whose consistent point is L, move the hold
   to L and wait until the applier holds there.
3. Checksum both sides per bucket (the target's read counts only if its snapshot sees the
   applier held at L), release the hold, drop the slot, end the lock's session.

The applier is held for the length of two checksums of one chunk; the move's lag grows by
that much meanwhile. A process killed between steps 2 and 3 leaves the hold in the stream's
state row: the move's verify phase releases it (it re-sets the hold first), and the slot is
the migration's, dropped by its cleanup (or ``shardshift doctor``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict

from shards.models import KeyRange
from shards.postgres import replication as repl
from shards.postgres.checksum import VerifyLock, checksum_range, diff_checksums, range_digest
from shards.postgres.stream_control import (
    ApplyError,
    StopRequested,
    StreamHold,
    read_state,
    release_hold,
    request_hold,
    wait_held,
)

SLOT_PART = "odv"
"""The stream part naming the comparison's slot (``ver`` is the move's own verify)."""


class VerifyBusyError(Exception):
    """The move's own verify holds the lock: compare again when it has ended."""


class ChunkDiff(BaseModel):
    """Source and target of a move compared at one LSN."""

    model_config = ConfigDict(frozen=True)

    lsn: str
    buckets: int
    documents_source: int
    documents_target: int
    mismatched: list[KeyRange]
    """Differing buckets, adjacent ones merged."""
    mismatched_buckets: int
    digest_source: str
    digest_target: str
    seconds: float

    @property
    def equal(self) -> bool:
        return not self.mismatched


def diff_in_flight(
    source_dsn: str,
    target_dsn: str,
    collection: str,
    key_range: KeyRange,
    migration_id: str,
    *,
    buckets: int = 64,
    hold_timeout_s: float = 60.0,
    lock_wait_s: float = 10.0,
    stop: threading.Event | None = None,
) -> ChunkDiff:
    """Compare a move's source and target at one LSN, changing nothing but the applier's
    pause (see the module essay).

    Raises:
        VerifyBusyError: the move's verify runs (the lock was not free within
            ``lock_wait_s``).
        ApplyError: the move's stream has not started (nothing to hold).
        StopRequested: ``stop`` was set.
    """
    started = time.monotonic()
    names = repl.stream_names(migration_id, "fwd")
    vnames = repl.stream_names(migration_id, SLOT_PART)
    stop = stop or threading.Event()
    with VerifyLock(target_dsn, migration_id) as lock:
        give_up = threading.Event()
        timer = threading.Timer(lock_wait_s, give_up.set)
        timer.start()
        try:
            lock.acquire(give_up)
        except StopRequested:
            raise VerifyBusyError(
                f"the verify of migration {migration_id} is running; compare again when it "
                "has ended") from None
        finally:
            timer.cancel()
        if read_state(target_dsn, names) is None:
            raise ApplyError(f"the stream of migration {migration_id} has not started")
        request_hold(target_dsn, names, None, conn=lock.conn)
        try:
            repl.drop_slot(source_dsn, vnames.slot)  # an earlier comparison's, if it died
            with repl.create_slot(source_dsn, vnames, export_snapshot=True) as slot:
                lsn = slot.consistent_lsn
                request_hold(target_dsn, names, lsn, conn=lock.conn)
                wait_held(target_dsn, names, lsn, timeout=hold_timeout_s, stop=stop)
                hold = StreamHold(names, lsn)
                with ThreadPoolExecutor(2) as pool:
                    fs = pool.submit(checksum_range, source_dsn, collection, key_range,
                                     buckets=buckets, snapshot=slot.snapshot_name,
                                     parallel_workers=1, stop=stop)
                    ft = pool.submit(checksum_range, target_dsn, collection, key_range,
                                     buckets=buckets, parallel_workers=1, held=hold, stop=stop)
                    a, b = fs.result(), ft.result()
        finally:
            with contextlib.suppress(Exception):
                repl.drop_slot(source_dsn, vnames.slot)
            release_hold(target_dsn, names, conn=lock.conn)
    diff = diff_checksums(a, b)
    bad = sum(1 for x, y in zip(a.buckets, b.buckets, strict=True)
              if (x.count, x.digest) != (y.count, y.digest))
    return ChunkDiff(lsn=lsn, buckets=buckets, documents_source=a.count,
                     documents_target=b.count, mismatched=diff, mismatched_buckets=bad,
                     digest_source=range_digest(a), digest_target=range_digest(b),
                     seconds=round(time.monotonic() - started, 3))


__all__ = ["SLOT_PART", "ChunkDiff", "VerifyBusyError", "diff_in_flight"]
