"""Measuring chunks for the planners: chunk by chunk (before) against one pass per shard.

    python -m bench.chunk_stats [--chunks 9000] [--docs 200000]

Starts a private stack with one shard (stopped and removed at the end, also on errors),
fills one collection with ``--docs`` documents of about 300 bytes (``generate_series``),
cuts its khash space into ``--chunks`` chunks, and measures them both ways on the same
server. Prints ONE JSON object:

* ``per_chunk_s``: ``PostgresShard.chunk_bytes`` once per chunk, what the planners did
  before (an index-only count plus an average row size per chunk: three round trips each).
* ``bulk_s``: ``PostgresShard.chunk_sizes``, every chunk in one statement (rows bucketed with
  ``width_bucket`` over the chunks' bounds, each row's stored size summed).
* ``speedup``, and ``bytes_ratio``: the total bytes the bulk pass measured over the total of
  the per-chunk estimates (the two weigh rows differently: a table-wide average against each
  row's own size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from psycopg import sql

from catalog.local_stack import private_stack
from shards.models import KHASH_END, KHASH_MIN, KeyRange
from shards.postgres import PostgresShard
from shards.postgres.schema import collection_table

COLLECTION = "bench_chunk_stats"


async def run(dsn: str, chunks: int, docs: int) -> dict[str, Any]:
    async with PostgresShard("bench", dsn, max_size=2) as shard:
        await shard.ensure_schema()
        await shard.drop_collection(COLLECTION)
        await shard.create_collection(COLLECTION)
        with shard.connect(autocommit=True) as conn:
            conn.execute(sql.SQL(
                "INSERT INTO {} (khash, id, doc)"
                " SELECT ((random() - 0.5) * 1.8e19)::bigint, i::text,"
                "  jsonb_build_object('acct', i, 'pad', repeat('x', 200 + (i %% 100)))"
                " FROM generate_series(1, %s) AS i").format(collection_table(COLLECTION)),
                (docs,))
            conn.execute(sql.SQL("ANALYZE {}").format(collection_table(COLLECTION)))
        ranges = list(enumerate(KeyRange(lo=KHASH_MIN, hi=KHASH_END).split(chunks), start=1))
        t = time.perf_counter()
        old = [await shard.chunk_bytes(COLLECTION, r) for _, r in ranges]
        per_chunk = time.perf_counter() - t
        t = time.perf_counter()
        new = await shard.chunk_sizes(COLLECTION, ranges)
        bulk = time.perf_counter() - t
        await shard.drop_collection(COLLECTION)
    return {"chunks": chunks, "docs": docs, "per_chunk_s": round(per_chunk, 3),
            "bulk_s": round(bulk, 3), "speedup": round(per_chunk / bulk, 1),
            "documents_counted": sum(d for d, _ in new.values()),
            "bytes_ratio": round(sum(b for _, b in new.values()) / max(sum(old), 1), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=9000)
    parser.add_argument("--docs", type=int, default=200_000)
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout) still stops and removes what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with private_stack(1, prefix="shardshift-chunkstats-") as st:
        [dsn] = st.shard_dsns().values()  # the mover role, as the planners' activities
        result = asyncio.run(run(dsn, args.chunks, args.docs))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
