"""Server-side checksums per khash bucket, their diff, and re-copy of mismatched buckets."""

from __future__ import annotations

import psycopg
import pytest
from bson import Int64
from psycopg import sql

from router.hashing import khash
from shards.models import KeyRange
from shards.postgres.bulk_import import import_parts
from shards.postgres.checksum import (
    ChecksumMismatchError,
    bucket_ranges,
    checksum_range,
    diff_checksums,
    merge_ranges,
    recopy_range,
)
from shards.postgres.documents import encode_for_store
from shards.postgres.snapshot import export_chunk
from tests.shards.helpers import (
    FULL,
    keyed,
    load_docs,
    make_docs,
    prepare,
    read_docs,
)

BUCKETS = 32


def bucket_of(account: str, key_range: KeyRange = FULL, buckets: int = BUCKETS) -> KeyRange:
    h = khash(account)
    return next(r for r in bucket_ranges(key_range, buckets) if r.contains(h))


def execute(dsn: str, query: str, collection: str, params: tuple) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL(query).format(t=sql.Identifier(collection)), params)


async def copied_pair(src: str, dst: str, collection: str, stage, n: int = 80):
    await prepare(src, collection)
    await prepare(dst, collection)
    docs = make_docs(n)
    load_docs(src, collection, docs)
    export_chunk(src, collection, FULL, stage, f"ck-{collection}", target_part_rows=30)
    import_parts(dst, collection, stage, f"ck-{collection}")
    return docs


async def test_checksums_detect_altered_missing_and_extra_rows(pg18_dsns, collection_name,
                                                               staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    docs = await copied_pair(src, dst, collection_name, staging)
    a = checksum_range(src, collection_name, FULL, buckets=BUCKETS)
    b = checksum_range(dst, collection_name, FULL, buckets=BUCKETS)
    assert a.count == 80 and len(a.buckets) == BUCKETS
    assert diff_checksums(a, b) == []

    altered, missing = docs[3], docs[10]
    # One field changes type only (int32 5 -> int64 5): the same number, another document.
    changed = dict(altered, i32=Int64(altered["i32"]))
    _, changed_text = encode_for_store(changed)
    execute(dst, "UPDATE docs.{t} SET doc = %s::jsonb WHERE khash = %s", collection_name,
            (changed_text, khash(altered["account"])))
    execute(dst, "DELETE FROM docs.{t} WHERE khash = %s", collection_name,
            (khash(missing["account"]),))
    extra = make_docs(1, tag="extra")[0]
    load_docs(dst, collection_name, [extra])

    b = checksum_range(dst, collection_name, FULL, buckets=BUCKETS)
    bad = diff_checksums(a, b)
    expected = merge_ranges([bucket_of(d["account"]) for d in (altered, missing, extra)])
    assert bad == expected

    for r in bad:
        recopy_range(src, dst, collection_name, r)
    b = checksum_range(dst, collection_name, FULL, buckets=BUCKETS)
    assert diff_checksums(a, b) == []
    assert keyed(read_docs(dst, collection_name)) == keyed(docs)


async def test_checksum_and_recopy_read_the_given_snapshot(pg18_dsns, collection_name,
                                                           staging):
    src, dst = pg18_dsns[0], pg18_dsns[2]
    docs = await copied_pair(src, dst, collection_name, staging, n=40)
    victim = docs[0]
    with psycopg.connect(src) as holder:
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = holder.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snap = row[0]
        execute(src, "DELETE FROM docs.{t} WHERE khash = %s", collection_name,
                (khash(victim["account"]),))
        at_snapshot = checksum_range(src, collection_name, FULL, snapshot=snap)
        now = checksum_range(src, collection_name, FULL)
        target = checksum_range(dst, collection_name, FULL)
        assert diff_checksums(at_snapshot, target) == []
        assert diff_checksums(now, target) == [bucket_of(victim["account"], buckets=64)]

        # Re-copying at the snapshot restores the row deleted after it.
        execute(dst, "DELETE FROM docs.{t}", collection_name, ())
        assert recopy_range(src, dst, collection_name, FULL, snapshot=snap) == 40
    assert keyed(read_docs(dst, collection_name)) == keyed(docs)


async def test_sub_range_checksums_and_empty_buckets(pg18_dsns, collection_name,
                                                     staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await copied_pair(src, dst, collection_name, staging, n=30)
    chunk = FULL.split(4)[1]
    a = checksum_range(src, collection_name, chunk, buckets=1000)
    b = checksum_range(dst, collection_name, chunk, buckets=1000)
    assert [x.range for x in a.buckets] == chunk.split(1000)
    assert a.buckets == b.buckets
    assert a.count == len(read_docs(src, collection_name, chunk))
    assert all(x.digest == 0 for x in a.buckets if x.count == 0)
    with pytest.raises(ChecksumMismatchError):
        diff_checksums(a, checksum_range(dst, collection_name, chunk, buckets=999))


def test_merge_ranges_joins_neighbours():
    r = FULL.split(8)
    assert merge_ranges([r[5], r[1], r[2], r[6], r[0]]) == [
        KeyRange(lo=r[0].lo, hi=r[2].hi), KeyRange(lo=r[5].lo, hi=r[6].hi)]


@pytest.mark.pg15
async def test_identical_data_hashes_identically_on_15_and_18(pg15_dsn, pg18_dsns,
                                                              collection_name):
    docs = make_docs(50)
    for dsn in (pg15_dsn, pg18_dsns[0]):
        await prepare(dsn, collection_name)
        # Different insertion orders: the digest must not care.
        load_docs(dsn, collection_name, docs if dsn == pg15_dsn else docs[::-1])
    a = checksum_range(pg15_dsn, collection_name, FULL, buckets=16)
    b = checksum_range(pg18_dsns[0], collection_name, FULL, buckets=16)
    assert a.count == 50
    assert a.buckets == b.buckets
