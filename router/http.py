"""The router as an HTTP/JSON service, for applications in any language.

Values are MongoDB Extended JSON: requests may use canonical or relaxed form (``{"$oid": ...}``,
``{"$numberDecimal": "12.50"}``); responses are canonical, so an int64, a Decimal128 or an
ObjectId comes back as exactly what was stored. Every ``/v1`` endpoint needs
``Authorization: Bearer <token>`` with a token from ``RouterSettings.http_tokens``; a missing
or wrong token gets 401 before anything reaches a shard. ``/healthz`` (the process is alive)
and ``/readyz`` (the catalog answers) are open.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from bson import json_util
from bson.errors import BSONError
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from router.core import Router
from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    OutcomeUnknownError,
    RetryDeadlineExceeded,
    UnknownCollectionError,
)
from settings import RouterSettings
from shards.codec import JSON_OPTIONS
from shards.errors import DuplicateDocumentError, InvalidDocumentError, InvalidNameError

_hook = partial(json_util.object_hook, json_options=JSON_OPTIONS)


def from_ejson(value: Any) -> Any:
    """Extended JSON (already parsed as plain JSON) to BSON-typed Python values."""
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


def create_app(
    router_factory: Callable[[], Router] | Router, settings: RouterSettings | None = None
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
        await router.start()
        state["router"] = router
        try:
            yield
        finally:
            await router.close()

    app = FastAPI(
        title="shardshift router",
        version="1",
        description=__doc__,
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False)

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = creds.credentials.encode() if creds else b""
        # Compare against every token so the time taken does not reveal which one matched.
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
    max_body = settings.max_document_bytes * 2 + 64 * 1024

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(_Unauthorized)
    async def _unauth(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "missing or invalid bearer token"}, status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _err(status: int, exc: Exception, **headers: str) -> JSONResponse:
        return JSONResponse({"error": str(exc), "type": type(exc).__name__}, status_code=status,
                            headers=headers or None)

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
        503, e, **{"Retry-After": str(max(1, math.ceil(getattr(e, "retry_after_s", 1.0))))}))
    # The write was sent and the connection broke: it may or may not have been applied.
    app.add_exception_handler(OutcomeUnknownError, lambda _r, e: _err(502, e))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "catalog unreachable"}})
    async def readyz() -> JSONResponse:
        try:
            await router().source.ping()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            # The type only: this endpoint is open, and a driver's message names the host.
            return JSONResponse({"status": "unavailable", "error": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    errors = {
        400: {"description": "bad request; nothing was written"},
        401: {"description": "missing or invalid bearer token"},
        404: {"description": "unknown collection"},
        413: {"description": "document too large"},
        502: {"description": "a write's shard connection broke after it was sent: it may or "
                             "may not have been applied (read to find out)"},
        503: {"description": "unavailable past the retry deadline (chunk frozen, shard down, "
                             "catalog needed and down); nothing was written; see Retry-After"},
    }

    @app.post("/v1/collections/{collection}/insert", dependencies=[Auth],
              responses={**errors, 409: {"description": "duplicate shard key and _id"}},
              status_code=201)
    async def insert(collection: str, body: InsertBody) -> Response:
        doc = from_ejson(body.document)
        await router().insert(collection, doc)
        return ejson_response({"inserted": True, "id": doc.get("_id")}, 201)

    @app.post("/v1/collections/{collection}/get", dependencies=[Auth], responses=errors)
    async def get(collection: str, body: KeyIdBody) -> Response:
        doc = await router().get(collection, from_ejson(body.key), from_ejson(body.id))
        return ejson_response({"document": doc})

    @app.post("/v1/collections/{collection}/replace", dependencies=[Auth], responses=errors)
    async def replace(collection: str, body: ReplaceBody) -> Response:
        doc = from_ejson(body.document)
        kwargs = {"key": from_ejson(body.key)} if "key" in body.model_fields_set else {}
        matched = await router().replace(collection, doc, **kwargs)
        return ejson_response({"matched": matched})

    @app.post("/v1/collections/{collection}/patch", dependencies=[Auth], responses=errors)
    async def patch(collection: str, body: PatchBody) -> Response:
        doc = await router().patch(
            collection, from_ejson(body.key), from_ejson(body.id), from_ejson(body.update)
        )
        return ejson_response({"document": doc})

    @app.post("/v1/collections/{collection}/delete", dependencies=[Auth], responses=errors)
    async def delete(collection: str, body: KeyIdBody) -> Response:
        deleted = await router().delete(collection, from_ejson(body.key), from_ejson(body.id))
        return ejson_response({"deleted": deleted})

    @app.post("/v1/collections/{collection}/find", dependencies=[Auth], responses=errors)
    async def find(collection: str, body: FindBody) -> Response:
        docs = await router().find(collection, from_ejson(body.filter), limit=body.limit)
        return ejson_response({"documents": docs})

    return app


class _Unauthorized(Exception):
    pass
