"""Checksum throughput: documents hashed per second by :func:`checksum_range` on one shard.

``python -m bench.checksum --docs 200000`` starts a private stack (2 PostgreSQL 18 shards in a
temporary state directory), loads ``--docs`` documents of about 1 KB into shard 1 (the same
generator as ``bench.bulk_copy``), and times a whole-range checksum of 64 buckets at a fresh
snapshot, best of ``--rounds`` (the first round also warms the buffer cache, as a verify
after an import finds it). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time

from bench.bulk_copy import FULL, create_tables, load, private_stack
from shards.postgres.checksum import checksum_range


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel-workers", type=int, default=2)
    args = parser.parse_args(argv)

    stack, state = private_stack(2)
    try:
        dsn = next(iter(stack.shard_dsns().values()))
        asyncio.run(create_tables(dsn, "bench"))
        load(dsn, "bench", args.docs)
        runs = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            result = checksum_range(dsn, "bench", FULL, buckets=args.buckets,
                                    parallel_workers=args.parallel_workers)
            runs.append(time.perf_counter() - t)
            if result.count != args.docs:
                raise SystemExit(f"checksum counted {result.count} rows, expected {args.docs}")
        best = min(runs)
        print(json.dumps({
            "docs": args.docs,
            "buckets": args.buckets,
            "parallel_workers": args.parallel_workers,
            "runs_s": [round(x, 3) for x in runs],
            "docs_per_s": round(args.docs / best),
        }))
        return 0
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
