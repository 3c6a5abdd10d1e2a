"""Benchmark of the change stream and applier: live lag under load, and backlog drain.

    python -m bench.cdc --seconds 20 --writers 8 [--rate 5000] [--backlog 100000]
                        [--batch B] [--no-native] [--dsn-source DSN --dsn-target DSN]
    python -m bench.cdc --rate 10000 --batch 500 --writers 4   # live apply at 10,000 writes/s

Unchanged figures keep their names (``backlog_drain_per_s``, ``lag_p99_s``, ...), so a new
run prints the old figure beside the new ratio.

Prints ONE JSON object:

* ``source_writes_per_s``: fenced document writes the writers committed per second on the
  source during the live phase, all inside the moved chunk. With ``--batch 1`` (default)
  each is a single-document insert / patch / replace / delete through ``PostgresShard``, its
  own durable transaction; with ``--batch B`` each writer commits transactions of B fenced
  inserts and ``$inc`` patches (the engine's statements, pipelined).
* ``applied_per_s``: source changes the applier applied per second in the live phase.
* ``lag_p50_s`` / ``lag_p99_s``: per source transaction, target commit time minus source
  commit time, in the live phase (same machine, same clock).
* ``backlog_drain_warm_per_s``: the applier is stopped, ``--backlog`` changes are written
  (batched inserts and updates), the applier is started again; changes divided by the time
  from its start until the target has applied everything (includes connecting to both
  shards and resuming the slot). The applier's process is already running and imported,
  as a worker's is when its replicate activity starts an applier.
* ``backlog_drain_per_s``: the same drain timed as this bench first did (until December
  2026), from starting the applier's Python process: the interpreter's start and imports
  (about 0.3 s here) count as drain time. ``drain_ratio_with_spawn`` is the ratio on it.
* ``native_drain_per_s``: PostgreSQL's own logical replication on the same two servers, the
  same backlog shape: a publication of a second collection's table on the source, a
  subscription on the target (``copy_data = false``, its slot created at once, disabled),
  ``--backlog`` changes written exactly as above, then ``ALTER SUBSCRIPTION ... ENABLE``;
  changes divided by the time from the enable until the native apply worker has committed
  the last backlog transaction (a marker row written after the backlog is on the target;
  apply is in commit order). ``drain_ratio`` is ``backlog_drain_warm_per_s /
  native_drain_per_s`` (1.0: as fast as the engine's own apply worker, which the server's
  launcher forks from its running postmaster; both clocks start at "apply now"). The subscription, its slot and the
  publication are dropped at the end, also on errors. ``--no-native`` skips it.
* ``source_rate_per_s`` / ``rate_reached``: with ``--rate R``, what the source sustained in
  the live phase and whether it reached 95 % of ``R`` (on a loaded machine the writers may
  not: then the lag figures are those of the rate the source did sustain).
* ``writer_cpu_share``: the share of one core the writers' process used in the live phase
  (near 1.0: the writers, not the servers or the applier, limited ``source_writes_per_s``).
* ``decoder``: which path read the stream in the drain, ``"c"`` (the optional accelerator,
  ``shards/postgres/_pgoutput_fast.c``) or ``"python"`` (``SHARDSHIFT_PURE_PYTHON=1``, or
  no compiled module); ``applier_cpu_s_per_100k``: the drain's applier process CPU-seconds
  (user + system) per 100,000 applied changes.
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
from psycopg.conninfo import make_conninfo

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
from shards.postgres.stream_control import ensure_apply_schema, wait_caught_up

CHUNK = 1
RANGE = KeyRange(lo=0, hi=KHASH_END)
TOKEN = 1
COLLECTION = "bench_cdc"
MIGRATION = "bench-cdc"
NATIVE = "bench_cdc_native"  # the collection PostgreSQL's own replication carries
NATIVE_PUB = "bench_cdc_native_pub"
NATIVE_SUB = "bench_cdc_native_sub"
MARKER_KEY = -1  # a key outside the backlog's keys: the marker row after the backlog


# -- the applier process -------------------------------------------------------------------


def _applier_main(spec_json: str, source: str, target: str, stop: Any, out: Any,
                  ready: Any, go: Any) -> None:
    spec = StreamSpec.model_validate_json(spec_json)
    # Imported and ready: the parent starts the drain's clock and says go (a worker's
    # replicate activity starts its applier in a process that is already running).
    ready.set()
    go.wait()
    applier = ChangeApplier(spec, source, target)
    try:
        cpu0 = time.process_time()
        stats = applier.run(stop)
        out.put({
            "applied_changes": stats.applied_changes, "applied_txns": stats.applied_txns,
            "batches": stats.batches, "lags": list(stats.lag_samples),
            "cpu_s": time.process_time() - cpu0, "decoder": stats.decoder,
        })
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put({"error": repr(exc)})


class ApplierProcess:
    """The applier in a process of its own. It imports everything, reports ready, and
    starts streaming at :meth:`go` (``spawned_at``: when the process was started)."""

    def __init__(self, spec: StreamSpec, source: str, target: str) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.ready = ctx.Event()
        self._go = ctx.Event()
        self.out: Any = ctx.Queue()
        self.proc = ctx.Process(
            target=_applier_main, args=(spec.model_dump_json(), source, target, self.stop,
                                        self.out, self.ready, self._go),
            daemon=True,
        )
        self.spawned_at = time.monotonic()
        self.proc.start()

    def go(self, timeout: float = 60) -> float:
        """Wait until the process is ready, let it start; returns the start time."""
        if not self.ready.wait(timeout):
            raise RuntimeError("the applier process did not start")
        started = time.monotonic()
        self._go.set()
        return started

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


async def _writer(shard: PostgresShard, wid: int, pool: list[int], rate: float, until: float,
                  counter: list[int]) -> None:
    """Fenced single-document writes at ``rate`` per second (0: as fast as possible), on
    the keys of ``pool``."""
    rng = random.Random(wid)
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


async def _batch_writer(source: str, wid: int, pool: list[int], batch: int, rate: float,
                        until: float, counter: list[int]) -> None:
    """Transactions of ``batch`` fenced writes (the engine's own statements, pipelined):
    inserts of new documents (keys of ``pool``) and ``$inc`` patches of earlier ones, at
    ``rate`` writes/s."""
    st = D.DocumentStatements(COLLECTION)
    ref = FenceRef(chunk_id=CHUNK, token=TOKEN)
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
                      batch: int) -> tuple[float, float]:
    """The writers for ``seconds``; returns their writes per second and the share of one
    core the writers' process used meanwhile (near 1.0: the writers, one Python process,
    were the source's limit)."""
    # Each writer's keys are found before the clock starts (a batch writer needs up to
    # 20,000 of them: computing their hashes inside the window cost the writers time).
    pools = [_chunk_keys(w * 10_000_000, 20_000 if batch > 1 else 2000)
             for w in range(writers)]
    async with PostgresShard("bench-src", source, max_size=writers) as shard:
        counter = [0]
        cpu0 = time.process_time()
        start = time.monotonic()
        until = start + seconds
        per_writer = rate / writers if rate > 0 else 0.0
        if batch > 1:
            await asyncio.gather(*(_batch_writer(source, w, pools[w], batch, per_writer,
                                                 until, counter)
                                   for w in range(writers)))
        else:
            await asyncio.gather(*(_writer(shard, w, pools[w], per_writer, until, counter)
                                   for w in range(writers)))
        elapsed = time.monotonic() - start
        return counter[0] / elapsed, (time.process_time() - cpu0) / elapsed


def _backlog(source: str, n: int, collection: str = COLLECTION) -> None:
    """``n`` changes written fast: 2/3 inserts, then updates of half of them, 500 changes
    per transaction, small jsonb documents."""
    table = collection_table(collection)
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


# -- PostgreSQL's native logical replication, the same backlog ---------------------------------


def _native_cleanup(source: str, target: str) -> None:
    """Drop the native subscription (and its slot), the publication and the tables."""
    with psycopg.connect(target, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s",
                        (NATIVE_SUB,)).fetchone():
            sub = sql.Identifier(NATIVE_SUB)
            try:
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sub))  # drops its slot
            except psycopg.Error:
                # The publisher refused to drop the slot: detach it, drop it below.
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sub))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sub))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sub))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(collection_table(NATIVE)))
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(NATIVE_PUB)))
        deadline = time.monotonic() + 30
        while True:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (NATIVE_SUB,)).fetchone()
            if row is None:
                break
            if not row[0] or time.monotonic() > deadline:
                # Inactive (or still held by a walsender past the deadline: then this
                # raises, and the slot's name is in the error for a manual drop).
                conn.execute("SELECT pg_drop_replication_slot(%s)", (NATIVE_SUB,))
                break
            time.sleep(0.05)  # a walsender of the dropped subscription is exiting
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(collection_table(NATIVE)))


def _wait_marker(target: str, timeout: float) -> None:
    """Wait (polling every 10 ms, up to ``timeout``) for the marker row on the target."""
    stmt = sql.SQL("SELECT 1 FROM {} WHERE khash = %s AND id = %s").format(
        collection_table(NATIVE))
    marker_id = json.dumps({"$numberInt": str(MARKER_KEY)}, separators=(",", ":"))
    deadline = time.monotonic() + timeout
    with psycopg.connect(target, autocommit=True) as conn:
        while conn.execute(stmt, (khash(MARKER_KEY), marker_id)).fetchone() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"native subscription did not apply the backlog in {timeout}s")
            time.sleep(0.01)


def native_drain(source: str, target: str, n: int) -> dict[str, Any]:
    """PostgreSQL's apply worker draining the same backlog between the same servers.

    ``source`` and ``target`` must be able to create publications and subscriptions (the
    superuser on a private stack); the subscription connects to ``source`` from the target
    server."""
    async def prepare() -> None:
        async with PostgresShard("bench-src", source) as s, \
                PostgresShard("bench-dst", target) as t:
            for shard in (s, t):
                await shard.ensure_schema()
                await shard.drop_collection(NATIVE)
                await shard.create_collection(NATIVE)

    _native_cleanup(source, target)
    asyncio.run(prepare())
    try:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(NATIVE_PUB), collection_table(NATIVE)))
            # The apply worker runs as the server's OS user, which may not read our
            # passfile: it gets the password libpq used, in its connection string.
            publisher = make_conninfo(source, password=conn.info.password or None,
                                      passfile=None)
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}"
                " WITH (copy_data = false, create_slot = true, enabled = false)"
            ).format(sql.Identifier(NATIVE_SUB), sql.Literal(publisher),
                     sql.Identifier(NATIVE_PUB)))
        _backlog(source, n, NATIVE)
        with psycopg.connect(source) as conn:
            conn.execute(sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s::jsonb)")
                         .format(collection_table(NATIVE)),
                         (khash(MARKER_KEY),
                          json.dumps({"$numberInt": str(MARKER_KEY)}, separators=(",", ":")),
                          '{"marker": true}'))
            conn.commit()
        started = time.monotonic()
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(
                sql.Identifier(NATIVE_SUB)))
        _wait_marker(target, timeout=600)
        drain_s = time.monotonic() - started
        same = _chunk_digest(source, NATIVE) == _chunk_digest(target, NATIVE)
        return {"native_drain_per_s": round(n / drain_s, 1),
                "native_drain_s": round(drain_s, 3), "native_verified": same}
    finally:
        _native_cleanup(source, target)


def _chunk_digest(dsn: str, collection: str = COLLECTION) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), coalesce(md5(string_agg(khash::text || ':' || id || ':' ||"
                    " doc::text, ',' ORDER BY khash, id)), '') FROM {} WHERE khash >= 0")
            .format(collection_table(collection))
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
    # The stream state table before the applier process starts (which also creates it):
    # waiting for the catch-up reads it, and the spawned process may not be there yet.
    with psycopg.connect(target) as conn:
        ensure_apply_schema(conn)


def run(source: str, target: str, seconds: float, writers: int, rate: float,
        backlog: int, batch: int = 1, native: tuple[str, str] | None = None
        ) -> dict[str, Any]:
    """Our applier's figures; with ``native`` (source and target DSNs allowed to create a
    subscription) also PostgreSQL's own drain of the same backlog and the ratio."""
    result = _run_ours(source, target, seconds, writers, rate, backlog, batch)
    if native is not None:
        result.update(native_drain(native[0], native[1], backlog))
        result["drain_ratio"] = round(
            result["backlog_drain_warm_per_s"] / result["native_drain_per_s"], 3)
        result["drain_ratio_with_spawn"] = round(
            result["backlog_drain_per_s"] / result["native_drain_per_s"], 3)
    return result


def _run_ours(source: str, target: str, seconds: float, writers: int, rate: float,
              backlog: int, batch: int) -> dict[str, Any]:
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
        applier.go()
        writes_per_s, writer_cpu = asyncio.run(_live_phase(source, writers, seconds, rate,
                                                           batch))
        live_end = _source_lsn(source)
        wait_caught_up(target, spec.names, live_end, timeout=120)
        live = applier.finish()

        # Backlog phase: stopped applier, N changes, then time the drain.
        _backlog(source, backlog)
        backlog_end = _source_lsn(source)
        applier = ApplierProcess(spec, source, target)
        started = applier.go()
        wait_caught_up(target, spec.names, backlog_end, timeout=600)
        done = time.monotonic()
        drain_s = done - started
        # The figure as it was first measured: from starting the applier's Python process
        # (interpreter and imports, about 0.3 s here) to the end.
        cold_s = done - applier.spawned_at
        drained = applier.finish()

        verified = _chunk_digest(source) == _chunk_digest(target)
        lags = live["lags"]
        return {
            "source_writes_per_s": round(writes_per_s, 1),
            "source_rate_per_s": round(writes_per_s, 1),
            "rate_reached": rate <= 0 or writes_per_s >= 0.95 * rate,
            "applied_per_s": round(live["applied_changes"] / seconds, 1),
            "lag_p50_s": round(statistics.median(lags), 4) if lags else 0.0,
            "lag_p99_s": round(_pct(lags, 0.99), 4),
            "backlog_drain_per_s": round(drained["applied_changes"] / cold_s, 1),
            "backlog_drain_warm_per_s": round(drained["applied_changes"] / drain_s, 1),
            "writer_cpu_share": round(writer_cpu, 2),
            "verified": verified,
            "writers": writers,
            "seconds": seconds,
            "target_rate": rate,
            "writes_per_txn": batch,
            "live_batches": live["batches"],
            "backlog_changes": drained["applied_changes"],
            "backlog_drain_s": round(cold_s, 3),
            "backlog_drain_warm_s": round(drain_s, 3),
            "decoder": drained["decoder"],
            "applier_cpu_s_per_100k": round(
                drained["cpu_s"] * 100_000 / max(drained["applied_changes"], 1), 3),
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
    parser.add_argument("--no-native", action="store_true",
                        help="skip PostgreSQL's own logical replication of the same backlog")
    parser.add_argument("--dsn-source")
    parser.add_argument("--dsn-target")
    parser.add_argument("--native-dsn-source",
                        help="with --dsn-*: a role that may create the native publication")
    parser.add_argument("--native-dsn-target",
                        help="with --dsn-*: a role that may create the native subscription")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        if args.dsn_source and args.dsn_target:
            source, target = args.dsn_source, args.dsn_target
            native = (args.native_dsn_source or source, args.native_dsn_target or target)
        else:
            from catalog.local_stack import private_stack

            st = stack.enter_context(private_stack(2))
            dsns = list(st.shard_dsns().values())
            source, target = dsns[0], dsns[1]
            supers = list(st.shard_dsns("superuser").values())
            native = (supers[0], supers[1])
        result = run(source, target, args.seconds, args.writers, args.rate, args.backlog,
                     args.batch, None if args.no_native else native)
    print(json.dumps(result))
    return 0 if result["verified"] and result.get("native_verified", True) else 1


if __name__ == "__main__":
    sys.exit(main())
