"""What every migration activity needs, built once per worker (``worker.py``).

Activities are async methods: the catalog and the shard engines are async (pools on the
worker's event loop). Blocking data movement (export, import, the applier, checksums, range
delete) runs in the context's thread pool through ``run_blocking``, which heartbeats the
latest checkpoint every second and, when Temporal cancels the activity, tells the blocking
code to stop and waits for it before re-raising, so no thread outlives its activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.copy_seats import CopySeats
from catalog import Catalog, CatalogError
from settings import DatabaseSettings, get_settings
from shards.postgres import PostgresShard
from shards.staging import Staging

T = TypeVar("T")


class MoveContext:
    """The catalog, shard engines (by catalog shard id) and staging area of a worker."""

    def __init__(self, catalog: Catalog, staging: Staging, *, max_threads: int = 64,
                 address_ttl_s: float = 5.0, db: DatabaseSettings | None = None,
                 home_queue: str | None = None, seats: CopySeats | None = None,
                 import_streams: int | None = None) -> None:
        """Args:
            home_queue: this worker's own task queue (serving the same activities), where a
                move whose staging is private to this host runs its export and import.
            seats: this worker's copy seats (``activities.copy_seats``; default: unlimited,
                only counted).
            db: whom activities connect to shards as (``db.mover_user``; default: the
                process settings). The catalog's addresses say where.
            import_streams: parts a move's import loads at once (default: the process
                settings' ``fleet.import_streams``).
            address_ttl_s: a shard's address is re-read from the catalog (in the background)
                when it was last read longer ago than this, so a shard re-registered at a new
                address is followed within about that long.
        """
        self.catalog = catalog
        self.staging = staging
        self.home_queue = home_queue
        self.seats = seats or CopySeats()
        self.db = db or get_settings().db
        self.import_streams = import_streams or get_settings().fleet.import_streams
        self.executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="move")
        self.address_ttl_s = address_ttl_s
        self._engines: dict[str, PostgresShard] = {}
        self._address_read_at: dict[str, float] = {}
        self._address_checks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

    async def engine(self, shard_id: str) -> PostgresShard:
        engine = self._engines.get(shard_id)
        if engine is not None:
            self._check_address_soon(shard_id, engine)
            return engine
        async with self._lock:
            engine = self._engines.get(shard_id)
            if engine is None:
                info = await self.catalog.shard(shard_id)
                engine = await PostgresShard(shard_id, self.address(info.address), max_size=4,
                                             check=True).open()
                self._engines[shard_id] = engine
                self._address_read_at[shard_id] = asyncio.get_running_loop().time()
            return engine

    def _check_address_soon(self, shard_id: str, engine: PostgresShard) -> None:
        """Re-read the shard's address in the background when it is older than the TTL; the
        caller never waits for the catalog (it may be down: then the address we have stays)."""
        now = asyncio.get_running_loop().time()
        if (now - self._address_read_at.get(shard_id, now) < self.address_ttl_s
                or shard_id in self._address_checks):
            return
        self._address_read_at[shard_id] = now

        async def check() -> None:
            try:
                async with asyncio.timeout(self.address_ttl_s):
                    address = self.address((await self.catalog.shard(shard_id)).address)
            except Exception:  # noqa: BLE001 - keep the address we have
                return
            if address != engine.dsn:
                engine.set_dsn(address)  # new connections go there; nothing in flight breaks

        task = asyncio.create_task(check(), name=f"shard-address-{shard_id}")
        self._address_checks[shard_id] = task
        task.add_done_callback(lambda _: self._address_checks.pop(shard_id, None))

    def address(self, catalog_address: str) -> str:
        """A shard address from the catalog as the DSN activities use (the mover role)."""
        return self.db.mover(catalog_address)

    async def dsn(self, shard_id: str) -> str:
        return (await self.engine(shard_id)).dsn

    async def close(self) -> None:
        checks = list(self._address_checks.values())
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        engines, self._engines = list(self._engines.values()), {}
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def run_blocking(
        self,
        fn: Callable[[threading.Event], T],
        checkpoint: Callable[[], Any] | None = None,
        *,
        interval: float = 1.0,
    ) -> T:
        """Run ``fn(stop_event)`` in a thread, heartbeating ``checkpoint()`` meanwhile."""
        stop = threading.Event()
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, ctx.run, fn, stop)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=interval)
                if done:
                    return fut.result()
                activity.heartbeat(checkpoint() if checkpoint else None)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(fut)
            raise


class Stopped(Exception):
    """Raised inside blocking code when its activity was cancelled."""


def non_retryable(exc: BaseException, what: str) -> ApplicationError:
    """An error retrying cannot fix, with a message a person can act on."""
    return ApplicationError(f"{what}: {exc}", type=type(exc).__name__, non_retryable=True)


def raise_catalog_failure(exc: CatalogError, what: str) -> NoReturn:
    """Catalog errors: retryable ones propagate as they are (Temporal retries), the rest stop
    the move. It raises, rather than returning what to raise, so a retryable error is never
    made its own cause (``raise exc from exc``): Temporal's failure converter would recurse on
    that cycle until ``RecursionError`` and the activity could not even report its failure."""
    if getattr(exc, "retryable", False):
        raise exc
    raise non_retryable(exc, what) from exc
