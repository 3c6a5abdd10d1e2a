"""``PostgresShard.chunk_sizes``: many chunks measured in one pass, against a real shard.

What a planner relies on: each chunk's documents and bytes are exactly those of its own range
(rows between or outside the given ranges count nowhere), the top chunk (``hi`` = 2^63) is
included, empty chunks are zero, and overlapping ranges are refused. And the per-table
estimates (``chunk_bytes``, ``live_usage``) work on tables large enough to be sampled."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg import sql

from shards.models import KeyRange
from shards.postgres import PostgresShard
from shards.postgres.server import SAMPLE_ABOVE_ROWS, live_usage
from tests.shards.helpers import FULL, load_docs, make_docs, prepare


def _expected(dsn: str, collection: str, r: KeyRange) -> tuple[int, int]:
    """Documents and stored bytes of a range, measured range by range (the old way)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), coalesce(sum(pg_column_size(d.*)), 0) FROM docs.{} AS d"
                    " WHERE khash >= %s AND (%s::bigint IS NULL OR khash < %s)")
            .format(sql.Identifier(collection)), (r.lo, r.sql_hi, r.sql_hi)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_chunk_sizes_measure_every_chunk_in_one_pass(
        pg18_dsns: list[str], collection_name: str) -> None:
    dsn = pg18_dsns[0]
    await prepare(dsn, collection_name)
    load_docs(dsn, collection_name, make_docs(800))
    pieces = FULL.split(6)
    # Chunk 30 is not given: its rows (say, another shard's leftovers) must count nowhere.
    given = [(10 + 10 * i, r) for i, r in enumerate(pieces) if i != 2]
    async with PostgresShard("t", dsn) as shard:
        try:
            sizes = await shard.chunk_sizes(collection_name, list(reversed(given)))
            sampled = await shard.chunk_sizes(collection_name, given, sample_percent=100)
            truth = {chunk_id: _expected(dsn, collection_name, r) for chunk_id, r in given}
            left_out = _expected(dsn, collection_name, pieces[2])
            total = await shard.count(collection_name)
            assert await shard.chunk_sizes(collection_name, []) == {}
            with pytest.raises(ValueError, match="overlap"):
                await shard.chunk_sizes(collection_name, [(1, pieces[0]), (2, FULL)])
            with pytest.raises(ValueError, match="sample_percent"):
                await shard.chunk_sizes(collection_name, given, sample_percent=0)
        finally:
            await shard.drop_collection(collection_name)
    assert sizes == truth == sampled
    assert pieces[-1].sql_hi is None and truth[60][0] > 0  # the top chunk is measured
    assert all(docs > 0 and size > 0 for docs, size in sizes.values())
    assert left_out[0] > 0 and sum(d for d, _ in sizes.values()) == total - left_out[0]


async def test_large_tables_are_sampled_not_refused(pg18_dsns: list[str],
                                                    collection_name: str) -> None:
    """Above ``SAMPLE_ABOVE_ROWS`` rows the row size is averaged over a block sample; that
    statement must be valid SQL (the alias goes before ``TABLESAMPLE``)."""
    dsn = pg18_dsns[0]
    await prepare(dsn, collection_name)
    rows = SAMPLE_ABOVE_ROWS + 5_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        table = sql.SQL("docs.{}").format(sql.Identifier(collection_name))
        conn.execute(sql.SQL(
            "INSERT INTO {} (khash, id, doc) SELECT ((random() - 0.5) * 1.8e19)::bigint,"
            " i::text, jsonb_build_object('account', i, 'pad', repeat('x', 100))"
            " FROM generate_series(1, %s) AS i").format(table), (rows,))
        conn.execute(sql.SQL("ANALYZE {}").format(table))
    async with PostgresShard("t", dsn) as shard:
        try:
            estimate = await shard.chunk_bytes(collection_name, FULL)
            usage = await asyncio.to_thread(live_usage, dsn, collection_name)
            [(docs, exact)] = (await shard.chunk_sizes(collection_name, [(1, FULL)])).values()
        finally:
            await shard.drop_collection(collection_name)
    assert docs == rows == usage.documents
    # A 1 % block sample of rows of (nearly) one size: within a few percent of the truth.
    assert abs(estimate - exact) <= 0.05 * exact
    assert abs(usage.live_bytes - exact) <= 0.05 * exact
