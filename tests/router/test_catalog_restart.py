"""The router across catalog restarts and short catalog outages: what its clients see.

The promise: a catalog that is down for seconds costs a client nothing as long as it is back
within the router's retry deadline; past the deadline the client gets the clean 503 shape. The
router here is the one ``router serve`` builds (``CatalogRouteSource.from_dsn``: its own small
catalog pool), in this process for the Router core and HTTP app tests, and as the served
process for start-up while the catalog is down. Every test restarts the session stack's catalog
server in ``finally``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from bson import json_util

from catalog.admin import provision_collection, split_chunk
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.hashing import khash
from router.http import create_app
from tests.conftest import refresh_session_catalogs
from tests.router.conftest import Deployment, router_settings
from tests.router.serve import AUTH, ServeProcess, assert_error_shape
from workload.generator import keys_in


def body(resp: httpx.Response) -> dict:
    """A response's Extended JSON body as BSON-typed values."""
    return json_util.loads(resp.text)


@pytest.fixture
async def uncached(deployment: Deployment) -> AsyncIterator[str]:
    """A second collection with one document (``_id`` 1, ``acct`` "u"), which the router under
    test has never read."""
    name = f"{deployment.collection[:50]}_u"
    cmap = await provision_collection(deployment.catalog, deployment.shards, name, "acct")
    h = khash("u")
    chunk = cmap.locate(h)
    await deployment.shards[chunk.shard_id].insert(name, chunk.ref, h, {"_id": 1, "acct": "u"})
    try:
        yield name
    finally:
        for s in deployment.shards.values():
            await s.drop_collection(name)


async def restart_catalog(stack: Stack, catalog_dsn: str,
                          down: Callable[[], Awaitable[None]] | None = None) -> None:
    """Stop the catalog server, run ``down`` while it is stopped, start it again. The session
    catalog pools (the tests' own, not the router's) drop their dead connections after."""
    pg = stack.instance_for_dsn(catalog_dsn)
    await asyncio.to_thread(pg.stop, 30)
    try:
        if down is not None:
            await down()
    finally:
        await asyncio.to_thread(pg.start, 60)
        await refresh_session_catalogs()


async def warm(source: CatalogRouteSource) -> None:
    """Fill the router's catalog pool: every pooled connection dies with the restart."""
    for _ in range(20):
        await asyncio.gather(*(source.ping() for _ in range(8)))
        if source.catalog._pool.get_stats()["pool_size"] >= 4:
            return
    raise AssertionError("the router's catalog pool never held 4 connections")


async def test_restart_costs_uncached_reads_and_route_refreshes_nothing(
    stack: Stack, deployment: Deployment, uncached: str, catalog_dsn: str
) -> None:
    """A warm router (4 pooled catalog connections), the catalog restarts, then at once: reads
    of a collection the router never read, and writes to a chunk split meanwhile (the router
    does not follow notifications here, so its cached token is refused and it re-reads the
    route). Every request through HTTP succeeds; no client sees the dead connections."""
    c = deployment.collection
    chunk = deployment.initial.chunks[0]
    keys = keys_in(chunk.range, 4, "r")
    source = CatalogRouteSource.from_dsn(catalog_dsn)
    async with Router(source, router_settings(), listen=False) as r:
        for i, k in enumerate(keys):
            await r.insert(c, {"_id": i, "acct": k, "v": 0})
        await warm(source)
        await restart_catalog(stack, catalog_dsn)
        await split_chunk(deployment.catalog, deployment.shards, c, chunk.chunk_id)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(r)),
                                     base_url="http://r") as http:
            responses = await asyncio.gather(
                *(http.post(f"/v1/collections/{uncached}/get", headers=AUTH,
                            json={"key": "u", "id": 1}) for _ in range(6)),
                *(http.post(f"/v1/collections/{c}/replace", headers=AUTH,
                            json={"document": {"_id": i, "acct": k, "v": 1}})
                  for i, k in enumerate(keys)),
            )
        assert [x.status_code for x in responses] == [200] * len(responses), \
            [x.text for x in responses if x.status_code != 200]
        assert [body(x)["document"] for x in responses[:6]] == [{"_id": 1, "acct": "u"}] * 6
        assert all(x.json()["matched"] for x in responses[6:])
        for i, k in enumerate(keys):
            assert await r.get(c, k, i) == {"_id": i, "acct": k, "v": 1}


async def test_short_catalog_outage_waits_within_the_deadline(
    stack: Stack, deployment: Deployment, uncached: str, catalog_dsn: str
) -> None:
    """The catalog goes down. A read of an uncached collection that cannot get the catalog
    within the deadline ends with the clean 503 shape; one whose deadline the catalog's return
    falls within waits and succeeds, and so does a write whose chunk was split while the
    router did not know (its route refresh waits for the catalog too)."""
    c = deployment.collection
    chunk = deployment.initial.chunks[0]
    (key,) = keys_in(chunk.range, 1, "r")
    catalog_port = stack.instance_for_dsn(catalog_dsn).port
    source = CatalogRouteSource.from_dsn(catalog_dsn)
    async with Router(source, router_settings(retry_deadline_s=6.0), listen=False) as r:
        await r.insert(c, {"_id": 1, "acct": key, "v": 0})
        await warm(source)
        await split_chunk(deployment.catalog, deployment.shards, c, chunk.chunk_id)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(r)),
                                     base_url="http://r", timeout=60) as http:
            waiting: list[asyncio.Task[httpx.Response]] = []

            async def outage() -> None:
                # Past the deadline: the clean 503 shape.
                gone = await http.post(f"/v1/collections/{uncached}/get", headers=AUTH,
                                       json={"key": "u", "id": 1})
                assert assert_error_shape(gone, 503, catalog_port)["type"] == \
                    "RouteUnavailableError"
                assert int(gone.headers["retry-after"]) >= 1
                # These start while the catalog is down and end after it is back.
                waiting.append(asyncio.create_task(http.post(
                    f"/v1/collections/{uncached}/get", headers=AUTH, json={"key": "u", "id": 1})))
                waiting.append(asyncio.create_task(http.post(
                    f"/v1/collections/{c}/replace", headers=AUTH,
                    json={"document": {"_id": 1, "acct": key, "v": 1}})))
                await asyncio.sleep(2.0)  # the outage lasts two more seconds

            await restart_catalog(stack, catalog_dsn, outage)
            got, replaced = await asyncio.gather(*waiting)
            assert got.status_code == 200, got.text
            assert body(got)["document"] == {"_id": 1, "acct": "u"}
            assert replaced.status_code == 200, replaced.text
            assert replaced.json()["matched"] is True
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
        assert await r.get(c, key, 1) == {"_id": 1, "acct": key, "v": 1}


async def test_router_serve_starts_while_the_catalog_is_down(
    stack: Stack, deployment: Deployment, catalog_dsn: str
) -> None:
    """``router serve`` started during a catalog outage listens at once: alive (/healthz),
    not ready (/readyz 503) and answering requests with the clean 503 shape; once the catalog
    is back it becomes ready and serves, without a restart."""
    c = deployment.collection
    h = khash("s")
    chunk = deployment.initial.locate(h)
    await deployment.shards[chunk.shard_id].insert(c, chunk.ref, h, {"_id": 1, "acct": "s"})
    pg = stack.instance_for_dsn(catalog_dsn)
    serve = ServeProcess(catalog_dsn, [], {"SHARDSHIFT_ROUTER__RETRY_DEADLINE_S": "1"})
    try:
        async def down() -> None:
            await asyncio.to_thread(serve.start, 60)
            async with httpx.AsyncClient(base_url=serve.url, timeout=30) as http:
                assert (await http.get("/healthz")).status_code == 200
                ready = await http.get("/readyz")
                assert assert_error_shape(ready, 503, pg.port)["type"] == "NotReady"
                r = await http.post(f"/v1/collections/{c}/get", headers=AUTH,
                                    json={"key": "s", "id": 1})
                assert assert_error_shape(r, 503, pg.port)["type"] == "RouteUnavailableError"

        await restart_catalog(stack, catalog_dsn, down)
        async with httpx.AsyncClient(base_url=serve.url, timeout=30) as http:
            async with asyncio.timeout(30):
                while (await http.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.1)
            r = await http.post(f"/v1/collections/{c}/get", headers=AUTH,
                                json={"key": "s", "id": 1})
            assert r.status_code == 200, r.text
            assert body(r)["document"] == {"_id": 1, "acct": "s"}
    finally:
        serve.stop()
