"""The catalog at fleet scale: a collection of 100,000 chunks (and a long migration history).

The router's reads (whole map as columns, the delta since a version) return what the catalog
holds; the hot queries (route load, delta, chunk by id, the active migrations, the status
aggregate of one collection) use indexes, never a sequential scan of ``chunks`` or
``migrations``, checked with EXPLAIN on the real plans; the schema upgrades in place
from schema 1; and dropping the collection takes one layout check, not one per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from catalog import Catalog
from catalog.models import MigrationKind, MigrationOutcome
from catalog.schema import SCHEMA_VERSION
from catalog.store.migrations import MIGRATIONS_SQL
from catalog.store.registry import SHARD_USAGE_SQL
from catalog.store.routemaps import DELTA_QUERY, ROUTE_QUERY
from catalog.store.rows import BUSY_SQL, CHUNK_SELECT
from router.routes import CollectionRoute
from shards.models import KHASH_END, KHASH_MIN
from tests.fleetfill import fill_collection

N = 100_000
HISTORY = 50_000
LARGE = {"chunks", "migrations"}
SMALL = "fleetscale_12"  # a small collection beside the large one


@pytest.fixture(scope="module")
async def fleet(catalog: Catalog, catalog_dsn: str, pg18_dsns: list[str]
                ) -> AsyncIterator[tuple[str, list[str], int]]:
    """A 100k-chunk collection on three shards, 50k finished migrations and two active."""
    ids = [f"fleetscale-s{i}" for i in range(3)]
    for sid, dsn in zip(ids, pg18_dsns[:3], strict=True):
        await catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
    name = "fleetscale_100k"
    version = await fill_collection(catalog_dsn, name, ids, N)
    await fill_collection(catalog_dsn, SMALL, ids, 12)
    async with await psycopg.AsyncConnection.connect(catalog_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO catalog.migrations (migration_id, kind, collection, chunk_id, source,"
            " target, phase, outcome, token_before, finished_at)"
            " SELECT 'fleetscale-old-' || i, 'move', %s, i, %s, %s, 'done', 'completed', 1,"
            " now() FROM generate_series(1, %s) AS i", (name, ids[0], ids[1], HISTORY))
        await conn.execute("ANALYZE catalog.chunks")
        await conn.execute("ANALYZE catalog.migrations")
    cols = await catalog.route_columns(name)
    for i in (10, 20):
        await catalog.register_migration(
            f"fleetscale-live-{i}", kind=MigrationKind.MOVE, collection=name,
            chunk_id=cols.chunk_ids[i], source=cols.shard_ids[i],
            target=ids[(ids.index(cols.shard_ids[i]) + 1) % 3])
    try:
        yield name, ids, version
    finally:
        async with await psycopg.AsyncConnection.connect(catalog_dsn, autocommit=True) as conn:
            await conn.execute("DELETE FROM catalog.migrations WHERE collection = %s", (name,))
        await catalog.drop_collection(name)
        await catalog.drop_collection(SMALL)


async def test_route_columns_are_the_whole_map(
        catalog: Catalog, fleet: tuple[str, list[str], int]) -> None:
    name, ids, version = fleet
    cols = await catalog.route_columns(name)
    assert cols.complete and len(cols) == N and cols.version >= version
    assert cols.los[0] == KHASH_MIN and cols.his[-1] == KHASH_END
    assert cols.his[:-1] == cols.los[1:]
    assert set(cols.shard_ids) == set(ids) and set(cols.tokens) == {1}
    route = CollectionRoute.from_columns(
        collection=name, shard_key=cols.collection.shard_key, indexes=(),
        version=cols.version, chunk_ids=cols.chunk_ids, los=cols.los, his=cols.his,
        shard_ids=cols.shard_ids, tokens=cols.tokens)
    for i in (0, 1, N // 2, N - 1):
        one = await catalog.chunk(name, cols.chunk_ids[i])
        assert route.lookup(one.range.lo).chunk_id == one.chunk_id
        assert route.lookup(one.range.hi - 1).chunk_id == one.chunk_id
        assert (one.shard_id, one.token) == (cols.shard_ids[i], cols.tokens[i])


async def test_delta_reads_only_what_changed(
        catalog: Catalog, fleet: tuple[str, list[str], int]) -> None:
    name, ids, _ = fleet
    before = await catalog.route_columns(name)
    assert len(await catalog.route_delta(name, before.version, limit=10)) == 0
    i = 500
    left, right = await catalog.split_chunk(name, before.chunk_ids[i], before.los[i] + 7,
                                            before.tokens[i])
    delta = await catalog.route_delta(name, before.version, limit=10)
    assert not delta.complete and delta.chunk_ids == [left.chunk_id, right.chunk_id]
    assert delta.los == [before.los[i], before.los[i] + 7]
    assert delta.his == [before.los[i] + 7, before.his[i]]
    assert delta.collection.layout_version == delta.version > before.version
    merged = await catalog.merge_chunks(name, [left.chunk_id, right.chunk_id],
                                        [left.token, right.token])
    delta = await catalog.route_delta(name, before.version, limit=10)
    assert delta.chunk_ids == [merged.chunk_id] and delta.tokens == [merged.token]
    # A limit the changes reach says so by its length: the caller reads the whole map.
    assert len(await catalog.route_delta(name, 0, limit=10)) == 10


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(node type, relation, index) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    out = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if "Relation Name" in node:
            index = node.get("Index Name", "")
            if node["Node Type"] == "Bitmap Heap Scan":
                # The index is named by the Bitmap Index Scan(s) under it.
                index = ",".join(p.get("Index Name", "") for p in node.get("Plans", [])
                                 if p["Node Type"] == "Bitmap Index Scan")
            out.append((node["Node Type"], node["Relation Name"], index))
        stack.extend(node.get("Plans", []))
    return out


async def _explain(dsn: str, query: str, params: Any) -> list[tuple[str, str, str]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("EXPLAIN (FORMAT JSON) " + query, params)
        row = await cur.fetchone()
        assert row is not None
        return _scans(row[0][0]["Plan"])


async def test_hot_queries_use_indexes(
        catalog: Catalog, catalog_dsn: str, fleet: tuple[str, list[str], int]) -> None:
    name, _, version = fleet
    cols = await catalog.route_columns(name)
    queries = {
        # Either of the collection's indexes serves it (the planner picks by statistics).
        "route load": (ROUTE_QUERY, {"c": name}, "chunks_"),
        "delta": (DELTA_QUERY, {"c": name, "since": version, "limit": 256},
                  "chunks_by_version"),
        "chunk by id": (CHUNK_SELECT + " WHERE c.collection = %s AND c.chunk_id = %s",
                        (name, cols.chunk_ids[N // 3]), "chunks_pkey"),
        "busy chunk": (BUSY_SQL, (name, [cols.chunk_ids[7]], [cols.chunk_ids[7]]),
                       "migrations_"),
        "active migrations": (MIGRATIONS_SQL, {"c": name, "a": True, "n": 10_000},
                              "migrations_"),
        "active migrations, all": (MIGRATIONS_SQL, {"c": None, "a": True, "n": 10_000},
                                   "migrations_"),
        # A collection's status among 100,000 other chunks (for the large collection itself,
        # which is the whole table, a sequential scan is the right plan).
        "status of a collection": (SHARD_USAGE_SQL, {"c": SMALL}, "chunks_"),
    }
    for what, (query, params, index) in queries.items():
        scans = await _explain(catalog_dsn, query, params)
        large = [s for s in scans if s[1] in LARGE]
        assert large, f"{what}: no scan of chunks or migrations in {scans}"
        assert not [s for s in large if s[0] == "Seq Scan"], f"{what}: {scans}"
        assert any(s[2].startswith(index) for s in large), f"{what}: {scans}"


async def test_schema_upgrades_in_place(
        catalog: Catalog, catalog_dsn: str, fleet: tuple[str, list[str], int]) -> None:
    """A schema-1 catalog (no chunk versions) comes up to date by ``ensure_schema``, live:
    its maps still load, and the next change is stamped and read as a delta."""
    name, _, _ = fleet
    async with await psycopg.AsyncConnection.connect(catalog_dsn) as conn, conn.transaction():
        await conn.execute("DROP TRIGGER chunks_stamp ON catalog.chunks")
        await conn.execute("ALTER TABLE catalog.chunks DROP COLUMN version")
        await conn.execute("DROP INDEX catalog.migrations_active")
        await conn.execute("UPDATE catalog.meta SET schema_version = 1")
    await catalog.ensure_schema()
    async with await psycopg.AsyncConnection.connect(catalog_dsn) as conn:
        cur = await conn.execute("SELECT schema_version FROM catalog.meta")
        assert await cur.fetchone() == (SCHEMA_VERSION,)
        cur = await conn.execute("SELECT count(*) FROM catalog.chunks WHERE version <> 0"
                                 " AND collection = %s", (name,))
        assert await cur.fetchone() == (0,)  # rows from before the upgrade: every router saw them
    before = await catalog.route_columns(name)
    assert len(before) == N
    i = 900
    left, right = await catalog.split_chunk(name, before.chunk_ids[i], before.los[i] + 1,
                                            before.tokens[i])
    delta = await catalog.route_delta(name, before.version, limit=10)
    assert delta.chunk_ids == [left.chunk_id, right.chunk_id]


async def test_dropping_a_large_collection_checks_its_layout_once(
        catalog: Catalog, fleet: tuple[str, list[str], int]) -> None:
    """Dropping a collection deletes its chunks, and the deferred layout check fired for each
    of them probed an index full of the other deleted rows: quadratic, over five minutes at
    100,000 chunks. Checked once per collection now (seconds)."""
    name, _, _ = fleet
    for i in (10, 20):
        await catalog.finish_migration(f"fleetscale-live-{i}", MigrationOutcome.ABORTED)
    async with asyncio.timeout(120):  # a hang guard, not a performance figure
        assert await catalog.drop_collection(name)
