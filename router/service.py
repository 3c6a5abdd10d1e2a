"""Running the router's HTTP service (``shardshift router serve``)."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import FastAPI

from infra import telemetry
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.http import create_app
from settings import Settings

log = logging.getLogger("shardshift.router")


def build_app(catalog_dsn: str, settings: Settings) -> FastAPI:
    """The HTTP app with a router that opens its own catalog connection at start-up."""
    def factory() -> Router:
        source = CatalogRouteSource.from_dsn(
            catalog_dsn, timeout_s=settings.router.catalog_timeout_s,
            check_interval_s=settings.router.listen_check_s)
        return Router(source, settings.router)

    return create_app(factory, settings.router, open_metrics=settings.telemetry.metrics_open)


def serve(
    catalog_dsn: str, settings: Settings, host: str = "127.0.0.1", port: int = 8080, *,
    metrics_port: int | None = None, log_format: Literal["text", "json"] | None = None,
) -> None:
    """Serve the API until interrupted. ``/metrics`` is on the API port (bearer token unless
    ``telemetry.metrics_open``); ``metrics_port`` (default ``telemetry.metrics_port``) also
    serves it, without a token, on its own port. ``log_format`` overrides the setting."""
    import uvicorn  # noqa: PLC0415

    fmt = log_format or settings.telemetry.log_format
    telemetry.configure_logging(fmt)
    tel = telemetry.setup("shardshift-router", settings.telemetry)
    port_m = metrics_port if metrics_port is not None else settings.telemetry.metrics_port
    server = (telemetry.serve_metrics(tel, port_m, settings.telemetry.metrics_host)
              if port_m is not None else None)
    log.info("router HTTP service on http://%s:%d (OpenAPI: /docs)%s", host, port,
             f"; metrics on http://{server.host}:{server.port}/metrics" if server else "")
    try:
        # JSON lines: uvicorn's loggers propagate to the root handler instead of their own.
        uvicorn.run(build_app(catalog_dsn, settings), host=host, port=port,
                    log_level="warning", log_config=None if fmt == "json" else uvicorn.config.LOGGING_CONFIG)
    finally:
        if server is not None:
            server.close()
