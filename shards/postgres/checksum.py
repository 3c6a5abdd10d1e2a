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

Speed: jsonb text output plus lookup3 runs at roughly 450k rows/s per core, and the aggregate
may use parallel workers. md5 over the same text measured 40% slower; ``jsonb_hash_extended``
is faster but combines the tokens of a document with a rotation of period 32, so swapping two
values 32 tokens apart goes unnoticed, which rules it out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.bulk_import import copy_from_sql
from shards.postgres.schema import collection_table
from shards.postgres.snapshot import open_snapshot, range_predicate

ALGORITHM = "hashtextextended-v1"


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

    Returns:
        A :class:`RangeChecksum` with every bucket, empty ones as ``count=0, digest=0``.
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
    with open_snapshot(dsn, snapshot, application_name="shardshift-checksum") as conn:
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
) -> int:
    """Replace a target's rows of a key range with the source's rows at a snapshot.

    One target transaction deletes the range and loads the source's rows, piped as binary
    COPY straight from the source (a mismatched bucket is small, so staging adds nothing).
    Either the whole range is replaced or, on any failure, nothing changed on the target.
    The caller holds the target's applier still meanwhile, and reads the source at the same
    snapshot it verifies against, so the range is exact at that point of the stream.

    Returns:
        Rows copied.
    """
    check_collection(collection)
    table = collection_table(collection)
    select = sql.SQL("COPY (SELECT khash, id, doc FROM {} WHERE {} ORDER BY khash, id)"
                     " TO STDOUT (FORMAT binary)").format(table, range_predicate(key_range))
    with (
        open_snapshot(source_dsn, snapshot, application_name="shardshift-recopy") as src,
        psycopg.connect(target_dsn, application_name="shardshift-recopy") as dst,
    ):
        with dst.transaction():
            dst.execute(sql.SQL("DELETE FROM {} WHERE {}").format(table, range_predicate(key_range)))
            cur = dst.cursor()
            with src.cursor().copy(select) as cin, cur.copy(copy_from_sql(collection)) as cout:
                for data in cin:
                    cout.write(data)
            rows = cur.rowcount
        src.rollback()
    return rows


__all__ = [
    "ALGORITHM",
    "BucketChecksum",
    "ChecksumMismatchError",
    "RangeChecksum",
    "bucket_ranges",
    "checksum_range",
    "diff_checksums",
    "merge_ranges",
    "recopy_range",
]
