"""The cutover's session advisory lock: one attempt of a migration's cutover at a time.

A retried cutover attempt (the previous one's heartbeat timed out) must never run while the
previous one is still alive: its recovery could unfreeze a source the other is about to
switch away from. Each attempt holds a session advisory lock on the old owner, keyed by the
migration (:func:`cutover_lock_key`), for its whole run; ``shardshift doctor`` takes the same
lock (:func:`cutover_lock`) before it repairs anything of a migration without a workflow.

The lock lives in a session that both ends probe (:class:`CutoverLock`): a worker process that
crashes closes its socket and the lock goes at once; a worker *host* that vanishes (power, a
network partition) sends nothing, and without keepalives its session, and the lock that keeps
every retry of the cutover waiting, would outlive it by hours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"

LOCK_KEEPALIVES: dict[str, Any] = {
    # Client side: the worker notices a vanished server within ~15 s.
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 5,
    "tcp_user_timeout": 15_000,
}
LOCK_SERVER_OPTIONS = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
                       " -c tcp_keepalives_count=5 -c tcp_user_timeout=15000")
"""Server side (the lock lives in the server's session): the backend notices a vanished
worker host, ends the session and frees the lock within ~15 s instead of the kernel's two
hours. These settings apply to the server's end of this one connection only."""


def cutover_lock_key(migration_id: str) -> str:
    """The key of the session advisory lock a cutover attempt holds on its old owner."""
    return f"shardshift-cutover:{migration_id}"


class CutoverLock:
    """A migration's cutover lock on one server, in a session probed from both ends.

    ``await CutoverLock.connect(dsn, migration_id)`` opens the session;
    :meth:`try_acquire` tries once (True: held from now until :meth:`close`); :meth:`close`
    ends the session, which releases the lock.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], migration_id: str) -> None:
        self._conn = conn
        self.key = cutover_lock_key(migration_id)

    @classmethod
    async def connect(cls, dsn: str, migration_id: str) -> CutoverLock:
        own = conninfo_to_dict(dsn).get("options")
        options = " ".join(filter(None, [str(own) if own else None, LOCK_SERVER_OPTIONS]))
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, options=options,
                                                     **LOCK_KEEPALIVES)
        return cls(conn, migration_id)

    async def try_acquire(self) -> bool:
        """Take the lock if no other session holds it (one round trip, never waits)."""
        cur = await self._conn.execute(_TRY_LOCK, (self.key,))
        row = await cur.fetchone()
        return bool(row and row[0])

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        """The lock's session (autocommit)."""
        return self._conn

    async def close(self) -> None:
        await self._conn.close()


@asynccontextmanager
async def cutover_lock(dsn: str, migration_id: str) -> AsyncIterator[bool]:
    """Try to take a migration's cutover lock on one server, and hold it inside the context.

    Yields False when another session holds it: a cutover attempt of that migration is
    still running there, so nothing of the migration may be touched. While the lock is held
    no new attempt can start (an attempt waits for it). Leaving the context closes the
    connection, which releases the lock.
    """
    lock = await CutoverLock.connect(dsn, migration_id)
    try:
        yield await lock.try_acquire()
    finally:
        await lock.close()


__all__ = ["LOCK_KEEPALIVES", "LOCK_SERVER_OPTIONS", "CutoverLock", "cutover_lock",
           "cutover_lock_key"]
