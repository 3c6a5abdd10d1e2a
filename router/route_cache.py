"""The router's cache of routes and shard pools, kept fresh from the catalog.

:class:`RouteCache` is the base of :class:`~router.core.Router`: it holds each collection's
chunk map and each shard's pool, follows the catalog's change notifications and re-reads what
changed. The retry loop and the operations that use it are ``router/core.py``.

The catalog is not on the data path
-----------------------------------
Because a stale map is safe, the router never throws a map away. A change notification marks
the collection's map stale and reloads it in the background; until the reload succeeds the old
map keeps serving (a fence rejection forces a reload on the spot). So a catalog outage costs
nothing for collections whose maps are cached; only a collection never seen before, or a chunk
that really moved, waits for the catalog: its read is tried again (backing off from 50 ms to
0.5 s) until the operation's deadline, each attempt bounded by the time left, so a catalog
that is back within the deadline costs the client a pause, and one that is not costs
``RouteUnavailableError``/``RetryDeadlineExceeded`` (HTTP 503), nothing written. When the
listener (re)connects it reports that anything may have changed, and every cached map and
shard address is re-read.

Refreshes are incremental: a cached map asks the catalog only for the chunks written since its
version (``load_delta``) and applies them (``CollectionRoute.apply``), so a move costs every
router one row, not the collection's size. A delta too long (the router is far behind) or one
that does not tile what it replaces falls back to reading the whole map; ``refreshes`` and
``rows_read`` (and the ``map_rows_read`` metric) say which happened and what it cost.

Shard addresses follow the catalog: a shard-registry notification (and a shard that cannot be
reached) makes the router re-read the addresses of the shards it has pools for; a changed one
is swapped into the pool, in-flight operations finishing on the old connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

import psycopg

from router import metrics
from router.errors import RouterClosedError, RouteUnavailableError
from router.routes import CollectionRoute, CollectionSummary, RouteDeltaError
from settings import RouterSettings
from shards import errors as serr
from shards.postgres import PostgresShard

log = logging.getLogger(__name__)

DELTA_MIN_ROWS = 256
DELTA_FRACTION = 4
"""A delta of ``max(DELTA_MIN_ROWS, chunks // DELTA_FRACTION)`` rows or more is given up for
a whole-map read: a router that far behind reloads whole (it is no slower)."""


class RouteSource(Protocol):
    """Where the router learns routes: the catalog (``router.catalog_source``)."""

    async def load_route(self, collection: str, *, timeout: float | None = None
                         ) -> CollectionRoute:
        """The collection's current route; ``UnknownCollectionError`` if it does not exist.
        Bounded (by ``timeout`` too, when given): raises rather than hang on the catalog."""
        ...

    async def shard_dsn(self, shard_id: str, *, timeout: float | None = None) -> str:
        """The shard's current address (bounded like ``load_route``)."""
        ...

    def changes(self) -> AsyncIterator[str | None]:
        """Names of collections whose layout changed (None: anything may have changed)."""
        ...

    async def collections(self, *, timeout: float | None = None) -> list[CollectionSummary]:
        """Every collection, by name, with its catalog statistics (bounded like
        ``load_route``)."""
        ...

    # Optional: ``load_delta(collection, since, *, limit, timeout=None) -> RouteColumns``,
    # the chunks written after catalog version ``since`` (``CatalogRouteSource``). A source
    # with it is refreshed incrementally (``RouteCache._read``).


def _unavailable(exc: BaseException) -> bool:
    """Is this a failure to reach the route source (worth a retry), not an answer?"""
    return bool(getattr(exc, "retryable", False)) or isinstance(
        exc, TimeoutError | OSError | psycopg.OperationalError)


class RouteCache:
    """Chunk maps and shard pools, read from ``source`` and refreshed on its notifications."""

    def __init__(
        self, source: RouteSource, settings: RouterSettings | None = None, *, listen: bool = True
    ) -> None:
        self.source = source
        self.settings = settings or RouterSettings()
        self._listen = listen
        self._routes: dict[str, CollectionRoute] = {}
        self._stale: set[str] = set()  # cached maps the catalog said changed: reload soon
        self._retry_at: dict[str, float] = {}  # no background reload before (catalog down)
        self._refreshing: dict[str, asyncio.Future[CollectionRoute]] = {}
        self._installed: dict[str, asyncio.Event] = {}  # set when a map is (re)installed
        self._shards: dict[str, PostgresShard] = {}
        self._shard_lock = asyncio.Lock()
        self._address_check_at = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._pools_closed = False  # set once close() has drained: no pool opens after
        # What refreshing cost (observable: tests and benches read these): refreshes and
        # chunk rows read by kind (see ``_count``), and the rows of the last catalog read.
        self.refreshes: dict[str, int] = {}
        self.rows_read: dict[str, int] = {}
        self.last_rows_read = 0

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow_changes(self) -> None:
        """Mark the maps the catalog says changed stale and reload them in the background;
        re-check shard addresses on registry changes. Never drops a map (see the module
        docstring): a catalog outage must not become a data-plane outage."""
        while True:
            try:
                async for collection in self.source.changes():
                    metrics.map_refreshes.add(1, {"reason": "notification"})
                    if collection is None:  # anything may have changed (or we were deaf)
                        for name in list(self._routes):
                            self._mark_stale(name)
                        self._check_addresses_soon(force=True)
                    elif collection in self._routes:
                        self._mark_stale(collection)
                # The source stopped (or never follows changes): rejections keep us correct.
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the catalog may restart; rejections still work
                log.warning("router: following catalog changes failed (%s); retrying",
                            type(exc).__name__)
                await asyncio.sleep(0.5)

    # -- routes and shards -------------------------------------------------------------------

    def _deadline(self) -> float:
        """An operation's deadline on the event loop's clock."""
        return asyncio.get_running_loop().time() + self.settings.retry_deadline_s

    async def route(self, collection: str, deadline: float | None = None) -> CollectionRoute:
        """The collection's map: the cached one (reloaded in the background when stale), or
        read from the catalog when none is cached, waiting for the catalog until ``deadline``
        (default: the retry deadline from now)."""
        route = self._routes.get(collection)
        if route is None:
            return await self._load(collection, self._deadline() if deadline is None
                                    else deadline)
        if collection in self._stale:
            self._reload_soon(collection)
        return route

    async def _load(self, collection: str, deadline: float) -> CollectionRoute:
        """Read a route from the catalog, again and again while the catalog cannot be read
        (down, restarting, a dead pooled connection), until ``deadline``; then the last
        ``RouteUnavailableError``. An answer (the route, an unknown collection) ends it."""
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            try:
                return await self._refresh(collection, timeout=deadline - loop.time())
            except RouteUnavailableError:
                left = deadline - loop.time()
                if left <= 0.01:
                    raise
                metrics.retries.add(1, {"op": "route"})
                await asyncio.sleep(min(backoff, left))
                backoff = min(backoff * 2, 0.5)

    def _mark_stale(self, collection: str) -> None:
        self._stale.add(collection)
        self._retry_at.pop(collection, None)
        self._reload_soon(collection)

    def _reload_soon(self, collection: str) -> None:
        """Reload a stale map in the background, at most once a second while it fails."""
        loop = asyncio.get_running_loop()
        if collection in self._refreshing or loop.time() < self._retry_at.get(collection, 0.0):
            return
        self._retry_at[collection] = loop.time() + 1.0

        async def reload() -> None:
            try:
                await self._refresh(collection)
            except Exception as exc:  # noqa: BLE001 - the cached map keeps serving meanwhile
                log.info("router: reloading %s's map failed (%s); serving the cached one",
                         collection, type(exc).__name__)

        self._spawn(reload(), f"router-reload-{collection}")

    async def refresh(self, collection: str) -> CollectionRoute:
        """Read one collection's route from the catalog now (after a change this process
        made, e.g. index DDL, rather than waiting for its notification)."""
        return await self._refresh(collection)

    async def _refresh(self, collection: str, timeout: float | None = None) -> CollectionRoute:
        """Reload one collection's route; concurrent callers share one catalog read. One
        attempt, bounded by the source's own limit and by ``timeout`` when given.

        Raises ``RouteUnavailableError`` when the catalog cannot be read (the cached map, if
        any, stays)."""
        pending = self._refreshing.get(collection)
        if pending is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(pending), timeout)
            except TimeoutError as exc:  # the shared read goes on, for its other callers
                raise RouteUnavailableError(
                    f"{collection}: the catalog did not answer in time and the collection's "
                    "chunk map is needed; nothing was written, retry later") from exc
        fut: asyncio.Future[CollectionRoute] = asyncio.get_running_loop().create_future()
        self._refreshing[collection] = fut
        stale = collection in self._stale
        self._stale.discard(collection)  # a notification during the read marks it again
        try:
            try:
                route = await self._read(collection, timeout)
            except Exception as exc:
                if not _unavailable(exc):
                    raise  # an unknown collection, a bad name: no retry changes that
                raise RouteUnavailableError(
                    f"{collection}: the catalog could not be read ({type(exc).__name__}) and "
                    "the collection's chunk map is needed; nothing was written, retry later"
                ) from exc
            self._routes[collection] = route
            self._retry_at.pop(collection, None)
            fut.set_result(route)
            installed = self._installed.pop(collection, None)
            if installed is not None:
                installed.set()
            return route
        except BaseException as exc:
            if stale and collection in self._routes:
                self._stale.add(collection)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._refreshing[collection]

    async def wait_for_new_placement(self, collection: str, seen: CollectionRoute,
                                     timeout: float) -> bool:
        """Wait until the cached map of ``collection`` places its chunks otherwise than
        ``seen`` (a cutover's switch, read after the catalog's notification), at most
        ``timeout`` seconds; True when it does.

        An operation a frozen chunk refused waits here rather than on a timer: the reload
        the switch's notification starts wakes it as soon as the new map is installed, so
        the pause it sees ends with the switch, not with its backoff."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        while True:
            current = self._routes.get(collection)
            if current is not None and not current.same_placement(seen):
                return True
            left = end - loop.time()
            if left <= 0:
                return False
            event = self._installed.setdefault(collection, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return False

    async def _read(self, collection: str, timeout: float | None) -> CollectionRoute:
        """The collection's current route: the cached one with the catalog's delta applied
        when the source reads deltas, else (or when the delta is too long or does not tile)
        the whole map. Both reads together stay within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)

        def left() -> dict[str, float]:
            return {} if deadline is None else {"timeout": max(0.0, deadline - loop.time())}

        cached = self._routes.get(collection)
        load_delta = getattr(self.source, "load_delta", None)
        if cached is not None and load_delta is not None:
            limit = max(DELTA_MIN_ROWS, len(cached) // DELTA_FRACTION)
            delta = await load_delta(collection, cached.version, limit=limit, **left())
            self._count("delta", len(delta))
            if len(delta) >= limit:
                self._count("behind", 0)
            elif delta.version < cached.version:
                self._count("inconsistent", 0)  # the catalog went back (restored): reload
            else:
                try:
                    return cached.apply(
                        version=delta.version, shard_key=delta.collection.shard_key,
                        indexes=delta.collection.indexes, chunk_ids=delta.chunk_ids,
                        los=delta.los, his=delta.his, shard_ids=delta.shard_ids,
                        tokens=delta.tokens)
                except RouteDeltaError as exc:
                    log.warning("router: %s; reading the whole map", exc)
                    self._count("inconsistent", 0)
        route = await self.source.load_route(collection, **left())
        self._count("full", len(route))
        return route

    def _count(self, kind: str, rows: int) -> None:
        """Record a refresh of ``kind`` (``full``, ``delta``; ``behind`` and ``inconsistent``
        are deltas given up for a full load) and the chunk rows it read."""
        self.refreshes[kind] = self.refreshes.get(kind, 0) + 1
        self.rows_read[kind] = self.rows_read.get(kind, 0) + rows
        self.last_rows_read = rows
        metrics.map_rows_read.add(rows, {"kind": kind})

    async def shard(self, shard_id: str, timeout: float | None = None) -> PostgresShard:
        """The pool of a shard (created on first use; no connection is opened here). Reading
        a new shard's address takes at most ``timeout`` when given."""
        s = self._shards.get(shard_id)
        if s is not None:
            return s
        async with self._shard_lock:
            if self._pools_closed:
                raise RouterClosedError(f"the router is closed (operation on {shard_id})")
            s = self._shards.get(shard_id)
            if s is None:
                try:
                    dsn = await (self.source.shard_dsn(shard_id) if timeout is None else
                                 self.source.shard_dsn(shard_id, timeout=max(0.0, timeout)))
                except Exception as exc:
                    if not _unavailable(exc):
                        raise
                    raise serr.ShardUnavailableError(
                        f"{shard_id}: the shard's address could not be read from the catalog"
                    ) from exc
                s = PostgresShard(
                    shard_id, dsn, min_size=self.settings.pool_min_size,
                    max_size=self.settings.pool_max_size,
                    connect_timeout_s=self.settings.connect_timeout_s,
                    breaker_open_s=self.settings.breaker_open_s,
                )
                await s.open(wait=False)
                self._shards[shard_id] = s
            return s

    def _check_addresses_soon(self, *, force: bool = False) -> None:
        """Re-read the address of every shard we have a pool for (in the background; at most
        once per ``breaker_open_s`` unless forced by a notification)."""
        loop = asyncio.get_running_loop()
        if not self._shards or (not force and loop.time() < self._address_check_at):
            return
        self._address_check_at = loop.time() + self.settings.breaker_open_s

        async def check() -> None:
            for shard_id, shard in list(self._shards.items()):
                try:
                    dsn = await self.source.shard_dsn(shard_id)
                except Exception as exc:  # noqa: BLE001 - keep the address we have
                    log.info("router: re-reading %s's address failed (%s)", shard_id,
                             type(exc).__name__)
                    continue
                if dsn != shard.dsn:
                    log.warning("router: shard %s was re-registered at a new address", shard_id)
                    shard.set_dsn(dsn)

        self._spawn(check(), "router-shard-addresses")


__all__ = ["RouteCache", "RouteSource"]
