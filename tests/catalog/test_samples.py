"""Move timelines in the catalog: bounded per move, idempotent, gone with their record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.models import MigrationKind
from catalog.timeline import LoadStage, MoveSample, SampleKind
from shards.postgres import PostgresShard


async def _migration(catalog: Catalog, collection: str, shard_ids: list[str],
                     engines: dict[str, PostgresShard]) -> str:
    cmap = await provision_collection(catalog, engines, collection, "acct", [],
                                      chunks_per_shard=1)
    chunk = cmap.chunks[0]
    target = next(s for s in shard_ids if s != chunk.shard_id)
    mid = f"m-{uuid.uuid4().hex[:8]}.000000000000"
    await catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=collection,
                                     chunk_id=chunk.chunk_id, source=chunk.shard_id, target=target)
    return mid


async def test_samples_are_bounded_thinned_and_idempotent(
    catalog: Catalog, shard_ids: list[str], engines: dict[str, PostgresShard], collection_name: str,
) -> None:
    mid = await _migration(catalog, collection_name, shard_ids, engines)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    lags = [MoveSample(at=t0 + timedelta(seconds=i), kind=SampleKind.LAG, name="fwd",
                       lag_bytes=i, lag_s=0.0) for i in range(40)]
    for i in range(0, 40, 8):  # batches, as a sampler writes them
        await catalog.record_move_samples(mid, lags[i:i + 8], max_samples=10, max_marks=3)
    kept = [s for s in await catalog.move_samples(mid) if s.kind == SampleKind.LAG]
    assert 5 <= len(kept) <= 10
    # The whole span survives thinning: the first and the newest sample are kept.
    assert kept[0].at == lags[0].at and kept[-1].at == lags[-1].at
    marks = [MoveSample(at=t0 + timedelta(seconds=i), kind=SampleKind.MARK, name=f"m{i}")
             for i in range(5)]
    assert await catalog.record_move_samples(mid, marks, max_samples=10, max_marks=3) == 3
    # The same batch again changes nothing (a retried write).
    assert await catalog.record_move_samples(mid, marks[:3], max_marks=10) == 0
    assert [s.name for s in await catalog.move_samples(mid)
            if s.kind == SampleKind.MARK] == ["m0", "m1", "m2"]


async def test_samples_need_their_migration_and_go_with_it(
    catalog: Catalog, shard_ids: list[str], engines: dict[str, PostgresShard], collection_name: str,
    catalog_dsn: str,
) -> None:
    sample = MoveSample(at=datetime.now(UTC), kind=SampleKind.COPY, name="import", rows=1)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        await catalog.record_move_samples("nosuch.000000000000", [sample])
    mid = await _migration(catalog, collection_name, shard_ids, engines)
    await catalog.record_move_samples(mid, [sample])
    with psycopg.connect(catalog_dsn, autocommit=True) as conn:  # a purge of old records
        conn.execute("DELETE FROM catalog.migrations WHERE migration_id = %s", (mid,))
    assert await catalog.move_samples(mid) == []


async def test_shard_loads_keep_the_first_before_and_the_latest_after(
    catalog: Catalog, shard_ids: list[str],
) -> None:
    op, chain = f"drain-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    a, b = shard_ids[:2]
    assert await catalog.record_shard_loads(op, chain, kind="merge_shards",
                                            stage=LoadStage.BEFORE, loads={a: 100, b: 0})
    assert not await catalog.record_shard_loads(op, chain, kind="merge_shards",
                                                stage=LoadStage.BEFORE, loads={a: 7, b: 7})
    for after in ({a: 50, b: 50}, {a: 0, b: 100}):
        await catalog.record_shard_loads(op, chain, kind="merge_shards",
                                         stage=LoadStage.AFTER, loads=after)
    rows = {(x.stage, x.shard_id): x.bytes for x in await catalog.shard_loads(op)}
    assert rows == {(LoadStage.BEFORE, a): 100, (LoadStage.BEFORE, b): 0,
                    (LoadStage.AFTER, a): 0, (LoadStage.AFTER, b): 100}
    with pytest.raises(ValueError):
        await catalog.record_shard_loads(op, chain, kind="merge_shards",
                                         stage=LoadStage.AFTER, loads={a: -1})
    assert {(x.stage, x.shard_id): x.bytes for x in await catalog.shard_loads(op)} == rows
