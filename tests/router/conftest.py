"""Router fixtures: a provisioned collection on the session stack and a router over it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.models import ChunkMap
from infra.passfile import add_alias
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import RouterSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from tests.conftest import SESSION_CATALOGS


@pytest.fixture(scope="session")
async def router_catalog(catalog_dsn: str) -> AsyncIterator[Catalog]:
    cat = Catalog(catalog_dsn, max_size=16)
    await cat.open()
    await cat.ensure_schema()
    SESSION_CATALOGS.append(cat)
    try:
        yield cat
    finally:
        SESSION_CATALOGS.remove(cat)
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
            # A test may have re-registered a shard at another address (a proxy it closed):
            # leave the catalog naming reachable servers, as later tests (and doctor) expect.
            for sid, dsn in zip(ids, pg18_dsns[:3], strict=True):
                await router_catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
        finally:
            for s in shards.values():
                await s.close()
            await s.close()


def router_settings(**kw: object) -> RouterSettings:
    return RouterSettings(**{"retry_deadline_s": 5.0, "pool_max_size": 4, **kw})


@pytest.fixture
async def router(deployment: Deployment, catalog_reader_dsn: str) -> AsyncIterator[Router]:
    """A router as deployed: the catalog read-only, shards as the router role."""
    source = CatalogRouteSource.from_dsn(catalog_reader_dsn)
    async with Router(source, router_settings()) as r:
        yield r


# -- a TCP proxy for network faults ------------------------------------------------------------


class TcpProxy:
    """A TCP proxy in front of one server, run on the test's event loop, that injects the
    network faults a mock cannot: an address that stops answering (``close``), connections
    that go silent without a FIN or RST (``freeze``: a NAT or firewall forgot them), and a
    reply lost after the server committed (``hold_next_reply`` + ``cut``).

    A real network element between real processes: the router and PostgreSQL are unchanged.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._links: list[_Link] = []
        self._hold = False
        self.reply_held = asyncio.Event()
        self._cut = asyncio.Event()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def dsn(self, real_dsn: str) -> str:
        """``real_dsn`` with this proxy's port (the passfile learns the proxy's port, so every
        role's password works through it)."""
        params = conninfo_to_dict(real_dsn)
        if params.get("passfile"):
            add_alias(Path(params["passfile"]), params.get("host", "127.0.0.1"),
                      params["port"], self.port)
        params["port"] = str(self.port)
        return make_conninfo(**params)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        link = _Link(writer, up_w)
        self._links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_w, link, upstream=True)),
            asyncio.create_task(self._pump(up_r, writer, link, upstream=False)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link,
                    *, upstream: bool) -> None:
        try:
            while data := await src.read(65536):
                if upstream and b"LISTEN " in data:
                    link.listener = True
                if not upstream and self._hold:
                    self._hold = False
                    self.reply_held.set()
                    await self._cut.wait()  # the reply never reaches the client
                    link.abort()
                    return
                await link.unfrozen.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if link.unfrozen.is_set():
                link.abort()

    def freeze(self, *, listeners_only: bool = False) -> int:
        """Stop forwarding on existing connections (no FIN, no RST); the number frozen."""
        frozen = 0
        for link in self._links:
            if not listeners_only or link.listener:
                link.unfrozen.clear()
                frozen += 1
        return frozen

    def hold_next_reply(self) -> None:
        """The next bytes a server sends on any connection are held until ``cut``."""
        self.reply_held.clear()
        self._cut.clear()
        self._hold = True

    def cut(self) -> None:
        """Drop the connection whose reply is held, without delivering it."""
        self._cut.set()

    async def close(self) -> None:
        """Stop listening and reset every connection: the address is gone."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._cut.set()
        for link in self._links:
            link.abort()
        for link in self._links:
            for t in link.tasks:
                t.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.clear()


class _Link:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.listener = False
        self.unfrozen = asyncio.Event()
        self.unfrozen.set()
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        self.unfrozen.set()
        self.client.transport.abort()
        self.server.transport.abort()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[str], Awaitable[TcpProxy]]]:
    """A factory of TCP proxies to the server of a DSN; all closed at the end of the test."""
    made: list[TcpProxy] = []

    async def make(dsn: str) -> TcpProxy:
        proxy = await TcpProxy(int(conninfo_to_dict(dsn)["port"])).start()
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for p in made:
            await p.close()


class CountingSource:
    """A real ``CatalogRouteSource`` that also counts the changes the router has *handled*
    (the router asks for the next change only after handling the previous one)."""

    def __init__(self, inner: CatalogRouteSource) -> None:
        self.inner = inner
        self.handled = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def changes(self) -> AsyncIterator[str | None]:
        async for change in self.inner.changes():
            yield change
            self.handled += 1

    async def wait_handled(self, n: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while self.handled < n:
                await asyncio.sleep(0.01)


# -- the MongoDB front end ------------------------------------------------------------------------


@pytest.fixture
def mongo(deployment: Deployment, catalog_reader_dsn: str) -> Any:
    """The deployment's collection behind the MongoDB front end (pymongo: ``mongo.client()``)."""
    from tests.router.mongo_front import mongo_front

    with mongo_front(catalog_reader_dsn, router_settings()) as front:
        yield front
