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
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from catalog import Catalog, CatalogError
from shards.postgres import PostgresShard
from shards.staging import Staging

T = TypeVar("T")


class MoveContext:
    """The catalog, shard engines (by catalog shard id) and staging area of a worker."""

    def __init__(self, catalog: Catalog, staging: Staging, *, max_threads: int = 64) -> None:
        self.catalog = catalog
        self.staging = staging
        self.executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="move")
        self._engines: dict[str, PostgresShard] = {}
        self._lock = asyncio.Lock()

    async def engine(self, shard_id: str) -> PostgresShard:
        engine = self._engines.get(shard_id)
        if engine is not None:
            return engine
        async with self._lock:
            engine = self._engines.get(shard_id)
            if engine is None:
                info = await self.catalog.shard(shard_id)
                engine = await PostgresShard(shard_id, info.address, max_size=4, check=True).open()
                self._engines[shard_id] = engine
            return engine

    async def dsn(self, shard_id: str) -> str:
        return (await self.engine(shard_id)).dsn

    async def close(self) -> None:
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


def catalog_failure(exc: CatalogError, what: str) -> BaseException:
    """Catalog errors: retryable ones propagate (Temporal retries), the rest stop the move."""
    if getattr(exc, "retryable", False):
        return exc
    return non_retryable(exc, what)
