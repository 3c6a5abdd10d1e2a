"""The router as an HTTP/JSON service, for applications in any language.

Values are MongoDB Extended JSON: requests may use canonical or relaxed form (``{"$oid": ...}``,
``{"$numberDecimal": "12.50"}``); responses are canonical, so an int64, a Decimal128 or an
ObjectId comes back as exactly what was stored.

Every ``/v1`` endpoint needs ``Authorization: Bearer <token>`` with a token from
``RouterSettings.http_tokens``; a missing or wrong token gets 401 before the request's body is
read and before anything reaches a shard. ``/healthz`` (the process is alive), ``/readyz``
(the catalog answers) and the API description (``/openapi.json``, ``/docs``) are open. The
service starts whether or not the catalog answers; until it does, ``/readyz`` is 503.

Every error, whatever its status, has one shape: ``{"error": "<what happened and what to
do>", "type": "<kind>"}``, plus ``"details"`` (the fields at fault) for 422. Error bodies
never name a host, a port, a database user or a driver's message; the full cause goes to the
server's log.

Limits per request: a body over ``max_document_bytes * 2 + 64 KiB`` gets 413 as soon as it
passes the limit (declared length or chunked), a request that takes longer than
``http_request_timeout_s`` gets 504 (408 when its body did not arrive in that time), more than
``http_max_in_flight`` requests at once get 503, and a ``find`` returns at most
``find_max_result_bytes`` of documents (then ``"truncated": true``).

``/metrics`` (Prometheus text format) needs the token too, unless the app is created with
``open_metrics``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from http import HTTPStatus
from typing import Any

from bson import json_util
from bson.errors import BSONError
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra import telemetry
from router import metrics
from router.core import Router
from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    OutcomeUnknownError,
    RetryDeadlineExceeded,
    RouterClosedError,
    UnknownCollectionError,
)
from settings import RouterSettings
from shards.codec import JSON_OPTIONS
from shards.errors import DuplicateDocumentError, InvalidDocumentError, InvalidNameError

log = logging.getLogger(__name__)

_hook = partial(json_util.object_hook, json_options=JSON_OPTIONS)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
"""Paths served without a token: health and the API description (no data)."""


_SCALARS = (str, int, float, bool, type(None))


def from_ejson(value: Any) -> Any:
    """Extended JSON (already parsed as plain JSON) to BSON-typed Python values."""
    if isinstance(value, _SCALARS):
        return value  # only an object can be an Extended JSON wrapper: a scalar is itself
    try:
        return json.loads(json.dumps(value), object_hook=_hook)
    except (ValueError, TypeError, KeyError, ArithmeticError, RecursionError, BSONError) as exc:
        # ArithmeticError: a $date out of range, a $numberDecimal that is no number;
        # BSONError: a bad $oid.
        raise BadRequestError(f"invalid Extended JSON: {exc}") from exc


def ejson_response(payload: Any, status_code: int = 200) -> Response:
    return Response(
        content=json_util.dumps(payload, json_options=JSON_OPTIONS),
        media_type="application/json",
        status_code=status_code,
    )


_DOCUMENT_NONE = b'{"document": null}'
GET_PATH = "/v1/collections/{collection}/get"


def max_body_bytes(settings: RouterSettings) -> int:
    """The largest request body taken: a document at the size limit, in Extended JSON."""
    return settings.max_document_bytes * 2 + 64 * 1024


# -- the one error shape ----------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error response, whatever its status."""

    error: str = Field(description="What happened and what to do; never a host, port or user")
    type: str = Field(description="The kind of error (stable, for programs)")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="422 only: each field at fault ({loc, msg, type})")


def error_body(kind: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    body: dict[str, Any] = {"error": message, "type": kind}
    if details is not None:
        body["details"] = details
    return json.dumps(body).encode()


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                   details: list[dict[str, Any]] | None = None) -> Response:
    return Response(error_body(kind, message, details), status_code=status,
                    media_type="application/json", headers=headers)


async def _send_error(send: Send, status: int, kind: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
    """An error response straight onto the ASGI channel (no app involved); the connection is
    closed after it, as the request's body may still be unread."""
    body = error_body(kind, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- the guard in front of the app ------------------------------------------------------------


def _bearer_token(scope: Scope) -> bytes | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())  # ASGI: raw byte pairs
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


_HTTP_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
"""Methods named as they are in ``http.request.method``; any other is ``_OTHER`` (OpenTelemetry's
HTTP conventions, as FastAPI's telemetry had it; ``OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS``
overrides the set)."""


def _known_methods() -> frozenset[str]:
    listed = os.getenv("OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS", "").strip()
    if not listed:
        return _HTTP_METHODS
    return frozenset(m.strip() for m in listed.split(",") if m.strip())


def _exception_type(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class _Exchange:
    """One request's state in the guard: what was answered, and whether the body was replayed.
    One object per request, with no closures: ``send`` and ``receive`` are its bound methods."""

    __slots__ = ("_receive", "_send", "body", "disconnected", "replayed", "status")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.status: int | None = None
        self.body = b""
        self.replayed = False
        self.disconnected = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    async def receive(self) -> Message:
        if not self.replayed:
            self.replayed = True
            body, self.body = self.body, b""
            return {"type": "http.request", "body": body, "more_body": False}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message


FastPath = Callable[[Scope, _Exchange], Awaitable[bool]]
"""Answers a request the guard has admitted and whose body it has read (``_Exchange.body``)
without the app, when it can: True if it did (see ``create_app``'s ``fast_get``)."""


class RequestGuard:
    """Pure ASGI middleware that bounds what one request may cost before the app sees it,
    and records the request's duration (``http.server.request.duration``, once per request)
    and the requests in flight (``http.server.active_requests``).

    In order: a path outside ``OPEN_PATHS`` without a valid bearer token -> 401 (nothing of
    the body read); more than ``max_in_flight`` authorized requests at once -> 503; a declared
    length over ``max_body`` -> 413 (nothing read); the body is then read up to ``max_body``
    (chunked or not: one byte over -> 413, the rest never read) within the request's time
    limit (else 408), and replayed to the app, which must answer within what is left of it
    (else 504). Responses it makes itself close the connection. ``fast``, when given, may
    answer an admitted request in the app's place (in the same time limit).
    """

    def __init__(self, app: ASGIApp, *, tokens: list[bytes], max_body: int, time_limit_s: float,
                 max_in_flight: int, fast: FastPath | None = None) -> None:
        self.app = app
        self.fast = fast
        self.tokens = tokens
        self.max_body = max_body
        self.time_limit_s = time_limit_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._methods = _known_methods()
        self._attributes: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._route_paths: dict[Any, str] | None = None

    def _authorized(self, scope: Scope) -> bool:
        given = _bearer_token(scope) or b""
        # Compare with every token so the time taken does not reveal which one matched.
        ok = False
        for t in self.tokens:
            ok |= secrets.compare_digest(given, t)
        return ok and bool(given)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        if method not in self._methods:
            method = "_OTHER"
        active = (method, scope.get("scheme", "http"))
        metrics.http_active[active] = metrics.http_active.get(active, 0) + 1
        ex = _Exchange(receive, send)
        error: BaseException | None = None
        try:
            await self._checked(scope, ex)
        except BaseException as exc:
            error = exc
            raise
        finally:
            metrics.http_active[active] -= 1
            self._record(scope, active, ex, error, time.perf_counter() - started)

    def _record(self, scope: Scope, active: tuple[str, str], ex: _Exchange,
                error: BaseException | None, seconds: float) -> None:
        """One histogram record; the attribute sets are made once per distinct kind of
        request (method, route, status, ...) and reused."""
        status = ex.status
        if status is None and error is not None:
            status = 500  # the app raised before answering: the server's error handler answers
        if error is not None:
            failure = _exception_type(error)
        elif status is None:
            failure = "ConnectionError" if ex.disconnected else "RuntimeError"
        elif status >= 500:
            failure = str(status)
        else:
            failure = None
        route = self._route(scope)
        key = (active, route, status, failure, scope.get("http_version"))
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {"url.scheme": active[1], "http.request.method": active[0]}
            if key[4]:
                attributes["network.protocol.version"] = key[4]
            if route is not None:
                attributes["http.route"] = route
            if status is not None:
                attributes["http.response.status_code"] = status
            if failure is not None:
                attributes["error.type"] = failure
            if len(self._attributes) < 10_000:  # bounded whatever clients send
                self._attributes[key] = attributes
        metrics.http_duration.record(seconds, attributes)

    def _route(self, scope: Scope) -> str | None:
        """The path template of the route that served the request (``http.route``), if any."""
        route = scope.get("route")
        if route is not None:
            path = getattr(route, "path_format", None)
            if isinstance(path, str):
                return path
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return None
        if self._route_paths is None:
            app = scope.get("app")
            self._route_paths = {
                getattr(r, "endpoint", None): r.path_format
                for r in getattr(app, "routes", ()) if hasattr(r, "path_format")}
        return self._route_paths.get(endpoint)

    async def _checked(self, scope: Scope, ex: _Exchange) -> None:
        if scope["path"] in OPEN_PATHS:
            await self._guarded(scope, ex)
            return
        if not self._authorized(scope):
            await _send_error(ex.send, 401, "Unauthorized", "missing or invalid bearer token",
                              {"WWW-Authenticate": "Bearer"})
            return
        if self.in_flight >= self.max_in_flight:
            await _send_error(ex.send, 503, "Overloaded",
                              f"more than {self.max_in_flight} requests in flight; retry later",
                              {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, ex)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, ex: _Exchange) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_body):
                await _send_error(ex.send, 413, "RequestTooLarge",
                                  f"request body over {self.max_body} bytes")
                return
        loop = asyncio.get_running_loop()
        chunks: list[bytes] = []
        size = 0
        receive = ex._receive
        in_app = False
        try:
            # One deadline for the body and the app (one timer per request).
            async with asyncio.timeout_at(loop.time() + self.time_limit_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        ex.disconnected = True
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        await _send_error(ex.send, 413, "RequestTooLarge",
                                          f"request body over {self.max_body} bytes")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                ex.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                del chunks
                in_app = True
                if self.fast is None or not await self.fast(scope, ex):
                    await self.app(scope, ex.receive, ex.send)
        except TimeoutError:
            if not in_app:
                await _send_error(ex.send, 408, "RequestTimeout",
                                  f"the request body did not arrive within {self.time_limit_s:g}s")
                return
            log.warning("%s %s exceeded the request time limit (%gs)", scope["method"],
                        scope["path"], self.time_limit_s)
            if ex.status is None:
                await _send_error(
                    ex.send, 504, "RequestTimeout",
                    f"the request took longer than {self.time_limit_s:g}s and was stopped; a "
                    "write may or may not have been applied (read to find out)")


# -- the app ----------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InsertBody(_Body):
    document: dict[str, Any] = Field(description="The document (Extended JSON), with _id and the shard key")


class ReplaceBody(_Body):
    document: dict[str, Any]
    key: Any = Field(default=None, description="Optional: the shard key the document has now")


class KeyIdBody(_Body):
    key: Any = Field(description="The document's shard key value (Extended JSON)")
    id: Any = Field(description="The document's _id (Extended JSON)")


class PatchBody(_Body):
    key: Any
    id: Any
    update: dict[str, dict[str, Any]] = Field(description="{$set|$unset|$inc: {path: value}}")


class FindBody(_Body):
    filter: dict[str, Any] = Field(description="{field: value}: the shard key or an indexed field")
    limit: int = Field(default=100, ge=1, le=10_000)


def _e(description: str) -> dict[str, Any]:
    return {"description": description, "model": ErrorBody}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _e("bad request; nothing was written"),
    401: _e("missing or invalid bearer token (checked before the body is read)"),
    404: _e("unknown collection"),
    408: _e("the request body did not arrive within the request time limit"),
    413: _e("request body or document too large; nothing was written"),
    422: _e("the body does not match the schema (malformed JSON, a missing or unknown field); "
            "nothing was written"),
    502: _e("a write's shard connection broke after it was sent: it may or may not have been "
            "applied (read to find out)"),
    503: _e("unavailable past the retry deadline (chunk frozen, shard down, catalog needed and "
            "down), the router closing, or too many requests in flight; nothing was written; "
            "see Retry-After"),
    504: _e("the request took longer than the request time limit and was stopped; a write may "
            "or may not have been applied (read to find out)"),
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"


def create_app(
    router_factory: Callable[[], Router] | Router, settings: RouterSettings | None = None,
    *, open_metrics: bool = False,
) -> FastAPI:
    """The HTTP app over one ``Router`` (started and closed with the app when a factory)."""
    settings = settings or RouterSettings()
    tokens = [t.get_secret_value().encode() for t in settings.http_tokens]
    state: dict[str, Router] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(router_factory, Router):
            state["router"] = router_factory
            yield
            return
        router = router_factory()
        await router.start()  # does not wait for the catalog: /readyz tells when it answers
        state["router"] = router
        probe = asyncio.create_task(_first_ping(router), name="router-first-ping")
        try:
            yield
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await router.close()

    app = FastAPI(
        title="shardshift router",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        # The request metrics are the guard's (one record per request, the same names); FastAPI
        # still traces requests when a tracer provider is configured (an OTLP endpoint).
        telemetry={"metrics": False},
    )
    get_route: list[Any] = []  # the APIRoute of POST .../get (found on first use)

    def handler_for(exc: Exception) -> Callable[..., Any] | None:
        """The exception handler the app's ``ExceptionMiddleware`` would call for ``exc``
        (none for the catch-all ``Exception``: that one is the server error middleware's,
        outside the guard, which answers 500 after the exception has passed the guard)."""
        for cls in type(exc).__mro__:
            if cls is Exception or cls is BaseException:
                return None
            handler = app.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None

    async def fast_get(scope: Scope, ex: _Exchange) -> bool:
        """``POST /v1/collections/{collection}/get`` with a JSON body of exactly ``key``
        and ``id``, answered without FastAPI's routing, dependencies and body model (a
        third of the service's CPU per get): the same router call, the same response bytes,
        the same error responses (the app's exception handlers, looked up as its
        ``ExceptionMiddleware`` does), the same ``http.route`` in the request metrics. Any
        other request, or one this is not sure of (another content type, a body that is not
        such an object, a tracer or logger observing requests through FastAPI's
        telemetry), is left to the app: False, nothing sent."""
        path: str = scope["path"]
        if (scope["method"] != "POST" or not path.startswith("/v1/collections/")
                or not path.endswith("/get") or scope.get("root_path")
                or scope.get("fastapi.telemetry") is not None):
            return False
        collection = path[16:-4]
        if not collection or "/" in collection:
            return False
        for name, value in scope["headers"]:
            if name == b"content-type":
                if value != b"application/json":
                    return False
                break
        else:
            return False
        try:
            data = json.loads(ex.body)
        except (ValueError, RecursionError):
            return False  # the app answers it (422), as always
        if type(data) is not dict or len(data) != 2 or "key" not in data or "id" not in data:
            return False
        if not get_route:
            get_route.extend(r for r in app.routes
                             if getattr(r, "path_format", None) == GET_PATH)
        scope["route"] = get_route[0]  # http.route, as routing would have set it
        scope["path_params"] = {"collection": collection}
        response: Response
        try:
            text = await router().get_text(collection, from_ejson(data["key"]),
                                           from_ejson(data["id"]))
        except Exception as exc:
            handler = handler_for(exc)
            if handler is None:
                raise
            answer = handler(Request(scope, ex.receive), exc)
            response = await answer if inspect.isawaitable(answer) else answer
        else:
            response = Response(content=_DOCUMENT_NONE if text is None
                                else b'{"document": ' + text.encode() + b"}",
                                media_type="application/json")
        await response(scope, ex.receive, ex.send)
        return True

    app.add_middleware(
        RequestGuard, tokens=tokens, max_body=max_body_bytes(settings),
        time_limit_s=settings.http_request_timeout_s, max_in_flight=settings.http_max_in_flight,
        fast=fast_get,
    )
    bearer = HTTPBearer(auto_error=False)

    async def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        # async: FastAPI runs a plain ``def`` dependency in a worker thread, per request.
        # The guard has checked the token before the body was read; this documents the scheme
        # in the OpenAPI description and holds if the app is ever mounted without the guard.
        given = creds.credentials.encode() if creds else b""
        ok = False
        for t in tokens:
            ok |= secrets.compare_digest(given, t)
        if not (creds and ok):
            raise _Unauthorized()

    def router() -> Router:
        if "router" not in state and isinstance(router_factory, Router):
            state["router"] = router_factory
        return state["router"]

    Auth = Depends(authorize)

    def _err(status: int, exc: Exception, **headers: str) -> Response:
        if status >= 500:
            # The client's message names shards and collections only; the cause (a driver's
            # message with hosts and ports) is for the operator.
            log.warning("%d %s: %s", status, type(exc).__name__, exc, exc_info=exc)
        return error_response(status, type(exc).__name__, str(exc), headers or None)

    def _retry_after(exc: Exception) -> str:
        return str(max(1, math.ceil(getattr(exc, "retry_after_s", 1.0))))

    app.add_exception_handler(_Unauthorized, lambda _r, _e: error_response(
        401, "Unauthorized", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}))
    app.add_exception_handler(UnknownCollectionError, lambda _r, e: _err(404, e))
    app.add_exception_handler(DocumentTooLargeError, lambda _r, e: _err(413, e))
    app.add_exception_handler(BadRequestError, lambda _r, e: _err(400, e))
    app.add_exception_handler(InvalidDocumentError, lambda _r, e: _err(400, e))
    app.add_exception_handler(InvalidNameError, lambda _r, e: _err(400, e))
    app.add_exception_handler(DuplicateDocumentError, lambda _r, e: _err(409, e))
    # Unavailable (a chunk frozen past the deadline, a shard down, the catalog needed and
    # down): nothing was written, retry after the advertised delay. The messages name shards
    # and collections, never hosts or ports.
    app.add_exception_handler(RetryDeadlineExceeded, lambda _r, e: _err(
        503, e, **{"Retry-After": _retry_after(e)}))
    app.add_exception_handler(RouterClosedError, lambda _r, e: _err(503, e, **{"Retry-After": "1"}))
    # The write was sent and the connection broke: it may or may not have been applied.
    app.add_exception_handler(OutcomeUnknownError, lambda _r, e: _err(502, e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        # Each error's location, message and type; never the input echoed back (it may be a
        # multi-megabyte document).
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))} for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(422, "ValidationError",
                              f"the request does not match the schema: {where}: {first['msg']}",
                              details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        # Routing answers (no such path: 404, wrong method: 405) in the same shape.
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, _phrase(exc.status_code), message,
                              dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "InternalError",
                               "internal error; the cause is in the router's log")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"],
             responses={503: _e("not ready: the catalog does not answer")})
    async def readyz() -> Response:
        try:
            await router().source.ping()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            # This endpoint is open, and a driver's message names the host: the log gets it.
            log.warning("readyz: the catalog does not answer: %s: %s", type(exc).__name__, exc)
            return error_response(503, "NotReady", "not ready: the catalog does not answer",
                                  {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], include_in_schema=False,
             dependencies=[] if open_metrics else [Auth])
    async def metrics() -> Response:
        body, content_type = telemetry.exposition()
        return Response(content=body, media_type=content_type)

    @app.post("/v1/collections/{collection}/insert", dependencies=[Auth],
              responses={**ERRORS, 409: _e("duplicate shard key and _id")},
              status_code=201)
    async def insert(collection: str, body: InsertBody) -> Response:
        doc = from_ejson(body.document)
        await router().insert(collection, doc)
        return ejson_response({"inserted": True, "id": doc.get("_id")}, 201)

    @app.post(GET_PATH, dependencies=[Auth], responses=ERRORS)
    async def get(collection: str, body: KeyIdBody) -> Response:
        # Usually answered by the guard's fast path (``fast_get``), the same way.
        text = await router().get_text(collection, from_ejson(body.key), from_ejson(body.id))
        # The stored canonical Extended JSON as it is (see shards.codec.canonical_text).
        return Response(content=_DOCUMENT_NONE if text is None
                        else b'{"document": ' + text.encode() + b"}",
                        media_type="application/json")

    @app.post("/v1/collections/{collection}/replace", dependencies=[Auth], responses=ERRORS)
    async def replace(collection: str, body: ReplaceBody) -> Response:
        doc = from_ejson(body.document)
        kwargs = {"key": from_ejson(body.key)} if "key" in body.model_fields_set else {}
        matched = await router().replace(collection, doc, **kwargs)
        return ejson_response({"matched": matched})

    @app.post("/v1/collections/{collection}/patch", dependencies=[Auth], responses=ERRORS)
    async def patch(collection: str, body: PatchBody) -> Response:
        doc = await router().patch(
            collection, from_ejson(body.key), from_ejson(body.id), from_ejson(body.update)
        )
        return ejson_response({"document": doc})

    @app.post("/v1/collections/{collection}/delete", dependencies=[Auth], responses=ERRORS)
    async def delete(collection: str, body: KeyIdBody) -> Response:
        deleted = await router().delete(collection, from_ejson(body.key), from_ejson(body.id))
        return ejson_response({"deleted": deleted})

    @app.post("/v1/collections/{collection}/find", dependencies=[Auth], responses=ERRORS)
    async def find(collection: str, body: FindBody) -> Response:
        """Documents whose one filter field equals a value, ordered by khash then _id: at
        most ``limit``, and at most ``find_max_result_bytes`` of BSON; ``truncated`` is true
        when that byte cap cut the result short (ask again with a narrower filter or a smaller
        limit)."""
        docs = await router().find(collection, from_ejson(body.filter), limit=body.limit)
        return ejson_response({"documents": docs, "truncated": docs.truncated})

    return app


async def _first_ping(router: Router) -> None:
    """Say in the log, once, when the router starts while the catalog does not answer (down,
    or a wrong address or password): it serves once the catalog answers, not ready till then."""
    try:
        await router.source.ping()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - reported, and /readyz keeps reporting it
        log.warning("router started, but the catalog does not answer (%s: %s); /readyz reports "
                    "not ready until it does", type(exc).__name__, exc)


class _Unauthorized(Exception):
    """A request without a valid bearer token reached an endpoint (the guard stops it first)."""
