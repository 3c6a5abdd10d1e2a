"""Router fixtures: a provisioned collection on the session stack and a router over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.models import ChunkMap
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import RouterSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard


@pytest.fixture(scope="session")
async def router_catalog(catalog_dsn: str) -> AsyncIterator[Catalog]:
    cat = Catalog(catalog_dsn, max_size=16)
    await cat.open()
    await cat.ensure_schema()
    try:
        yield cat
    finally:
        await cat.close()


@dataclass
class Deployment:
    catalog: Catalog
    collection: str
    shards: dict[str, PostgresShard]
    initial: ChunkMap

    async def chunk_map(self) -> ChunkMap:
        return await self.catalog.chunk_map(self.collection)


@pytest.fixture
async def deployment(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str
) -> AsyncIterator[Deployment]:
    """A collection ``acct``-keyed, indexed on ``email``, 2 chunks on each of 3 shards."""
    ids = [f"{collection_name[:40]}-s{i}" for i in range(3)]
    shards = {}
    for sid, dsn in zip(ids, pg18_dsns[:3], strict=True):
        await router_catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
        shards[sid] = await PostgresShard(sid, dsn, max_size=4).open()
    cmap = await provision_collection(
        router_catalog, shards, collection_name, "acct",
        [IndexDefinition(name="by_email", fields=("email",))], chunks_per_shard=2,
    )
    try:
        yield Deployment(router_catalog, collection_name, shards, cmap)
    finally:
        try:
            for s in shards.values():
                await s.drop_collection(collection_name)
        finally:
            for s in shards.values():
                await s.close()
            await s.close()


def router_settings(**kw: object) -> RouterSettings:
    return RouterSettings(**{"retry_deadline_s": 5.0, "pool_max_size": 4, **kw})


@pytest.fixture
async def router(deployment: Deployment) -> AsyncIterator[Router]:
    async with Router(CatalogRouteSource(deployment.catalog), router_settings()) as r:
        yield r
