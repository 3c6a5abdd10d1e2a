"""Benchmark of the MongoDB front end's writes with the real pymongo driver.

    python -m bench.mongo_writes [--docs 2000]

Prints ONE JSON object with documents per second for: ``insert_many`` ordered (one document
at a time, as an ordered batch must) and unordered (up to 16 at once), ``update_many`` with a
filter on an indexed field (found on every shard, then patched one by one), and
``delete_many`` by the same filter. It starts a private stack (catalog + 2 shards) in a
temporary directory, provisions a collection (4 chunks, an index on ``grp``), serves the
front end on a thread, and removes everything at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bson import Decimal128, ObjectId

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import private_stack
from settings import DatabaseSettings, RouterSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from tests.router.mongo_front import mongo_front

COLLECTION = "bench_mongo_writes"


async def provision(catalog_dsn: str, shard_dsns: dict[str, str]) -> None:
    db = DatabaseSettings()
    async with Catalog(catalog_dsn, max_size=2) as catalog:
        await catalog.ensure_schema()
        shards: dict[str, PostgresShard] = {}
        try:
            for sid, dsn in shard_dsns.items():
                await catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
                shards[sid] = await PostgresShard(sid, db.mover(dsn), max_size=2).open()
                await shards[sid].ensure_schema()
            await provision_collection(catalog, shards, COLLECTION, "acct",
                                       [IndexDefinition(name="by_grp", fields=("grp",))],
                                       chunks_per_shard=2)
        finally:
            for s in shards.values():
                await s.close()


def docs(n: int, grp: str) -> list[dict[str, Any]]:
    return [{"_id": ObjectId(), "acct": f"{grp}-{i}", "grp": grp, "n": i,
             "amount": Decimal128("1.5"), "tags": ["a", "b"]} for i in range(n)]


def rate(n: int, t0: float) -> float:
    return round(n / (time.perf_counter() - t0), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.docs
    out: dict[str, Any] = {"docs": n}
    with private_stack(2) as st:
        shard_dsns = {f"bench-s{i}": dsn for i, dsn in enumerate(st.shard_dsns().values())}
        asyncio.run(provision(st.catalog_dsn, shard_dsns))
        with mongo_front(st.catalog_dsn, RouterSettings()) as front, front.client() as client:
            coll = client.shardshift[COLLECTION]
            t0 = time.perf_counter()
            coll.insert_many(docs(n, "ord"), ordered=True)
            out["insert_ordered_docs_per_s"] = rate(n, t0)
            t0 = time.perf_counter()
            coll.insert_many(docs(n, "unord"), ordered=False)
            out["insert_unordered_docs_per_s"] = rate(n, t0)
            t0 = time.perf_counter()
            res = coll.update_many({"grp": "ord"}, {"$inc": {"n": 1}, "$set": {"seen": True}})
            assert res.modified_count == n, res.raw_result
            out["update_many_docs_per_s"] = rate(n, t0)
            t0 = time.perf_counter()
            assert coll.delete_many({"grp": "unord"}).deleted_count == n
            out["delete_many_docs_per_s"] = rate(n, t0)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
