"""Planning at fleet scale, on a synthetic fleet in a private catalog.

    python -m bench.fleet_sim --shards 2000 --chunks 100000 [--collections 4] [--seed 7]
                              [--tolerance 0.2] [--max-moves-per-shard N] [--max-moves N]

Starts a private catalog PostgreSQL (its own state directory under /tmp and a free port; no
shard servers, no Temporal), fills it with a synthetic fleet in a few statements
(``generate_series``): ``--shards`` active shards declaring both capacities, ``--collections``
collections sharing ``--chunks`` chunks (40 %, 30 %, 20 %, ... of them), placed round robin,
with skewed sizes (log-normal, a few chunks ten times larger) and skewed traffic (log-normal
with a heavy tail: a handful of chunks hotter than any shard should carry). Then it times,
and prints ONE JSON object:

* ``route_load_ms``: ``await router.route(name)`` on a cold ``router.core.Router`` (over
  ``router.catalog_source.CatalogRouteSource``) for the largest collection.
* ``refresh_ms_per_change``: a chunk split through the catalog API (``Catalog.split_chunk``),
  then the time until the router's map routes the split point to the new chunk (the mean of
  ``--changes`` splits; the router follows the catalog's notifications).
* ``stats_refresh_s``: the catalog-side bulk write of every chunk's measured size
  (``Catalog.record_chunk_sizes``), and ``read_loads_s``: the planners' read of every chunk's
  load (``Catalog.chunk_loads``).
* ``plan_rebalance_s`` (the first round) and ``plan_merge_s``: the planners
  (``activities.planners``, ``activities.packing``) on the loads read back, input building
  included; ``..._cpu_s`` is the same in CPU time of this process, the figure to trust on a
  machine other work shares.
* ``plan_valid``: both plans checked here, independently of the planners: every move takes a
  known, idle chunk from the shard that holds it to another shard in scope, at most once; the
  global and per-shard move limits hold; every shard that receives a chunk stays within both
  declared capacities; no plan makes the spreads worse (the sum over bytes and ops/s of the
  spread of utilization, max minus min, over its mean, squared); the merge drains whole
  shards onto the kept ones. The rebalance is planned round after round as the workflow
  does (each round's moves and splits applied, a split's halves each half of the chunk), up
  to ``--rounds``, and must end with bytes and ops/s within ``--tolerance`` (spread at most
  tolerance times the mean); ``rebalance_rounds`` says how many it took. ``checks`` lists
  what failed (empty when valid); the spreads before, after round 1 and at the end are
  printed.
* ``shards_after`` and ``shards_lower_bound``: the merge keeps ``shards_after`` shards; the
  lower bound is, in each dimension, the fewest shards whose capacities (largest first) add
  up to the fleet's total (here ``ceil(total / capacity)``: every shard declares the same),
  the larger of the two; ``merge_gap`` is the difference.

Everything it started is stopped and removed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from activities.models import PlannedMove, RebalancePlan
from activities.packing import MergePlan, plan_merge
from activities.planners import ChunkEntry, ShardCapacity, plan_rebalance
from catalog import Catalog
from catalog.models import ShardInfo
from catalog.provision import provision_catalog
from catalog.store import ChunkLoad, ChunkSize
from infra.net import free_port_block
from infra.postgres import PostgresInstance, embedded_bin_dir
from infra.private import new_state_dir
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import DatabaseSettings, FleetSettings, InfraSettings, RouterSettings

MIB = 1 << 20
MAX_CHUNK_BYTES = 256 * MIB
"""The largest synthetic chunk (a fleet splits chunks before they grow past a limit)."""
UTILIZATION = 0.4
"""Mean share of a shard's capacities the synthetic fleet uses (both dimensions)."""


# -- a private catalog ---------------------------------------------------------------------------


@contextmanager
def private_catalog() -> Iterator[str]:
    """A provisioned catalog PostgreSQL of its own; yields the catalog role's DSN."""
    state = new_state_dir("shardshift-fleetsim-")
    db = DatabaseSettings()
    instance = PostgresInstance(
        "catalog", data_dir=state / "pg" / "catalog", port=free_port_block(1),
        bin_dir=embedded_bin_dir(), passfile=state / "pgpass", run_as=InfraSettings().run_as)
    try:
        (state / "pg").mkdir()
        (state / "pg").chmod(0o755)
        instance.init()
        instance.start(120)
        provision_catalog(instance.dsn(), instance.passfile, db=db)
        yield instance.dsn(user=db.catalog_user)
    finally:
        try:
            instance.stop()
        finally:
            shutil.rmtree(state, ignore_errors=True)


# -- the synthetic fleet -------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    shards: int
    collections: list[tuple[str, int]]
    """(name, chunks)."""
    cap_bytes: int
    cap_ops: float


def shard_name(i: int) -> str:
    return f"sim-{i:05d}"


def chunk_counts(chunks: int, collections: int) -> list[int]:
    """40 %, 30 %, 20 %, ... of the chunks (the last takes the rest), at least one each."""
    weights = [max(1, collections - i) for i in range(collections)]
    counts = [max(1, chunks * w // sum(weights)) for w in weights]
    counts[0] += chunks - sum(counts)
    return counts


def fill(dsn: str, shards: int, chunks: int, collections: int) -> list[tuple[str, int]]:
    """Shards (capacities declared later, once the sizes are known), collections and chunks,
    in one transaction (the layout trigger checks each collection once at commit)."""
    names = [(f"sim_{chr(ord('a') + i)}", n)
             for i, n in enumerate(chunk_counts(chunks, collections))]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO catalog.shards (shard_id, address, engine, major_version, state)"
            " SELECT 'sim-' || lpad(i::text, 5, '0'), 'host=127.0.0.1 port=1 dbname=sim',"
            " 'postgres', 18, 'active' FROM generate_series(0, %s - 1) AS i", (shards,))
        offset = 0
        for name, n in names:
            conn.execute("INSERT INTO catalog.collections (name, shard_key, layout_version)"
                         " VALUES (%s, 'acct', 1)", (name,))
            conn.execute(
                "INSERT INTO catalog.chunks (collection, chunk_id, lo, hi, shard_id, token)"
                " SELECT %(c)s, nextval('catalog.chunk_ids'), lo, lead(lo) OVER (ORDER BY i),"
                "  'sim-' || lpad(((i + %(off)s) %% %(s)s)::text, 5, '0'), 1"
                " FROM (SELECT i, (-9223372036854775808::numeric"
                "   + floor(i * 18446744073709551616::numeric / %(n)s))::bigint AS lo"
                "   FROM generate_series(0, %(n)s - 1) AS i) AS x",
                {"c": name, "off": offset, "s": shards, "n": n})
            offset += n
    return names


def declare_capacities(dsn: str, shards: int, sizes: Sequence[ChunkSize],
                       ops: Sequence[float]) -> tuple[int, float]:
    """Every shard declares the same capacities: the mean load over ``UTILIZATION``."""
    cap_b = int(sum(s.size_bytes for s in sizes) / shards / UTILIZATION)
    cap_o = sum(ops) / shards / UTILIZATION
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE catalog.shards SET capacity_bytes = %s, capacity_ops_per_s = %s",
                     (cap_b, cap_o))
    return cap_b, cap_o


def synthetic_sizes(loads: Sequence[ChunkLoad], seed: int) -> tuple[list[ChunkSize],
                                                                        list[float]]:
    """Skewed sizes: log-normal around 8 MiB, one chunk in 50 four times larger, none above
    ``MAX_CHUNK_BYTES`` (chunks are split before they grow past it). Skewed traffic:
    log-normal around 5 ops/s, one chunk in 5,000 fifty times hotter."""
    rng = random.Random(seed)
    sizes, ops = [], []
    for c in loads:
        size = 8 * MIB * rng.lognormvariate(0, 0.8) * (4 if rng.random() < 0.02 else 1)
        size = min(size, MAX_CHUNK_BYTES)
        sizes.append(ChunkSize(c.collection, c.chunk_id, int(size), int(size) // 1024))
        ops.append(5.0 * rng.lognormvariate(0, 1.0) * (50 if rng.random() < 0.0002 else 1))
    return sizes, ops


def record_ops(dsn: str, loads: Sequence[ChunkLoad], ops: Sequence[float]) -> None:
    """What routers report: ``chunk_stats.ops_per_s``, set in one statement."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE catalog.chunk_stats s SET ops_per_s = x.ops"
            " FROM unnest(%s::text[], %s::bigint[], %s::float8[]) AS x(collection, chunk_id, ops)"
            " WHERE s.collection = x.collection AND s.chunk_id = x.chunk_id",
            ([c.collection for c in loads], [c.chunk_id for c in loads], list(ops)))


# -- checks (independent of the planners) -------------------------------------------------------


@dataclass
class Layout:
    owner: dict[tuple[str, int], str]
    weight: dict[tuple[str, int], tuple[int, float]]

    @classmethod
    def of(cls, loads: Sequence[ChunkLoad]) -> Layout:
        return cls({(c.collection, c.chunk_id): c.shard_id for c in loads},
                   {(c.collection, c.chunk_id): (c.size_bytes, c.ops_per_s) for c in loads})

    def totals(self, shards: Sequence[str], skip: Collection[tuple[str, int]] = ()
               ) -> tuple[dict[str, float], dict[str, float]]:
        b = dict.fromkeys(shards, 0.0)
        o = dict.fromkeys(shards, 0.0)
        for key, s in self.owner.items():
            if key not in skip:
                b[s] += self.weight[key][0]
                o[s] += self.weight[key][1]
        return b, o


def apply_moves(layout: Layout, moves: Sequence[PlannedMove], scope: set[str],
                problems: list[str], what: str) -> Layout:
    owner = dict(layout.owner)
    seen: Counter[tuple[str, int]] = Counter()
    for m in moves:
        key = (m.collection, m.chunk_id)
        seen[key] += 1
        if key not in owner:
            problems.append(f"{what}: unknown chunk {key}")
        elif owner[key] != m.source:
            problems.append(f"{what}: {key} is on {owner[key]}, not {m.source}")
        elif m.target not in scope or m.target == m.source:
            problems.append(f"{what}: {key} moves to {m.target}")
        owner[key] = m.target
    if seen and max(seen.values()) > 1:
        problems.append(f"{what}: a chunk moves twice")
    return Layout(owner, layout.weight)


def spread(values: dict[str, float], cap: float) -> tuple[float, float]:
    """(max - min, mean) of utilization."""
    util = [v / cap for v in values.values()]
    return max(util) - min(util), sum(util) / len(util)


def check_rebalance(fleet: Fleet, layout: Layout, plan: RebalancePlan, *, max_moves: int,
                    per_shard: int, problems: list[str], what: str) -> Layout:
    """Check one plan against the layout it was made for; the layout after it (moves done,
    each planned split's halves on the chunk's shard)."""
    shards = [shard_name(i) for i in range(fleet.shards)]
    after = apply_moves(layout, plan.moves, set(shards), problems, what)
    if len(plan.moves) > max_moves:
        problems.append(f"{what}: {len(plan.moves)} moves > {max_moves}")
    per = Counter([m.source for m in plan.moves] + [m.target for m in plan.moves])
    if per and max(per.values()) > per_shard:
        problems.append(f"{what}: a shard takes part in {max(per.values())} moves")
    b1, o1 = after.totals(shards)
    for s in {m.target for m in plan.moves}:
        if b1[s] > fleet.cap_bytes or o1[s] > fleet.cap_ops * (1 + 1e-9):
            problems.append(f"{what}: {s} over capacity")
    b0, o0 = layout.totals(shards)
    phi = [sum((sp / mean) ** 2 for sp, mean in (spread(b, fleet.cap_bytes),
                                                   spread(o, fleet.cap_ops)))
           for b, o in ((b0, o0), (b1, o1))]
    if phi[1] > phi[0] * (1 + 1e-9):
        problems.append(f"{what}: the spreads grew (sum of squares {phi[0]:.4f} -> {phi[1]:.4f})")
    moved = {(m.collection, m.chunk_id) for m in plan.moves}
    owner, weight = dict(after.owner), dict(after.weight)
    next_id = max(k[1] for k in owner) + 1
    for sp in plan.splits:
        key = (sp.collection, sp.chunk_id)
        if key in moved or layout.owner.get(key) != sp.shard:
            problems.append(f"{what}: split {key} is not an unmoved chunk of {sp.shard}")
            continue
        b, o = weight.pop(key)
        del owner[key]
        for half, size in ((next_id, b // 2), (next_id + 1, b - b // 2)):
            owner[(sp.collection, half)] = sp.shard
            weight[(sp.collection, half)] = (size, o / 2)
        next_id += 2
    return Layout(owner, weight)


def spreads(fleet: Fleet, layout: Layout) -> tuple[float, float]:
    """The spread of utilization over its mean, bytes and ops/s."""
    b, o = layout.totals([shard_name(i) for i in range(fleet.shards)])
    (sb, mb), (so, mo) = spread(b, fleet.cap_bytes), spread(o, fleet.cap_ops)
    return sb / mb, so / mo


def rebalance_rounds(fleet: Fleet, layout: Layout, infos: Sequence[ShardInfo], *,
                     tolerance: float, max_moves: int, per_shard: int, rounds: int,
                     problems: list[str]) -> dict[str, Any]:
    """Plan, apply (moves and splits), plan again: as the workflow's rounds do, until both
    spreads are within tolerance; every plan checked."""
    out: dict[str, Any] = {}
    sb, so = spreads(fleet, layout)
    out["rebalance_spread_bytes_before"], out["rebalance_spread_ops_before"] = \
        round(sb, 3), round(so, 3)
    times: list[float] = []
    cpu = 0.0
    moves = splits = hot = 0
    reached = None
    for n in range(1, rounds + 1):
        t, c = time.perf_counter(), time.process_time()
        entries, caps = rebalance_input(layout, infos)
        plan = plan_rebalance(entries, tolerance=tolerance, max_moves=max_moves,
                              max_moves_per_shard=per_shard, split=True, capacities=caps)
        times.append(time.perf_counter() - t)
        if n == 1:
            cpu = time.process_time() - c
        moves += len(plan.moves)
        splits += len(plan.splits)
        hot += sum(sp.reason == "hot" for sp in plan.splits)
        layout = check_rebalance(fleet, layout, plan, max_moves=max_moves,
                                 per_shard=per_shard, problems=problems,
                                 what=f"rebalance round {n}")
        sb, so = spreads(fleet, layout)
        if n == 1:
            out["rebalance_spread_bytes_round1"] = round(sb, 3)
            out["rebalance_spread_ops_round1"] = round(so, 3)
        if sb <= tolerance and so <= tolerance:
            reached = n
            break
        if not plan.moves and not plan.splits:
            break
    out.update({"plan_rebalance_s": round(times[0], 3), "plan_rebalance_cpu_s": round(cpu, 3),
                "plan_rebalance_s_max": round(max(times), 3),
                "rebalance_rounds": len(times), "rebalance_moves": moves,
                "rebalance_splits": splits, "rebalance_hot_splits": hot,
                "rebalance_spread_bytes_after": round(sb, 3),
                "rebalance_spread_ops_after": round(so, 3)})
    if reached is None:
        problems.append(f"rebalance: spreads {sb:.3f} (bytes) and {so:.3f} (ops/s) of the mean "
                        f"after {len(times)} rounds, tolerance {tolerance}")
    return out


def check_merge(fleet: Fleet, layout: Layout, plan: MergePlan, problems: list[str]) -> None:
    kept = set(plan.kept)
    drained = set(plan.drained)
    if kept & drained or len(kept | drained) != fleet.shards:
        problems.append("merge: kept and drained shards do not partition the fleet")
    after = apply_moves(layout, plan.moves, kept, problems, "merge")
    if any(s in drained for s in after.owner.values()):
        problems.append("merge: a drained shard keeps a chunk")
    b, o = after.totals(sorted(kept))
    if any(b[s] > fleet.cap_bytes or o[s] > fleet.cap_ops * (1 + 1e-9)
           for s in {m.target for m in plan.moves}):
        problems.append("merge: a shard that takes chunks ends over capacity")


# -- the run -------------------------------------------------------------------------------------


async def route_figures(catalog: Catalog, fleet: Fleet, changes: int) -> dict[str, float]:
    name = fleet.collections[0][0]
    source = CatalogRouteSource(catalog, timeout_s=60)
    async with Router(source, RouterSettings()) as router:
        t0 = time.perf_counter()
        # A deadline of its own: a loaded machine must not turn a slow load into a failure.
        route = await router.route(name, asyncio.get_running_loop().time() + 300)
        route_ms = (time.perf_counter() - t0) * 1000
        rng = random.Random(changes)
        waits = []
        for _ in range(changes):
            chunk = rng.choice(route.chunks)
            at = chunk.range.lo + (chunk.range.hi - chunk.range.lo) // 2
            await catalog.split_chunk(name, chunk.chunk_id, at, chunk.token)
            t0 = time.perf_counter()
            deadline = t0 + 60
            while True:
                route = await router.route(name)
                if route.lookup(at).range.lo == at:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError("the router did not follow a split within 60 s")
                await asyncio.sleep(0.001)  # the reload runs in the background meanwhile
            waits.append((time.perf_counter() - t0) * 1000)
    return {"route_load_ms": round(route_ms, 1),
            "route_chunks": len(route.chunks),
            "refresh_ms_per_change": round(sum(waits) / len(waits), 1) if waits else 0.0}


def rebalance_input(layout: Layout, infos: Sequence[ShardInfo]
                    ) -> tuple[dict[str, list[ChunkEntry]], dict[str, ShardCapacity]]:
    chunks: dict[str, list[ChunkEntry]] = {s.shard_id: [] for s in infos}
    for key, s in layout.owner.items():
        b, o = layout.weight[key]
        chunks[s].append((key[0], key[1], b, o))
    caps = {s.shard_id: ShardCapacity(s.capacity_bytes, s.capacity_ops_per_s) for s in infos}
    return chunks, caps


async def run(dsn: str, *, shards: int, chunks: int, collections: int, seed: int,
              tolerance: float, max_moves: int, per_shard: int, changes: int,
              rounds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"shards": shards, "chunks": chunks, "collections": collections,
                           "tolerance": tolerance, "max_moves": max_moves,
                           "max_moves_per_shard": per_shard, "rounds": rounds}
    async with Catalog(dsn, max_size=4) as catalog:
        await catalog.ensure_schema()
        names = await asyncio.to_thread(fill, dsn, shards, chunks, collections)
        loads = await catalog.chunk_loads()
        sizes, ops = synthetic_sizes(loads, seed)
        t = time.perf_counter()
        recorded = await catalog.record_chunk_sizes(sizes)
        out["stats_refresh_s"] = round(time.perf_counter() - t, 3)
        await asyncio.to_thread(record_ops, dsn, loads, ops)
        cap_b, cap_o = await asyncio.to_thread(declare_capacities, dsn, shards, sizes, ops)
        fleet = Fleet(shards=shards, collections=names, cap_bytes=cap_b, cap_ops=cap_o)
        out["fill_s"] = round(time.perf_counter() - t0, 1)
        if recorded != len(loads):
            raise RuntimeError(f"recorded {recorded} of {len(loads)} chunk sizes")
        t = time.perf_counter()
        loads = await catalog.chunk_loads()
        out["read_loads_s"] = round(time.perf_counter() - t, 3)
        infos = await catalog.list_shards()
        out.update(await route_figures(catalog, fleet, changes))
        loads = await catalog.chunk_loads()  # the splits' halves

    problems: list[str] = []
    layout = Layout.of(loads)
    out.update(rebalance_rounds(fleet, layout, infos, tolerance=tolerance, max_moves=max_moves,
                                per_shard=per_shard, rounds=rounds, problems=problems))

    t, cpu = time.perf_counter(), time.process_time()
    by_shard: dict[str, list[tuple[str, int, int, float]]] = {s.shard_id: [] for s in infos}
    for c in loads:
        by_shard[c.shard_id].append((c.collection, c.chunk_id, c.size_bytes, c.ops_per_s))
    merge = plan_merge(by_shard, infos)
    out["plan_merge_s"] = round(time.perf_counter() - t, 3)
    out["plan_merge_cpu_s"] = round(time.process_time() - cpu, 3)
    check_merge(fleet, layout, merge, problems)
    out["merge_moves"] = len(merge.moves)
    out["shards_after"] = len(merge.kept)
    out["shards_lower_bound"] = merge.lower_bound
    out["merge_gap"] = len(merge.kept) - merge.lower_bound
    out["plan_valid"] = not problems
    out["checks"] = problems[:20]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--collections", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--max-moves", type=int, default=None,
                        help="the rebalance's global limit (default: one per shard)")
    parser.add_argument("--max-moves-per-shard", type=int,
                        default=FleetSettings().max_moves_per_shard)
    parser.add_argument("--rounds", type=int, default=30,
                        help="rebalance rounds at most (a workflow run plans up to 10; a "
                             "schedule runs it again)")
    parser.add_argument("--changes", type=int, default=5,
                        help="chunk splits the router must follow")
    args = parser.parse_args(argv)
    if args.shards < 2 or args.chunks < args.shards or not 1 <= args.collections <= 26:
        parser.error("need at least 2 shards, a chunk per shard, 1 to 26 collections")
    # A SIGTERM (a timeout) still stops and removes what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with private_catalog() as dsn:
        result = asyncio.run(run(
            dsn, shards=args.shards, chunks=args.chunks, collections=args.collections,
            seed=args.seed, tolerance=args.tolerance, max_moves=args.max_moves or args.shards,
            per_shard=args.max_moves_per_shard, changes=args.changes, rounds=args.rounds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
