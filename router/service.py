"""Running the router's HTTP service (``shardshift router serve``)."""

from __future__ import annotations

from fastapi import FastAPI

from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.http import create_app
from settings import Settings


def build_app(catalog_dsn: str, settings: Settings) -> FastAPI:
    """The HTTP app with a router that opens its own catalog connection at start-up.

    The router is the internet-facing process, so it connects with the least it needs: the
    catalog as ``settings.db.catalog_reader_user`` (read-only, LISTEN) and shards as
    ``settings.db.router_user`` (routed DML, fence reads), whatever user ``catalog_dsn``
    names."""
    def factory() -> Router:
        source = CatalogRouteSource.from_dsn(
            settings.db.catalog_reader(catalog_dsn), timeout_s=settings.router.catalog_timeout_s,
            check_interval_s=settings.router.listen_check_s, db=settings.db)
        return Router(source, settings.router)

    return create_app(factory, settings.router)


def serve(catalog_dsn: str, settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(build_app(catalog_dsn, settings), host=host, port=port, log_level="warning")
