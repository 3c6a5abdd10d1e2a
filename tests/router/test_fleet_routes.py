"""Routers at fleet scale: a 100,000-chunk map follows a split, a move and a merge through
deltas (rows read proportional to the change), and falls back to a whole read when a delta
has a gap or the router is too far behind. Real catalog, real notifications, the router's
read-only catalog role."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from catalog import Catalog
from catalog.models import MigrationKind, MigrationOutcome, RouteColumns
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.routes import CollectionRoute
from tests.fleetfill import fill_collection
from tests.router.conftest import router_settings

N = 100_000


@pytest.fixture(scope="module")
async def fleet(router_catalog: Catalog, catalog_dsn: str, pg18_dsns: list[str]
                ) -> AsyncIterator[tuple[str, list[str]]]:
    ids = [f"fleetroutes-s{i}" for i in range(3)]
    for sid, dsn in zip(ids, pg18_dsns[:3], strict=True):
        await router_catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
    name = "fleetroutes_100k"
    await fill_collection(catalog_dsn, name, ids, N)
    try:
        yield name, ids
    finally:
        await router_catalog.drop_collection(name)


async def cached(router: Router, collection: str, version: int) -> CollectionRoute:
    """The router's cached map once it is at ``version`` or later (it follows notifications)."""
    async with asyncio.timeout(30):
        while True:
            route = router._routes.get(collection)
            if route is not None and route.version >= version:
                return route
            await asyncio.sleep(0.01)


async def check_routes(route: CollectionRoute, source: CatalogRouteSource,
                       changed: list[Any]) -> None:
    """The map is the catalog's (every key routes as a fresh whole read says), and the
    changed chunks' own keys land on them."""
    fresh = await source.load_route(route.collection)
    assert route.same_placement(fresh)
    for c in changed:
        for key in (c.range.lo, c.range.hi - 1):
            hit = route.lookup(key)
            assert (hit.chunk_id, hit.shard_id, hit.token) == (c.chunk_id, c.shard_id, c.token)


async def test_a_router_follows_split_move_and_merge_through_deltas(
        router_catalog: Catalog, catalog_reader_dsn: str, fleet: tuple[str, list[str]]) -> None:
    name, ids = fleet
    cat = router_catalog
    source = CatalogRouteSource.from_dsn(catalog_reader_dsn)
    async with Router(source, router_settings()) as router:
        route = await router.route(name)
        assert len(route) == N and router.refreshes == {"full": 1}
        assert router.rows_read == {"full": N}

        def delta_rows() -> int:
            return router.rows_read.get("delta", 0)

        # A split: two rows (the children), replacing their parent.
        parent = route.lookup(0)
        rows = delta_rows()
        left, right = await cat.split_chunk(name, parent.chunk_id, parent.range.lo + 1000,
                                            parent.token)
        route = await cached(router, name, (await cat.collection(name)).layout_version)
        assert delta_rows() - rows == 2 and len(route) == N + 1
        await check_routes(route, source, [left, right])

        # A move: one row.
        j = route.lookup(2**62)
        target = next(s for s in ids if s != j.shard_id)
        await cat.register_migration("fleetroutes-move", kind=MigrationKind.MOVE,
                                     collection=name, chunk_id=j.chunk_id,
                                     source=j.shard_id, target=target)
        rows = delta_rows()
        moved = await cat.move_chunk(name, j.chunk_id, j.token, target, "fleetroutes-move")
        await cat.finish_migration("fleetroutes-move", MigrationOutcome.COMPLETED)
        route = await cached(router, name, (await cat.collection(name)).layout_version)
        assert delta_rows() - rows == 1 and moved.shard_id == target
        await check_routes(route, source, [moved])

        # A merge of the split's children: one row, replacing two.
        rows = delta_rows()
        merged = await cat.merge_chunks(name, [left.chunk_id, right.chunk_id],
                                        [left.token, right.token])
        route = await cached(router, name, (await cat.collection(name)).layout_version)
        assert delta_rows() - rows == 1 and len(route) == N
        await check_routes(route, source, [merged])

        assert router.refreshes["full"] == 1, router.refreshes  # never a whole reload
        assert "inconsistent" not in router.refreshes and "behind" not in router.refreshes


class GapSource(CatalogRouteSource):
    """The real catalog, whose deltas lose their first row (a row the router must not
    paper over: the map would have a gap)."""

    async def load_delta(self, collection: str, since: int, *, limit: int,
                         timeout: float | None = None) -> RouteColumns:
        d = await super().load_delta(collection, since, limit=limit, timeout=timeout)
        return RouteColumns(collection=d.collection, version=d.version, complete=False,
                            since=since, chunk_ids=d.chunk_ids[1:], los=d.los[1:],
                            his=d.his[1:], shard_ids=d.shard_ids[1:], tokens=d.tokens[1:])


async def test_a_delta_with_a_gap_falls_back_to_a_whole_read(
        router_catalog: Catalog, fleet: tuple[str, list[str]]) -> None:
    name, _ = fleet
    source = GapSource(router_catalog, listen=False)
    async with Router(source, router_settings()) as router:
        route = await router.route(name)
        chunk = route.lookup(-(2**61))
        await router_catalog.split_chunk(name, chunk.chunk_id, chunk.range.lo + 5, chunk.token)
        fresh = await router._refresh(name)  # what a fence rejection does
        assert router.refreshes == {"full": 2, "delta": 1, "inconsistent": 1}
        assert router.rows_read["delta"] == 1  # the split's children, less the lost one
        assert fresh.same_placement(await source.load_route(name))


async def test_a_router_far_behind_reads_the_whole_map(
        router_catalog: Catalog, catalog_dsn: str, fleet: tuple[str, list[str]]) -> None:
    name, _ = fleet
    source = CatalogRouteSource(router_catalog, listen=False)
    async with Router(source, router_settings()) as router:
        route = await router.route(name)
        # A change of a third of the chunks (hand-written: the trigger stamps them all).
        async with await psycopg.AsyncConnection.connect(catalog_dsn) as conn, \
                conn.transaction():
            await conn.execute(
                "UPDATE catalog.chunks SET updated_at = now() WHERE collection = %s"
                " AND lo < -3074457345618258602", (name,))
            await conn.execute("UPDATE catalog.meta SET version = version + 1 WHERE id = 1")
        fresh = await router._refresh(name)
        assert router.refreshes == {"full": 2, "delta": 1, "behind": 1}
        assert router.rows_read["delta"] == len(route) // 4  # the read stopped at the limit
        assert fresh.same_placement(route) and fresh.version > route.version
