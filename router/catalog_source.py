"""Routes from the catalog: chunk maps, shard addresses and change notifications.

Two promises to the router, whatever the catalog does:

* **Every catalog read is bounded** by ``timeout_s``. A read that takes longer is abandoned
  (cancelled in the background; the caller does not wait for the cancellation, which psycopg
  may spend seconds on) and the caller gets ``TimeoutError``. The router then serves from the
  map it has: a stale map is safe because every routed statement is fenced.
* **A dead listener is noticed.** The listening connection has TCP keepalives, and whenever it
  has been quiet for ``check_interval_s`` it must answer ``SELECT 1`` within ``timeout_s``;
  otherwise it is dropped and a new one opened. Every (re)start of listening yields ``None``
  ("anything may have changed"), because notifications sent while no one listened are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import psycopg
from pydantic import ValidationError

from catalog import errors as cerr
from catalog.models import CatalogChange, ChunkMap
from catalog.schema import NOTIFY_CHANNEL
from catalog.store import Catalog
from router.errors import UnknownCollectionError
from router.routes import ChunkRoute, CollectionRoute
from settings import DatabaseSettings, get_settings
from shards.postgres.pool import connect_kwargs

T = TypeVar("T")
log = logging.getLogger(__name__)


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
        catalog: an open catalog (or one this source opens: ``owned``).
        listen: follow LISTEN/NOTIFY (False simulates lost notifications: the router then
            converges through fence rejections alone).
        timeout_s: upper bound of one catalog read.
        db: whom the router connects to shards as (``db.router_user``; default: the
            process settings). The catalog's addresses say where; the role is the router's.
        check_interval_s: how long the listener may stay quiet before it proves its
            connection alive.
    """

    def __init__(
        self, catalog: Catalog, *, listen: bool = True, owned: bool = False,
        timeout_s: float = 2.0, check_interval_s: float = 5.0,
        db: DatabaseSettings | None = None,
    ) -> None:
        self.catalog = catalog
        self.db = db or get_settings().db
        self._listen = listen
        self._owned = owned
        self.timeout_s = timeout_s
        self.check_interval_s = check_interval_s
        self._abandoned: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_dsn(
        cls, dsn: str, *, listen: bool = True, timeout_s: float = 2.0,
        check_interval_s: float = 5.0, db: DatabaseSettings | None = None,
    ) -> CatalogRouteSource:
        """A source that opens (at router start) and closes its own catalog connection (as
        the given DSN's role: a router's is the read-only ``db.catalog_reader``)."""
        return cls(Catalog(dsn, max_size=4), listen=listen, owned=True, timeout_s=timeout_s,
                   check_interval_s=check_interval_s, db=db)

    async def open(self) -> None:
        if self._owned:
            await self.catalog.open()

    async def close(self) -> None:
        for task in list(self._abandoned):
            task.cancel()
        if self._abandoned:
            await asyncio.wait(self._abandoned, timeout=self.timeout_s)
        if self._owned:
            await self.catalog.close()

    async def _bounded(self, coro: Coroutine[Any, Any, T]) -> T:
        """``await coro``, but give up after ``timeout_s`` without waiting for its cleanup."""
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            return task.result()
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)
        raise TimeoutError(f"the catalog did not answer within {self.timeout_s:.1f}s")

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was abandoned on purpose

    async def load_route(self, collection: str) -> CollectionRoute:
        try:
            return route_of(await self._bounded(self.catalog.chunk_map(collection)))
        except cerr.UnknownCollectionError as exc:
            raise UnknownCollectionError(str(exc)) from exc

    async def shard_dsn(self, shard_id: str) -> str:
        return self.db.router((await self._bounded(self.catalog.shard(shard_id))).address)

    async def ping(self) -> None:
        await self._bounded(self.catalog.version())

    async def changes(self) -> AsyncIterator[str | None]:
        """Collections whose routing changed; ``None`` when anything may have changed (a shard
        registry change, or listening (re)started). Forever, until cancelled."""
        if not self._listen:
            await asyncio.Event().wait()  # follow nothing, forever (until cancelled)
        delay = 0.2
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            busy: asyncio.Task[Any] | None = None
            try:
                dsn = self.catalog.dsn
                conn = await self._bounded(psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, connect_timeout=max(2, round(self.timeout_s)),
                    **connect_kwargs(dsn)))
                await self._bounded(conn.execute(f"LISTEN {NOTIFY_CHANNEL}"))
                delay = 0.2
                yield None  # from here on nothing is missed; before it, anything may have been
                while True:
                    async for note in conn.notifies(timeout=self.check_interval_s):
                        try:
                            change = CatalogChange.model_validate_json(note.payload)
                        except ValidationError:
                            log.warning("catalog listen: malformed payload %r", note.payload[:200])
                            continue
                        if change.affects_routing:
                            yield change.collection
                    busy = asyncio.ensure_future(conn.execute("SELECT 1"))
                    await self._bounded(_wait(busy))
                    busy = None
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("catalog listener lost (%s); listening again",
                            type(exc).__name__)
            finally:
                if conn is not None:
                    self._close_later(conn, busy)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _close_later(self, conn: psycopg.AsyncConnection[Any],
                     busy: asyncio.Task[Any] | None) -> None:
        """Close a listener connection once nothing uses it (a cancelled statement may still
        be unwinding on it), without making the listener wait."""

        async def close() -> None:
            if busy is not None:
                busy.cancel()
                await asyncio.wait({busy})
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

        task = asyncio.ensure_future(close())
        self._abandoned.add(task)
        task.add_done_callback(self._forget)


async def _wait(task: asyncio.Task[T]) -> T:
    return await asyncio.shield(task)
