"""Cursors: what ``find`` (and ``getMore``) read from between batches.

A cursor is a stream of documents (an async iterator of pages; a scan reads its next fenced
page only when a batch needs it), owned by the user who opened it: another user's
``getMore`` or ``killCursors`` is refused. A cursor left idle longer than ``IDLE_S`` (MongoDB's
10 minutes) is closed (a later ``getMore`` gets CursorNotFound, code 43); at most
``MAX_CURSORS`` are open in one front end (the next ``find`` that would need one is refused).
An open cursor holds at most one page of its scan (500 documents, about 4 MiB as stored)
between batches, a few more when its chunks are read concurrently (``Router.scan``). A batch stops before its documents reach ``BATCH_BYTES`` (16 MiB, MongoDB's
``maxBsonObjectSize``, less room for the reply's envelope), and holds at least one document.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import bson

from router.mongo.errors import MongoError
from router.mongo.registry import ServerContext, Session
from shards.codec import bson_bytes

IDLE_S = 600.0
MAX_CURSORS = 1000
BATCH_BYTES = 16 * 1024 * 1024 - 16 * 1024
DEFAULT_FIRST_BATCH = 101
_STATE_KEY = "cursors"


@dataclass
class Cursor:
    id: int
    ns: str
    user: str | None
    pages: AsyncIterator[list[dict[str, Any]]]
    remaining: int | None
    """Documents still to return (the find's limit), None for no limit."""
    buffer: list[dict[str, Any]] = field(default_factory=list)
    exhausted: bool = False
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def batch(self, size: int | None) -> list[dict[str, Any]]:
        """The next batch: at most ``size`` documents (None: as many as fit)."""
        out: list[dict[str, Any]] = []
        used = 0
        want = size if size is not None else 2**62
        if self.remaining is not None:
            want = min(want, self.remaining)
        while len(out) < want:
            if not self.buffer:
                if self.exhausted:
                    break
                try:
                    self.buffer = list(await anext(self.pages))
                except StopAsyncIteration:
                    self.exhausted = True
                    break
                continue
            n = len(bson_bytes(self.buffer[0]))
            if out and used + n > BATCH_BYTES:
                break
            used += n
            out.append(self.buffer.pop(0))
        if self.remaining is not None:
            self.remaining -= len(out)
        self.last_used = time.monotonic()
        return out

    @property
    def done(self) -> bool:
        return (self.exhausted and not self.buffer) or self.remaining == 0

    async def close(self) -> None:
        closer = getattr(self.pages, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except RuntimeError:
                pass  # a generator running in another task's getMore: it is dropped anyway


def _cursors(ctx: ServerContext) -> dict[int, Cursor]:
    table: dict[int, Cursor] = ctx.state.setdefault(_STATE_KEY, {})
    return table


async def expire_idle(ctx: ServerContext, now: float | None = None) -> int:
    """Close cursors idle past ``IDLE_S``; how many were closed."""
    now = time.monotonic() if now is None else now
    table = _cursors(ctx)
    stale = [c for c in table.values() if now - c.last_used > IDLE_S and not c.lock.locked()]
    for c in stale:
        table.pop(c.id, None)
        await c.close()
    return len(stale)


async def open_cursor(s: Session, ns: str, pages: AsyncIterator[list[dict[str, Any]]], *,
                      first_batch: int | None, limit: int | None, single: bool
                      ) -> dict[str, Any]:
    """Read the first batch; keep the cursor if more may follow. The ``cursor`` reply."""
    cur = Cursor(0, ns, s.user, pages, limit)
    size = DEFAULT_FIRST_BATCH if first_batch is None else first_batch
    try:
        docs = await cur.batch(size)
    except BaseException:
        await cur.close()
        raise
    if single or cur.done:
        await cur.close()
        return {"cursor": {"id": bson.Int64(0), "ns": ns, "firstBatch": docs}}
    await expire_idle(s.server)
    table = _cursors(s.server)
    if len(table) >= MAX_CURSORS:
        await cur.close()
        raise MongoError("OperationFailed", f"too many open cursors ({MAX_CURSORS}); close "
                         "some (killCursors) or read them to the end")
    while cur.id == 0 or cur.id in table:
        cur.id = secrets.randbits(62) + 1
    table[cur.id] = cur
    return {"cursor": {"id": bson.Int64(cur.id), "ns": ns, "firstBatch": docs}}


def _owned(s: Session, cur: Cursor, cursor_id: int) -> None:
    if cur.user != s.user:
        raise MongoError("Unauthorized",
                         f"cursor id {cursor_id} was not created by the authenticated user")


async def get_more(s: Session, cursor_id: int, ns: str, batch_size: int | None
                   ) -> dict[str, Any]:
    await expire_idle(s.server)
    table = _cursors(s.server)
    cur = table.get(cursor_id)
    if cur is None:
        raise MongoError("CursorNotFound", f"cursor id {cursor_id} not found")
    _owned(s, cur, cursor_id)
    if cur.ns != ns:
        raise MongoError("Unauthorized", f"Requested getMore on namespace '{ns[:200]}', but "
                         f"cursor belongs to a different namespace {cur.ns[:200]}")
    if cur.lock.locked():
        raise MongoError("OperationFailed", f"cursor id {cursor_id} is already in use")
    async with cur.lock:
        try:
            docs = await cur.batch(batch_size)
        except BaseException:
            table.pop(cursor_id, None)
            await cur.close()
            raise
        if cur.done:
            table.pop(cursor_id, None)
            await cur.close()
            out_id = 0
        else:
            out_id = cursor_id
    return {"cursor": {"id": bson.Int64(out_id), "ns": ns, "nextBatch": docs}}


async def kill(s: Session, ns: str, ids: list[int]) -> dict[str, Any]:
    table = _cursors(s.server)
    killed: list[bson.Int64] = []
    missing: list[bson.Int64] = []
    for cursor_id in ids:
        cur = table.get(cursor_id)
        if cur is None or cur.ns != ns:
            missing.append(bson.Int64(cursor_id))
            continue
        _owned(s, cur, cursor_id)
        table.pop(cursor_id, None)
        await cur.close()
        killed.append(bson.Int64(cursor_id))
    return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
            "cursorsUnknown": []}


def open_count(ctx: ServerContext) -> int:
    return len(_cursors(ctx))
