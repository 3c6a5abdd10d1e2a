"""Routers count operations per chunk and report them to the catalog; reports of several
routers add up, and planners read them as operations per second."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from catalog import Catalog
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.hashing import khash
from tests.router.conftest import Deployment, router_settings


async def _router(catalog_reader_dsn: str) -> Router:
    return await Router(CatalogRouteSource.from_dsn(catalog_reader_dsn),
                        router_settings(traffic_report_s=1.0)).start()


async def test_reports_of_two_routers_add_up_per_chunk(
        deployment: Deployment, catalog_reader_dsn: str) -> None:
    coll = deployment.collection
    cmap = await deployment.chunk_map()
    hot, cold = "acct-hot", "acct-cold"
    hot_chunk, cold_chunk = cmap.locate(khash(hot)), cmap.locate(khash(cold))
    assert hot_chunk.chunk_id != cold_chunk.chunk_id
    one, two = await _router(catalog_reader_dsn), await _router(catalog_reader_dsn)
    try:
        for i in range(30):
            await one.insert(coll, {"_id": i, "acct": hot, "v": i})
        for i in range(10):
            await one.get(coll, cold, i)
        for i in range(20):
            await two.get(coll, hot, i)
    finally:
        await one.close()  # each close reports what is left
        await two.close()
    rates = await deployment.catalog.traffic_rates(coll, 600)
    assert rates[hot_chunk.chunk_id] * 600 == pytest.approx(50)
    assert rates[cold_chunk.chunk_id] * 600 == pytest.approx(10)
    assert await deployment.catalog.refresh_ops_rates(coll, 600) == len(cmap.chunks)
    after = {c.chunk_id: c.ops_per_s for c in (await deployment.chunk_map()).chunks}
    assert after[hot_chunk.chunk_id] == pytest.approx(50 / 600)
    assert after[cold_chunk.chunk_id] == pytest.approx(10 / 600)
    assert sum(1 for v in after.values() if v == 0) == len(after) - 2


async def test_a_router_can_only_add_bounded_counts(
        deployment: Deployment, catalog_reader_dsn: str, router_catalog: Catalog) -> None:
    coll = deployment.collection
    chunk = (await deployment.chunk_map()).chunks[0].chunk_id
    async with await psycopg.AsyncConnection.connect(catalog_reader_dsn, autocommit=True) as conn:
        for statement in (
            "INSERT INTO catalog.chunk_traffic VALUES (%s, %s, now(), 10, 5)",
            "UPDATE catalog.chunk_traffic SET ops = 0 WHERE collection = %s AND chunk_id = %s",
            "DELETE FROM catalog.chunk_traffic WHERE collection = %s AND chunk_id = %s",
            "UPDATE catalog.chunk_stats SET ops_per_s = 1e9 WHERE collection = %s"
            " AND chunk_id = %s",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                await conn.execute(statement, (coll, chunk))
        with pytest.raises(errors.InvalidParameterValue):
            await conn.execute("SELECT catalog.report_traffic(%s, %s, %s, 0)",
                               (coll, [chunk], [1]))
        await conn.execute("SELECT catalog.report_traffic(%s, %s, %s, 10)",
                           (coll, [chunk, 987654321], [2**62, 5]))
    rates = await router_catalog.traffic_rates(coll, 600)
    assert rates == {chunk: pytest.approx(1e9 / 600)}  # clamped; an unknown chunk is ignored


async def test_a_split_gives_its_halves_the_traffic_and_a_merge_sums_it(
        deployment: Deployment, router_catalog: Catalog) -> None:
    """A chunk split for being hot stays hot in both halves (so a plan can move them apart),
    and chunks merged carry the sum of their traffic."""
    coll = deployment.collection
    chunk = (await deployment.chunk_map()).chunks[0]
    await router_catalog.report_traffic(coll, {chunk.chunk_id: 101}, window_s=10)
    mid = chunk.range.lo + (chunk.range.hi - chunk.range.lo) // 2
    left, right = await router_catalog.split_chunk(coll, chunk.chunk_id, mid, chunk.token)
    rates = await router_catalog.traffic_rates(coll, 600)
    assert chunk.chunk_id not in rates
    assert (rates[left.chunk_id] * 600, rates[right.chunk_id] * 600) == (
        pytest.approx(50), pytest.approx(51))
    merged = await router_catalog.merge_chunks(coll, [left.chunk_id, right.chunk_id],
                                               [left.token, right.token])
    rates = await router_catalog.traffic_rates(coll, 600)
    assert set(rates) == {merged.chunk_id}
    assert rates[merged.chunk_id] * 600 == pytest.approx(101)
