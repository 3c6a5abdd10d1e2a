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

Every function is blocking except :func:`is_connection_error` and :func:`server_key`, which
do no I/O.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

PROBE_TIMEOUT_S = 3.0


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


__all__ = ["PROBE_TIMEOUT_S", "is_connection_error", "probe", "server_key"]
