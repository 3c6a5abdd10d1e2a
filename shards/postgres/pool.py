"""``ShardPool``: the connections of one shard engine, with a per-shard circuit breaker.

Why not ``psycopg_pool``
------------------------
``psycopg_pool`` connects in background workers and makes a caller that finds no free
connection wait in a queue for one. When the server is down that queue is where routed
operations hung: every caller waited its full pool timeout (30 s) while the workers failed to
connect, and after a long outage the workers' exponential backoff (1, 2, 4 ... s) kept the pool
empty for many seconds after the server was back. This pool connects on the caller's path
instead, so the caller's own time limit bounds everything it waits for.

Invariants
----------
* **A caller never waits past its timeout.** Taking an idle connection costs nothing; opening
  one is bounded by ``min(timeout, connect_timeout_s)``; waiting for a busy pool to return a
  connection is bounded by the timeout. Each failure raises ``ShardUnavailableError``, and in
  every one of those cases nothing was sent.
* **Nothing is sent on a connection the server hung up on.** An idle autocommit connection
  has nothing to read unless the server ended it, so a readable socket at checkout (one
  zero-timeout ``select``) means the connection is gone; it is closed and another is taken.
* **Circuit breaker.** A failed connect opens the breaker for ``breaker_open_s``: meanwhile a
  caller that needs a *new* connection fails at once (live idle connections still serve).
  After that, exactly one caller probes by connecting; the others keep failing fast until the
  probe succeeds (breaker closed) or fails (open again). A dead server therefore costs each
  caller at most one connect timeout, and usually none.
* **Addresses can change.** ``set_dsn`` starts a new generation: idle connections of an older
  one are closed at checkout, connections in use when they are returned, and the breaker is
  reset, so the next operation connects to the new address.
* TCP keepalives are on (unless the DSN says otherwise), so a pooled connection to a host that
  vanished without a FIN is eventually reported dead by the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import ConnStatus, TransactionStatus

from shards.errors import ShardUnavailableError

log = logging.getLogger(__name__)

MAX_CURSORS = 16
"""Statements per connection whose cursor ``ShardPool.cursor`` keeps."""
KEEP_RESULT_CHARS = 64 * 1024
"""A kept cursor that has just returned a text value longer than this is dropped, so kept
cursors never pin a large result between statements."""

_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
               "keepalives_count": 3}


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """Keepalive settings for a DSN that does not choose its own."""
    given = conninfo_to_dict(dsn)
    return {k: v for k, v in _KEEPALIVES.items() if k not in given}


def hung_up(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Has the server let go of this idle connection? Checked without a round trip.

    Sending a statement down such a connection would fail *after* the statement left, and a
    failed write could then only be reported as "outcome unknown".
    """
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK:
        return True
    try:
        readable, _, _ = select.select((pgconn.socket,), (), (), 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class ShardPool:
    """Autocommit connections to one shard (see the module docstring).

    Args:
        name: for messages (the shard id; never the address, which names a host).
        dsn: libpq DSN.
        check: run an empty statement on each connection at checkout (one round trip), for
            control-plane callers.
        connect_timeout_s: upper bound of one connection attempt.
        breaker_open_s: how long callers fail fast after a failed connect.
        acquire_timeout_s: default bound of ``getconn`` when the caller gives none.
    """

    def __init__(
        self, name: str, dsn: str, *, min_size: int = 1, max_size: int = 8, check: bool = False,
        connect_timeout_s: float = 5.0, breaker_open_s: float = 1.0,
        acquire_timeout_s: float = 30.0,
    ) -> None:
        if max_size < 1 or min_size < 0 or min_size > max_size:
            raise ValueError(f"invalid pool sizes min={min_size} max={max_size}")
        self.name = name
        self._dsn = dsn
        self._kwargs = connect_kwargs(dsn)
        self._min_size, self._max_size = min_size, max_size
        self._check = check
        self._connect_timeout_s = connect_timeout_s
        self._breaker_open_s = breaker_open_s
        self._acquire_timeout_s = acquire_timeout_s
        self._idle: deque[psycopg.AsyncConnection[Any]] = deque()
        self._gen_of: dict[int, int] = {}  # id(connection) -> generation
        # id(connection) -> (its cursors by statement): see ``cursor``. Dropped with the
        # connection (``_discard``).
        self._cursors: dict[int, dict[bytes, psycopg.AsyncCursor[Any]]] = {}
        self._gen = 0
        self._size = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._open_until = 0.0  # breaker: loop time until which connects are refused
        self._probing = False
        self._closed = True

    @property
    def dsn(self) -> str:
        return self._dsn

    def set_dsn(self, dsn: str) -> None:
        """Use a new address from now on (see the module docstring)."""
        if dsn == self._dsn:
            return
        self._dsn, self._kwargs = dsn, connect_kwargs(dsn)
        self._gen += 1
        self._open_until = 0.0
        log.info("%s: shard address changed; reconnecting", self.name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, wait: bool = True) -> None:
        """Start taking requests; with ``wait``, open ``min_size`` connections first (and raise
        ``ShardUnavailableError`` if the shard cannot be reached)."""
        self._closed = False
        if wait:
            conns = [await self.getconn() for _ in range(self._min_size)]
            for conn in conns:
                await self.putconn(conn)

    async def close(self) -> None:
        """Close idle connections now and those in use when they are returned."""
        self._closed = True
        idle, self._idle = list(self._idle), deque()
        for conn in idle:
            await self._discard(conn)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- checkout ----------------------------------------------------------------------------

    def take_idle(self) -> psycopg.AsyncConnection[Any] | None:
        """The most recently used idle connection, when it is live, of the current address
        and needs no check (``check`` off): ``getconn``'s usual case without a coroutine.
        None: call ``getconn`` (which also discards the connection this one refused)."""
        if self._closed or self._check or not self._idle:
            return None
        conn = self._idle[-1]
        if self._gen_of.get(id(conn)) != self._gen or hung_up(conn):
            return None
        return self._idle.pop()

    def cursor(self, conn: psycopg.AsyncConnection[Any], query: bytes
               ) -> psycopg.AsyncCursor[Any]:
        """A cursor of ``conn`` kept for ``query`` (a statement rendered once, always the
        same bytes object). psycopg keeps a cursor's adapters (its ``Transformer``: the
        dumpers of the parameters' types, the loaders of the result's columns) while it
        runs the same query object again; a new cursor per statement builds them anew every
        time. At most ``MAX_CURSORS`` statements per connection; the caller runs one
        statement at a time on a connection it has checked out, and drops a cursor
        (``drop_cursor``) that holds a large result."""
        per = self._cursors.get(id(conn))
        if per is None:
            per = self._cursors[id(conn)] = {}
        cur = per.get(query)
        if cur is None or cur.connection is not conn:
            cur = conn.cursor()
            if len(per) < MAX_CURSORS:
                per[query] = cur
        return cur

    def drop_cursor(self, conn: psycopg.AsyncConnection[Any], query: bytes) -> None:
        """Forget ``conn``'s cursor of ``query`` (and the last result it holds)."""
        per = self._cursors.get(id(conn))
        if per is not None:
            per.pop(query, None)

    def put_idle(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """``putconn``'s usual case without a coroutine: a connection of the current address,
        idle outside a transaction, goes back to the pool (True). False: call ``putconn``."""
        if (self._closed or self._gen_of.get(id(conn)) != self._gen
                or conn.pgconn.transaction_status != TransactionStatus.IDLE):
            return False
        self._idle.append(conn)
        if self._waiters:
            self._wake_one()
        return True

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        """A live connection within ``timeout`` seconds, else ``ShardUnavailableError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._acquire_timeout_s if timeout is None else timeout)
        while True:
            if self._closed:
                raise ShardUnavailableError(f"{self.name}: the connection pool is closed")
            while self._idle:
                conn = self._idle.pop()  # the most recently used: warm, and least likely dead
                if self._gen_of.get(id(conn)) != self._gen or hung_up(conn):
                    await self._discard(conn)
                    continue
                if self._check:
                    try:
                        await conn.execute("")
                    except psycopg.Error:
                        await self._discard(conn)
                        continue
                return conn
            if self._size < self._max_size:
                self._size += 1
                try:
                    return await self._connect(deadline)
                except BaseException:
                    self._size -= 1
                    self._wake_one()
                    raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ShardUnavailableError(
                    f"{self.name}: all {self._max_size} connections stayed busy")
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                raise ShardUnavailableError(
                    f"{self.name}: all {self._max_size} connections stayed busy") from None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    async def _connect(self, deadline: float) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._open_until:
            raise ShardUnavailableError(
                f"{self.name}: the shard is unreachable (failing fast after a failed connect)",
                retry_after_s=self._open_until - now)
        probe = self._open_until > 0
        if probe:
            if self._probing:
                raise ShardUnavailableError(
                    f"{self.name}: the shard is unreachable (a reconnect attempt is under way)",
                    retry_after_s=self._breaker_open_s)
            self._probing = True
        gen = self._gen
        try:
            budget = min(self._connect_timeout_s, deadline - now)
            if budget <= 0:
                raise ShardUnavailableError(f"{self.name}: no time left to connect")
            try:
                conn = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True,
                        connect_timeout=max(2, math.ceil(budget)), **self._kwargs),
                    budget)
            except (psycopg.OperationalError, TimeoutError, OSError) as exc:
                if gen == self._gen:  # a failure at an old address says nothing of the new
                    self._open_until = loop.time() + self._breaker_open_s
                log.warning("%s: cannot connect (%s); failing fast for %.1fs", self.name,
                            str(exc).strip().splitlines()[-1] if str(exc).strip()
                            else type(exc).__name__, self._breaker_open_s)
                raise ShardUnavailableError(
                    f"{self.name}: the shard is unreachable",
                    retry_after_s=self._breaker_open_s) from exc
        finally:
            if probe:
                self._probing = False
        if gen == self._gen:
            self._open_until = 0.0
        self._gen_of[id(conn)] = gen
        return conn

    # -- return ------------------------------------------------------------------------------

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give a connection back; a broken, stale or mid-transaction one is closed."""
        if self._closed or conn.closed or self._gen_of.get(id(conn)) != self._gen:
            await self._discard(conn)
            return
        status = conn.pgconn.transaction_status
        if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            try:
                await conn.rollback()
            except psycopg.Error:
                await self._discard(conn)
                return
        elif status != TransactionStatus.IDLE:  # ACTIVE (interrupted) or UNKNOWN (broken)
            await self._discard(conn)
            return
        self._idle.append(conn)
        self._wake_one()

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await self.getconn(timeout)
        try:
            yield conn
        finally:
            await self.putconn(conn)

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._cursors.pop(id(conn), None)
        if self._gen_of.pop(id(conn), None) is not None:
            self._size -= 1
        try:
            await conn.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
