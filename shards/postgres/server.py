"""One PostgreSQL server as a whole: is it there, and what failed when it was not.

The activities must tell a shard that is *unreachable* from every other failure (see
``activities/availability.py``): this module is where the driver's errors are read for that,
so nothing outside ``shards/postgres`` names a ``psycopg`` type.

- :func:`probe`: one fresh connection and ``SELECT 1``, bounded by a timeout; None when the
  server answered, else a one-line reason.
- :func:`is_connection_error`: whether a failure (anywhere in its cause chain) is the loss of
  a connection, as opposed to an error the server answered with. A cancelled statement
  (``statement_timeout``, a cancel request) is an answer.
- :func:`server_key`: the identity of the server an address points at (host, port,
  database), so two spellings of one address count once.
- :func:`identify`: who a connection is on the server and whether the role is fit for its
  job (``shardshift shard add`` checks a new shard with it).
- :func:`live_usage`: documents and their bytes on the server, per collection table, from
  the server's statistics and a sample (``shardshift status``): one connection, a few
  statements per collection, never one per chunk.

Every function is blocking except :func:`is_connection_error` and :func:`server_key`, which
do no I/O.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict

from shards.postgres.schema import collection_table

PROBE_TIMEOUT_S = 3.0
EXACT_BELOW_ROWS = 1_000_000
"""``live_usage`` counts the rows of a table exactly below this many (estimated), else it
takes the server's live-row statistic."""
SAMPLE_ABOVE_ROWS = 200_000
"""``live_usage`` averages row sizes over a 1 % block sample above this many rows."""


class ServerIdentity(BaseModel):
    """What ``identify`` found on a server, as the connecting role."""

    model_config = ConfigDict(frozen=True)

    user: str
    major_version: int
    superuser: bool
    replication: bool
    owns_schemas: bool
    """The role owns the ``shardshift`` and ``docs`` schemas (what a mover needs)."""
    reads_fence: bool
    """The role may read ``shardshift.chunk_fence`` (what a router needs)."""


class LiveUsage(BaseModel):
    """Documents on a server (all collections, or one), from ``live_usage``."""

    model_config = ConfigDict(frozen=True)

    major_version: int
    documents: int
    live_bytes: int
    """Bytes of live documents: rows times their average stored size (dead rows and free
    space do not count)."""
    exact: bool
    """Every table small enough to be counted exactly (else a row estimate was used)."""


def probe(dsn: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the server answers a query within ``timeout``, else why not (blocking)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
        return None
    except (psycopg.Error, OSError) as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """A failure to reach a server (anywhere in the cause chain), not a logic error.

    ``psycopg.OperationalError`` (which includes a pool's timeout) and ``OSError`` (which
    includes ``ShardUnavailableError`` and ``ShardConnectionLostError``) count; a cancelled
    statement does not: the server answered.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, psycopg.errors.QueryCanceled):
            return False
        if isinstance(cur, psycopg.OperationalError | OSError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def server_key(address: str) -> str:
    """``host:port/dbname`` of a libpq address (an unparsable address is its own key)."""
    try:
        d = conninfo_to_dict(address)
    except Exception:  # noqa: BLE001 - an unparsable address is its own server
        return address
    return f"{d.get('host', '')}:{d.get('port', '5432')}/{d.get('dbname', '')}"


def identify(dsn: str, timeout: float = PROBE_TIMEOUT_S) -> ServerIdentity:
    """Connect as the DSN's role and report what it is (blocking). Raises ``psycopg.Error``
    or ``OSError`` when the server cannot be reached or refuses the role."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
        row = conn.execute(
            "SELECT current_user::text, current_setting('server_version_num')::int / 10000,"
            " r.rolsuper, r.rolreplication,"
            " coalesce((SELECT bool_and(n.nspowner = r.oid) AND count(*) = 2"
            "           FROM pg_namespace n WHERE n.nspname IN ('shardshift', 'docs')), false),"
            " coalesce(to_regclass('shardshift.chunk_fence') IS NOT NULL"
            "   AND has_table_privilege(to_regclass('shardshift.chunk_fence'), 'SELECT'), false)"
            " FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    assert row is not None
    return ServerIdentity(user=row[0], major_version=row[1], superuser=row[2],
                          replication=row[3], owns_schemas=row[4], reads_fence=row[5])


def live_usage(dsn: str, collection: str | None = None,
               timeout: float = PROBE_TIMEOUT_S) -> LiveUsage:
    """Live documents and bytes of the ``docs`` tables (or one collection's) on a server
    (blocking). Rows: an exact count when the server estimates fewer than
    ``EXACT_BELOW_ROWS``, else its live-row statistic; bytes: rows times the average stored
    row size (a 1 % block sample above ``SAMPLE_ABOVE_ROWS``), as ``chunk_bytes`` weighs a
    chunk. Raises ``psycopg.Error`` or ``OSError`` when the server cannot be read."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout)),
                         options="-c statement_timeout=30000") as conn:
        version_row = conn.execute(
            "SELECT current_setting('server_version_num')::int / 10000").fetchone()
        assert version_row is not None
        tables = conn.execute(
            "SELECT c.relname::text, greatest(c.reltuples, 0)::bigint,"
            " coalesce(s.n_live_tup, 0)::bigint"
            " FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.relnamespace = to_regnamespace('docs') AND c.relkind IN ('r', 'p')"
            " AND (%(c)s::text IS NULL OR c.relname = %(c)s) ORDER BY 1",
            {"c": collection},
        ).fetchall()
        documents = live_bytes = 0
        exact = True
        for name, reltuples, live in tables:
            table = collection_table(name)
            estimate = max(int(reltuples), int(live))
            rows: int
            if estimate < EXACT_BELOW_ROWS:
                counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
                rows = int(counted[0]) if counted else 0
            else:
                rows, exact = int(live) or int(reltuples), False
            if rows == 0:
                continue
            sample = sql.SQL("TABLESAMPLE SYSTEM (1)" if rows > SAMPLE_ABOVE_ROWS else "")
            avg: Any = (conn.execute(sql.SQL("SELECT avg(pg_column_size(d.*)) FROM {} AS d {}")
                                     .format(table, sample)).fetchone() or (None,))[0]
            if avg is None:  # an unlucky sample: read the whole table once
                avg = (conn.execute(sql.SQL("SELECT avg(pg_column_size(d.*)) FROM {} AS d")
                                    .format(table)).fetchone() or (0,))[0] or 0
            documents += rows
            live_bytes += int(rows * float(avg))
    return LiveUsage(major_version=version_row[0], documents=documents, live_bytes=live_bytes,
                     exact=exact)


__all__ = [
    "PROBE_TIMEOUT_S", "LiveUsage", "ServerIdentity", "identify", "is_connection_error",
    "live_usage", "probe", "server_key",
]
