"""The MongoDB wire path of ``bench.router``: the same get/replace mix as a MongoDB driver
sends it (pymongo's ``AsyncMongoClient``) to ``shardshift router serve --mongo-port`` in its
own process: ``find`` with ``{acct: k, _id: k}`` and ``limit: 1``, and ``update`` with a
replacement document. Sequential latency is measured with the synchronous ``MongoClient`` (in
a thread, a whole round at a time) and with ``AsyncMongoClient``; throughput with the latter."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from pymongo import AsyncMongoClient, MongoClient

from settings import RouterSettings


class _Target(Protocol):
    @property
    def key(self) -> int | str: ...


def open_client(port: int, settings: RouterSettings, pool: int) -> AsyncMongoClient[Any]:
    """A client of the first configured user (the development user by default)."""
    user = settings.mongo_users[0]
    uri = (f"mongodb://{user.name}:{user.password.get_secret_value()}@127.0.0.1:{port}/"
           "?authSource=admin")
    return AsyncMongoClient(uri, maxPoolSize=pool, minPoolSize=1, tz_aware=True,
                            uuidRepresentation="standard", serverSelectionTimeoutMS=30_000)


def mongo_op(client: AsyncMongoClient[Any], database: str, collection: str, shard_key: str,
             make_doc: Callable[[Any, int], dict[str, Any]]
             ) -> Callable[[int, Any], Awaitable[None]]:
    """One operation of the mix: a get on even ``i``, a replace on odd."""
    coll = client[database][collection]

    async def op(i: int, t: _Target) -> None:
        if i % 2 == 0:
            doc = await coll.find_one({shard_key: t.key, "_id": t.key})
            assert doc is not None and doc["_id"] == t.key
        else:
            res = await coll.replace_one({shard_key: t.key, "_id": t.key}, make_doc(t.key, i))
            assert res.matched_count == 1

    return op


def open_sync_client(port: int, settings: RouterSettings) -> MongoClient[Any]:
    """A synchronous client (the most common driver), one connection, for sequential rounds."""
    user = settings.mongo_users[0]
    uri = (f"mongodb://{user.name}:{user.password.get_secret_value()}@127.0.0.1:{port}/"
           "?authSource=admin")
    return MongoClient(uri, maxPoolSize=1, tz_aware=True, uuidRepresentation="standard",
                       serverSelectionTimeoutMS=30_000)


def sync_sequential(client: MongoClient[Any], database: str, collection: str, shard_key: str,
                    make_doc: Callable[[Any, int], dict[str, Any]], targets: Sequence[_Target],
                    seq: list[int], start: int, out: dict[str, list[float]]) -> None:
    """``bench.router.sequential`` with the synchronous driver (run it in a thread)."""
    coll = client[database][collection]
    pc = time.perf_counter
    gets, reps = out["get"], out["replace"]
    for j, idx in enumerate(seq):
        i = start + j
        k = targets[idx].key
        t0 = pc()
        if i % 2 == 0:
            doc = coll.find_one({shard_key: k, "_id": k})
            assert doc is not None and doc["_id"] == k
            gets.append((pc() - t0) * 1000.0)
        else:
            assert coll.replace_one({shard_key: k, "_id": k}, make_doc(k, i)).matched_count == 1
            reps.append((pc() - t0) * 1000.0)


def sync_ping(client: MongoClient[Any], n: int, out: list[float]) -> None:
    """``n`` pings (``{ping: 1}`` on ``admin``), one at a time; latencies (ms) appended to
    ``out``: the floor of a round trip (driver, hop, the front end's loop and dispatch)."""
    admin = client.admin
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        admin.command("ping")
        out.append((pc() - t0) * 1000.0)
