"""The router core: one place that turns an application's operation into a fenced shard call.

How a cutover is absorbed
-------------------------
Every operation carries the token of the chunk it addresses, taken from the cached chunk map.
When a shard's fence refuses it (stale token, chunk frozen, chunk gone), nothing was written;
the router reloads that collection's map from the catalog and tries again, backing off briefly
while the map still names the same placement (the chunk is frozen and the catalog not yet
switched: the cutover pause). Applications therefore see a pause, never an error, unless the
chunk stays unavailable past ``retry_deadline_s`` (then ``RetryDeadlineExceeded``, and still
nothing was written).

A lost notification costs one retry, never a wrong answer: reads are fenced exactly like
writes, so a stale map can never read "not found" from a shard that no longer owns a chunk.

Connection failures are different: the write may or may not have committed. Operations whose
repetition is harmless (get, find, replace, delete, ``$set``/``$unset`` patches) are retried;
inserts and ``$inc`` patches raise ``OutcomeUnknownError`` instead of risking a double apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import bson
import psycopg
from bson.errors import InvalidDocument

from router import metrics
from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    OutcomeUnknownError,
    RetryDeadlineExceeded,
    RouterClosedError,
    ShardKeyChangeError,
)
from router.hashing import khash
from router.routes import CollectionRoute
from settings import RouterSettings
from shards.errors import (
    FenceRejectedError,
    InvalidDocumentError,
    InvalidNameError,
    KeyOutsideChunkError,
)
from shards.postgres import PostgresShard

T = TypeVar("T")
_MISSING = object()


log = logging.getLogger(__name__)

class RouteSource(Protocol):
    """Where the router learns routes: the catalog (``router.catalog_source``)."""

    async def load_route(self, collection: str) -> CollectionRoute:
        """The collection's current route; ``UnknownCollectionError`` if it does not exist."""
        ...

    async def shard_dsn(self, shard_id: str) -> str: ...

    def changes(self) -> AsyncIterator[str | None]:
        """Names of collections whose layout changed (None: anything may have changed)."""
        ...


def field_value(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or ``_MISSING``."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class Router:
    """Routes documents to shards from a cached chunk map; absorbs cutovers with retries."""

    def __init__(
        self, source: RouteSource, settings: RouterSettings | None = None, *, listen: bool = True
    ) -> None:
        self.source = source
        self.settings = settings or RouterSettings()
        self._listen = listen
        self._routes: dict[str, CollectionRoute] = {}
        self._refreshing: dict[str, asyncio.Future[CollectionRoute]] = {}
        self._shards: dict[str, PostgresShard] = {}
        self._shard_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Router:
        self._closed = False
        opener = getattr(self.source, "open", None)
        if opener is not None:
            await opener()
        if self._listen and self._listener is None:
            self._listener = asyncio.create_task(self._follow_changes(), name="router-listen")
        return self

    async def close(self, drain_s: float | None = None) -> None:
        """Stop taking operations, let those in flight finish (up to ``drain_s``, default
        the retry deadline plus a second: a graceful restart costs clients nothing), then
        close the connections. Idempotent."""
        self._closed = True  # new operations are refused; none may reopen a pool
        wait = self.settings.retry_deadline_s + 1.0 if drain_s is None else drain_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=wait)
        except TimeoutError:
            log.warning("router closing with %d operation(s) still in flight", self._inflight)
        if self._listener:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._listener = None
        shards, self._shards = list(self._shards.values()), {}
        await asyncio.gather(*(s.close() for s in shards), return_exceptions=True)
        closer = getattr(self.source, "close", None)
        if closer is not None:
            await closer()

    async def __aenter__(self) -> Router:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _follow_changes(self) -> None:
        """Drop cached routes the catalog says changed; reconnect after failures."""
        while True:
            try:
                async for collection in self.source.changes():
                    if collection is None:
                        self._routes.clear()
                    else:
                        self._routes.pop(collection, None)
                    metrics.map_refreshes.add(1, {"reason": "notification"})
                # The source stopped (or never follows changes): rejections keep us correct.
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the catalog may restart; rejections still work
                self._routes.clear()
                await asyncio.sleep(0.5)

    # -- routes and shards -------------------------------------------------------------------

    async def route(self, collection: str) -> CollectionRoute:
        route = self._routes.get(collection)
        if route is None:
            route = await self._refresh(collection)
        return route

    async def _refresh(self, collection: str) -> CollectionRoute:
        """Reload one collection's route; concurrent callers share one catalog read."""
        pending = self._refreshing.get(collection)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[CollectionRoute] = asyncio.get_running_loop().create_future()
        self._refreshing[collection] = fut
        try:
            route = await self.source.load_route(collection)
            self._routes[collection] = route
            fut.set_result(route)
            return route
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._refreshing[collection]

    async def shard(self, shard_id: str) -> PostgresShard:
        s = self._shards.get(shard_id)
        if s is not None:
            return s
        async with self._shard_lock:
            if self._closed:
                raise RouterClosedError(f"the router is closed (operation on {shard_id})")
            s = self._shards.get(shard_id)
            if s is None:
                dsn = await self.source.shard_dsn(shard_id)
                s = PostgresShard(
                    shard_id, dsn, min_size=self.settings.pool_min_size,
                    max_size=self.settings.pool_max_size,
                )
                await s.open()
                self._shards[shard_id] = s
            return s

    # -- the retry loop ----------------------------------------------------------------------

    async def _run(
        self,
        collection: str,
        op: str,
        fn: Callable[[CollectionRoute], Awaitable[T]],
        *,
        idempotent: bool,
    ) -> T:
        if self._closed:
            raise RouterClosedError(f"the router is closed ({op} on {collection})")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + self.settings.retry_deadline_s
        backoff = self.settings.retry_backoff_s
        attempts = 0
        outcome = "error"
        self._inflight += 1
        self._idle.clear()
        try:
            while True:
                route = await self.route(collection)
                attempts += 1
                try:
                    result = await fn(route)
                    outcome = "ok"
                    return result
                except (FenceRejectedError, KeyOutsideChunkError) as exc:
                    metrics.rejections.add(1, {"op": op})
                    if loop.time() >= deadline:
                        outcome = "deadline"
                        raise RetryDeadlineExceeded(
                            f"{collection}: {op} gave up after {attempts} attempts in "
                            f"{self.settings.retry_deadline_s:.1f}s: {exc}"
                        ) from exc
                    fresh = await self._refresh(collection)
                    metrics.map_refreshes.add(1, {"reason": "rejection"})
                    metrics.retries.add(1, {"op": op})
                    if fresh.chunks == route.chunks:
                        # Same placement and tokens: the chunk is frozen mid-cutover. Wait a
                        # little (growing), never past the deadline.
                        await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                        backoff = min(backoff * 2, 0.05)
                except psycopg.OperationalError as exc:
                    if not idempotent:
                        raise OutcomeUnknownError(
                            f"{collection}: {op} lost its shard connection; the write may or "
                            f"may not have been applied: {exc}"
                        ) from exc
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                    backoff = min(backoff * 2, 0.2)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            metrics.op_duration.record(
                (time.perf_counter() - started) * 1000.0, {"op": op, "outcome": outcome}
            )

    # -- helpers -----------------------------------------------------------------------------

    def _key_of(self, route: CollectionRoute, doc: Mapping[str, Any]) -> Any:
        if not isinstance(doc, Mapping):
            raise BadRequestError(f"a document must be an object, not {type(doc).__name__}")
        if "_id" not in doc:
            raise BadRequestError("a document needs an _id")
        value = field_value(doc, route.shard_key)
        if value is _MISSING:
            raise BadRequestError(
                f"{route.collection}: document lacks the shard key field {route.shard_key!r}"
            )
        return value

    def _check_size(self, doc: Mapping[str, Any]) -> None:
        try:
            size = len(bson.encode(doc))
        except (InvalidDocument, TypeError, ValueError, OverflowError) as exc:
            raise BadRequestError(f"document cannot be encoded as BSON: {exc}") from exc
        if size > self.settings.max_document_bytes:
            raise DocumentTooLargeError(
                f"document is {size} bytes of BSON; the limit is {self.settings.max_document_bytes}"
            )

    @staticmethod
    def _hash(value: Any) -> int:
        try:
            return khash(value)
        except InvalidDocumentError as exc:
            raise BadRequestError(str(exc)) from exc

    # -- operations --------------------------------------------------------------------------

    async def insert(self, collection: str, doc: Mapping[str, Any]) -> None:
        """Insert a new document (``DuplicateDocumentError`` if its key and _id exist)."""
        route = await self.route(collection)
        h = self._hash(self._key_of(route, doc))
        self._check_size(doc)

        async def op(r: CollectionRoute) -> None:
            c = r.lookup(h)
            await (await self.shard(c.shard_id)).insert(collection, c.ref, h, doc)

        await self._run(collection, "insert", op, idempotent=False)

    async def replace(
        self, collection: str, doc: Mapping[str, Any], *, key: Any = _MISSING
    ) -> bool:
        """Replace the document with the same shard key and _id; False if there is none.

        ``key``, when given, is the shard key the caller believes the document has; a
        replacement that carries another one is refused (shard keys are immutable).
        """
        route = await self.route(collection)
        value = self._key_of(route, doc)
        if key is not _MISSING and key != value:
            raise ShardKeyChangeError(
                f"{collection}: the shard key {route.shard_key!r} cannot change "
                f"({key!r} -> {value!r})"
            )
        h = self._hash(value)
        self._check_size(doc)

        async def op(r: CollectionRoute) -> bool:
            c = r.lookup(h)
            return await (await self.shard(c.shard_id)).replace(collection, c.ref, h, doc)

        return await self._run(collection, "replace", op, idempotent=True)

    async def patch(
        self, collection: str, key: Any, _id: Any, update: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Apply ``$set``/``$unset``/``$inc``; the new document, or None if there is none."""
        route = await self.route(collection)
        h = self._hash(key)
        protected = ("_id", route.shard_key)

        async def op(r: CollectionRoute) -> dict[str, Any] | None:
            c = r.lookup(h)
            return await (await self.shard(c.shard_id)).patch(
                collection, c.ref, h, _id, update, protected
            )

        idempotent = isinstance(update, Mapping) and "$inc" not in update
        try:
            return await self._run(collection, "patch", op, idempotent=idempotent)
        except (InvalidDocumentError, InvalidNameError) as exc:
            raise BadRequestError(str(exc)) from exc

    async def delete(self, collection: str, key: Any, _id: Any) -> bool:
        route = await self.route(collection)
        del route
        h = self._hash(key)

        async def op(r: CollectionRoute) -> bool:
            c = r.lookup(h)
            return await (await self.shard(c.shard_id)).delete(collection, c.ref, h, _id)

        return await self._run(collection, "delete", op, idempotent=True)

    async def get(self, collection: str, key: Any, _id: Any) -> dict[str, Any] | None:
        await self.route(collection)
        h = self._hash(key)

        async def op(r: CollectionRoute) -> dict[str, Any] | None:
            c = r.lookup(h)
            return await (await self.shard(c.shard_id)).get(collection, c.ref, h, _id)

        return await self._run(collection, "get", op, idempotent=True)

    async def find(
        self, collection: str, filter: Mapping[str, Any], *, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Documents whose one filter field equals a value.

        The shard key routes to one chunk; an indexed field scatters to every shard that holds
        a chunk of the collection and gathers the results (ordered by khash, then _id).
        """
        route = await self.route(collection)
        if not isinstance(filter, Mapping) or len(filter) != 1:
            raise BadRequestError("filter must have exactly one field: {field: value}")
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise BadRequestError("limit must be an integer from 1 to 10000")
        ((field, value),) = filter.items()
        if field == route.shard_key:
            h = self._hash(value)

            async def by_key(r: CollectionRoute) -> list[dict[str, Any]]:
                c = r.lookup(h)
                return await (await self.shard(c.shard_id)).find_by_shard_key(
                    collection, c.ref, h, r.shard_key, value, limit
                )

            return await self._run(collection, "find", by_key, idempotent=True)
        if field not in route.indexed_fields():
            raise BadRequestError(
                f"{collection}: cannot filter on {field!r}: it is neither the shard key "
                f"{route.shard_key!r} nor the first field of an index "
                f"({sorted(route.indexed_fields())})"
            )

        async def scatter(r: CollectionRoute) -> list[dict[str, Any]]:
            legs = [
                self._find_leg(collection, shard_id, [c.ref for c in chunks], field, value, limit)
                for shard_id, chunks in r.by_shard().items()
            ]
            results = await asyncio.gather(*legs)
            return [d for part in results for d in part][:limit]

        return await self._run(collection, "find", scatter, idempotent=True)

    async def _find_leg(
        self, collection: str, shard_id: str, refs: list[Any], field: str, value: Any, limit: int
    ) -> list[dict[str, Any]]:
        shard = await self.shard(shard_id)
        try:
            return await shard.find_by_field(collection, refs, field, value, limit)
        except (InvalidDocumentError, InvalidNameError) as exc:
            raise BadRequestError(str(exc)) from exc
