"""Benchmark of the change stream and applier: live lag under load, and backlog drain.

    python -m bench.cdc --seconds 20 --writers 8 [--rate 5000] [--backlog 100000]
                        [--dsn-source DSN --dsn-target DSN]

Prints ONE JSON object:

* ``source_writes_per_s``: fenced document writes the writers committed per second on the
  source during the live phase, all inside the moved chunk. With ``--batch 1`` (default)
  each is a single-document insert / patch / replace / delete through ``PostgresShard``, its
  own durable transaction; with ``--batch B`` each writer commits transactions of B fenced
  inserts and ``$inc`` patches (the engine's statements, pipelined).
* ``applied_per_s``: source changes the applier applied per second in the live phase.
* ``lag_p50_s`` / ``lag_p99_s``: per source transaction, target commit time minus source
  commit time, in the live phase (same machine, same clock).
* ``backlog_drain_per_s``: the applier is stopped, ``--backlog`` changes are written (batched
  inserts and updates), the applier is started again; changes divided by the time from its
  start until the target has applied everything (includes connecting and resuming).
* ``verified``: after catch-up the source chunk and the target chunk are identical.

Without DSNs it starts a private two-shard stack in a temporary directory and removes it at
the end. The applier runs in its own process, as it does in a worker, so it does not share a
GIL with the writers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from contextlib import ExitStack
from typing import Any

import psycopg
from psycopg import sql

from router.hashing import khash
from shards.codec import encode_value
from shards.models import KHASH_END, FenceRef, FenceState, KeyRange
from shards.postgres import PostgresShard
from shards.postgres import documents as D
from shards.postgres.apply import ChangeApplier, StreamSpec
from shards.postgres.replication import (
    cleanup_stream_objects,
    create_publication,
    create_slot,
    current_lsn,
)
from shards.postgres.schema import collection_table
from shards.postgres.stream_control import wait_caught_up

CHUNK = 1
RANGE = KeyRange(lo=0, hi=KHASH_END)
TOKEN = 1
COLLECTION = "bench_cdc"
MIGRATION = "bench-cdc"


# -- the applier process -------------------------------------------------------------------


def _applier_main(spec_json: str, source: str, target: str, stop: Any, out: Any) -> None:
    spec = StreamSpec.model_validate_json(spec_json)
    applier = ChangeApplier(spec, source, target)
    try:
        stats = applier.run(stop)
        out.put({
            "applied_changes": stats.applied_changes, "applied_txns": stats.applied_txns,
            "batches": stats.batches, "lags": list(stats.lag_samples),
        })
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put({"error": repr(exc)})


class ApplierProcess:
    def __init__(self, spec: StreamSpec, source: str, target: str) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.out: Any = ctx.Queue()
        self.proc = ctx.Process(
            target=_applier_main, args=(spec.model_dump_json(), source, target, self.stop,
                                        self.out),
            daemon=True,
        )
        self.proc.start()

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        result = self.out.get(timeout=60)
        self.proc.join(timeout=30)
        if "error" in result:
            raise RuntimeError(f"applier failed: {result['error']}")
        return result


# -- writers ---------------------------------------------------------------------------------


def _chunk_keys(start: int, n: int) -> list[int]:
    keys: list[int] = []
    k = start
    while len(keys) < n:
        if RANGE.contains(khash(k)):
            keys.append(k)
        k += 1
    return keys


async def _writer(shard: PostgresShard, wid: int, rate: float, until: float,
                  counter: list[int]) -> None:
    """Fenced single-document writes at ``rate`` per second (0: as fast as possible)."""
    rng = random.Random(wid)
    pool = _chunk_keys(wid * 10_000_000, 2000)
    live: list[int] = []
    ref = FenceRef(chunk_id=CHUNK, token=TOKEN)
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    fresh = iter(pool)
    while time.monotonic() < until:
        r = rng.random()
        if not live or r < 0.45:
            key = next(fresh, None)
            if key is None:
                fresh = iter(pool)
                continue
            if key in live:
                continue
            await shard.insert(COLLECTION, ref, khash(key),
                               {"_id": key, "k": key, "n": 0, "pad": "p" * 64})
            live.append(key)
        elif r < 0.75:
            key = rng.choice(live)
            await shard.patch(COLLECTION, ref, khash(key), key, {"$inc": {"n": 1}},
                              protected=("_id", "k"))
        elif r < 0.9:
            key = rng.choice(live)
            await shard.replace(COLLECTION, ref, khash(key),
                                {"_id": key, "k": key, "n": -1, "s": rng.random()})
        else:
            key = live.pop(rng.randrange(len(live)))
            await shard.delete(COLLECTION, ref, khash(key), key)
        counter[0] += 1
        if interval:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def _batch_writer(source: str, wid: int, batch: int, rate: float, until: float,
                        counter: list[int]) -> None:
    """Transactions of ``batch`` fenced writes (the engine's own statements, pipelined):
    inserts of new documents and ``$inc`` patches of earlier ones, at ``rate`` writes/s."""
    st = D.DocumentStatements(COLLECTION)
    ref = FenceRef(chunk_id=CHUNK, token=TOKEN)
    pool = _chunk_keys(wid * 10_000_000, 20_000)
    rng = random.Random(wid)
    used = 0
    interval = batch / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    patch = D.validate_patch({"$inc": {"n": 1}}, ("_id", "k"))
    async with await psycopg.AsyncConnection.connect(source) as conn:
        while time.monotonic() < until:
            inserts, patches = [], []
            for _ in range(batch):
                if used < 50 or (rng.random() < 0.5 and used < len(pool)):
                    key = pool[used]
                    used += 1
                    id_text, doc = D.encode_for_store({"_id": key, "k": key, "n": 0,
                                                       "pad": "p" * 64})
                    inserts.append(D.fence_params(COLLECTION, ref, khash(key))
                                   | {"id": id_text, "doc": doc})
                else:
                    key = pool[rng.randrange(used)]
                    patches.append(D.fence_params(COLLECTION, ref, khash(key))
                                   | {"id": encode_value(key), "patch": patch})
            async with conn.transaction(), conn.cursor() as cur:
                if inserts:
                    await cur.executemany(st.insert, inserts)
                if patches:
                    await cur.executemany(st.patch, patches)
            counter[0] += batch
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)


async def _live_phase(source: str, writers: int, seconds: float, rate: float,
                      batch: int) -> float:
    async with PostgresShard("bench-src", source, max_size=writers) as shard:
        counter = [0]
        start = time.monotonic()
        until = start + seconds
        per_writer = rate / writers if rate > 0 else 0.0
        if batch > 1:
            await asyncio.gather(*(_batch_writer(source, w, batch, per_writer, until, counter)
                                   for w in range(writers)))
        else:
            await asyncio.gather(*(_writer(shard, w, per_writer, until, counter)
                                   for w in range(writers)))
        return counter[0] / (time.monotonic() - start)


def _backlog(source: str, n: int) -> None:
    """``n`` changes written fast: batched inserts, then batched updates of half of them."""
    table = collection_table(COLLECTION)
    keys = _chunk_keys(10**9, n * 2 // 3)
    with psycopg.connect(source) as conn:
        with conn.cursor() as cur:
            for i in range(0, len(keys), 500):
                cur.executemany(
                    sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s::jsonb)")
                    .format(table),
                    [(khash(k), json.dumps({"$numberInt": str(k)}, separators=(",", ":")),
                      json.dumps({"_id": {"$numberInt": str(k)}, "k": {"$numberInt": str(k)},
                                  "pad": "b" * 64}))
                     for k in keys[i:i + 500]],
                )
                conn.commit()
        updates = n - len(keys)
        with conn.cursor() as cur:
            for i in range(0, updates, 500):
                cur.executemany(
                    sql.SQL("UPDATE {} SET doc = doc || '{{\"u\": 1}}' WHERE khash = %s AND id = %s")
                    .format(table),
                    [(khash(k), json.dumps({"$numberInt": str(k)}, separators=(",", ":")))
                     for k in keys[i:min(i + 500, updates)]],
                )
                conn.commit()


def _chunk_digest(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), coalesce(md5(string_agg(khash::text || ':' || id || ':' ||"
                    " doc::text, ',' ORDER BY khash, id)), '') FROM {} WHERE khash >= 0")
            .format(collection_table(COLLECTION))
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _source_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return current_lsn(conn)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- main ------------------------------------------------------------------------------------


async def _prepare(source: str, target: str) -> None:
    async with PostgresShard("bench-src", source) as s, PostgresShard("bench-dst", target) as t:
        for shard in (s, t):
            await shard.ensure_schema()
            await shard.drop_collection(COLLECTION)
            await shard.create_collection(COLLECTION)
        await s.put_fence(COLLECTION, CHUNK, RANGE, TOKEN, FenceState.ACTIVE)
        await t.put_fence(COLLECTION, CHUNK, RANGE, TOKEN, FenceState.RECEIVING)


def run(source: str, target: str, seconds: float, writers: int, rate: float,
        backlog: int, batch: int = 1) -> dict[str, Any]:
    spec = StreamSpec(migration_id=MIGRATION, collection=COLLECTION, chunk_id=CHUNK,
                      key_range=RANGE)
    for dsn in (source, target):
        cleanup_stream_objects(dsn, MIGRATION)
    asyncio.run(_prepare(source, target))
    try:
        create_publication(source, spec.names, COLLECTION, CHUNK, RANGE)
        with create_slot(source, spec.names, export_snapshot=False):
            pass  # the chunk starts empty: nothing to copy

        # Live phase: writers at the requested rate, the applier following.
        applier = ApplierProcess(spec, source, target)
        writes_per_s = asyncio.run(_live_phase(source, writers, seconds, rate, batch))
        live_end = _source_lsn(source)
        wait_caught_up(target, spec.names, live_end, timeout=120)
        live = applier.finish()

        # Backlog phase: stopped applier, N changes, then time the drain.
        _backlog(source, backlog)
        backlog_end = _source_lsn(source)
        started = time.monotonic()
        applier = ApplierProcess(spec, source, target)
        wait_caught_up(target, spec.names, backlog_end, timeout=600, )
        drain_s = time.monotonic() - started
        drained = applier.finish()

        verified = _chunk_digest(source) == _chunk_digest(target)
        lags = live["lags"]
        return {
            "source_writes_per_s": round(writes_per_s, 1),
            "applied_per_s": round(live["applied_changes"] / seconds, 1),
            "lag_p50_s": round(statistics.median(lags), 4) if lags else 0.0,
            "lag_p99_s": round(_pct(lags, 0.99), 4),
            "backlog_drain_per_s": round(drained["applied_changes"] / drain_s, 1),
            "verified": verified,
            "writers": writers,
            "seconds": seconds,
            "target_rate": rate,
            "writes_per_txn": batch,
            "live_batches": live["batches"],
            "backlog_changes": drained["applied_changes"],
            "backlog_drain_s": round(drain_s, 3),
        }
    finally:
        for dsn in (source, target):
            cleanup_stream_objects(dsn, MIGRATION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=5000,
                        help="target source writes per second in all (0: unthrottled)")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1,
                        help="fenced writes per source transaction (1: single-document "
                        "writes through PostgresShard)")
    parser.add_argument("--dsn-source")
    parser.add_argument("--dsn-target")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        if args.dsn_source and args.dsn_target:
            source, target = args.dsn_source, args.dsn_target
        else:
            from catalog.local_stack import private_stack

            st = stack.enter_context(private_stack(2))
            dsns = list(st.shard_dsns().values())
            source, target = dsns[0], dsns[1]
        result = run(source, target, args.seconds, args.writers, args.rate, args.backlog,
                     args.batch)
    print(json.dumps(result))
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
