"""The catalog with real shards: provisioning, fence checks, split and merge on the shard,
and change notifications."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from catalog import (
    Catalog,
    CatalogChange,
    ChangeKind,
    ChunkBusyError,
    MigrationKind,
    ViolationKind,
)
from catalog.admin import merge_chunks, provision_collection, split_chunk
from catalog.invariants import check_invariants
from shards.errors import FenceRejectedError
from shards.models import FenceRef, FenceState, IndexDefinition, KeyRange
from shards.postgres.engine import PostgresShard

INDEXES = [IndexDefinition(name="by_customer", fields=("customer",))]


async def test_provisioning_creates_fences_that_agree_with_the_catalog(
    catalog: Catalog, engines: dict[str, PostgresShard], collection_name: str
) -> None:
    cmap = await provision_collection(catalog, engines, collection_name, "account", INDEXES,
                                      chunks_per_shard=2)
    again = await provision_collection(catalog, engines, collection_name, "account", INDEXES,
                                       chunks_per_shard=2)
    assert again.chunks == cmap.chunks
    assert await check_invariants(catalog, collection_name, engines) == []
    for sid, engine in engines.items():
        fences = await engine.fences(collection_name)
        assert [(f.chunk_id, f.token, f.state) for f in fences] == [
            (c.chunk_id, c.token, FenceState.ACTIVE) for c in cmap.on_shard(sid)]
        assert collection_name in await engine.collections()


async def test_invariant_check_detects_fence_disagreements(
    catalog: Catalog, engines: dict[str, PostgresShard], collection_name: str
) -> None:
    cmap = await provision_collection(catalog, engines, collection_name, "account")
    c0, c1, c2 = cmap.chunks
    e0, e1 = engines[c0.shard_id], engines[c1.shard_id]

    await e0.freeze(collection_name, c0.chunk_id, c0.token)
    await e1.drop_fence(collection_name, c1.chunk_id)
    # A stray active fence: shard of c0 claims c2, which the catalog places elsewhere.
    await e0.put_fence(collection_name, c2.chunk_id, c2.range, c2.token, FenceState.ACTIVE)
    partial = {sid: e for sid, e in engines.items() if sid != c2.shard_id}

    found = await check_invariants(catalog, collection_name, partial)

    kinds = {(v.kind, v.chunk_id, v.shard_id) for v in found}
    assert kinds == {
        (ViolationKind.FENCE_MISMATCH, c0.chunk_id, c0.shard_id),
        (ViolationKind.FENCE_MISSING, c1.chunk_id, c1.shard_id),
        (ViolationKind.STRAY_FENCE, c2.chunk_id, c0.shard_id),
        (ViolationKind.UNCHECKED, None, c2.shard_id),
    }, found
    mismatch = next(v for v in found if v.kind == ViolationKind.FENCE_MISMATCH)
    assert "frozen at token 2" in mismatch.message and "active at token 1" in mismatch.message
    # The layout itself is fine: without shards, nothing to report.
    assert await check_invariants(catalog, collection_name) == []


async def test_split_and_merge_move_the_fences_with_the_catalog(
    catalog: Catalog, engines: dict[str, PostgresShard], collection_name: str
) -> None:
    cmap = await provision_collection(catalog, engines, collection_name, "account")
    parent = cmap.chunks[1]
    engine = engines[parent.shard_id]
    khash = parent.range.lo + 10
    await engine.insert(collection_name, parent.ref, khash, {"_id": 1, "account": "a"})

    left, right = await split_chunk(catalog, engines, collection_name, parent.chunk_id)

    assert await check_invariants(catalog, collection_name, engines) == []
    assert await engine.fence(collection_name, parent.chunk_id) is None
    # The old route is closed; the new one serves the same document (no data moved).
    with pytest.raises(FenceRejectedError):
        await engine.get(collection_name, parent.ref, khash, 1)
    assert await engine.get(collection_name, left.ref, khash, 1) == {"_id": 1, "account": "a"}

    merged = await merge_chunks(catalog, engines, collection_name,
                                [right.chunk_id, left.chunk_id])
    assert merged.range == parent.range and merged.token == left.token + 1
    assert await check_invariants(catalog, collection_name, engines) == []
    with pytest.raises(FenceRejectedError):
        await engine.get(collection_name, left.ref, khash, 1)
    assert await engine.get(collection_name, FenceRef(chunk_id=merged.chunk_id,
                                                      token=merged.token), khash, 1) is not None


async def test_a_refused_split_restores_the_fences(
    catalog: Catalog, engines: dict[str, PostgresShard], shard_ids: list[str],
    collection_name: str,
) -> None:
    cmap = await provision_collection(catalog, engines, collection_name, "account")
    chunk = cmap.chunks[0]
    other = next(s for s in shard_ids if s != chunk.shard_id)
    await catalog.register_migration(
        f"{collection_name}/m", kind=MigrationKind.MOVE, collection=collection_name,
        chunk_id=chunk.chunk_id, source=chunk.shard_id, target=other)
    ids = await catalog.allocate_chunk_ids(2)

    with pytest.raises(ChunkBusyError):
        await split_chunk(catalog, engines, collection_name, chunk.chunk_id, child_ids=ids)

    engine = engines[chunk.shard_id]
    fence = await engine.fence(collection_name, chunk.chunk_id)
    assert fence is not None and (fence.state, fence.token) == (FenceState.ACTIVE, chunk.token)
    assert [await engine.fence(collection_name, i) for i in ids] == [None, None]
    assert await check_invariants(catalog, collection_name, engines) == []


async def test_an_interrupted_split_resumes_with_the_same_ids(
    catalog: Catalog, engines: dict[str, PostgresShard], collection_name: str
) -> None:
    """The catalog change committed but the helper died before opening the children."""
    cmap = await provision_collection(catalog, engines, collection_name, "account")
    parent = cmap.chunks[2]
    engine = engines[parent.shard_id]
    ids = await catalog.allocate_chunk_ids(2)
    at = parent.range.lo + 77
    halves = [KeyRange(lo=parent.range.lo, hi=at), KeyRange(lo=at, hi=parent.range.hi)]
    for cid, rng in zip(ids, halves, strict=True):
        await engine.put_fence(collection_name, cid, rng, parent.token + 1, FenceState.RECEIVING)
    await engine.freeze(collection_name, parent.chunk_id, parent.token)
    await catalog.split_chunk(collection_name, parent.chunk_id, at, parent.token, child_ids=ids)
    assert {v.kind for v in await check_invariants(catalog, collection_name, engines)} == {
        ViolationKind.FENCE_MISMATCH}

    left, right = await split_chunk(catalog, engines, collection_name, parent.chunk_id,
                                    child_ids=ids)

    assert (left.range.hi, right.range.lo) == (at, at)
    assert await check_invariants(catalog, collection_name, engines) == []


@pytest.fixture
async def changes(catalog: Catalog) -> AsyncIterator[AsyncGenerator[CatalogChange, None]]:
    stream = catalog.listen()
    try:
        yield stream
    finally:
        await stream.aclose()


async def next_change(stream: AsyncIterator[CatalogChange], collection: str) -> CatalogChange:
    """The next notification about ``collection`` (other sessions' changes are skipped)."""
    async def find() -> CatalogChange:
        async for change in stream:
            if change.collection == collection:
                return change
        raise AssertionError("the notification stream ended")

    return await asyncio.wait_for(find(), timeout=10)


async def test_changes_are_notified_after_they_commit(
    catalog: Catalog, changes: AsyncIterator[CatalogChange], shard_ids: list[str],
    collection_name: str,
) -> None:
    first = await anext(changes)
    assert first.change == ChangeKind.RESYNC and first.affects_routing

    cmap = await catalog.create_collection(collection_name, "account", (), shard_ids)
    created = await next_change(changes, collection_name)
    assert (created.change, created.version) == (ChangeKind.LAYOUT, cmap.version)
    assert created.version > first.version

    chunk = cmap.chunks[0]
    await catalog.split_chunk(collection_name, chunk.chunk_id, chunk.range.lo + 1, chunk.token)
    split = await next_change(changes, collection_name)
    assert split.change == ChangeKind.LAYOUT and split.version > created.version
    assert (await catalog.chunk_map(collection_name)).version == split.version

    await catalog.register_migration(
        f"{collection_name}/m", kind=MigrationKind.MOVE, collection=collection_name,
        chunk_id=cmap.chunks[1].chunk_id, source=shard_ids[1], target=shard_ids[0])
    registered = await next_change(changes, collection_name)
    assert registered.change == ChangeKind.MIGRATION and not registered.affects_routing
