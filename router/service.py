"""Running the router's HTTP service (``shardshift router serve``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.http import create_app
from settings import DEV_HTTP_TOKEN, Settings


class ServeConfigError(ValueError):
    """The service would start in an unsafe or impossible configuration; nothing started."""


def build_app(catalog_dsn: str, settings: Settings) -> FastAPI:
    """The HTTP app with a router that opens its own catalog connection at start-up."""
    def factory() -> Router:
        source = CatalogRouteSource.from_dsn(
            catalog_dsn, timeout_s=settings.router.catalog_timeout_s,
            check_interval_s=settings.router.listen_check_s)
        return Router(source, settings.router)

    return create_app(factory, settings.router)


def is_loopback(host: str) -> bool:
    """Does ``host`` (a name or an address) listen only on this machine? Every address it
    resolves to must be a loopback one; an unresolvable name counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
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
                  log_level: str = "warning") -> Any:
    """The uvicorn configuration ``serve`` runs (checked with ``check_serve_config``)."""
    import uvicorn  # noqa: PLC0415

    check_serve_config(settings, host, tls_cert, tls_key)
    tls: dict[str, Any] = {}
    if tls_cert is not None and tls_key is not None:
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        server_header=False,  # do not advertise the server software
        timeout_keep_alive=5,
        **tls,
    )


def serve(catalog_dsn: str, settings: Settings, host: str = "127.0.0.1", port: int = 8080, *,
          tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
    """Serve until interrupted. ``ServeConfigError`` (nothing started) for an unsafe setup."""
    import uvicorn  # noqa: PLC0415

    config = server_config(build_app(catalog_dsn, settings), settings, host, port,
                           tls_cert=tls_cert, tls_key=tls_key)
    if not logging.getLogger().handlers:
        # The causes error bodies leave out (driver messages, hosts) go to this log.
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(config).run()
