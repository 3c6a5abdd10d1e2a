"""The router core: one place that turns an application's operation into a fenced shard call.

How a cutover is absorbed
-------------------------
Every operation carries the token of the chunk it addresses, taken from the cached chunk map.
When a shard's fence refuses it (stale token, chunk frozen, chunk gone), nothing was written;
the router reloads that collection's map from the catalog and tries again. While the map still
names the same placement (the chunk is frozen and the catalog not yet switched: the cutover
pause) it waits for the switch: the catalog's notification reloads the map, and installing a
map that places the chunk elsewhere wakes every operation waiting on it at once
(``RouteCache.wait_for_new_placement``); a short growing backoff (``retry_backoff_s`` up to
50 ms) bounds the wait, so a lost notification costs one more try, never a stall.
Applications therefore see a pause, never an error, unless the chunk stays unavailable past
``retry_deadline_s`` (then ``RetryDeadlineExceeded``, and still nothing was written).

A lost notification costs one retry, never a wrong answer: reads are fenced exactly like
writes, so a stale map can never read "not found" from a shard that no longer owns a chunk.

The route cache (chunk maps, shard pools, change notifications) is ``router/route_cache.py``;
its docstring tells why the catalog is not on the data path.

When a shard cannot be reached, or the connection breaks
--------------------------------------------------------
* Nothing sent (no connection in time, the shard's circuit breaker open, a pooled connection
  the server had already hung up on): every operation is retried until the deadline, then
  ``ShardUnavailableError`` (HTTP 503 with ``Retry-After``). The engine's pool bounds each wait
  by the remaining deadline, so an operation never hangs on a dead server.
* Sent, and the connection broke before the reply (``ShardConnectionLostError``): reads are
  retried. Writes (insert, replace, delete, every patch) raise ``OutcomeUnknownError`` and
  are never repeated: the first attempt may have committed, and a blind repeat could undo a
  write another client made in between (a delete repeated after the document was inserted
  again, a replace repeated over a later ``$inc``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from bson.errors import InvalidDocument

from router import metrics
from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    OutcomeUnknownError,
    RetryDeadlineExceeded,
    RouterClosedError,
    RouteUnavailableError,
    ShardKeyChangeError,
    ShardUnavailableError,
)
from router.hashing import khash
from router.route_cache import RouteCache, RouteSource
from router.routes import CollectionRoute, CollectionSummary
from router.traffic import TrafficCounter, TrafficSink, publish
from settings import RouterSettings
from shards import errors as serr
from shards.codec import bson_bytes, canonical_text, encode_value
from shards.errors import (
    FenceRejectedError,
    InvalidDocumentError,
    InvalidNameError,
    KeyOutsideChunkError,
    ShardConnectionLostError,
)
from shards.models import KHASH_END, KHASH_MIN

T = TypeVar("T")
_MISSING = object()
SCAN_FANOUT = 16
"""Ranges a narrowed scan reads at once."""
SCAN_POINT_KEYS = 64
"""Up to this many shard key values, a scan reads each one's khash alone (concurrently)."""
_OP_ATTRIBUTES: dict[tuple[str, str], dict[str, str]] = {}
"""``op_duration``'s attribute sets, made once per (operation, outcome) and reused (the
operation names and outcomes are a handful of constants)."""


log = logging.getLogger(__name__)


def field_value(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or ``_MISSING``."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class FindResult(list[dict[str, Any]]):
    """The documents of a ``find``, in order. ``truncated`` is True when the result-size cap
    (``find_max_result_bytes``) left out documents that matched within ``limit``: what is
    here is then the first part of the full answer, in the same order."""

    truncated: bool = False


def cap_result(docs: list[dict[str, Any]], max_bytes: int) -> FindResult:
    """The longest prefix of ``docs`` whose BSON sizes add up to at most ``max_bytes``."""
    out = FindResult()
    used = 0
    for doc in docs:
        used += len(bson_bytes(doc))
        if used > max_bytes:
            out.truncated = True
            break
        out.append(doc)
    return out


class Router(RouteCache):
    """Routes documents to shards from a cached chunk map; absorbs cutovers with retries."""

    def __init__(
        self, source: RouteSource, settings: RouterSettings | None = None, *, listen: bool = True
    ) -> None:
        super().__init__(source, settings, listen=listen)
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.traffic = TrafficCounter()
        """Operations per chunk since the last report (see ``router/traffic.py``)."""
        self.statements: dict[str, int] = {}
        """Routed statements sent (attempts, retries included) by operation (``get``,
        ``replace``, ``scan`` ...) since the router was made: what a caller's request cost
        in shard round trips (diagnostics and tests)."""
        self._publisher: asyncio.Task[None] | None = None
        self._stop_publishing = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Router:
        self._closed = self._pools_closed = False
        opener = getattr(self.source, "open", None)
        if opener is not None:
            await opener()
        if self._listen and self._listener is None:
            self._listener = asyncio.create_task(self._follow_changes(), name="router-listen")
        sink = self._traffic_sink()
        if sink is not None and self._publisher is None:
            self._stop_publishing.clear()
            self._publisher = asyncio.create_task(
                publish(self.traffic, sink, self.settings.traffic_report_s,
                        self._stop_publishing),
                name="router-traffic")
        return self

    def _traffic_sink(self) -> TrafficSink | None:
        """The source, when it takes traffic reports (the catalog does)."""
        return self.source if callable(getattr(self.source, "report_traffic", None)) else None  # type: ignore[return-value]

    async def close(self, drain_s: float | None = None) -> None:
        """Stop taking operations, let those in flight finish (up to ``drain_s``, default
        the retry deadline plus a second: a graceful restart costs clients nothing), then
        close the connections. Idempotent."""
        self._closed = True  # new operations are refused
        wait = self.settings.retry_deadline_s + 1.0 if drain_s is None else drain_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=wait)
        except TimeoutError:
            log.warning("router closing with %d operation(s) still in flight", self._inflight)
        # Only now may no pool open: an operation accepted before the close may need the new
        # owner's pool after a cutover it was absorbing.
        self._pools_closed = True
        if self._publisher is not None:
            # The last report (what was counted since the previous one), bounded like any
            # catalog call; a report in flight finishes rather than being cut off.
            self._stop_publishing.set()
            await asyncio.wait({self._publisher}, timeout=2 * self.settings.catalog_timeout_s)
        tasks = [*self._background, *([self._listener] if self._listener else []),
                 *([self._publisher] if self._publisher else [])]
        self._listener = self._publisher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        shards, self._shards = list(self._shards.values()), {}
        await asyncio.gather(*(s.close() for s in shards), return_exceptions=True)
        closer = getattr(self.source, "close", None)
        if closer is not None:
            await closer()

    async def __aenter__(self) -> Router:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the retry loop ----------------------------------------------------------------------

    async def _run(
        self,
        collection: str,
        op: str,
        fn: Callable[[CollectionRoute, float], Awaitable[T]],
        *,
        read_only: bool,
        deadline: float | None = None,
        route: CollectionRoute | None = None,
    ) -> T:
        """Run ``fn(route, time_left)`` until it succeeds, retrying what is safe to retry
        (see the module docstring) until ``deadline`` (default: ``retry_deadline_s`` from
        now; an operation passes the one it started with). ``route``: the map the caller
        has just read (no await since), for the first attempt; later ones read it again."""
        if self._closed:
            raise RouterClosedError(f"the router is closed ({op} on {collection})")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if deadline is None:
            deadline = self._deadline()
        backoff = self.settings.retry_backoff_s
        attempts = 0
        outcome = "error"
        first = route
        self._inflight += 1
        self._idle.clear()

        def give_up(why: str, exc: Exception) -> RetryDeadlineExceeded:
            nonlocal outcome
            outcome = "deadline"
            text = (f"{collection}: {op} gave up after {attempts} attempts in "
                    f"{self.settings.retry_deadline_s:.1f}s: {why}")
            if isinstance(exc, serr.ShardUnavailableError | ShardConnectionLostError):
                return ShardUnavailableError(
                    text, retry_after_s=getattr(exc, "retry_after_s", 1.0))
            return RetryDeadlineExceeded(text)

        try:
            while True:
                if first is not None:
                    cur, first = first, None
                else:
                    cur = await self.route(collection, deadline)
                attempts += 1
                self.statements[op] = self.statements.get(op, 0) + 1
                try:
                    result = await fn(cur, max(0.0, deadline - loop.time()))
                    outcome = "ok"
                    return result
                except (FenceRejectedError, KeyOutsideChunkError) as exc:
                    metrics.rejections.add(1, {"op": op})
                    if loop.time() >= deadline:
                        raise give_up(str(exc), exc) from exc
                    try:
                        fresh = await self._refresh(collection,
                                                    timeout=max(0.0, deadline - loop.time()))
                    except RouteUnavailableError:
                        fresh = cur  # the catalog is down: wait for it, within the deadline
                    metrics.map_refreshes.add(1, {"reason": "rejection"})
                    metrics.retries.add(1, {"op": op, "reason": "fence"})
                    if fresh.same_placement(cur):
                        # Same placement and tokens: the chunk is frozen mid-cutover. Wait
                        # until the switch's notification brings the new map, or a little
                        # (growing: a lost notification costs one more try), never past the
                        # deadline.
                        await self.wait_for_new_placement(
                            collection, fresh, min(backoff, max(0.0, deadline - loop.time())))
                        backoff = min(backoff * 2, 0.05)
                except serr.ShardUnavailableError as exc:
                    # Nothing was sent. The shard may be down, or re-registered elsewhere.
                    self._check_addresses_soon()
                    wait = max(min(exc.retry_after_s, 0.25), backoff)
                    if loop.time() + wait >= deadline:
                        raise give_up("the shard is unreachable", exc) from exc
                    metrics.retries.add(1, {"op": op, "reason": "unavailable"})
                    await asyncio.sleep(wait)
                    backoff = min(backoff * 2, 0.2)
                except ShardConnectionLostError as exc:
                    if not read_only:
                        raise OutcomeUnknownError(
                            f"{collection}: {op} lost its shard connection after the write was "
                            "sent; it may or may not have been applied (read to find out)"
                        ) from exc
                    if loop.time() >= deadline:
                        raise give_up("the shard connection keeps failing", exc) from exc
                    await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                    backoff = min(backoff * 2, 0.2)
                except psycopg.OperationalError as exc:
                    # An error the server reported for the statement: it rolled back, nothing
                    # was applied (lock or statement timeout, cancelled, out of resources).
                    if loop.time() >= deadline:
                        raise give_up(f"the shard refused: {exc.sqlstate}", exc) from exc
                    await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                    backoff = min(backoff * 2, 0.2)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            attributes = _OP_ATTRIBUTES.get((op, outcome))
            if attributes is None:
                attributes = _OP_ATTRIBUTES[op, outcome] = {"op": op, "outcome": outcome}
            metrics.op_duration.record(time.perf_counter() - started, attributes)

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
            size = len(bson_bytes(doc))
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
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(self._key_of(route, doc))
        self._check_size(doc)

        async def op(r: CollectionRoute, t: float) -> None:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            await shard.insert(collection, c.ref, h, doc, timeout=t)

        await self._run(collection, "insert", op, read_only=False,
                               deadline=deadline, route=route)

    async def replace(
        self, collection: str, doc: Mapping[str, Any], *, key: Any = _MISSING
    ) -> bool:
        """Replace the document with the same shard key and _id; False if there is none.

        ``key``, when given, is the shard key the caller believes the document has; a
        replacement that carries another one is refused (shard keys are immutable).
        """
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        value = self._key_of(route, doc)
        if key is not _MISSING and key != value:
            raise ShardKeyChangeError(
                f"{collection}: the shard key {route.shard_key!r} cannot change "
                f"({key!r} -> {value!r})"
            )
        h = self._hash(value)
        self._check_size(doc)

        async def op(r: CollectionRoute, t: float) -> bool:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.replace(
                collection, c.ref, h, doc, timeout=t)

        return await self._run(collection, "replace", op, read_only=False,
                               deadline=deadline, route=route)

    async def replace_pinned(self, collection: str, doc: Mapping[str, Any]) -> tuple[int, int]:
        """Replace the document whose shard key and ``_id`` are, as stored (same BSON type
        and value), those of ``doc``, unless it already equals ``doc``: (matched, written),
        each 0 or 1, in one fenced statement (the read-modify-write of a MongoDB replacement
        pinned by shard key and ``_id``). (0, 0): no document holds that key and ``_id`` in
        those very types (one may in others: the caller looks further)."""
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(self._key_of(route, doc))
        self._check_size(doc)
        shard_key = route.shard_key

        async def op(r: CollectionRoute, t: float) -> tuple[int, int]:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.replace_pinned(
                collection, c.ref, h, shard_key, doc, timeout=t)

        return await self._run(collection, "replace", op, read_only=False,
                               deadline=deadline, route=route)

    async def patch(
        self, collection: str, key: Any, _id: Any, update: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Apply ``$set``/``$unset``/``$inc``; the new document, or None if there is none."""
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(key)
        protected = ("_id", route.shard_key)

        async def op(r: CollectionRoute, t: float) -> dict[str, Any] | None:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.patch(
                collection, c.ref, h, _id, update, protected, timeout=t
            )

        try:
            return await self._run(collection, "patch", op, read_only=False,
                               deadline=deadline, route=route)
        except (InvalidDocumentError, InvalidNameError) as exc:
            raise BadRequestError(str(exc)) from exc

    async def delete(self, collection: str, key: Any, _id: Any) -> bool:
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(key)

        async def op(r: CollectionRoute, t: float) -> bool:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.delete(
                collection, c.ref, h, _id, timeout=t)

        return await self._run(collection, "delete", op, read_only=False,
                               deadline=deadline, route=route)

    async def get(self, collection: str, key: Any, _id: Any) -> dict[str, Any] | None:
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(key)

        async def op(r: CollectionRoute, t: float) -> dict[str, Any] | None:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.get(collection, c.ref, h, _id, timeout=t)

        return await self._run(collection, "get", op, read_only=True,
                               deadline=deadline, route=route)

    async def get_text(self, collection: str, key: Any, _id: Any) -> str | None:
        """``get``, the document as canonical Extended JSON text (``shards.codec.
        canonical_text``: the stored text itself unless a number needs re-spelling), for
        a caller that sends it on as JSON (the HTTP service). Counted as a ``get``."""
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(key)

        async def op(r: CollectionRoute, t: float) -> str | None:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.get_text(collection, c.ref, h, _id,
                                                                   timeout=t)

        text = await self._run(collection, "get", op, read_only=True,
                               deadline=deadline, route=route)
        return None if text is None else canonical_text(text)

    async def get_many(self, collection: str, key: Any, ids: Sequence[Any]
                       ) -> list[dict[str, Any]]:
        """The documents with shard key ``key`` whose ``_id`` is one of ``ids`` (compared as
        stored), from the one chunk that owns the key: one fenced statement."""
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        h = self._hash(key)

        async def op(r: CollectionRoute, t: float) -> list[dict[str, Any]]:
            c = r.lookup(h)
            self.traffic.count(collection, c.chunk_id)
            shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
            return await shard.get_many(collection, c.ref, h, ids,
                                                                    timeout=t)

        return await self._run(collection, "get", op, read_only=True,
                               deadline=deadline, route=route)

    async def find(
        self, collection: str, filter: Mapping[str, Any], *, limit: int = 100
    ) -> FindResult:
        """Documents whose one filter field equals a value.

        The shard key routes to one chunk; an indexed field scatters to every shard that holds
        a chunk of the collection and gathers the results (ordered by khash, then _id). At
        most ``limit`` documents and ``find_max_result_bytes`` of them (BSON): when that cap
        cuts the result short, the result's ``truncated`` is True.
        """
        deadline = self._deadline()
        route = await self.route(collection, deadline)
        if not isinstance(filter, Mapping) or len(filter) != 1:
            raise BadRequestError("filter must have exactly one field: {field: value}")
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise BadRequestError("limit must be an integer from 1 to 10000")
        ((field, value),) = filter.items()
        if field == route.shard_key:
            h = self._hash(value)

            async def by_key(r: CollectionRoute, t: float) -> list[dict[str, Any]]:
                c = r.lookup(h)
                self.traffic.count(collection, c.chunk_id)
                shard = self._shards.get(c.shard_id) or await self.shard(c.shard_id, t)
                return await shard.find_by_shard_key(
                    collection, c.ref, h, r.shard_key, value, limit, timeout=t
                )

            docs = await self._run(collection, "find", by_key, read_only=True, deadline=deadline)
            return cap_result(docs, self.settings.find_max_result_bytes)
        if field not in route.indexed_fields():
            raise BadRequestError(
                f"{collection}: cannot filter on {field!r}: it is neither the shard key "
                f"{route.shard_key!r} nor the first field of an index "
                f"({sorted(route.indexed_fields())})"
            )

        async def scatter(r: CollectionRoute, t: float) -> list[dict[str, Any]]:
            legs = [
                self._find_leg(collection, shard_id, [c.ref for c in chunks], field, value,
                               limit, t)
                for shard_id, chunks in r.by_shard().items()
            ]
            results = await asyncio.gather(*legs)
            # Each leg is ordered by (khash, _id) and holds its own first ``limit``, so a merge
            # in that order, cut at ``limit``, is the collection's first ``limit``.
            def order(doc: dict[str, Any]) -> tuple[int, str]:
                return khash(field_value(doc, r.shard_key)), encode_value(doc["_id"])

            return list(heapq.merge(*results, key=order))[:limit]

        docs = await self._run(collection, "find", scatter, read_only=True, deadline=deadline)
        return cap_result(docs, self.settings.find_max_result_bytes)

    async def _find_leg(
        self, collection: str, shard_id: str, refs: list[Any], field: str, value: Any,
        limit: int, timeout: float,
    ) -> list[dict[str, Any]]:
        shard = await self.shard(shard_id, timeout)
        try:
            return await shard.find_by_field(collection, refs, field, value, limit,
                                             timeout=timeout)
        except (InvalidDocumentError, InvalidNameError) as exc:
            raise BadRequestError(str(exc)) from exc

    # -- scans (the MongoDB front end's queries) ---------------------------------------------

    async def scan(
        self, collection: str, *, ids: Sequence[Any] | None = None, field: str | None = None,
        values: Sequence[Any] | None = None, key_values: Sequence[Any] | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The collection's documents in pages (at most ``page_size`` documents and, past
        the first, about 4 MiB), never all at once.

        Chunk by chunk, each page one fenced keyset statement (the rows after the last
        (khash, id) read): a page a fence refuses reloads the map and is read again from the
        same position, from whichever chunk holds it now, so a scan that meets a cutover (or
        a split, or a merge) neither misses nor repeats a document. Narrowed on the shard by
        ``ids`` (``_id`` equals one of them) or ``field``/``values`` (an indexed field equals
        one of them, as stored): then the chunks are read concurrently (``SCAN_FANOUT`` at
        once), each its own khash range, and pages come in the order they are read.
        ``key_values`` (shard key values) reads only their khashes: each alone and
        concurrently up to ``SCAN_POINT_KEYS`` of them, else the chunks holding them one
        after another. Otherwise in (khash, _id) order, one chunk after another. The caller
        applies its full filter to what comes back.
        """
        if not 1 <= page_size <= 10_000:
            raise BadRequestError("page_size must be from 1 to 10000")
        route = await self.route(collection)
        hashes = sorted({self._hash(v) for v in key_values}) if key_values is not None else None
        narrow: dict[str, Any] = {"ids": ids, "field": field, "values": values,
                                  "khashes": hashes, "page_size": page_size}
        if hashes is not None and len(hashes) <= SCAN_POINT_KEYS:
            # Each khash is a range of its own: an exact primary-key range per statement.
            ranges = [(h, h + 1) for h in hashes]
            narrow["khashes"] = None
        elif (ids is None and field is None) or hashes is not None or len(route.chunks) == 1:
            async for page in self._scan_range(collection, KHASH_MIN, KHASH_END, **narrow):
                yield page
            return
        else:
            ranges = [(c.range.lo, c.range.hi) for c in route.chunks]
        queue: asyncio.Queue[list[dict[str, Any]] | Exception | None] = asyncio.Queue(4)
        gate = asyncio.Semaphore(SCAN_FANOUT)

        async def drain(lo: int, hi: int) -> None:
            try:
                async with gate:
                    async for page in self._scan_range(collection, lo, hi, **narrow):
                        await queue.put(page)
            except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
                await queue.put(exc)
                return
            await queue.put(None)

        tasks = [asyncio.create_task(drain(lo, hi), name="router-scan") for lo, hi in ranges]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _scan_range(
        self, collection: str, lo: int, hi: int, *, ids: Sequence[Any] | None,
        field: str | None, values: Sequence[Any] | None, khashes: list[int] | None,
        page_size: int,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The documents of the khash range [lo, hi), in (khash, _id) order, page by page."""
        pos: tuple[int, str] = (lo, "")
        while True:
            if khashes is not None:
                i = bisect_left(khashes, pos[0])
                if i == len(khashes) or khashes[i] >= hi:
                    return
                if khashes[i] > pos[0]:
                    pos = (khashes[i], "")
            at = pos

            async def page(r: CollectionRoute, t: float, at: tuple[int, str] = at
                           ) -> tuple[int, list[tuple[int, str, dict[str, Any]]], bool]:
                c = r.lookup(at[0])
                shard = await self.shard(c.shard_id, t)
                try:
                    rows, more = await shard.scan_page(
                        collection, c.ref, c.range, at, page_size, ids=ids, field=field,
                        values=values, khashes=khashes, stop=hi, timeout=t)
                except (InvalidDocumentError, InvalidNameError) as exc:
                    raise BadRequestError(str(exc)) from exc
                return min(c.range.hi, hi), rows, more

            end, rows, more = await self._run(collection, "scan", page, read_only=True)
            if rows:
                yield [doc for _, _, doc in rows]
                pos = (rows[-1][0], rows[-1][1])
            if not more:
                if end >= hi:
                    return
                pos = (end, "")

    async def count(self, collection: str) -> int:
        """The collection's exact document count: one fenced count per shard, gathered."""

        async def op(r: CollectionRoute, t: float) -> int:
            async def leg(shard_id: str, refs: list[Any]) -> int:
                return await (await self.shard(shard_id, t)).count_chunks(
                    collection, refs, timeout=t)

            counts = await asyncio.gather(*(leg(sid, [c.ref for c in chunks])
                                            for sid, chunks in r.by_shard().items()))
            return sum(counts)

        return await self._run(collection, "count", op, read_only=True)

    async def collections(self) -> list[CollectionSummary]:
        """Every collection the catalog holds, with its chunk statistics."""
        if self._closed:
            raise RouterClosedError("the router is closed")
        try:
            return await self.source.collections(timeout=self.settings.retry_deadline_s)
        except (TimeoutError, OSError, psycopg.OperationalError) as exc:
            raise RouteUnavailableError(f"the catalog cannot list collections: {exc}") from exc
