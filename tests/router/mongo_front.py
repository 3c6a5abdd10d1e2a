"""The MongoDB front end on a thread of its own, so a synchronous driver (pymongo's
``MongoClient``) can talk to it from a test without blocking the loop that serves it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymongo import MongoClient

from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.mongo.server import MongoServer
from settings import DEV_MONGO_PASSWORD, DEV_MONGO_USER, RouterSettings


class MongoFront:
    """A router and its MongoDB front end, served from a background thread's event loop."""

    def __init__(self, catalog_reader_dsn: str, settings: RouterSettings,
                 index_ddl: Any = None, *, listen: bool = True) -> None:
        self.catalog_reader_dsn = catalog_reader_dsn
        self.index_ddl = index_ddl
        self.listen = listen
        """False: the router never hears of catalog changes (only fences tell it)."""
        self.settings = settings
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="mongo-front", daemon=True)
        self.router: Router | None = None
        self.server: MongoServer | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test by start()
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        source = CatalogRouteSource.from_dsn(self.catalog_reader_dsn, listen=self.listen)
        async with Router(source, self.settings) as router:
            self.router = router
            self.server = await MongoServer(router, self.settings,
                                         index_ddl=self.index_ddl).start("127.0.0.1", 0)
            self.port = self.server.port
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.close()

    def start(self, timeout: float = 30.0) -> MongoFront:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the MongoDB front end did not start")
        if self._error is not None:
            raise RuntimeError("the MongoDB front end failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def uri(self, user: str = DEV_MONGO_USER, password: str = DEV_MONGO_PASSWORD) -> str:
        return f"mongodb://{user}:{password}@127.0.0.1:{self.port}/?authSource=admin"

    def client(self, **kw: Any) -> MongoClient[dict[str, Any]]:
        """A pymongo client, authenticated as the development user unless told otherwise."""
        kw.setdefault("serverSelectionTimeoutMS", 5000)
        kw.setdefault("tz_aware", True)
        kw.setdefault("uuidRepresentation", "standard")
        return MongoClient(self.uri(), **kw)

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the front end's loop (e.g. a router call) from the test."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def mongo_front(catalog_reader_dsn: str, settings: RouterSettings,
                index_ddl: Any = None, *, listen: bool = True) -> Iterator[MongoFront]:
    front = MongoFront(catalog_reader_dsn, settings, index_ddl, listen=listen).start()
    try:
        yield front
    finally:
        front.stop()
