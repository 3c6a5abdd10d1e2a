"""Benchmark of the router's hot path: single-document get and replace, routed vs direct.

    python -m bench.router --ops 20000 [--docs 2000] [--concurrency 16] [--http-ops N]
                           [--profile]

Prints ONE JSON object:

* ``direct_p50_ms`` / ``router_p50_ms`` (and p99s, and per-operation p50s): latency of one
  operation at a time, get and replace alternating on random documents. "router" goes through
  ``Router`` (route lookup, khash, fenced statement over the shard's pool); "direct" runs the
  plain statements (``SELECT doc FROM docs."c" WHERE khash=%s AND id=%s`` and ``UPDATE ...
  SET doc=%s::jsonb WHERE khash=%s AND id=%s``) on a plain async psycopg connection per shard,
  prepared by psycopg's default ``prepare_threshold``. Both encode and decode documents with
  ``shards.codec``; the direct side is given each document's khash and shard (it is the
  baseline of "no router at all"). The two run in alternating rounds so drift hits both.
* ``ratio_p50``: router p50 / direct p50, per operation (``ratio_get_p50``,
  ``ratio_replace_p50``), averaged over the two operations of the 50/50 mix.
  ``ratio_mixed_p50`` is the ratio of the p50s of the whole mix; it is printed but not the
  headline, because the mix is bimodal (a get takes about half a replace), so its median
  falls in the sparse gap between the two modes and swings by 20-40 % between runs while the
  per-operation medians stay put.
* ``router_ops_per_s`` / ``direct_ops_per_s``: throughput with ``--concurrency`` tasks (the
  direct side gets a pool per shard as large as the router's).
* ``mongo_p50_ms`` (and p99, per-operation p50s), ``mongo_ratio_p50`` (per operation against
  the direct side, averaged like ``ratio_p50``; goal <= 1.5) and ``mongo_ops_per_s``: the same
  mix as a MongoDB driver sends it (``find`` by shard key and ``_id``, ``update`` with a
  replacement) to ``shardshift router serve --mongo-port`` in its own process
  (``bench.router_mongo``), in the same rotating rounds as the other sides: latency with
  pymongo's ``MongoClient`` (``mongo_async_*``: ``AsyncMongoClient``), throughput with
  ``AsyncMongoClient`` and ``--concurrency`` operations in flight. ``mongo_inproc_*``: the
  front end in the bench's own process over the routed side's router, ``AsyncMongoClient``
  on the same loop: the front end's own cost without a hop between processes (which, on a
  machine with more runnable processes than cores, adds a scheduling wait per operation).
* ``mongo_ping_p50_ms`` (and p99): the floor of the wire path, pymongo's ``MongoClient``
  sending ``ping`` (an admin command: no shard, no routing) to the same front-end process,
  in the same rotating rounds: the driver, the hop between processes and the front end's
  loop and dispatch alone. ``mongo_get_p50_ms - mongo_ping_p50_ms`` is what a find costs
  beyond it (the routed read and our command code).
* ``http_ops_per_s``: the same mix through the HTTP service as deployed (``shardshift router
  serve``: uvicorn with httptools and uvloop, in its own process), driven from this process by
  ``httpx.AsyncClient`` with ``--concurrency`` requests in flight. On 2 cores the client, the
  service and the PostgreSQL servers share the CPUs.

It starts a private stack (catalog + 2 shards) in a temporary directory, provisions a
collection with ``catalog.admin.provision_collection``, loads ``--docs`` documents of ~1 KB,
and stops and removes everything at the end, also on errors. ``--profile`` adds a cProfile
of the routed sequential loop and of the in-process wire side (top functions by own time),
printed to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

from bench.router_mongo import mongo_op, open_client, open_sync_client, sync_ping, sync_sequential
from catalog import Catalog
from catalog.admin import provision_collection
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.hashing import khash
from router.mongo.server import serving
from settings import DatabaseSettings, RouterSettings
from shards.codec import decode_document, encode_document, encode_value
from shards.models import FenceRef
from shards.postgres import PostgresShard
from shards.postgres import documents as D
from shards.postgres.schema import collection_table

COLLECTION = "bench_router"
SHARD_KEY = "acct"
PAD = 900  # bytes of padding: documents of ~1 KB as Extended JSON
RATIO_P50_GOAL = 1.2  # a routed operation's p50 within 20 % of the direct statement's


# -- documents -------------------------------------------------------------------------------


def make_doc(i: int | str, n: int = 0) -> dict[str, Any]:
    return {
        "_id": i,
        SHARD_KEY: i,
        "name": f"customer {i}",
        "email": f"c{i}@example.com",
        "n": n,
        "tags": ["a", "b", "c"],
        "pad": ("x" * PAD),
    }


@dataclass(frozen=True)
class Target:
    """What the direct side knows about one document: its khash, id text and shard."""

    key: int | str
    h: int
    id_text: str
    shard_id: str
    ref: FenceRef


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# -- the direct baseline ---------------------------------------------------------------------


class Direct:
    """Plain statements on plain async psycopg connections (one per shard, or pools)."""

    def __init__(self, dsns: dict[str, str]) -> None:
        self.dsns = dsns
        t = collection_table(COLLECTION)
        self.get_sql = sql.SQL("SELECT doc FROM {} WHERE khash = %s AND id = %s").format(t)
        self.replace_sql = sql.SQL(
            "UPDATE {} SET doc = %s::jsonb WHERE khash = %s AND id = %s"
        ).format(t)
        self.fenced = D.DocumentStatements(COLLECTION)
        self.conns: dict[str, psycopg.AsyncConnection[Any]] = {}
        self.pools: dict[str, AsyncConnectionPool] = {}

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # jsonb as text, so the document is decoded by shards.codec exactly as the router does.
        conn.adapters.register_loader("jsonb", TextLoader)

    async def open(self, pool_size: int) -> Direct:
        for sid, dsn in self.dsns.items():
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            await self._configure(conn)
            self.conns[sid] = conn
            pool = AsyncConnectionPool(dsn, min_size=1, max_size=pool_size, open=False,
                                       kwargs={"autocommit": True}, configure=self._configure,
                                       name=f"direct-{sid}")
            await pool.open(wait=True)
            self.pools[sid] = pool
        return self

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()
        for pool in self.pools.values():
            await pool.close()

    async def get(self, conn: psycopg.AsyncConnection[Any], t: Target) -> dict[str, Any] | None:
        cur = await conn.execute(self.get_sql, (t.h, encode_value(t.key)))
        row = await cur.fetchone()
        return decode_document(row[0]) if row else None

    async def replace(self, conn: psycopg.AsyncConnection[Any], t: Target,
                      doc: dict[str, Any]) -> bool:
        cur = await conn.execute(self.replace_sql,
                                 (encode_document(doc), t.h, encode_value(doc["_id"])))
        return cur.rowcount == 1

    # one operation of the mix, on the sequential connection or through the pool
    async def op_seq(self, i: int, t: Target) -> None:
        await self._op(self.conns[t.shard_id], i, t)

    async def op_pooled(self, i: int, t: Target) -> None:
        async with self.pools[t.shard_id].connection() as conn:
            await self._op(conn, i, t)

    async def op_fenced(self, i: int, t: Target) -> None:
        """Diagnostic: the engine's fenced statements, on the plain connection."""
        conn = self.conns[t.shard_id]
        params = D.fence_params(COLLECTION, t.ref, t.h)
        if i % 2 == 0:
            cur = await conn.execute(self.fenced.get, params | {"id": encode_value(t.key)})
            row = await cur.fetchone()
            assert row is not None and decode_document(row[1])["_id"] == t.key
        else:
            id_text, doc = D.encode_for_store(make_doc(t.key, i))
            cur = await conn.execute(self.fenced.replace, params | {"id": id_text, "doc": doc})
            row = await cur.fetchone()
            assert row is not None and row[1] == 1

    async def _op(self, conn: psycopg.AsyncConnection[Any], i: int, t: Target) -> None:
        if i % 2 == 0:
            doc = await self.get(conn, t)
            assert doc is not None and doc["_id"] == t.key
        else:
            assert await self.replace(conn, t, make_doc(t.key, i))


def router_op(router: Router) -> Callable[[int, Target], Awaitable[None]]:
    async def op(i: int, t: Target) -> None:
        if i % 2 == 0:
            doc = await router.get(COLLECTION, t.key, t.key)
            assert doc is not None and doc["_id"] == t.key
        else:
            assert await router.replace(COLLECTION, make_doc(t.key, i))

    return op


# -- measurement -----------------------------------------------------------------------------


async def sequential(op: Callable[[int, Target], Awaitable[None]], targets: list[Target],
                     seq: list[int], start: int, out: dict[str, list[float]]) -> None:
    """One operation at a time; latencies (ms) appended to out['get'] / out['replace']."""
    pc = time.perf_counter
    gets, reps = out["get"], out["replace"]
    for j, idx in enumerate(seq):
        i = start + j
        t0 = pc()
        await op(i, targets[idx])
        (gets if i % 2 == 0 else reps).append((pc() - t0) * 1000.0)


async def concurrent(op: Callable[[int, Target], Awaitable[None]], targets: list[Target],
                     ops: int, concurrency: int, seed: int) -> float:
    """Operations per second with ``concurrency`` tasks sharing ``ops`` operations."""
    per = ops // concurrency

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        for i in range(per):
            await op(i, targets[rng.randrange(len(targets))])

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:  # the first failure cancels the others
        for w in range(concurrency):
            tg.create_task(worker(w))
    return per * concurrency / (time.perf_counter() - t0)


def _lat_summary(prefix: str, lat: dict[str, list[float]]) -> dict[str, float]:
    both = lat["get"] + lat["replace"]
    return {
        f"{prefix}_p50_ms": round(statistics.median(both), 4),
        f"{prefix}_p99_ms": round(_pct(both, 0.99), 4),
        f"{prefix}_get_p50_ms": round(statistics.median(lat["get"]), 4),
        f"{prefix}_replace_p50_ms": round(statistics.median(lat["replace"]), 4),
    }


# -- HTTP ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpServer:
    """The router's HTTP service as deployed: ``shardshift router serve`` in its own process
    (uvicorn with httptools and uvloop), so client and server do not share a GIL."""

    def __init__(self, catalog_dsn: str, settings: RouterSettings, *,
                 mongo: bool = False) -> None:
        self.catalog_dsn = catalog_dsn
        self.settings = settings
        self.port = _free_port()
        self.mongo_port = _free_port() if mongo else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> HttpServer:
        env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": self.catalog_dsn}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "router", "serve", "--host", "127.0.0.1",
             "--port", str(self.port),
             *(["--mongo-port", str(self.mongo_port)] if self.mongo_port else [])],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"HTTP service exited: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    if b" 200 " in conn.recv(64):
                        return self
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"HTTP service not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def http_throughput(port: int, token: str, targets: list[Target], ops: int,
                          concurrency: int, warmup: int) -> float:
    import httpx

    base = f"http://127.0.0.1:{port}/v1/collections/{COLLECTION}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                 limits=limits, timeout=30) as client:

        async def op(i: int, t: Target) -> None:
            if i % 2 == 0:
                body = f'{{"key":{t.id_text},"id":{t.id_text}}}'
                r = await client.post(f"{base}/get", content=body,
                                      headers={"Content-Type": "application/json"})
                r.raise_for_status()
                assert r.json()["document"] is not None
            else:
                body = f'{{"document":{encode_document(make_doc(t.key, i))}}}'
                r = await client.post(f"{base}/replace", content=body,
                                      headers={"Content-Type": "application/json"})
                r.raise_for_status()
                assert r.json()["matched"] is True

        await concurrent(op, targets, warmup, concurrency, seed=7)
        return await concurrent(op, targets, ops, concurrency, seed=8)


# -- main ------------------------------------------------------------------------------------


async def run(catalog_dsn: str, shard_dsns: dict[str, str], ops: int, docs: int,
              concurrency: int, http_ops: int, profile: bool,
              key_type: str = "int") -> dict[str, Any]:
    settings = RouterSettings()
    db = DatabaseSettings()  # the product's roles: the mover provisions, routers route
    pool_size = settings.pool_max_size
    async with AsyncExitStack() as es:
        catalog = await es.enter_async_context(Catalog(catalog_dsn, max_size=4))
        await catalog.ensure_schema()
        shards: dict[str, PostgresShard] = {}
        for sid, dsn in shard_dsns.items():
            await catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
            shards[sid] = await es.enter_async_context(PostgresShard(sid, db.mover(dsn),
                                                                     max_size=2))
            await shards[sid].ensure_schema()
            await shards[sid].drop_collection(COLLECTION)  # a fresh table on a re-run
        cmap = await provision_collection(catalog, shards, COLLECTION, SHARD_KEY,
                                          chunks_per_shard=2)

        router = await es.enter_async_context(Router(CatalogRouteSource(catalog), settings))
        route = await router.route(COLLECTION)
        # int (today's figures): a MongoDB equality on a number also matches its other
        # stored forms (Int64, double, Decimal128), so the wire path reads each form; str: one.
        keys: list[int | str] = (list(range(1, docs + 1)) if key_type == "int"
                                 else [f"k{i}" for i in range(1, docs + 1)])
        targets = []
        for k in keys:
            h = khash(k)
            c = route.lookup(h)
            targets.append(Target(key=k, h=h, id_text=encode_value(k), shard_id=c.shard_id,
                                  ref=c.ref))

        # Load the documents through the provisioning engines (not the router: its pools
        # stay at one connection per shard until the throughput phase).
        sem = asyncio.Semaphore(4)

        async def load(t: Target) -> None:
            async with sem:
                await shards[t.shard_id].insert(COLLECTION, t.ref, t.h, make_doc(t.key))

        async with asyncio.TaskGroup() as tg:
            for t in targets:
                tg.create_task(load(t))
        doc_bytes = len(encode_document(make_doc(docs)))

        lat_d: dict[str, list[float]] = {"get": [], "replace": []}
        lat_r: dict[str, list[float]] = {"get": [], "replace": []}
        lat_f: dict[str, list[float]] = {"get": [], "replace": []}
        # The direct side connects as the router role too: the same server-side checks.
        direct = Direct({sid: db.router(dsn) for sid, dsn in shard_dsns.items()})
        await direct.open(pool_size)
        es.push_async_callback(direct.close)
        r_op = router_op(router)

        # The MongoDB wire path: ``router serve --mongo-port`` in its own process (its own
        # router and pools), pymongo's AsyncMongoClient here; one connection while sequential.
        server = await asyncio.to_thread(HttpServer(catalog_dsn, settings, mongo=True).start)
        es.callback(server.stop)
        assert server.mongo_port is not None
        mongo_seq_client = open_client(server.mongo_port, settings, pool=1)
        es.push_async_callback(mongo_seq_client.close)
        m_async = mongo_op(mongo_seq_client, settings.mongo_database, COLLECTION, SHARD_KEY,
                           make_doc)
        mongo_sync = open_sync_client(server.mongo_port, settings)
        es.callback(mongo_sync.close)

        async def m_op(i: int, t: Target) -> None:
            raise AssertionError("a marker: its rounds run sync_sequential in a thread")

        async def ping_op(i: int, t: Target) -> None:
            raise AssertionError("a marker: its rounds run sync_ping in a thread")

        async def one_round(fn: Callable[[int, Target], Awaitable[None]], seq: list[int],
                            out: dict[str, list[float]]) -> None:
            if fn is ping_op:
                await asyncio.to_thread(sync_ping, mongo_sync, len(seq), out["get"])
            elif fn is m_op:
                await asyncio.to_thread(sync_sequential, mongo_sync, settings.mongo_database,
                                        COLLECTION, SHARD_KEY, make_doc, targets, seq, 0, out)
            else:
                await sequential(fn, targets, seq, 0, out)

        lat_m: dict[str, list[float]] = {"get": [], "replace": []}
        lat_ma: dict[str, list[float]] = {"get": [], "replace": []}
        # The front end in this process over this router, the client on the same loop: the
        # front end's own cost (wire, BSON, dispatch) without a hop to another process.
        front = await es.enter_async_context(serving(router, settings))
        inproc_client = open_client(front.port, settings, pool=1)
        es.push_async_callback(inproc_client.close)
        m_inproc = mongo_op(inproc_client, settings.mongo_database, COLLECTION, SHARD_KEY,
                            make_doc)
        lat_mi: dict[str, list[float]] = {"get": [], "replace": []}
        # The floor: pymongo's ping (an admin command) against the same front end process,
        # the same synchronous client, as many round trips per round as the other sides.
        lat_ping: dict[str, list[float]] = {"get": [], "replace": []}

        # Warm up every side, one operation at a time (prepared statements, caches). Pools
        # stay at one connection per shard until the throughput phase, like the direct side.
        rng = random.Random(1)
        warm = max(1000, ops // 20)
        scratch: dict[str, list[float]] = {"get": [], "replace": []}
        sides = [(direct.op_seq, lat_d), (r_op, lat_r), (direct.op_fenced, lat_f),
                 (m_op, lat_m), (m_async, lat_ma), (m_inproc, lat_mi), (ping_op, lat_ping)]
        for _ in range(2):
            seq = [rng.randrange(docs) for _ in range(warm)]
            for fn, _out in sides:
                await one_round(fn, seq, scratch)

        # Sequential latency: rounds in rotating order, the same documents for every side.
        rounds = 6
        per_round = max(2, ops // rounds // 2 * 2)
        prof = cProfile.Profile() if profile else None
        prof_m = cProfile.Profile() if profile else None  # the in-process wire side
        for r in range(rounds):
            seq = [rng.randrange(docs) for _ in range(per_round)]
            turn = r % len(sides)
            for fn, out in sides[turn:] + sides[:turn]:
                p = prof if fn is r_op else prof_m if fn is m_inproc else None
                if p is not None:
                    p.enable()
                await one_round(fn, seq, out)
                if p is not None:
                    p.disable()

        # Throughput with concurrency (warmed first: the pools grow to their maximum).
        await concurrent(direct.op_pooled, targets, warm, concurrency, seed=2)
        await concurrent(r_op, targets, warm, concurrency, seed=2)
        direct_tp = await concurrent(direct.op_pooled, targets, ops, concurrency, seed=3)
        router_tp = await concurrent(r_op, targets, ops, concurrency, seed=3)
        mongo_client = open_client(server.mongo_port, settings, pool=concurrency)
        es.push_async_callback(mongo_client.close)
        m_pool_op = mongo_op(mongo_client, settings.mongo_database, COLLECTION, SHARD_KEY,
                             make_doc)
        await concurrent(m_pool_op, targets, warm, concurrency, seed=2)
        mongo_tp = await concurrent(m_pool_op, targets, ops, concurrency, seed=3)

        # Sequential latency again with full pools (the pool hands out its connections in
        # turn, so each operation lands on a colder backend): router vs direct pooled.
        lat_rp: dict[str, list[float]] = {"get": [], "replace": []}
        lat_dp: dict[str, list[float]] = {"get": [], "replace": []}
        for r in range(2):
            seq = [rng.randrange(docs) for _ in range(max(2, ops // 8 // 2 * 2))]
            pair = [(direct.op_pooled, lat_dp), (r_op, lat_rp)]
            for fn, out in pair[r:] + pair[:r]:
                await sequential(fn, targets, seq, 0, out)

        # HTTP: the service in its own process, with its own router and catalog pool
        # (``--http-ops 0`` leaves it out).
        http_tp: float | None = None
        if http_ops > 0:
            server = await asyncio.to_thread(HttpServer(catalog_dsn, settings).start)
            try:
                token = settings.http_tokens[0].get_secret_value()
                http_tp = await http_throughput(server.port, token, targets, http_ops,
                                                concurrency, warmup=max(500, http_ops // 20))
            finally:
                await asyncio.to_thread(server.stop)

        result: dict[str, Any] = {}
        result.update(_lat_summary("direct", lat_d))
        result.update(_lat_summary("router", lat_r))
        result.update(_lat_summary("fenced_direct", lat_f))
        result["direct_pool8_p50_ms"] = round(statistics.median(lat_dp["get"] + lat_dp["replace"]), 4)
        result["router_pool8_p50_ms"] = round(statistics.median(lat_rp["get"] + lat_rp["replace"]), 4)
        get_ratio = result["router_get_p50_ms"] / result["direct_get_p50_ms"]
        replace_ratio = result["router_replace_p50_ms"] / result["direct_replace_p50_ms"]
        result["ratio_p50"] = round((get_ratio + replace_ratio) / 2, 3)
        result["ratio_p50_goal_max"] = RATIO_P50_GOAL
        result["meets_goal"] = (get_ratio + replace_ratio) / 2 <= RATIO_P50_GOAL
        result["ratio_get_p50"] = round(get_ratio, 3)
        result["ratio_replace_p50"] = round(replace_ratio, 3)
        result["ratio_mixed_p50"] = round(result["router_p50_ms"] / result["direct_p50_ms"], 3)
        result.update(_lat_summary("mongo", lat_m))
        result.update(_lat_summary("mongo_async", lat_ma))
        result.update(_lat_summary("mongo_inproc", lat_mi))
        m_get = result["mongo_get_p50_ms"] / result["direct_get_p50_ms"]
        m_replace = result["mongo_replace_p50_ms"] / result["direct_replace_p50_ms"]
        result["mongo_ratio_p50"] = round((m_get + m_replace) / 2, 3)
        result["mongo_ratio_get_p50"] = round(m_get, 3)
        result["mongo_ratio_replace_p50"] = round(m_replace, 3)
        for side in ("mongo_async", "mongo_inproc"):
            result[f"{side}_ratio_p50"] = round(
                (result[f"{side}_get_p50_ms"] / result["direct_get_p50_ms"]
                 + result[f"{side}_replace_p50_ms"] / result["direct_replace_p50_ms"]) / 2, 3)
        result["mongo_ping_p50_ms"] = round(statistics.median(lat_ping["get"]), 4)
        result["mongo_ping_p99_ms"] = round(_pct(lat_ping["get"], 0.99), 4)
        result["mongo_ops_per_s"] = round(mongo_tp, 1)
        result.update({
            "router_ops_per_s": round(router_tp, 1),
            "direct_ops_per_s": round(direct_tp, 1),
            "http_ops_per_s": round(http_tp, 1) if http_tp is not None else None,
            "ops": len(lat_r["get"]) + len(lat_r["replace"]),
            "http_ops": http_ops,
            "docs": docs,
            "doc_bytes": doc_bytes,
            "concurrency": concurrency,
            "shards": len(shard_dsns),
            "chunks": len(cmap.chunks),
        })
        if prof is not None and prof_m is not None:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            buf.write("\n-- the in-process wire side (client and front end) --\n")
            pstats.Stats(prof_m, stream=buf).sort_stats("tottime").print_stats(30)
            result["profile"] = buf.getvalue()
        await asyncio.gather(*(s.drop_collection(COLLECTION) for s in shards.values()))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20_000,
                        help="operations per side for latency and for throughput")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--http-ops", type=int, default=None,
                        help="operations through HTTP (default: --ops; 0: leave HTTP out)")
    parser.add_argument("--key-type", choices=["int", "str"], default="int",
                        help="shard key and _id values: numbers (the default, as before) or "
                             "strings (one stored form each: the wire path's own cost)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the routed sequential loop (adds its overhead to it)")
    args = parser.parse_args(argv)

    from catalog.local_stack import private_stack

    with private_stack(2) as st:
        shard_dsns = {f"bench-s{i}": dsn for i, dsn in enumerate(st.shard_dsns().values())}
        result = asyncio.run(run(st.catalog_dsn, shard_dsns, args.ops, args.docs,
                                 args.concurrency, args.ops if args.http_ops is None else args.http_ops, args.profile,
                                 args.key_type))
    result["key_type"] = args.key_type
    profile = result.pop("profile", None)
    if profile:
        print(profile, file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
