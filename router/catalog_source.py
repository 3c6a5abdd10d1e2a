"""Routes from the catalog: chunk maps, shard addresses and change notifications.

Two promises to the router, whatever the catalog does:

* **Every catalog read is bounded** by ``timeout_s``. A read that takes longer is abandoned
  (cancelled in the background; the caller does not wait for the cancellation, which psycopg
  may spend seconds on) and the caller gets ``TimeoutError``. The router then serves from the
  map it has: a stale map is safe because every routed statement is fenced.
* **Its own catalog connections ride out a restart** (``from_dsn``, what ``router serve``
  uses). A pooled connection the catalog dropped fails its read, which the catalog runs again
  on another connection (reads are safe to repeat; the pool discards the broken one); no
  check runs before each use. While the catalog is down the pool does not back off: a failed
  reconnection gives up after ``RECONNECT_S`` and the next read that waits for a connection
  (at most ``CONNECTION_WAIT_S``, then the catalog asks again) starts a new one. So the first
  read after the catalog is back gets a connection at once, whatever the outage's length
  (psycopg_pool's own policy doubles the wait between attempts: after a 30 s outage the next
  one could be 30 s later). The pool keeps no connection it was not asked for
  (``min_size=0``), so opening it never waits: the router starts while the catalog is down.
  Retrying until the operation's deadline is the router's part (``router.core``); every read
  here takes a ``timeout`` so that it never outlasts that deadline.
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
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ValidationError

from catalog import errors as cerr
from catalog.models import CatalogChange, ChunkMap, RouteColumns
from catalog.schema import NOTIFY_CHANNEL
from catalog.store import Catalog
from router.errors import UnknownCollectionError
from router.routes import ChunkRoute, CollectionRoute, CollectionSummary
from settings import DatabaseSettings, get_settings
from shards.postgres.pool import connect_kwargs

T = TypeVar("T")
log = logging.getLogger(__name__)

CONNECTION_WAIT_S = 0.5
"""How long one catalog read waits for a pooled connection before the catalog asks again
(and with that, while the catalog is down, starts a new connection attempt)."""
RECONNECT_S = 0.5
"""How long the router's catalog pool keeps retrying one failed connection on its own."""


def router_catalog(dsn: str, *, timeout_s: float = 2.0, max_size: int = 4) -> Catalog:
    """The router's catalog: a small pool that opens without waiting for the catalog and
    reconnects on demand (see the module docstring). The DSN gets a connect timeout and TCP
    keepalives unless it sets its own, so a catalog host that does not answer at all cannot
    hold a connection attempt for the kernel's minutes."""
    given = conninfo_to_dict(dsn)
    extra: dict[str, Any] = dict(connect_kwargs(dsn))
    if "connect_timeout" not in given:
        extra["connect_timeout"] = max(2, round(timeout_s))
    return Catalog(make_conninfo(dsn, **extra) if extra else dsn, min_size=0,
                   max_size=max_size, timeout=CONNECTION_WAIT_S, reconnect_timeout=RECONNECT_S)


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


def route_of_columns(cols: RouteColumns) -> CollectionRoute:
    """The router's view of a whole map read as columns (``Catalog.route_columns``)."""
    return CollectionRoute.from_columns(
        collection=cols.collection.name, shard_key=cols.collection.shard_key,
        indexes=cols.collection.indexes, version=cols.version, chunk_ids=cols.chunk_ids,
        los=cols.los, his=cols.his, shard_ids=cols.shard_ids, tokens=cols.tokens,
    )


class CatalogRouteSource:
    """A ``RouteSource`` over a ``Catalog``.

    Args:
        catalog: an open catalog (or one this source opens: ``owned``).
        listen: follow LISTEN/NOTIFY (False simulates lost notifications: the router then
            converges through fence rejections alone).
        timeout_s: upper bound of one catalog read (a caller's ``timeout`` may shorten it).
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
        """A source with a catalog pool of its own (``router_catalog``, as the given DSN's
        role: a router's is the read-only ``db.catalog_reader``), opened at router start
        without waiting for the catalog, and closed with the router."""
        return cls(router_catalog(dsn, timeout_s=timeout_s), listen=listen, owned=True,
                   timeout_s=timeout_s, check_interval_s=check_interval_s, db=db)

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

    async def _bounded(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """``await coro``, but give up after ``timeout_s`` (or ``timeout``, if shorter) without
        waiting for its cleanup."""
        limit = self.timeout_s if timeout is None else max(0.0, min(timeout, self.timeout_s))
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            return task.result()
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)
        raise TimeoutError(f"the catalog did not answer within {limit:.1f}s")

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was abandoned on purpose

    async def load_route(self, collection: str, *, timeout: float | None = None
                         ) -> CollectionRoute:
        """The whole map, in one statement returning arrays (fast at 100,000 chunks)."""
        try:
            cols = await self._bounded(self.catalog.route_columns(collection), timeout)
        except cerr.UnknownCollectionError as exc:
            raise UnknownCollectionError(str(exc)) from exc
        return route_of_columns(cols)

    async def load_delta(self, collection: str, since: int, *, limit: int,
                         timeout: float | None = None) -> RouteColumns:
        """The chunks written after catalog version ``since`` (at most ``limit``; a result of
        ``limit`` rows may be cut short), sorted by ``lo``: see ``RouteCache``."""
        try:
            return await self._bounded(
                self.catalog.route_delta(collection, since, limit=limit), timeout)
        except cerr.UnknownCollectionError as exc:
            raise UnknownCollectionError(str(exc)) from exc

    async def collections(self, *, timeout: float | None = None) -> list[CollectionSummary]:
        maps = await self._bounded(self.catalog.chunk_maps(), timeout)
        return [
            CollectionSummary(
                name=name, shard_key=m.collection.shard_key, chunks=len(m.chunks),
                size_bytes=sum(c.size_bytes for c in m.chunks),
                doc_count=sum(c.doc_count for c in m.chunks))
            for name, m in sorted(maps.items())
        ]

    async def shard_dsn(self, shard_id: str, *, timeout: float | None = None) -> str:
        return self.db.router((await self._bounded(self.catalog.shard(shard_id), timeout)).address)

    async def report_traffic(self, collection: str, ops: dict[int, int], *,
                             window_s: float) -> None:
        """Add a router's operation counts to the catalog (``router/traffic.py``)."""
        await self._bounded(self.catalog.report_traffic(collection, ops, window_s=window_s))

    async def ping(self, *, timeout: float | None = None) -> None:
        await self._bounded(self.catalog.version(), timeout)

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
