"""The thinnest HTTP document service: the baseline of ``bench.http``.

A bare FastAPI app on uvicorn (uvloop, httptools: as ``shardshift router serve`` runs) with a
psycopg-pool over ONE shard, serving the router's get request shape
(``POST /v1/collections/{collection}/get`` with ``{"key": K, "id": I}``) by one primary-key
lookup, ``SELECT doc FROM docs."<collection>" WHERE khash = %s AND id = %s``: no route
lookup, no fence, no bearer token, and the stored jsonb text is returned as it is (not
decoded and encoded again). Run it as::

    BENCH_BASELINE_DSN=... python -m uvicorn bench.http_baseline:app --loop uvloop \\
        --http httptools --port N

``bench.http_baseline:asgi_app`` is thinner still: the same lookup as a plain ASGI callable,
no FastAPI at all (no routing, no body model: the path split by hand and the body read with
``json.loads``). Since the router's keyed get skips FastAPI's routing and body model
(``router/http.py``, ``fast_get``), ``bench.http`` measures it beside the FastAPI app.

``BENCH_BASELINE_POOL`` sets the pool's size (default 8, the router's ``pool_max_size``).
Its connections are in autocommit, as the router's are: the lookup is one round trip.
``BENCH_BASELINE_AUTOCOMMIT=0`` gives the baseline as it was until December 2026: psycopg's
default transactions, so each lookup was three round trips (``BEGIN``, the ``SELECT``, and the
pool's ``COMMIT``), which made the "thinnest" path slower than the router's one round trip
(``bench.http`` still measures it, as ``baseline_txn``, beside the new figure).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from psycopg import sql
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from router.hashing import khash
from shards.codec import encode_value
from shards.names import check_collection
from shards.postgres.schema import collection_table


class KeyId(BaseModel):
    key: Any
    id: Any


async def _configure(conn: Any) -> None:
    conn.adapters.register_loader("jsonb", TextLoader)  # the stored text, as it is


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    size = int(os.environ.get("BENCH_BASELINE_POOL", "8"))
    autocommit = os.environ.get("BENCH_BASELINE_AUTOCOMMIT", "1") != "0"
    pool = AsyncConnectionPool(os.environ["BENCH_BASELINE_DSN"], min_size=size, max_size=size,
                               configure=_configure, open=False,
                               kwargs={"autocommit": autocommit})
    await pool.open(wait=True)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(lifespan=_lifespan)


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/v1/collections/{collection}/get")
async def get(collection: str, body: KeyId) -> Response:
    check_collection(collection)
    stmt = sql.SQL("SELECT doc FROM {} WHERE khash = %s AND id = %s").format(
        collection_table(collection))
    async with app.state.pool.connection() as conn:
        cur = await conn.execute(stmt, (khash(body.key), encode_value(body.id)))
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, "no such document")
    return Response(b'{"document":' + row[0].encode() + b"}", media_type="application/json")


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same lookup with no framework: ``POST /v1/collections/{collection}/get`` and
    ``GET /readyz``, anything else 404."""
    if scope["type"] == "lifespan":
        pool: AsyncConnectionPool | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                size = int(os.environ.get("BENCH_BASELINE_POOL", "8"))
                pool = AsyncConnectionPool(os.environ["BENCH_BASELINE_DSN"], min_size=size,
                                           max_size=size, configure=_configure, open=False,
                                           kwargs={"autocommit": True})
                await pool.open(wait=True)
                _ASGI["pool"] = pool
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if pool is not None:
                    await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    if path == "/readyz":
        await _answer(send, 200, b'{"status":"ready"}')
        return
    parts = path.split("/")
    if (scope["method"] != "POST" or len(parts) != 5 or parts[1:3] != ["v1", "collections"]
            or parts[4] != "get"):
        await _answer(send, 404, b'{"detail":"Not Found"}')
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        check_collection(parts[3])
        data = json.loads(body)
        params = (khash(data["key"]), encode_value(data["id"]))
    except (ValueError, KeyError, TypeError):
        await _answer(send, 422, b'{"detail":"bad request"}')
        return
    stmt = sql.SQL("SELECT doc FROM {} WHERE khash = %s AND id = %s").format(
        collection_table(parts[3]))
    async with _ASGI["pool"].connection() as conn:
        cur = await conn.execute(stmt, params)
        row = await cur.fetchone()
    if row is None:
        await _answer(send, 404, b'{"detail":"no such document"}')
        return
    await _answer(send, 200, b'{"document":' + row[0].encode() + b"}")


_ASGI: dict[str, Any] = {}


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
