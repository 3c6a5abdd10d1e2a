"""Catalog test fixtures: one ``Catalog`` on the session stack's catalog database, and per test
fresh shard ids (registered against the stack's PostgreSQL 18 shards) so that leases, states
and placements of one test never meet another's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from catalog import Catalog
from shards.postgres.engine import PostgresShard
from tests.conftest import SESSION_CATALOGS


@pytest.fixture(scope="session")
async def catalog(catalog_dsn: str) -> AsyncIterator[Catalog]:
    cat = Catalog(catalog_dsn, max_size=24)
    await cat.open()
    await cat.ensure_schema()
    await cat.ensure_schema()  # idempotent: a second run must not fail
    SESSION_CATALOGS.append(cat)
    try:
        yield cat
    finally:
        SESSION_CATALOGS.remove(cat)
        await cat.close()


@pytest.fixture
async def shard_ids(catalog: Catalog, pg18_dsns: list[str], collection_name: str) -> list[str]:
    """Three catalog shard ids unique to this test, registered on the stack's shards."""
    ids = [f"{collection_name[:48]}-s{i}" for i in range(3)]
    for sid, dsn in zip(ids, pg18_dsns[:3], strict=True):
        await catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
    return ids


@pytest.fixture
async def engines(shard_ids: list[str], pg18_dsns: list[str]) -> AsyncIterator[dict[str, PostgresShard]]:
    """Shard engines by this test's catalog shard ids."""
    out = {sid: PostgresShard(sid, dsn, max_size=4) for sid, dsn in zip(shard_ids, pg18_dsns[:3], strict=True)}
    for engine in out.values():
        await engine.open()
    try:
        yield out
    finally:
        for engine in out.values():
            await engine.close()
