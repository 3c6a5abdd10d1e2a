"""``register_shard`` refuses what it cannot store faithfully (found by the property tests'
sweep): NUL characters in the engine text, capacities that are NaN, infinite, negative or
wider than the column, before anything is written. A refused registration leaves a
registered shard exactly as it was, and the per-shard usage read counts what it should."""

from __future__ import annotations

import math

import pytest

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.models import MigrationKind, MigrationOutcome
from shards.models import IndexDefinition
from shards.postgres import PostgresShard

BAD: list[tuple[dict[str, object], str]] = [
    ({"engine": "post\x00gres"}, "engine"),
    ({"engine": "x" * 64}, "engine"),
    ({"engine": ""}, "engine"),
    ({"major_version": True}, "major_version"),
    ({"major_version": 2**31}, "major_version"),
    ({"capacity_bytes": -1}, "capacity_bytes"),
    ({"capacity_bytes": 2**63}, "capacity_bytes"),
    ({"capacity_bytes": 1.5}, "capacity_bytes"),
    ({"capacity_bytes": True}, "capacity_bytes"),
    ({"capacity_ops_per_s": math.nan}, "capacity_ops_per_s"),
    ({"capacity_ops_per_s": math.inf}, "capacity_ops_per_s"),
    ({"capacity_ops_per_s": -1.0}, "capacity_ops_per_s"),
    ({"capacity_ops_per_s": 1e300}, "capacity_ops_per_s"),
]


@pytest.mark.parametrize(("bad", "field"), BAD, ids=[f"{k}={v!r}"[:40] for (d, _) in BAD
                                                      for k, v in d.items()])
async def test_register_shard_refuses_bad_values_and_changes_nothing(
    catalog: Catalog, shard_ids: list[str], pg18_dsns: list[str], bad: dict[str, object],
    field: str,
) -> None:
    sid = shard_ids[0]
    await catalog.register_shard(sid, pg18_dsns[0], engine="postgres", major_version=18,
                                 capacity_bytes=1000, capacity_ops_per_s=50.0)
    before = await catalog.shard(sid)
    version = await catalog.version()
    kw: dict[str, object] = {"engine": "postgres", "major_version": 18,
                             "capacity_bytes": 2000, "capacity_ops_per_s": 60.0, **bad}
    with pytest.raises(ValueError, match=field):
        await catalog.register_shard(sid, pg18_dsns[0], **kw)  # type: ignore[arg-type]
    assert await catalog.shard(sid) == before
    assert await catalog.version() == version
    # A new shard id is not created by a refused registration either.
    new = f"{sid[:50]}-new"
    with pytest.raises(ValueError, match=field):
        await catalog.register_shard(new, pg18_dsns[0], **kw)  # type: ignore[arg-type]
    assert new not in {s.shard_id for s in await catalog.list_shards()}


async def test_register_shard_accepts_the_edges(catalog: Catalog, shard_ids: list[str],
                                                pg18_dsns: list[str]) -> None:
    info = await catalog.register_shard(shard_ids[0], pg18_dsns[0], engine="postgres",
                                        major_version=18, capacity_bytes=2**63 - 1,
                                        capacity_ops_per_s=0.0)
    assert info.capacity_bytes == 2**63 - 1 and info.capacity_ops_per_s == 0.0


async def test_shard_usage_counts_chunks_and_active_moves(
    catalog: Catalog, shard_ids: list[str], engines: dict[str, PostgresShard],
    collection_name: str,
) -> None:
    c = collection_name
    cmap = await provision_collection(catalog, engines, c, "acct",
                                      [IndexDefinition(name="by_e", fields=("e",))],
                                      chunks_per_shard=2)
    chunk = cmap.on_shard(shard_ids[0])[0]
    mid = f"usage-{c}"
    await catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=c,
                                     chunk_id=chunk.chunk_id, source=shard_ids[0],
                                     target=shard_ids[1])
    try:
        usage = await catalog.shard_usage(collection=c)
        assert {s: (u.chunks, u.moves_out, u.moves_in) for s, u in usage.items()
                if s in shard_ids} == {
            shard_ids[0]: (2, 1, 0), shard_ids[1]: (2, 0, 1), shard_ids[2]: (2, 0, 0)}
        everything = await catalog.shard_usage()
        assert everything[shard_ids[0]].chunks >= 2
    finally:
        await catalog.finish_migration(mid, MigrationOutcome.ABORTED)
        for e in engines.values():
            await e.drop_collection(c)
        await catalog.drop_collection(c)
