"""Chunk sizes recorded in bulk and every chunk's load read back, on the real catalog.

A size report keeps the traffic the routers measured, skips chunks that no longer exist,
refuses bad values without writing anything, and splits into batches of one statement."""

from __future__ import annotations

import pytest

from catalog import Catalog
from catalog.models import ChunkStats
from catalog.store import ChunkSize
from shards.models import IndexDefinition


async def test_sizes_are_recorded_in_batches_and_keep_ops(
        catalog: Catalog, shard_ids: list[str], collection_name: str) -> None:
    c = collection_name
    cmap = await catalog.create_collection(
        c, "account", (IndexDefinition(name="e", fields=("email",)),), shard_ids,
        chunks_per_shard=3)
    ids = [ch.chunk_id for ch in cmap.chunks]
    await catalog.report_stats(c, [ChunkStats(chunk_id=ids[0], size_bytes=1, doc_count=1,
                                              ops_per_s=42.5)])
    version = await catalog.version()

    sizes = [ChunkSize(c, i, 1000 * n, n) for n, i in enumerate(ids, start=1)]
    gone = ChunkSize(c, max(ids) + 10_000, 5, 5)  # split or merged since it was measured
    assert await catalog.record_chunk_sizes([*sizes, gone], batch=4) == len(ids)

    loads = {x.chunk_id: x for x in await catalog.chunk_loads([c])}
    assert set(loads) == set(ids)
    for n, i in enumerate(ids, start=1):
        assert (loads[i].size_bytes, loads[i].doc_count) == (1000 * n, n)
        assert loads[i].measured_at is not None
    assert loads[ids[0]].ops_per_s == 42.5  # the routers' traffic survives a size report
    assert all(loads[i].ops_per_s == 0 for i in ids[1:])
    assert [(x.lo, x.shard_id) for x in sorted(loads.values(), key=lambda x: x.lo)] == \
        [(ch.range.lo, ch.shard_id) for ch in cmap.chunks]
    assert await catalog.version() == version  # observations: no catalog change
    # The chunk maps carry the same numbers.
    assert [ch.size_bytes for ch in (await catalog.chunk_map(c)).chunks] == \
        [1000 * n for n in range(1, len(ids) + 1)]


async def test_bad_sizes_change_nothing(catalog: Catalog, shard_ids: list[str],
                                        collection_name: str) -> None:
    c = collection_name
    cmap = await catalog.create_collection(c, "account", (), shard_ids, chunks_per_shard=1)
    ids = [ch.chunk_id for ch in cmap.chunks]
    with pytest.raises(ValueError, match="negative"):
        await catalog.record_chunk_sizes([ChunkSize(c, ids[0], 10, 1),
                                          ChunkSize(c, ids[1], -1, 1)])
    with pytest.raises(ValueError, match="batch"):
        await catalog.record_chunk_sizes([ChunkSize(c, ids[0], 10, 1)], batch=0)
    with pytest.raises(Exception, match="collection"):
        await catalog.record_chunk_sizes([ChunkSize("no'pe", ids[0], 10, 1)])
    assert all(x.size_bytes == 0 and x.measured_at is None
               for x in await catalog.chunk_loads([c]))
