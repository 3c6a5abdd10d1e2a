"""Routing through the router library on the real stack."""

from __future__ import annotations

import asyncio

import pytest
from bson import Decimal128, Int64, ObjectId

from infra import Stack
from router.core import Router
from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    RetryDeadlineExceeded,
    ShardKeyChangeError,
    UnknownCollectionError,
)
from router.hashing import khash
from shards.errors import DuplicateDocumentError, InvalidNameError
from tests.router.conftest import Deployment


async def test_every_operation_reaches_the_owning_shard(router: Router, deployment: Deployment) -> None:
    cmap = deployment.initial
    c = deployment.collection
    keys = [f"acct-{i}" for i in range(60)]
    for i, k in enumerate(keys):
        await router.insert(c, {"_id": i, "acct": k, "email": f"{i % 3}@x", "bal": Decimal128("1.00")})
    # Every document sits on exactly the shard that owns its chunk, and nowhere else.
    for i, k in enumerate(keys):
        owner = cmap.locate(khash(k))
        for sid, shard in deployment.shards.items():
            docs = await shard.scan(c, owner.range)
            present = any(d["_id"] == i for d in docs)
            assert present == (sid == owner.shard_id), (k, sid, owner.shard_id)
    assert len({cmap.locate(khash(k)).shard_id for k in keys}) == 3  # all shards used

    assert (await router.get(c, "acct-5", 5))["email"] == "2@x"
    assert await router.replace(c, {"_id": 5, "acct": "acct-5", "email": "new@x", "n": Int64(1)})
    patched = await router.patch(c, "acct-5", 5, {"$inc": {"n": 2}, "$set": {"tag": "t"}})
    assert patched["n"] == Int64(3) and patched["tag"] == "t"
    assert [d["_id"] for d in await router.find(c, {"acct": "acct-7"})] == [7]
    by_email = await router.find(c, {"email": "1@x"}, limit=1000)
    assert sorted(d["_id"] for d in by_email) == [i for i in range(60) if i % 3 == 1]
    assert await router.delete(c, "acct-5", 5)
    assert await router.get(c, "acct-5", 5) is None
    assert not await router.delete(c, "acct-5", 5)
    with pytest.raises(DuplicateDocumentError):
        await router.insert(c, {"_id": 6, "acct": "acct-6"})


async def test_bad_input_is_refused_and_writes_nothing(router: Router, deployment: Deployment) -> None:
    c = deployment.collection
    with pytest.raises(UnknownCollectionError):
        await router.insert("nosuchcollection", {"_id": 1, "acct": "a"})
    with pytest.raises(InvalidNameError):
        await router.insert('bad"; DROP TABLE x;--', {"_id": 1, "acct": "a"})
    with pytest.raises(BadRequestError, match="shard key"):
        await router.insert(c, {"_id": 1, "email": "x"})
    with pytest.raises(BadRequestError, match="_id"):
        await router.insert(c, {"acct": "a"})
    with pytest.raises(DocumentTooLargeError):
        await router.insert(c, {"_id": 1, "acct": "a", "pad": "x" * (5 * 1024 * 1024)})
    await router.insert(c, {"_id": 2, "acct": "b", "email": "e"})
    with pytest.raises(ShardKeyChangeError):
        await router.replace(c, {"_id": 2, "acct": "c"}, key="b")
    with pytest.raises(BadRequestError):
        await router.patch(c, "b", 2, {"$set": {"acct": "c"}})
    with pytest.raises(BadRequestError, match="cannot filter"):
        await router.find(c, {"unindexed": 1})
    with pytest.raises(BadRequestError):
        await router.find(c, {"acct": "b", "email": "e"})
    total = 0
    for shard in deployment.shards.values():
        total += await shard.count(c)
    assert total == 1
    assert await router.get(c, "b", 2) == {"_id": 2, "acct": "b", "email": "e"}


async def test_rejection_past_deadline_is_a_typed_error(deployment: Deployment) -> None:
    """A chunk frozen and never switched: the client waits out the deadline, then a clear error."""
    from router.catalog_source import CatalogRouteSource
    from tests.router.conftest import router_settings

    c = deployment.collection
    chunk = deployment.initial.locate(khash("frozen-key"))
    shard = deployment.shards[chunk.shard_id]
    async with Router(CatalogRouteSource(deployment.catalog), router_settings(retry_deadline_s=0.3)) as r:
        await shard.freeze(c, chunk.chunk_id, chunk.token)
        try:
            with pytest.raises(RetryDeadlineExceeded, match="gave up"):
                await r.insert(c, {"_id": ObjectId(), "acct": "frozen-key"})
        finally:
            await shard.unfreeze(c, chunk.chunk_id, chunk.token + 1)
        await r.insert(c, {"_id": 1, "acct": "frozen-key"})  # available again
    assert await shard.count(c) == 1


async def test_concurrent_operations_share_pools(router: Router, deployment: Deployment) -> None:
    c = deployment.collection
    await asyncio.gather(*(router.insert(c, {"_id": i, "acct": f"k{i}"}) for i in range(200)))
    found = await asyncio.gather(*(router.get(c, f"k{i}", i) for i in range(200)))
    assert all(d is not None and d["_id"] == i for i, d in enumerate(found))


async def test_shard_restart_costs_no_write(stack: Stack, router: Router,
                                            deployment: Deployment) -> None:
    """A restarted shard leaves the router's pooled connections to it dead. The router must
    notice before it sends anything, so even writes it can never retry blindly (insert,
    ``$inc``) succeed, each exactly once."""
    c = deployment.collection
    owner = deployment.initial.chunks[0].shard_id
    keys = [k for k in (f"r-{i}" for i in range(400))
            if deployment.initial.locate(khash(k)).shard_id == owner][:24]
    # Concurrent operations open several pooled connections to the shard.
    async with asyncio.TaskGroup() as tg:
        for k in keys:
            tg.create_task(router.insert(c, {"_id": k, "acct": k, "n": 0}))
    pg = stack.instance_for_dsn(deployment.shards[owner].dsn)
    await asyncio.to_thread(pg.stop, 30)
    await asyncio.to_thread(pg.start, 60)
    async with asyncio.TaskGroup() as tg:  # a failure cancels the rest
        for k in keys:
            tg.create_task(router.patch(c, k, k, {"$inc": {"n": 1}}))
    async with asyncio.TaskGroup() as tg:
        for k in keys:
            tg.create_task(router.insert(c, {"_id": f"{k}-new", "acct": k, "n": 0}))
    for k in keys:
        assert (await router.get(c, k, k))["n"] == 1, k
        assert await router.get(c, k, f"{k}-new") is not None, k


async def test_close_drains_operations_in_flight(deployment: Deployment) -> None:
    """A graceful restart: operations already running finish (here one waits out a frozen
    chunk until it is unfrozen); new ones are refused with a clear error."""
    from router.catalog_source import CatalogRouteSource
    from router.errors import RouterClosedError
    from tests.router.conftest import router_settings

    c = deployment.collection
    chunk = deployment.initial.locate(khash("drain-key"))
    shard = deployment.shards[chunk.shard_id]
    r = await Router(CatalogRouteSource(deployment.catalog), router_settings()).start()
    await shard.freeze(c, chunk.chunk_id, chunk.token)
    try:
        pending = asyncio.create_task(r.insert(c, {"_id": 1, "acct": "drain-key"}))
        while not r._inflight:  # the insert is in the router, retrying on the frozen chunk
            await asyncio.sleep(0)
        closing = asyncio.create_task(r.close())
        await asyncio.sleep(0.05)
        assert not closing.done(), "close did not wait for the operation in flight"
        with pytest.raises(RouterClosedError):
            await r.get(c, "drain-key", 1)
    finally:
        await shard.unfreeze(c, chunk.chunk_id, chunk.token + 1)
    await pending  # absorbed: it succeeds once the chunk is available again
    await closing
    assert await shard.count(c) == 1
