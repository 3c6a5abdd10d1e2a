"""Running the router's services (``shardshift router serve``): the HTTP/JSON API and, with
``--mongo-port``, the MongoDB wire protocol, both over one ``Router`` in one process."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI

from infra import telemetry
from infra.heap import settle_heap
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.http import create_app
from router.mongo.index_ddl import IndexDdl
from router.mongo.server import MongoServer
from settings import DEV_HTTP_TOKEN, DEV_MONGO_PASSWORD, DEV_MONGO_USER, Settings


class ServeConfigError(ValueError):
    """The service would start in an unsafe or impossible configuration; nothing started."""


log = logging.getLogger("shardshift.router")


def build_router(catalog_dsn: str, settings: Settings) -> Router:
    """A router that opens its own catalog connection when started.

    The router is the internet-facing process, so it connects with the least it needs: the
    catalog as ``settings.db.catalog_reader_user`` (read-only, LISTEN) and shards as
    ``settings.db.router_user`` (routed DML, fence reads), whatever user ``catalog_dsn``
    names."""
    source = CatalogRouteSource.from_dsn(
        settings.db.catalog_reader(catalog_dsn), timeout_s=settings.router.catalog_timeout_s,
        check_interval_s=settings.router.listen_check_s, db=settings.db)
    return Router(source, settings.router)


def build_app(catalog_dsn: str, settings: Settings) -> FastAPI:
    """The HTTP app with a router of its own (started and closed with the app)."""
    return create_app(lambda: build_router(catalog_dsn, settings), settings.router,
                      open_metrics=settings.telemetry.metrics_open)


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
                       tls_key: Path | None, *, mongo: bool = False) -> None:
    """Refuse what must not serve: the development token (or, with ``mongo``, the
    development MongoDB user) off loopback, half a TLS pair, or TLS files that cannot be read.
    Raises ``ServeConfigError`` with what to do."""
    if mongo and not is_loopback(host):
        dev = [u.name for u in settings.router.mongo_users
               if u.name == DEV_MONGO_USER or u.password.get_secret_value() == DEV_MONGO_PASSWORD]
        if dev:
            raise ServeConfigError(
                f"refusing to serve the MongoDB protocol on {host}: it accepts the built-in "
                f"development user {DEV_MONGO_USER!r} (or its password), which anyone can "
                "guess. Set your own users, e.g. SHARDSHIFT_ROUTER__MONGO_USERS='[{\"name\": "
                "\"app\", \"password\": \"<a long random secret>\"}]', or serve on 127.0.0.1")
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


def tls_context(tls_cert: Path | None, tls_key: Path | None) -> ssl.SSLContext | None:
    """The server-side TLS context of the MongoDB front end (None without a certificate)."""
    if tls_cert is None or tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls_cert), str(tls_key))
    return ctx


def serve(
    catalog_dsn: str, settings: Settings, host: str = "127.0.0.1", port: int = 8080, *,
    tls_cert: Path | None = None, tls_key: Path | None = None,
    metrics_port: int | None = None, log_format: Literal["text", "json"] | None = None,
    mongo_port: int | None = None, index_ddl: IndexDdl | None = None,
) -> None:
    """Serve the API until interrupted (``index_ddl``: who runs the MongoDB front end's
    index changes, see ``router.mongo.index_ddl``); ``ServeConfigError`` (nothing started) for an unsafe
    setup. ``/metrics`` is on the API port (bearer token unless ``telemetry.metrics_open``);
    ``metrics_port`` (default ``telemetry.metrics_port``) also serves it, without a token, on
    its own port. ``log_format`` overrides the setting. The causes error bodies leave out
    (driver messages, hosts) go to this process's log."""
    import uvicorn  # noqa: PLC0415 - only a process that serves HTTP loads the server

    fmt = log_format or settings.telemetry.log_format
    check_serve_config(settings, host, tls_cert, tls_key, mongo=mongo_port is not None)
    router = build_router(catalog_dsn, settings) if mongo_port is not None else None
    app = (create_app(router, settings.router, open_metrics=settings.telemetry.metrics_open)
           if router is not None else build_app(catalog_dsn, settings))
    config = server_config(app, settings, host, port,
                           tls_cert=tls_cert, tls_key=tls_key,
                           log_config=None if fmt == "json" else uvicorn.config.LOGGING_CONFIG)
    telemetry.configure_logging(fmt)
    tel = telemetry.setup("shardshift-router", settings.telemetry)
    port_m = metrics_port if metrics_port is not None else settings.telemetry.metrics_port
    server = (telemetry.serve_metrics(tel, port_m, settings.telemetry.metrics_host)
              if port_m is not None else None)
    scheme = "https" if tls_cert else "http"
    settle_heap("router")  # everything is imported and built: start-up is over
    log.info("router HTTP service on %s://%s:%d (OpenAPI: /docs)%s", scheme, host, port,
             f"; metrics on http://{server.host}:{server.port}/metrics" if server else "")
    try:
        if router is None or mongo_port is None:
            uvicorn.Server(config).run()
        else:
            # uvicorn picks uvloop for the HTTP-only service; serving both, pick it here too
            # (both protocols' hot paths run on this loop).
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(_serve_both(router, uvicorn.Server(config), settings, host,
                                       mongo_port, tls_context(tls_cert, tls_key), index_ddl))
    finally:
        if server is not None:
            server.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415 - optional at import time; only a serving process needs it
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve_both(router: Router, http: Any, settings: Settings, host: str,
                      mongo_port: int, ssl_context: ssl.SSLContext | None,
                      index_ddl: IndexDdl | None = None) -> None:
    """The HTTP service and the MongoDB front end over one router, until interrupted."""
    await router.start()
    mongo = MongoServer(router, settings.router, ssl_context=ssl_context, index_ddl=index_ddl)
    try:
        await mongo.start(host, mongo_port)
        log.info("router MongoDB front end on %s:%d%s (database %r)", host, mongo.port,
                 " (TLS)" if ssl_context else "", settings.router.mongo_database)
        await http.serve()
    finally:
        await mongo.close()
        await router.close()
