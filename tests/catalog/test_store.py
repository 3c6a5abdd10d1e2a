"""The catalog against a real PostgreSQL: layout, compare-and-set, migrations, bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from catalog import (
    Catalog,
    ChunkBusyError,
    CollectionExistsError,
    InvalidLayoutError,
    MigrationKind,
    MigrationOutcome,
    MigrationPhase,
    MigrationStateError,
    ShardState,
    ShardStateError,
    TokenMismatchError,
    UnknownChunkError,
    UnknownCollectionError,
    UnknownMigrationError,
    UnknownShardError,
)
from catalog.invariants import check_invariants
from catalog.models import ChangeKind, ChunkStats
from catalog.store import topology
from shards.errors import InvalidNameError
from shards.models import KHASH_END, KHASH_MIN, IndexDefinition

INDEXES = [IndexDefinition(name="by_customer", fields=("customer",))]


async def make(catalog: Catalog, name: str, shard_ids: list[str], per_shard: int = 2):
    return await catalog.create_collection(
        name, "account", INDEXES, shard_ids, chunks_per_shard=per_shard
    )


async def test_create_collection_covers_the_space_round_robin(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    before = await catalog.version()
    cmap = await make(catalog, collection_name, shard_ids, per_shard=4)

    assert len(cmap.chunks) == 12
    assert cmap.chunks[0].range.lo == KHASH_MIN
    assert cmap.chunks[-1].range.hi == KHASH_END
    for a, b in zip(cmap.chunks, cmap.chunks[1:], strict=False):
        assert a.range.hi == b.range.lo
    assert [c.shard_id for c in cmap.chunks] == shard_ids * 4
    assert {c.token for c in cmap.chunks} == {1}
    assert len({c.chunk_id for c in cmap.chunks}) == 12
    assert cmap.version > before
    assert cmap.collection.layout_version == cmap.version
    assert cmap.collection.indexes == tuple(INDEXES)
    for khash in (KHASH_MIN, -1, 0, KHASH_END - 1):
        assert cmap.locate(khash).range.contains(khash)
    assert await check_invariants(catalog, collection_name) == []
    assert await catalog.chunk_map(collection_name) == cmap


async def test_create_collection_is_idempotent_but_refuses_another_definition(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    first = await make(catalog, collection_name, shard_ids)
    again = await make(catalog, collection_name, shard_ids)
    assert again.chunks == first.chunks
    with pytest.raises(CollectionExistsError, match="already exists with shard key 'account'"):
        await catalog.create_collection(collection_name, "other", INDEXES, shard_ids)
    assert (await catalog.chunk_map(collection_name)).chunks == first.chunks


async def test_concurrent_move_exactly_one_wins(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids)
    chunk = cmap.chunks[0]
    source, target = chunk.shard_id, shard_ids[1]
    mid = f"{collection_name}/move"
    await catalog.register_migration(
        mid, kind=MigrationKind.MOVE, collection=collection_name, chunk_id=chunk.chunk_id,
        source=source, target=target,
    )

    results = await asyncio.gather(
        *(catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token, target, mid,
                             pause_ms=1.5) for _ in range(20)),
        return_exceptions=True,
    )

    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, TokenMismatchError)]
    assert len(wins) == 1, results
    assert len(losses) == 19, results
    assert {(e.expected, e.actual, e.shard_id) for e in losses} == {(1, 2, target)}
    assert "expected token 1" in str(losses[0])
    now = await catalog.chunk(collection_name, chunk.chunk_id)
    assert (now.shard_id, now.token) == (target, 2) == (wins[0].shard_id, wins[0].token)
    record = await catalog.migration(mid)
    assert (record.cutover_token, record.cutover_shard, record.pause_ms) == (2, target, 1.5)
    assert record.committed_at is not None
    assert await check_invariants(catalog, collection_name) == []


async def test_concurrent_splits_exactly_one_wins_and_layout_stays_valid(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids, per_shard=1)
    chunk = cmap.chunks[1]
    points = [chunk.range.lo + (i + 1) * ((chunk.range.hi - chunk.range.lo) // 21)
              for i in range(20)]

    results = await asyncio.gather(
        *(catalog.split_chunk(collection_name, chunk.chunk_id, at, chunk.token) for at in points),
        return_exceptions=True,
    )

    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1, results
    losses = [r for r in results if isinstance(r, BaseException)]
    # A loser that retried after the winner's commit finds the parent gone.
    assert all(isinstance(e, TokenMismatchError | UnknownChunkError) for e in losses), losses
    after = await catalog.chunk_map(collection_name)
    assert len(after.chunks) == 4
    assert await check_invariants(catalog, collection_name) == []


async def test_move_chunk_follows_the_migration_record(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids)
    chunk = cmap.chunks[0]
    s0, s1, s2 = shard_ids
    mid = f"{collection_name}/m1"
    with pytest.raises(UnknownMigrationError):
        await catalog.move_chunk(collection_name, chunk.chunk_id, 1, s1, mid)
    await catalog.register_migration(mid, kind=MigrationKind.REBALANCE, collection=collection_name,
                                     chunk_id=chunk.chunk_id, source=s0, target=s1)
    with pytest.raises(MigrationStateError, match="moves between"):
        await catalog.move_chunk(collection_name, chunk.chunk_id, 1, s2, mid)
    with pytest.raises(MigrationStateError, match="not 'completed'|cannot finish as completed"):
        await catalog.finish_migration(mid, MigrationOutcome.COMPLETED)
    await catalog.set_migration_phase(mid, MigrationPhase.CUTOVER)

    forward = await catalog.move_chunk(collection_name, chunk.chunk_id, 1, s1, mid)
    back = await catalog.move_chunk(collection_name, chunk.chunk_id, 2, s0, mid)  # rollback
    assert (forward.shard_id, forward.token, back.shard_id, back.token) == (s1, 2, s0, 3)

    done = await catalog.finish_migration(mid, MigrationOutcome.ROLLED_BACK, detail="operator")
    assert (done.outcome, done.detail, done.active) == (MigrationOutcome.ROLLED_BACK, "operator",
                                                        False)
    assert await catalog.finish_migration(mid, MigrationOutcome.ROLLED_BACK) == done
    with pytest.raises(MigrationStateError, match="already finished"):
        await catalog.move_chunk(collection_name, chunk.chunk_id, 3, s1, mid)
    with pytest.raises(MigrationStateError, match="already finished"):
        await catalog.set_migration_phase(mid, MigrationPhase.CLEANUP)


async def test_one_active_migration_per_chunk(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids)
    chunk = cmap.chunks[0]
    s0, s1, s2 = shard_ids

    results = await asyncio.gather(
        *(catalog.register_migration(
            f"{collection_name}/m{i}", kind=MigrationKind.MOVE, collection=collection_name,
            chunk_id=chunk.chunk_id, source=s0, target=s1 if i % 2 else s2)
          for i in range(10)),
        return_exceptions=True,
    )

    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1, results
    busy = [r for r in results if isinstance(r, ChunkBusyError)]
    assert len(busy) == 9, results
    assert all(e.migration_id == wins[0].migration_id for e in busy)
    active = await catalog.migrations(collection=collection_name, active_only=True)
    assert [m.migration_id for m in active] == [wins[0].migration_id]
    # Same id, same request: idempotent. Same id, another request: refused.
    same = await catalog.register_migration(
        wins[0].migration_id, kind=MigrationKind.MOVE, collection=collection_name,
        chunk_id=chunk.chunk_id, source=s0, target=wins[0].target)
    assert same == wins[0]
    with pytest.raises(MigrationStateError, match="already used"):
        await catalog.register_migration(
            wins[0].migration_id, kind=MigrationKind.UPGRADE, collection=collection_name,
            chunk_id=chunk.chunk_id, source=s0, target=wins[0].target)
    # A moving chunk can be neither split nor merged.
    with pytest.raises(ChunkBusyError, match="already moving"):
        await catalog.split_chunk(collection_name, chunk.chunk_id, chunk.range.lo + 1, 1)

    await catalog.finish_migration(wins[0].migration_id, MigrationOutcome.ABORTED)
    nxt = await catalog.register_migration(
        f"{collection_name}/next", kind=MigrationKind.MOVE, collection=collection_name,
        chunk_id=chunk.chunk_id, source=s0, target=s1)
    assert nxt.active and nxt.token_before == 1


async def test_split_and_merge_keep_the_layout_and_bump_tokens(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids, per_shard=1)
    parent = cmap.chunks[0]
    await catalog.report_stats(collection_name, [ChunkStats(
        chunk_id=parent.chunk_id, size_bytes=1001, doc_count=11, ops_per_s=4.0)])
    at = parent.range.lo + 1000

    left, right = await catalog.split_chunk(collection_name, parent.chunk_id, at, parent.token)

    assert (left.range.lo, left.range.hi, right.range.lo, right.range.hi) == (
        parent.range.lo, at, at, parent.range.hi)
    assert left.token == right.token == parent.token + 1
    assert left.shard_id == right.shard_id == parent.shard_id
    assert {left.chunk_id, right.chunk_id}.isdisjoint({c.chunk_id for c in cmap.chunks})
    assert (left.size_bytes + right.size_bytes, left.doc_count + right.doc_count) == (1001, 11)
    assert left.stats_at is None  # an estimate until measured again
    assert await check_invariants(catalog, collection_name) == []
    with pytest.raises(UnknownChunkError, match="split or merged"):
        await catalog.chunk(collection_name, parent.chunk_id)

    # Split again, then merge the three pieces back with a fresh token.
    a, b = await catalog.split_chunk(collection_name, right.chunk_id, at + 5, right.token)
    merged = await catalog.merge_chunks(
        collection_name, [b.chunk_id, left.chunk_id, a.chunk_id], [b.token, left.token, a.token])
    assert merged.range == parent.range
    assert merged.token == a.token + 1 == 4
    assert (merged.size_bytes, merged.doc_count) == (1001, 11)
    after = await catalog.chunk_map(collection_name)
    assert [c.chunk_id for c in after.chunks][1:] == [c.chunk_id for c in cmap.chunks][1:]
    assert await check_invariants(catalog, collection_name) == []


async def test_split_and_merge_refusals_change_nothing(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    cmap = await make(catalog, collection_name, shard_ids, per_shard=1)
    c0, c1, c2 = cmap.chunks
    version = await catalog.version()

    with pytest.raises(TokenMismatchError, match="at token 1 .* expected token 7"):
        await catalog.split_chunk(collection_name, c0.chunk_id, c0.range.lo + 1, 7)
    with pytest.raises(InvalidLayoutError, match="not strictly inside"):
        await catalog.split_chunk(collection_name, c0.chunk_id, c0.range.hi, 1)
    with pytest.raises(InvalidLayoutError, match="different shards"):
        await catalog.merge_chunks(collection_name, [c0.chunk_id, c1.chunk_id], [1, 1])
    with pytest.raises(TokenMismatchError):
        await catalog.merge_chunks(collection_name, [c0.chunk_id, c1.chunk_id], [1, 2])
    with pytest.raises(InvalidLayoutError, match="already used"):
        await catalog.split_chunk(collection_name, c0.chunk_id, c0.range.lo + 1, 1,
                                  child_ids=[c1.chunk_id, c2.chunk_id])
    with pytest.raises(InvalidLayoutError, match="not allocated"):
        await catalog.split_chunk(collection_name, c0.chunk_id, c0.range.lo + 1, 1,
                                  child_ids=[2**62, 2**62 + 1])

    assert await catalog.version() == version
    assert (await catalog.chunk_map(collection_name)).chunks == cmap.chunks

    # Two chunks of one shard that are not neighbours cannot merge either.
    wide = await make(catalog, collection_name + "_w", shard_ids[:2], per_shard=2)
    on0 = wide.on_shard(shard_ids[0])
    with pytest.raises(InvalidLayoutError, match="not adjacent"):
        await catalog.merge_chunks(wide.collection.name, [c.chunk_id for c in on0], [1, 1])


async def test_unknown_and_hostile_input_is_refused_and_changes_nothing(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    version = await catalog.version()
    with pytest.raises(UnknownShardError, match="'nope' is not registered"):
        await catalog.create_collection(collection_name, "account", (), [shard_ids[0], "nope"])
    with pytest.raises(UnknownCollectionError):
        await catalog.chunk_map(collection_name)
    for hostile in ['x"; DROP SCHEMA catalog CASCADE; --', "", "a" * 80, "1abc", "a.b"]:
        with pytest.raises(InvalidNameError):
            await catalog.create_collection(hostile, "account", (), shard_ids)
        with pytest.raises(InvalidNameError):
            await catalog.chunk_map(hostile)
    with pytest.raises(InvalidNameError):
        await catalog.create_collection(collection_name, "a..b", (), shard_ids)
    with pytest.raises(InvalidNameError):
        await catalog.register_shard("bad shard'", "host=x", engine="postgres", major_version=18)
    with pytest.raises(ValueError, match="passfile"):
        await catalog.register_shard("pw", "host=x password=hunter2", engine="postgres",
                                     major_version=18)
    with pytest.raises(ValueError, match="passfile"):
        await catalog.register_shard("pw", "postgresql://u:hunter2@x/db", engine="postgres",
                                     major_version=18)
    assert await catalog.version() == version

    await make(catalog, collection_name, shard_ids)
    with pytest.raises(UnknownChunkError):
        await catalog.chunk(collection_name, 2**62)
    with pytest.raises(UnknownCollectionError):
        await catalog.chunk(collection_name + "x", 1)
    with pytest.raises(ValueError):
        await catalog.chunk(collection_name, -5)
    with pytest.raises(InvalidNameError):
        await catalog.move_chunk(collection_name, 1, 1, shard_ids[1], "no spaces allowed")


async def test_shard_states(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    s0, s1, s2 = shard_ids
    cmap = await make(catalog, collection_name, [s0, s1])
    draining = await catalog.set_shard_state(s2, ShardState.DRAINING)
    assert draining.state == ShardState.DRAINING
    with pytest.raises(ShardStateError, match="only active shards receive chunks"):
        await catalog.create_collection(collection_name + "_d", "account", (), [s2])
    with pytest.raises(ShardStateError, match="only active shards receive chunks"):
        await catalog.register_migration(
            f"{collection_name}/m", kind=MigrationKind.MOVE, collection=collection_name,
            chunk_id=cmap.chunks[0].chunk_id, source=s0, target=s2)
    with pytest.raises(ShardStateError, match="still holds 2 chunk"):
        await catalog.set_shard_state(s1, ShardState.RETIRED)
    assert (await catalog.set_shard_state(s2, ShardState.RETIRED)).state == ShardState.RETIRED
    with pytest.raises(ShardStateError, match="retired"):
        await catalog.set_shard_state(s2, ShardState.ACTIVE)
    # Re-registering keeps the state and updates the hints.
    info = await catalog.shard(s0)
    again = await catalog.register_shard(s0, info.address, engine="postgres", major_version=18,
                                         capacity_bytes=10**12)
    assert (again.state, again.capacity_bytes) == (ShardState.ACTIVE, 10**12)


async def test_the_database_refuses_a_broken_layout(
    catalog: Catalog, catalog_dsn: str, shard_ids: list[str], collection_name: str
) -> None:
    """Even SQL that bypasses the store cannot commit a gap or an overlap."""
    cmap = await make(catalog, collection_name, shard_ids, per_shard=1)
    first = cmap.chunks[0]
    async with await psycopg.AsyncConnection.connect(catalog_dsn) as conn:
        with pytest.raises(psycopg.Error, match="a gap"):
            async with conn.transaction():
                await conn.execute(
                    "UPDATE catalog.chunks SET hi = hi - 1 WHERE collection = %s AND chunk_id = %s",
                    (collection_name, first.chunk_id))
        with pytest.raises(psycopg.Error, match="do not cover"):
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM catalog.chunks WHERE collection = %s AND hi IS NULL",
                    (collection_name,))
    assert await check_invariants(catalog, collection_name) == []


async def test_catalog_transactions_are_serializable(catalog: Catalog) -> None:
    """The store's guarantees (lease limits, checks before writes) rest on SERIALIZABLE."""

    async def isolation(cur: psycopg.AsyncCursor[Any]) -> object:
        await cur.execute("SHOW transaction_isolation")
        row = await cur.fetchone()
        return row[0] if row else None

    assert await catalog._txn(isolation) == "serializable"
    assert await catalog._txn(isolation, read_only=True) == "serializable"


async def test_move_chunk_is_one_change_stamped_notified_and_checked(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    """The switch (one statement inside its transaction) does all the full path did: the
    chunk row stamped with the version the bump commits, the collection's layout version,
    the migration record and one LAYOUT notification carrying that version; and each refusal
    (a target that is not active, a wrong token) changes nothing and names its cause."""
    cmap = await make(catalog, collection_name, shard_ids)
    chunk = cmap.chunks[0]
    s0, s1, _ = shard_ids
    mid = f"{collection_name}/one"
    await catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=collection_name,
                                     chunk_id=chunk.chunk_id, source=s0, target=s1)
    changes = catalog.listen()
    assert (await anext(changes)).change == ChangeKind.RESYNC
    before = await catalog.version()

    await catalog.set_shard_state(s1, ShardState.DRAINING)
    with pytest.raises(ShardStateError, match="abort the migration"):
        await catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token, s1, mid)
    await catalog.set_shard_state(s1, ShardState.ACTIVE)
    with pytest.raises(TokenMismatchError):
        await catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token + 5, s1, mid)
    unchanged = await catalog.chunk(collection_name, chunk.chunk_id)
    assert (unchanged.shard_id, unchanged.token) == (s0, chunk.token)
    assert (await catalog.migration(mid)).cutover_token is None

    moved = await catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token, s1, mid,
                                     pause_ms=12.5)
    version = await catalog.version()
    assert (moved.shard_id, moved.token) == (s1, chunk.token + 1)
    assert moved == await catalog.chunk(collection_name, chunk.chunk_id)
    assert (await catalog.collection(collection_name)).layout_version == version
    delta = await catalog.route_delta(collection_name, version - 1, limit=10)
    assert (delta.chunk_ids, delta.shard_ids, delta.tokens) == (
        [chunk.chunk_id], [s1], [chunk.token + 1])
    record = await catalog.migration(mid)
    assert (record.cutover_token, record.cutover_shard, record.pause_ms) == (
        chunk.token + 1, s1, 12.5)
    # The two shard-state changes, then the switch: one LAYOUT change at the new version.
    seen = [await anext(changes) for _ in range(3)]
    await changes.aclose()
    assert [c.change for c in seen] == [ChangeKind.SHARDS, ChangeKind.SHARDS, ChangeKind.LAYOUT]
    assert (seen[2].version, seen[2].collection) == (version, collection_name)
    assert version == before + 3
    assert await check_invariants(catalog, collection_name) == []


async def test_move_chunk_commits_only_after_before_commit_and_never_when_it_fails(
    catalog: Catalog, shard_ids: list[str], collection_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``before_commit`` (the cutover activates the new owner there) runs inside the switch's
    transaction: while it runs, the switch is not visible; when it raises, nothing commits
    and its own error comes out (not a catalog error); when it succeeds, the switch commits.
    Also on the full path (a first switch that changed nothing)."""
    cmap = await make(catalog, collection_name, shard_ids)
    chunk = cmap.chunks[0]
    s0, s1, _ = shard_ids
    mid = f"{collection_name}/hook"
    await catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=collection_name,
                                     chunk_id=chunk.chunk_id, source=s0, target=s1)

    class ActivationFailed(Exception):
        pass

    async def fail() -> None:
        raise ActivationFailed("the new owner refused")

    with pytest.raises(ActivationFailed, match="refused"):
        await catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token, s1, mid,
                                 before_commit=fail)
    unchanged = await catalog.chunk(collection_name, chunk.chunk_id)
    assert (unchanged.shard_id, unchanged.token) == (s0, chunk.token)
    assert (await catalog.migration(mid)).cutover_token is None

    seen_during: list[tuple[str, int]] = []

    async def look() -> None:
        during = await catalog.chunk(collection_name, chunk.chunk_id)
        seen_during.append((during.shard_id, during.token))

    moved = await catalog.move_chunk(collection_name, chunk.chunk_id, chunk.token, s1, mid,
                                     before_commit=look)
    assert seen_during == [(s0, chunk.token)]
    assert (moved.shard_id, moved.token) == (s1, chunk.token + 1)
    assert moved == await catalog.chunk(collection_name, chunk.chunk_id)

    # The full path (the one statement made to change nothing, as a state changed under
    # it would): the same guarantees. The move back is the migration's rollback.
    monkeypatch.setattr(topology, "MOVE_CHUNK_SQL", "SELECT 1 WHERE %(mid)s::text IS NULL")
    back_token = chunk.token + 1
    with pytest.raises(ActivationFailed):
        await catalog.move_chunk(collection_name, chunk.chunk_id, back_token, s0, mid,
                                 before_commit=fail)
    still = await catalog.chunk(collection_name, chunk.chunk_id)
    assert (still.shard_id, still.token) == (s1, back_token)
    seen_during.clear()
    back = await catalog.move_chunk(collection_name, chunk.chunk_id, back_token, s0, mid,
                                    before_commit=look)
    assert seen_during == [(s1, back_token)]
    assert (back.shard_id, back.token) == (s0, back_token + 1)
    assert await check_invariants(catalog, collection_name) == []
