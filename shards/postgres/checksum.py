"""Checksums of a key range, per khash bucket, computed on the server at a snapshot.

What is hashed
--------------
A chunk's range is cut into ``buckets`` equal-width khash buckets with exact integer
boundaries (those of :meth:`KeyRange.split`). ``width_bucket(khash, <boundaries>)`` places each
row by integer comparison, so the bucket of a row is the same on every server and every bucket
maps back to an exact khash range that can be re-copied. Per bucket the server returns::

    count(*), sum(hashtextextended(doc::text, khash) # hashtextextended(id, khash))

* ``doc::text`` is jsonb's canonical output (keys sorted, one spelling of every value), so
  identical documents give identical text on PostgreSQL 15 and 18, whatever their insertion
  history; the hash covers the ``_id`` and, through the seed, the khash.
* ``hashtextextended`` is PostgreSQL's 64-bit ``hash_any_extended`` (Jenkins lookup3), the hash
  behind hash partitioning, which is why it is kept identical across major versions. Under the
  database's deterministic collation it hashes the bytes. It is not cryptographic: it detects
  accidents (a lost, duplicated, stale or altered row), not an adversary who crafts collisions,
  and nothing outside shardshift writes these tables.
* The sum (``numeric``, exact) is order-independent, so source and target may scan in any
  order or in parallel. Each lost, extra or altered row changes the sum unless 64-bit hashes
  happen to cancel (probability about 2^-64 per event), and lost or extra rows also change the
  count. XOR is not used: it cancels pairs.

Reading and repairing a target that an applier writes
-----------------------------------------------------
A target's chunk is only comparable with the source at L while its applier holds at L, and a
repair is only right at that same point: re-copying a bucket as of L over a target that has
applied past L writes an older version over newer data, and the applier never sends those
changes again. So, given the hold (:class:`~shards.postgres.stream_control.StreamHold`):

* :func:`checksum_range` reads the stream's state row in the same snapshot as the rows and
  refuses (:class:`~shards.postgres.stream_control.HoldLostError`) unless that snapshot sees the
  applier held at L;
* :func:`recopy_range` pins the hold in its one target transaction (the stream's hold lock,
  shared): the hold can be neither moved nor released, so the applier applies nothing, until
  the repair has committed or rolled back, and it refuses unless the hold is at L.

Every verify attempt of a migration also takes :class:`VerifyLock`, a session advisory lock
on the target (TCP keepalives on, so a vanished worker host frees it within a minute), and
makes its hold changes and repairs on that lock's connection: two attempts never act at once,
and an attempt that lost its session can no longer write (its transaction dies with the
lock). Long queries take a ``stop`` event and are cancelled on the server when it is set.

Speed: jsonb text output plus lookup3 runs at roughly 450k rows/s per core, and the aggregate
may use parallel workers. md5 over the same text measured 40% slower; ``jsonb_hash_extended``
is faster but combines the tokens of a document with a rotation of period 32, so swapping two
values 32 tokens apart goes unnoticed, which rules it out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.bulk_import import copy_from_sql
from shards.postgres.replication import StreamNames
from shards.postgres.schema import collection_table
from shards.postgres.snapshot import open_snapshot, range_predicate
from shards.postgres.stream_control import StopRequested, StreamHold, check_held, release_hold

ALGORITHM = "hashtextextended-v1"

log = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BucketChecksum(_Frozen):
    """Count and order-independent digest of the rows of one khash bucket."""

    bucket: int
    range: KeyRange
    count: int = Field(ge=0)
    digest: int
    """Exact sum of the rows' 64-bit hashes (0 for an empty bucket)."""


class RangeChecksum(_Frozen):
    """Checksums of every bucket of a key range (empty buckets included)."""

    collection: str
    range: KeyRange
    algorithm: str = ALGORITHM
    buckets: tuple[BucketChecksum, ...]
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return sum(b.count for b in self.buckets)


class ChecksumMismatchError(ValueError):
    """Two checksums that cannot be compared (different ranges, bucketings or algorithms)."""


def bucket_ranges(key_range: KeyRange, buckets: int) -> list[KeyRange]:
    """The buckets of a range: :meth:`KeyRange.split`, so boundaries are exact integers."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    return key_range.split(buckets)


def checksum_range(
    dsn: str,
    collection: str,
    key_range: KeyRange,
    *,
    buckets: int = 64,
    snapshot: str | None = None,
    parallel_workers: int = 2,
    held: StreamHold | None = None,
    stop: threading.Event | None = None,
) -> RangeChecksum:
    """Checksum a key range of a shard, bucket by bucket, on the server.

    Args:
        dsn: The shard.
        collection: The collection (validated before anything is touched).
        key_range: The chunk (or sub-range) to hash.
        buckets: How many equal-width khash buckets to report (the unit of re-copy).
        snapshot: An exported snapshot name to hash exactly what it saw, or None for a fresh
            ``REPEATABLE READ`` snapshot (for a target whose applier is held still).
        parallel_workers: ``max_parallel_workers_per_gather`` for the query (0 disables).
        held: for a target an applier writes: the hold it must be read at (checked in the
            same snapshot as the rows).
        stop: when set, the query is cancelled on the server (:class:`StopRequested`).

    Returns:
        A :class:`RangeChecksum` with every bucket, empty ones as ``count=0, digest=0``.

    Raises:
        HoldLostError: ``held`` is given and the snapshot does not see the applier held there.
    """
    check_collection(collection)
    started = time.monotonic()
    ranges = bucket_ranges(key_range, buckets)
    bounds = [r.lo for r in ranges[1:]]
    query = sql.SQL(
        "SELECT width_bucket(khash, {bounds}::bigint[]) AS b, count(*),"
        " sum(hashtextextended(doc::text, khash) # hashtextextended(id, khash))"
        " FROM {t} WHERE {w} GROUP BY 1"
    ).format(
        bounds=sql.Literal("{" + ",".join(str(b) for b in bounds) + "}"),
        t=collection_table(collection),
        w=range_predicate(key_range),
    )
    _check_stop(stop)
    with (open_snapshot(dsn, snapshot, application_name="shardshift-checksum") as conn,
          cancel_on(stop, conn)):
        if held is not None:
            check_held(conn, held, pin=False)
        # Aggregate by hash (64-ish groups) rather than sorting whole rows by bucket, which
        # the planner picks when it cannot estimate the number of buckets.
        conn.execute("SET LOCAL enable_sort = off")
        conn.execute(
            sql.SQL("SET LOCAL max_parallel_workers_per_gather = {}").format(
                sql.Literal(int(parallel_workers))
            )
        )
        found = {int(b): (int(n), int(Decimal(s))) for b, n, s in conn.execute(query).fetchall()}
        conn.rollback()
    return RangeChecksum(
        collection=collection,
        range=key_range,
        buckets=tuple(
            BucketChecksum(bucket=i, range=r, count=found.get(i, (0, 0))[0],
                           digest=found.get(i, (0, 0))[1])
            for i, r in enumerate(ranges)
        ),
        seconds=time.monotonic() - started,
    )


def range_digest(checksum: RangeChecksum) -> str:
    """One digest for a whole range: the buckets' digests summed modulo 2^64, as 16 hex digits.

    Order-independent like the buckets' (so independent of the bucketing too): two shards hold
    the same rows of a range exactly when their counts and digests agree (up to the hash's
    collision odds)."""
    return f"{sum(b.digest for b in checksum.buckets) % 2**64:016x}"


def diff_checksums(a: RangeChecksum, b: RangeChecksum) -> list[KeyRange]:
    """Key ranges whose buckets differ between two checksums, adjacent ones merged.

    Raises:
        ChecksumMismatchError: the checksums do not cover the same buckets of the same data.
    """
    if (a.collection, a.range, a.algorithm) != (b.collection, b.range, b.algorithm) or [
        x.range for x in a.buckets
    ] != [y.range for y in b.buckets]:
        raise ChecksumMismatchError(
            f"cannot compare checksums of {a.collection} {a.range} ({len(a.buckets)} buckets, "
            f"{a.algorithm}) and {b.collection} {b.range} ({len(b.buckets)} buckets, "
            f"{b.algorithm})"
        )
    bad = [x.range for x, y in zip(a.buckets, b.buckets, strict=True)
           if (x.count, x.digest) != (y.count, y.digest)]
    return merge_ranges(bad)


def merge_ranges(ranges: Sequence[KeyRange]) -> list[KeyRange]:
    """Sorted ranges with touching neighbours joined."""
    out: list[KeyRange] = []
    for r in sorted(ranges, key=lambda r: r.lo):
        if out and out[-1].hi >= r.lo:
            out[-1] = KeyRange(lo=out[-1].lo, hi=max(out[-1].hi, r.hi))
        else:
            out.append(r)
    return out


def recopy_range(
    source_dsn: str,
    target_dsn: str,
    collection: str,
    key_range: KeyRange,
    *,
    snapshot: str | None = None,
    held: StreamHold | None = None,
    target_conn: psycopg.Connection[Any] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Replace a target's rows of a key range with the source's rows at a snapshot.

    One target transaction deletes the range and loads the source's rows, piped as binary
    COPY straight from the source (a mismatched bucket is small, so staging adds nothing).
    Either the whole range is replaced or, on any failure, nothing changed on the target.

    Args:
        snapshot: the exported source snapshot to copy (None: a fresh one).
        held: for a target an applier writes: the hold at the snapshot's LSN. The
            transaction pins it first (see the module essay), so the rows land exactly at
            that point of the stream or not at all.
        target_conn: an autocommit target connection to write on (the verify lock's), or
            None for a connection of its own.
        stop: when set, both sides' statements are cancelled (:class:`StopRequested`).

    Returns:
        Rows copied.

    Raises:
        HoldLostError: ``held`` is given and the applier is no longer held there.
    """
    check_collection(collection)
    table = collection_table(collection)
    select = sql.SQL("COPY (SELECT khash, id, doc FROM {} WHERE {} ORDER BY khash, id)"
                     " TO STDOUT (FORMAT binary)").format(table, range_predicate(key_range))
    _check_stop(stop)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(
            open_snapshot(source_dsn, snapshot, application_name="shardshift-recopy"))
        dst = target_conn if target_conn is not None else stack.enter_context(
            psycopg.connect(target_dsn, application_name="shardshift-recopy"))
        stack.enter_context(cancel_on(stop, src, dst))
        with dst.transaction():
            if held is not None:
                check_held(dst, held, pin=True)
            dst.execute(sql.SQL("DELETE FROM {} WHERE {}").format(table, range_predicate(key_range)))
            cur = dst.cursor()
            with src.cursor().copy(select) as cin, cur.copy(copy_from_sql(collection)) as cout:
                for data in cin:
                    cout.write(data)
            rows = cur.rowcount
        src.rollback()
    return rows


# -- stopping and exclusivity -----------------------------------------------------------------


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StopRequested("stopped")


@contextlib.contextmanager
def cancel_on(stop: threading.Event | None, *conns: psycopg.Connection[Any]) -> Iterator[None]:
    """While the block runs, cancel the connections' running statements once ``stop`` is set
    (a cancel request on a side channel: it works while the statement waits on the server);
    the block then raises :class:`StopRequested`."""
    if stop is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.05):
                if not done.is_set():
                    for conn in conns:
                        with contextlib.suppress(Exception):
                            conn.cancel_safe(timeout=5.0)
                return

    watcher = threading.Thread(target=watch, name="shardshift-cancel-on-stop", daemon=True)
    watcher.start()
    try:
        yield
    except psycopg.errors.QueryCanceled as exc:
        if stop.is_set():
            raise StopRequested("stopped: statement cancelled") from exc
        raise
    finally:
        done.set()
        watcher.join()


KEEPALIVES: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}
"""libpq keepalives of a lock-holding session: the worker notices a dead server (~25 s)."""

_SERVER_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '10', false),"
    " set_config('tcp_keepalives_interval', '5', false),"
    " set_config('tcp_keepalives_count', '3', false)"
)
"""The same on the server's side of the socket: a backend whose client host vanished exits
(and frees its session locks) within ~25 s instead of the kernel's two hours. Ignored on
Unix-domain sockets, where the peer's death is seen at once."""


class VerifyLock:
    """One verify attempt of a migration at a time: a session advisory lock on the target.

    A verify attempt whose heartbeat timed out can still be running when Temporal starts the
    next one; without this lock the two interleave (each drops the other's snapshot slot,
    moves or releases the other's hold, repairs at the wrong point). The lock is keyed by the
    migration and lives in its own session, with TCP keepalives on both ends; a crashed worker's
    session ends and frees it. The attempt makes its target writes (hold changes, repairs) on
    :attr:`conn`, so a write can only commit while its attempt still holds the lock.

    Args:
        target_dsn: the shard the verified stream applies to.
        migration_id: the migration (the lock's key).
    """

    def __init__(self, target_dsn: str, migration_id: str) -> None:
        self.target_dsn = target_dsn
        self.key = f"shardshift-verify:{migration_id}"
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The lock's session (autocommit); only valid after :meth:`acquire`."""
        if self._conn is None:
            raise RuntimeError("the verify lock is not held")
        return self._conn

    def acquire(self, stop: threading.Event | None = None,
                on_wait: Callable[[], None] | None = None, poll_s: float = 0.1) -> None:
        """Take the lock, waiting for an earlier attempt to end (``on_wait`` is called once
        when that happens); :class:`StopRequested` when ``stop`` is set meanwhile."""
        conn = psycopg.connect(self.target_dsn, autocommit=True,
                               application_name="shardshift-verify", **KEEPALIVES)
        try:
            conn.execute(_SERVER_KEEPALIVES)
            waited = False
            while True:
                _check_stop(stop)
                row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                   (self.key,)).fetchone()
                if row and row[0]:
                    break
                if not waited:
                    waited = True
                    log.info("%s: waiting for an earlier verify attempt to end", self.key)
                    if on_wait is not None:
                        on_wait()
                if stop is not None:
                    stop.wait(poll_s)
                else:
                    time.sleep(poll_s)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def release_hold(self, names: StreamNames) -> None:
        """Let the stream's applier continue past its hold, on the lock's session.

        A stop's cancel request (:func:`cancel_on`) can land just after the statement it was
        meant for and cancel the next one on this session instead; the session is still ours,
        so a release cancelled that way is run once more.
        """
        try:
            release_hold(self.target_dsn, names, conn=self.conn)
        except psycopg.errors.QueryCanceled:
            release_hold(self.target_dsn, names, conn=self.conn)

    def close(self) -> None:
        """End the session, which releases the lock."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> VerifyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "ALGORITHM",
    "BucketChecksum",
    "ChecksumMismatchError",
    "RangeChecksum",
    "VerifyLock",
    "bucket_ranges",
    "cancel_on",
    "checksum_range",
    "diff_checksums",
    "merge_ranges",
    "range_digest",
    "recopy_range",
]
