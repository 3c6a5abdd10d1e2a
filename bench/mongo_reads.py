"""Benchmark of reads through the MongoDB front end: scans, targeting and pushdowns.

    python -m bench.mongo_reads [--docs 20000] [--lookups 300]

Prints ONE JSON object:

* ``scan_docs_per_s``: a full ``find({})`` drained by pymongo (fenced keyset pages of 500,
  chunk by chunk, batches up to 16 MiB), and ``scan_filtered_docs_per_s`` for a range filter
  evaluated on the router over the same scan (``matching`` documents of ``docs``);
* ``key_in_p50_ms`` / ``id_in_p50_ms`` / ``index_eq_p50_ms`` (and p99s): one ``find`` at a
  time whose filter pins the shard key by ``$in`` (10 values: only their chunks are read),
  ``_id`` by ``$in`` (pushed down to every chunk's primary key), or the indexed field by
  equality (pushed down to the expression index);
* ``count_exact_ms``: ``estimated_document_count`` (an exact fenced count per shard) and
  ``count_documents_filtered_ms`` (a filter counted over the scan);
* ``sort_limit_ms``: ``find({}).sort(i, -1).limit(10)`` (holds only the top 10).

It starts a private stack (catalog + 2 shards, 2 chunks each) in a temporary directory, loads
``--docs`` documents of ~300 bytes through the router, serves the front end on a thread of
this process, and stops and removes everything at the end, also on errors. On 2 cores the
client, the front end and the PostgreSQL servers share the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from pymongo import MongoClient

from catalog import Catalog
from catalog.admin import provision_collection
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.mongo.server import MongoServer
from settings import DEV_MONGO_PASSWORD, DEV_MONGO_USER, DatabaseSettings, RouterSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard

COLLECTION = "bench_mongo_reads"


def _doc(i: int) -> dict[str, Any]:
    return {"_id": ObjectId(f"{i:024x}"), "acct": f"acct-{i % 997}", "i": i,
            "email": f"user{i}@example.com", "tags": [f"t{i % 7}", f"t{i % 11}"],
            "payload": {"n": i % 13, "text": "x" * 200}}


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)


class _Front:
    """The router and its front end on a thread of their own (pymongo is synchronous)."""

    def __init__(self, catalog_dsn: str) -> None:
        self.catalog_dsn = catalog_dsn
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        settings = RouterSettings()
        source = CatalogRouteSource.from_dsn(self.catalog_dsn)
        async with Router(source, settings) as router:
            server = await MongoServer(router, settings).start("127.0.0.1", 0)
            self.port = server.port
            self.ready.set()
            try:
                await self.stop.wait()
            finally:
                await server.close()

    def __enter__(self) -> _Front:
        self.thread.start()
        self.ready.wait(60)
        if self.error is not None or not self.port:
            raise RuntimeError("the front end did not start") from self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


async def _provision(catalog_dsn: str, shard_dsns: dict[str, str]) -> None:
    db = DatabaseSettings()
    async with Catalog(catalog_dsn, max_size=4) as catalog:
        await catalog.ensure_schema()
        shards: dict[str, PostgresShard] = {}
        try:
            for sid, dsn in shard_dsns.items():
                await catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
                shards[sid] = await PostgresShard(sid, db.mover(dsn), max_size=2).open()
                await shards[sid].ensure_schema()
            await provision_collection(
                catalog, shards, COLLECTION, "acct",
                [IndexDefinition(name="by_email", fields=("email",))], chunks_per_shard=2)
        finally:
            for s in shards.values():
                await s.close()


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(catalog_dsn: str, catalog_reader_dsn: str, shard_dsns: dict[str, str], docs: int,
        lookups: int) -> dict[str, Any]:
    asyncio.run(_provision(catalog_dsn, shard_dsns))
    with _Front(catalog_reader_dsn) as front:
        uri = (f"mongodb://{DEV_MONGO_USER}:{DEV_MONGO_PASSWORD}@127.0.0.1:{front.port}/"
               "?authSource=admin")
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        with client:
            coll = client.shardshift[COLLECTION]
            t = time.perf_counter()
            for i in range(0, docs, 1000):
                coll.insert_many([_doc(j) for j in range(i, min(docs, i + 1000))],
                                 ordered=False)
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            n = sum(1 for _ in coll.find({}))
            scan_s = time.perf_counter() - t
            assert n == docs, (n, docs)
            t = time.perf_counter()
            matching = sum(1 for _ in coll.find({"payload.n": {"$gte": 10}}))
            filtered_s = time.perf_counter() - t
            step = max(1, docs // lookups)
            key_in = _timed(lambda: list(coll.find(
                {"acct": {"$in": [f"acct-{k}" for k in range(10)]}})), max(10, lookups // 10))
            ids = [ObjectId(f"{i:024x}") for i in range(0, docs, step)][:lookups]
            id_in = _timed(lambda: list(coll.find({"_id": {"$in": ids[:10]}})),
                           max(10, lookups // 10))
            emails = iter([f"user{i}@example.com" for i in range(0, docs, step)] * 2)
            index_eq = _timed(lambda: list(coll.find({"email": next(emails)})), lookups)
            t = time.perf_counter()
            exact = coll.estimated_document_count()
            count_s = time.perf_counter() - t
            t = time.perf_counter()
            filtered = coll.count_documents({"payload.n": {"$gte": 10}})
            count_f_s = time.perf_counter() - t
            assert exact == docs and filtered == matching
            t = time.perf_counter()
            top = [d["i"] for d in coll.find({}, {"i": 1}).sort("i", -1).limit(10)]
            sort_s = time.perf_counter() - t
            assert top == list(range(docs - 1, docs - 11, -1))
    return {
        "docs": docs, "load_docs_per_s": round(docs / load_s),
        "scan_docs_per_s": round(docs / scan_s),
        "scan_filtered_docs_per_s": round(docs / filtered_s), "matching": matching,
        "key_in_p50_ms": _pct(key_in, 0.5), "key_in_p99_ms": _pct(key_in, 0.99),
        "id_in_p50_ms": _pct(id_in, 0.5), "id_in_p99_ms": _pct(id_in, 0.99),
        "index_eq_p50_ms": _pct(index_eq, 0.5), "index_eq_p99_ms": _pct(index_eq, 0.99),
        "count_exact_ms": round(count_s * 1000, 1),
        "count_documents_filtered_ms": round(count_f_s * 1000, 1),
        "sort_limit_ms": round(sort_s * 1000, 1),
        "index_eq_mean_ms": round(statistics.mean(index_eq) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=300)
    args = parser.parse_args(argv)

    from catalog.local_stack import private_stack

    with private_stack(2) as st:
        db = DatabaseSettings()
        shard_dsns = {f"bench-s{i}": dsn for i, dsn in enumerate(st.shard_dsns().values())}
        result = run(st.catalog_dsn, db.catalog_reader(st.catalog_dsn), shard_dsns,
                     args.docs, args.lookups)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
