"""Measuring chunks for the planners: one pass per shard and collection, written in bulk.

The planners (``drain.plan``, ``rebalance.plan``, ``fleet.replan``, a drain's "after") weigh
chunks by bytes and operations per second. Bytes come from the shards: each shard measures
all its chunks of a collection in one statement (``PostgresShard.chunk_sizes``: every row
bucketed into its chunk by a binary search over the chunks' bounds), where measuring chunk by
chunk cost three round trips per chunk (13.6 s for 9,000 chunks on 3 shards). The sizes are
recorded in the catalog's ``chunk_stats`` a batch per statement
(``Catalog.record_chunk_sizes``), keeping the traffic (``ops_per_s``) the routers measure.
Shards are measured a few at a time (``MEASURE_PARALLEL``), each heartbeating its progress.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Collection, Sequence

from temporalio import activity

from activities.context import MoveContext
from catalog.store import ChunkLoad, ChunkSize
from shards.models import KHASH_END, KeyRange

MEASURE_PARALLEL = 8
"""Shard collections measured at once."""


def chunk_range(load: ChunkLoad) -> KeyRange:
    return KeyRange(lo=load.lo, hi=KHASH_END if load.hi is None else load.hi)


async def measure(ctx: MoveContext, loads: Sequence[ChunkLoad], shards: Collection[str],
                  *, record: bool = True, parallel: int = MEASURE_PARALLEL) -> list[ChunkLoad]:
    """Measure every chunk in ``loads`` held by one of ``shards``, record the sizes in the
    catalog (unless ``record`` is off: a dry run changes nothing) and return ``loads`` with
    them (the other chunks as they were)."""
    groups: dict[tuple[str, str], list[ChunkLoad]] = defaultdict(list)
    for load in loads:
        if load.shard_id in shards:
            groups[(load.shard_id, load.collection)].append(load)
    if not groups:
        return list(loads)
    gate = asyncio.Semaphore(parallel)
    measured: dict[tuple[str, int], tuple[int, int]] = {}
    done = 0

    async def one(shard_id: str, collection: str, chunks: list[ChunkLoad]) -> None:
        nonlocal done
        async with gate:
            engine = await ctx.engine(shard_id)
            sizes = await engine.chunk_sizes(
                collection, [(c.chunk_id, chunk_range(c)) for c in chunks])
        for chunk_id, size in sizes.items():
            measured[(collection, chunk_id)] = size
        done += 1
        if activity.in_activity():
            activity.heartbeat(f"measured {done}/{len(groups)} shard collections "
                               f"({len(measured)} chunks)")

    await asyncio.gather(*(one(s, c, cs) for (s, c), cs in sorted(groups.items())))
    if record:
        await ctx.catalog.record_chunk_sizes(
            [ChunkSize(c, i, size, docs) for (c, i), (docs, size) in sorted(measured.items())])
    out = []
    for load in loads:
        got = measured.get((load.collection, load.chunk_id))
        out.append(load if got is None or load.shard_id not in shards
                   else load._replace(doc_count=got[0], size_bytes=got[1]))
    return out


async def record_sizes(ctx: MoveContext, loads: Sequence[ChunkLoad],
                       shards: Collection[str]) -> None:
    """Record the sizes of the chunks of ``shards`` in ``loads`` (measured by ``measure``
    with ``record=False``, once the operation they were measured for is known to go on)."""
    await ctx.catalog.record_chunk_sizes(
        [ChunkSize(c.collection, c.chunk_id, c.size_bytes, c.doc_count)
         for c in loads if c.shard_id in shards])
