"""Benchmark of routes at fleet scale: loading a big chunk map, and following changes to it.

    python -m bench.route_load [--chunks 100000] [--changes 30] [--repeat 5]

Prints ONE JSON object:

* ``route_load_ms``: a fresh ``Router``'s first ``route()`` of the collection (median of
  ``--repeat`` routers): the whole map in one catalog statement returning arrays, then the
  columns checked and kept (``CollectionRoute.from_columns``). ``route_read_ms`` and
  ``route_build_ms`` split it.
* ``refresh_ms_per_change``: the median time of one refresh after a chunk change (a split,
  a move or a merge, in turn): the delta read and ``CollectionRoute.apply``, called as a
  fence rejection calls it; ``refresh_p90_ms`` its p90. ``commit_to_router_ms``: from the
  change's commit until a router that follows notifications serves the new map
  (notification delivery included); ``delta_rows_per_change`` the chunk rows those
  refreshes read, per change; ``full_reloads_during_changes`` should be 0.
* ``model_route_load_ms``: the read shape routers used before (``Catalog.chunk_map``: a row
  and a model per chunk, then a route model per chunk), which every change also cost every
  router. (Before, ``chunk_map`` also ran serializable: a predicate lock per row read; it
  now reads at REPEATABLE READ, so this figure is below what routers paid then.)
* ``status_catalog_ms``: ``shardshift status``'s catalog reads (shards, ``shard_usage``,
  the active migrations) for the whole fleet.

It starts a private stack (catalog + one shard) in a temporary directory, writes the
collection in one statement (``tests.fleetfill``: ``--chunks`` equal chunks over three shard
ids), and stops and removes everything at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from catalog import Catalog
from catalog.local_stack import private_stack
from catalog.models import MigrationKind, MigrationOutcome
from router.catalog_source import CatalogRouteSource, route_of, route_of_columns
from router.core import Router
from router.routes import CollectionRoute
from settings import RouterSettings
from tests.fleetfill import fill_collection

COLLECTION = "bench_routes"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _at_version(router: Router, version: int) -> CollectionRoute:
    async with asyncio.timeout(30):
        while True:
            route = router._routes.get(COLLECTION)
            if route is not None and route.version >= version:
                return route
            await asyncio.sleep(0.0005)


async def _changes(catalog: Catalog, router: Router, shards: list[str], n: int, *,
                   follow: bool) -> tuple[list[float], list[int]]:
    """``n`` changes (split, move, merge of the split's children, in turn): the time from
    each commit to the router serving it (``follow``: through the notification; else one
    refresh called at once, as a fence rejection does), and the delta rows each cost."""
    times: list[float] = []
    rows: list[int] = []
    route = await router.route(COLLECTION)
    split: tuple[Any, Any] | None = None
    for i in range(n):
        chunk = route.lookup((i * 7919 % 1000 - 500) * 2**53)
        before = router.rows_read.get("delta", 0)
        kind = i % 3
        if kind == 0 or (kind == 2 and split is None):
            split = await catalog.split_chunk(COLLECTION, chunk.chunk_id,
                                              chunk.range.lo + 1, chunk.token)
        elif kind == 1:
            mid = f"bench-move-{follow}-{i}"
            target = next(s for s in shards if s != chunk.shard_id)
            await catalog.register_migration(mid, kind=MigrationKind.MOVE,
                                             collection=COLLECTION, chunk_id=chunk.chunk_id,
                                             source=chunk.shard_id, target=target)
            await catalog.move_chunk(COLLECTION, chunk.chunk_id, chunk.token, target, mid)
        else:
            assert split is not None
            left, right = split
            await catalog.merge_chunks(COLLECTION, [left.chunk_id, right.chunk_id],
                                       [left.token, right.token])
            split = None
        if follow:
            started = time.perf_counter()  # the change has committed
            version = await catalog.version()
            route = await _at_version(router, version)
        else:
            started = time.perf_counter()
            route = await router._refresh(COLLECTION)
        times.append(time.perf_counter() - started)
        rows.append(router.rows_read.get("delta", 0) - before)
        if kind == 1:
            await catalog.finish_migration(f"bench-move-{follow}-{i}",
                                           MigrationOutcome.COMPLETED)
    return times, rows


async def run(catalog_dsn: str, shard_dsn: str, chunks: int, changes: int,
              repeat: int) -> dict[str, Any]:
    settings = RouterSettings(retry_deadline_s=10.0, catalog_timeout_s=30.0)
    async with Catalog(catalog_dsn, max_size=4) as catalog:
        await catalog.ensure_schema()
        shards = [f"bench-s{i}" for i in range(3)]
        for sid in shards:
            await catalog.register_shard(sid, shard_dsn, engine="postgres", major_version=18)
        await catalog.drop_collection(COLLECTION)
        started = time.perf_counter()
        await fill_collection(catalog_dsn, COLLECTION, shards, chunks)
        fill_s = time.perf_counter() - started

        loads, reads, builds, olds = [], [], [], []
        source = CatalogRouteSource(catalog, listen=False, timeout_s=30.0)
        for _ in range(repeat):
            async with Router(CatalogRouteSource(catalog, listen=False, timeout_s=30.0),
                              settings) as fresh:
                t = time.perf_counter()
                route = await fresh.route(COLLECTION)
                loads.append(time.perf_counter() - t)
                assert len(route) == chunks
            t = time.perf_counter()
            cols = await catalog.route_columns(COLLECTION)
            t1 = time.perf_counter()
            route_of_columns(cols)
            reads.append(t1 - t)
            builds.append(time.perf_counter() - t1)
        for _ in range(max(1, repeat // 2)):
            t = time.perf_counter()
            route_of(await catalog.chunk_map(COLLECTION))
            olds.append(time.perf_counter() - t)

        async with Router(CatalogRouteSource(catalog, timeout_s=30.0), settings) as router:
            times, rows = await _changes(catalog, router, shards, changes, follow=True)
            fulls = router.refreshes.get("full", 0)
        async with Router(source, settings) as router:
            direct, _ = await _changes(catalog, router, shards, changes, follow=False)
            fulls += router.refreshes.get("full", 0)
        assert await source.load_route(COLLECTION)

        status = []
        for _ in range(repeat):
            t = time.perf_counter()
            await catalog.list_shards()
            await catalog.shard_usage(None)
            await catalog.migrations(active_only=True, limit=10_000)
            status.append(time.perf_counter() - t)
        await catalog.drop_collection(COLLECTION)

    times.sort()
    direct.sort()
    return {
        "chunks": chunks,
        "route_load_ms": _ms(statistics.median(loads)),
        "route_read_ms": _ms(statistics.median(reads)),
        "route_build_ms": _ms(statistics.median(builds)),
        "refresh_ms_per_change": _ms(statistics.median(direct)),
        "refresh_p90_ms": _ms(direct[int(0.9 * (len(direct) - 1))]),
        "commit_to_router_ms": _ms(statistics.median(times)),
        "delta_rows_per_change": round(sum(rows) / len(rows), 2),
        "full_reloads_during_changes": fulls - 2,
        "changes": changes,
        "model_route_load_ms": _ms(statistics.median(olds)),
        "status_catalog_ms": _ms(statistics.median(status)),
        "fill_s": round(fill_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=30,
                        help="chunk changes the refresh figure is measured over")
    parser.add_argument("--repeat", type=int, default=5, help="routers loaded from scratch")
    args = parser.parse_args(argv)
    if args.chunks < 8 or args.changes < 1 or args.repeat < 1:
        parser.error("--chunks must be at least 8, --changes and --repeat at least 1")

    with private_stack(1) as st:
        (shard_dsn,) = st.shard_dsns().values()
        result = asyncio.run(run(st.catalog_dsn, shard_dsn, args.chunks, args.changes,
                                 args.repeat))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
