"""Running the router's HTTP service (``shardshift router serve``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI

from infra import telemetry
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.http import create_app
from settings import DEV_HTTP_TOKEN, Settings


class ServeConfigError(ValueError):
    """The service would start in an unsafe or impossible configuration; nothing started."""


log = logging.getLogger("shardshift.router")


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

    return create_app(factory, settings.router, open_metrics=settings.telemetry.metrics_open)


def is_loopback(host: str) -> bool:
    """Does ``host`` (a name or an address) listen only on this machine? Every address it
    resolves to must be a loopback one; an unresolvable name counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # not an address literal: a name, resolved below
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_serve_config(settings: Settings, host: str, tls_cert: Path | None,
                       tls_key: Path | None) -> None:
    """Refuse what must not serve: the development token off loopback, half a TLS pair, or
    TLS files that cannot be read. Raises ``ServeConfigError`` with what to do."""
    tokens = [t.get_secret_value() for t in settings.router.http_tokens]
    if DEV_HTTP_TOKEN in tokens and not is_loopback(host):
        raise ServeConfigError(
            f"refusing to serve on {host}: the router accepts the built-in development token "
            f"{DEV_HTTP_TOKEN!r}, which anyone can guess. Set your own tokens, e.g. "
            "SHARDSHIFT_ROUTER__HTTP_TOKENS='[\"<a long random secret>\"]' (a JSON list; "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes one), or "
            "serve on 127.0.0.1")
    if (tls_cert is None) != (tls_key is None):
        raise ServeConfigError("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ServeConfigError(f"TLS file {path} does not exist or is not a file")


def server_config(app: FastAPI, settings: Settings, host: str, port: int, *,
                  tls_cert: Path | None = None, tls_key: Path | None = None,
                  log_level: str = "warning", log_config: Any = None) -> Any:
    """The uvicorn configuration ``serve`` runs (checked with ``check_serve_config``)."""
    import uvicorn  # noqa: PLC0415 - only a process that serves HTTP loads the server

    check_serve_config(settings, host, tls_cert, tls_key)
    tls: dict[str, Any] = {}
    if tls_cert is not None and tls_key is not None:
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        server_header=False,  # do not advertise the server software
        timeout_keep_alive=5,
        # JSON lines: uvicorn's loggers propagate to the root handler instead of their own.
        **({} if log_config is None else {"log_config": log_config}),
        **tls,
    )


def serve(
    catalog_dsn: str, settings: Settings, host: str = "127.0.0.1", port: int = 8080, *,
    tls_cert: Path | None = None, tls_key: Path | None = None,
    metrics_port: int | None = None, log_format: Literal["text", "json"] | None = None,
) -> None:
    """Serve the API until interrupted; ``ServeConfigError`` (nothing started) for an unsafe
    setup. ``/metrics`` is on the API port (bearer token unless ``telemetry.metrics_open``);
    ``metrics_port`` (default ``telemetry.metrics_port``) also serves it, without a token, on
    its own port. ``log_format`` overrides the setting. The causes error bodies leave out
    (driver messages, hosts) go to this process's log."""
    import uvicorn  # noqa: PLC0415 - only a process that serves HTTP loads the server

    fmt = log_format or settings.telemetry.log_format
    config = server_config(build_app(catalog_dsn, settings), settings, host, port,
                           tls_cert=tls_cert, tls_key=tls_key,
                           log_config=None if fmt == "json" else uvicorn.config.LOGGING_CONFIG)
    telemetry.configure_logging(fmt)
    tel = telemetry.setup("shardshift-router", settings.telemetry)
    port_m = metrics_port if metrics_port is not None else settings.telemetry.metrics_port
    server = (telemetry.serve_metrics(tel, port_m, settings.telemetry.metrics_host)
              if port_m is not None else None)
    scheme = "https" if tls_cert else "http"
    log.info("router HTTP service on %s://%s:%d (OpenAPI: /docs)%s", scheme, host, port,
             f"; metrics on http://{server.host}:{server.port}/metrics" if server else "")
    try:
        uvicorn.Server(config).run()
    finally:
        if server is not None:
            server.close()
