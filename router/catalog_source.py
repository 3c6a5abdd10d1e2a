"""Routes from the catalog: chunk maps, shard addresses and change notifications."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from catalog import errors as cerr
from catalog.models import ChunkMap
from catalog.store import Catalog
from router.errors import UnknownCollectionError
from router.routes import ChunkRoute, CollectionRoute


def route_of(cmap: ChunkMap) -> CollectionRoute:
    """The router's view of a catalog chunk map."""
    return CollectionRoute(
        collection=cmap.collection.name,
        shard_key=cmap.collection.shard_key,
        indexes=cmap.collection.indexes,
        chunks=tuple(
            ChunkRoute(chunk_id=c.chunk_id, range=c.range, shard_id=c.shard_id, token=c.token)
            for c in cmap.chunks
        ),
        version=cmap.version,
    )


class CatalogRouteSource:
    """A ``RouteSource`` over a ``Catalog``.

    Args:
        catalog: an open catalog.
        listen: follow LISTEN/NOTIFY (False simulates lost notifications: the router then
            converges through fence rejections alone).
    """

    def __init__(self, catalog: Catalog, *, listen: bool = True, owned: bool = False) -> None:
        self.catalog = catalog
        self._listen = listen
        self._owned = owned

    @classmethod
    def from_dsn(cls, dsn: str, *, listen: bool = True) -> CatalogRouteSource:
        """A source that opens (at router start) and closes its own catalog connection."""
        return cls(Catalog(dsn, max_size=4), listen=listen, owned=True)

    async def open(self) -> None:
        if self._owned:
            await self.catalog.open()

    async def close(self) -> None:
        if self._owned:
            await self.catalog.close()

    async def load_route(self, collection: str) -> CollectionRoute:
        try:
            return route_of(await self.catalog.chunk_map(collection))
        except cerr.UnknownCollectionError as exc:
            raise UnknownCollectionError(str(exc)) from exc

    async def shard_dsn(self, shard_id: str) -> str:
        return (await self.catalog.shard(shard_id)).address

    async def ping(self) -> None:
        await self.catalog.version()

    async def changes(self) -> AsyncIterator[str | None]:
        if not self._listen:
            await asyncio.Event().wait()  # follow nothing, forever (until cancelled)
        async for change in self.catalog.listen():
            if change.affects_routing:
                yield None if change.collection is None else change.collection
