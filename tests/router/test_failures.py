"""The router (and the worker's shard engines) under catalog, shard and network failures.

Each test reproduces one failure with real servers: a stopped catalog or shard (the session
stack's own instances, restarted in ``finally``), or a TCP proxy between the router and a
server that closes, goes silent or loses a reply (``conftest.TcpProxy``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from bson import ObjectId

from activities.context import MoveContext
from catalog import Catalog
from catalog.admin import split_chunk
from infra import Stack
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.errors import OutcomeUnknownError, RetryDeadlineExceeded
from router.hashing import khash
from router.http import create_app
from shards.codec import encode_value
from shards.staging import Staging
from tests.conftest import refresh_session_catalogs
from tests.router.conftest import CountingSource, Deployment, TcpProxy, router_settings

Proxies = Callable[[str], Awaitable[TcpProxy]]
AUTH = {"Authorization": "Bearer shardshift-local"}


def keys_on(deployment: Deployment, shard_id: str, n: int, prefix: str = "k") -> list[str]:
    out = []
    i = 0
    while len(out) < n:
        k = f"{prefix}-{i}"
        if deployment.initial.locate(khash(k)).shard_id == shard_id:
            out.append(k)
        i += 1
    return out


async def register_at(deployment: Deployment, shard_id: str, dsn: str) -> None:
    await deployment.catalog.register_shard(shard_id, dsn, engine="postgres", major_version=18)


async def eventually(fn: Callable[[], Awaitable[object]], timeout: float) -> object:
    """``fn()``'s result once it stops raising, polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


# -- shard addresses (defect 8) ---------------------------------------------------------------


async def test_reregistered_address_reaches_the_router(deployment: Deployment,
                                                       proxies: Proxies) -> None:
    """A shard re-registered at a new address: the router's pool follows it, so writes keep
    working after the old address goes away, and they reach the new one."""
    c = deployment.collection
    sid = deployment.initial.chunks[0].shard_id
    real = deployment.shards[sid].dsn
    old, new = await proxies(real), await proxies(real)
    await register_at(deployment, sid, old.dsn(real))
    keys = keys_on(deployment, sid, 6)
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as r:
        await r.insert(c, {"_id": 0, "acct": keys[0]})
        assert old.connections > 0
        await register_at(deployment, sid, new.dsn(real))
        await old.close()  # the old address is gone
        async with asyncio.timeout(10):
            for i, k in enumerate(keys[1:], 1):
                await r.insert(c, {"_id": i, "acct": k})
        assert new.connections > 0
        for i, k in enumerate(keys):
            assert await r.get(c, k, i) == {"_id": i, "acct": k}


async def test_reregistered_address_reaches_worker_engines(deployment: Deployment,
                                                           proxies: Proxies, tmp_path) -> None:
    """``MoveContext.engine`` notices a changed address within a few seconds."""
    sid = deployment.initial.chunks[0].shard_id
    real = deployment.shards[sid].dsn
    old, new = await proxies(real), await proxies(real)
    await register_at(deployment, sid, old.dsn(real))
    ctx = MoveContext(deployment.catalog, Staging(str(tmp_path)), max_threads=2)
    try:
        assert await (await ctx.engine(sid)).count(deployment.collection) == 0
        assert old.connections > 0
        await register_at(deployment, sid, new.dsn(real))
        await old.close()

        async def count() -> int:
            return await (await ctx.engine(sid)).count(deployment.collection)

        assert await eventually(count, timeout=15) == 0
        assert new.connections > 0
        assert await ctx.dsn(sid) == new.dsn(real)
    finally:
        await ctx.close()


# -- catalog outages (defect 9) ---------------------------------------------------------------


async def test_router_serves_cached_routes_while_the_catalog_is_down(
    stack: Stack, deployment: Deployment, router_catalog: Catalog, catalog_dsn: str
) -> None:
    """A notification just before the catalog goes down must not cost the router its map:
    fences make a stale map safe, so it keeps serving reads and writes from it."""
    c = deployment.collection
    keys = [f"cat-{i}" for i in range(12)]
    source = CountingSource(CatalogRouteSource(deployment.catalog))
    catalog_pg = stack.instance_for_dsn(catalog_dsn)
    async with Router(source, router_settings()) as r:
        for i, k in enumerate(keys[:6]):
            await r.insert(c, {"_id": i, "acct": k, "v": 0})
        await source.wait_handled(1)  # the listener's first resync
        # A routing change elsewhere (a shard registered) is notified to the router.
        await router_catalog.register_shard(f"{c[:40]}-extra", deployment.shards[
            deployment.initial.chunks[0].shard_id].dsn, engine="postgres", major_version=18)
        await source.wait_handled(2)
        await asyncio.to_thread(catalog_pg.stop, 30)
        try:
            started = time.monotonic()
            async with asyncio.timeout(15):
                for i, k in enumerate(keys[:6]):
                    assert (await r.get(c, k, i))["v"] == 0
                    assert await r.replace(c, {"_id": i, "acct": k, "v": 1})
                for i, k in enumerate(keys[6:], 6):
                    await r.insert(c, {"_id": i, "acct": k, "v": 1})
            assert time.monotonic() - started < 5, "served, but slowly"
        finally:
            await asyncio.to_thread(catalog_pg.start, 60)
            await refresh_session_catalogs()  # every session catalog pool: drop dead links
        # The catalog is back: a chunk change is picked up (the router re-reads its maps).
        for i, k in enumerate(keys):
            assert (await r.get(c, k, i))["v"] == 1


async def test_dead_listener_is_noticed_and_missed_changes_are_picked_up(
    deployment: Deployment, proxies: Proxies, catalog_dsn: str
) -> None:
    """The listener's connection goes silent (no FIN, no RST: a NAT forgot it). The router
    notices within its liveness check, reconnects, and re-reads every map it holds, so a
    chunk split it was never told about reaches its cache without any client operation."""
    c = deployment.collection
    proxy = await proxies(catalog_dsn)
    source = CatalogRouteSource(Catalog(proxy.dsn(catalog_dsn), max_size=4), listen=True,
                                owned=True, check_interval_s=1.0, timeout_s=1.0)
    async with Router(source, router_settings()) as r:
        await r.get(c, "x", 1)  # caches the route
        async with asyncio.timeout(10):
            while not proxy.freeze(listeners_only=True):
                await asyncio.sleep(0.05)
        chunk = deployment.initial.chunks[0]
        await split_chunk(deployment.catalog, deployment.shards, c, chunk.chunk_id)
        fresh = await deployment.catalog.chunk_map(c)
        assert len(fresh.chunks) == len(deployment.initial.chunks) + 1
        deadline = time.monotonic() + 15
        while len(r._routes[c].chunks) != len(fresh.chunks):
            assert time.monotonic() < deadline, "the router never learned of the split"
            await asyncio.sleep(0.05)


# -- retries after a lost connection (defect 10) ----------------------------------------------


@pytest.mark.parametrize("op", ["replace", "delete"])
async def test_write_whose_reply_was_lost_is_not_retried_over_a_later_write(
    deployment: Deployment, proxies: Proxies, op: str
) -> None:
    """A write commits, its reply is lost, and another client writes the document before the
    router could retry. Retrying would silently undo that acknowledged write."""
    c = deployment.collection
    sid = deployment.initial.chunks[0].shard_id
    real = deployment.shards[sid].dsn
    proxy = await proxies(real)
    await register_at(deployment, sid, proxy.dsn(real))
    (key,) = keys_on(deployment, sid, 1, prefix="lost")
    h = khash(key)
    ref = deployment.initial.locate(h).ref
    direct = deployment.shards[sid]  # "another client", not through the proxy
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as r:
        await r.insert(c, {"_id": 1, "acct": key, "n": 5})
        proxy.hold_next_reply()
        if op == "replace":
            first = asyncio.create_task(r.replace(c, {"_id": 1, "acct": key, "n": 0}))
        else:
            first = asyncio.create_task(r.delete(c, key, 1))
        async with asyncio.timeout(10):
            await proxy.reply_held.wait()  # the write committed; its reply is held
        if op == "replace":
            # Another client increments; its result (1) shows it ran after the replace.
            after = await direct.patch(c, ref, h, 1, {"$inc": {"n": 1}}, ("_id", "acct"))
            assert after["n"] == 1
            expected = {"_id": 1, "acct": key, "n": 1}
        else:
            # Another client inserts the document again; acknowledged.
            await direct.insert(c, ref, h, {"_id": 1, "acct": key, "n": 7})
            expected = {"_id": 1, "acct": key, "n": 7}
        proxy.cut()
        with pytest.raises(OutcomeUnknownError, match="may or may not"):
            await first
        assert await r.get(c, key, 1) == expected


# -- scatter find (11c) -----------------------------------------------------------------------


async def test_scatter_find_is_merged_by_khash_then_id(router: Router,
                                                       deployment: Deployment) -> None:
    """``Router.find`` documents its order for a scatter: by khash, then _id."""
    c = deployment.collection
    docs = [{"_id": i, "acct": f"m-{i % 17}", "email": "same@x"} for i in range(40)]
    for d in docs:
        await router.insert(c, d)
    expected = sorted(docs, key=lambda d: (khash(d["acct"]), encode_value(d["_id"])))
    assert len({deployment.initial.locate(khash(d["acct"])).shard_id for d in docs}) == 3
    assert await router.find(c, {"email": "same@x"}, limit=1000) == expected
    assert await router.find(c, {"email": "same@x"}, limit=7) == expected[:7]


# -- a shard that is down (fail fast) ---------------------------------------------------------


async def test_operations_on_a_down_shard_end_within_the_deadline(
    stack: Stack, deployment: Deployment
) -> None:
    """Operations on a stopped shard end within the retry deadline with a typed error (HTTP
    503 with Retry-After), never hang; after the restart they succeed."""
    c = deployment.collection
    sid = deployment.initial.chunks[0].shard_id
    keys = keys_on(deployment, sid, 8, prefix="down")
    other = next(k for k in (f"up-{i}" for i in range(100))
                 if deployment.initial.locate(khash(k)).shard_id != sid)
    pg = stack.instance_for_dsn(deployment.shards[sid].dsn)
    deadline_s = 2.0
    async with Router(CatalogRouteSource(deployment.catalog),
                      router_settings(retry_deadline_s=deadline_s)) as r:
        await r.insert(c, {"_id": 0, "acct": keys[0]})  # a warm pool to the shard
        app = create_app(r)
        await asyncio.to_thread(pg.stop, 30)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://r") as http:
                started = time.monotonic()

                async def timed(aw: Awaitable[object]) -> float:
                    t0 = time.monotonic()
                    with pytest.raises(RetryDeadlineExceeded) as info:
                        await aw
                    assert "may or may not" not in str(info.value)
                    return time.monotonic() - t0

                async with asyncio.timeout(30):
                    took = await asyncio.gather(
                        *(timed(r.get(c, k, 0)) for k in keys),
                        *(timed(r.insert(c, {"_id": ObjectId(), "acct": k})) for k in keys),
                    )
                    assert max(took) < deadline_s + 1.5, took
                    t0 = time.monotonic()
                    resp = await http.post(f"/v1/collections/{c}/get", headers=AUTH,
                                           json={"key": keys[1], "id": 0})
                    assert time.monotonic() - t0 < deadline_s + 1.5
                assert resp.status_code == 503, resp.text
                assert int(resp.headers["retry-after"]) >= 1
                body = resp.json()
                assert body["type"] == "ShardUnavailableError"
                port = str(pg.port)
                assert port not in resp.text and "127.0.0.1" not in resp.text, resp.text
                # Other shards are unaffected meanwhile.
                await r.insert(c, {"_id": 1, "acct": other})
                assert time.monotonic() - started < 30
        finally:
            await asyncio.to_thread(pg.start, 60)

        async def write_after_restart() -> None:
            await r.insert(c, {"_id": 2, "acct": keys[2]})

        await eventually(write_after_restart, timeout=10)
        assert await r.get(c, keys[2], 2) == {"_id": 2, "acct": keys[2]}
