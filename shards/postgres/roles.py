"""Connecting as a role: an address (where) plus a role name (who) make a DSN.

Shard and catalog addresses carry no secret; the password of each role is looked up by libpq
in the passfile, by host, port and user. See ``settings.DatabaseSettings`` for which component
uses which role, and ``infra/roles.py`` with ``shards/postgres/provision.py`` and
``catalog/provision.py`` for what each role may do.
"""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from settings import as_role


def dsn_user(dsn: str) -> str | None:
    """The ``user=`` of a DSN, if it names one."""
    user = conninfo_to_dict(dsn).get("user")
    return None if user is None else str(user)


__all__ = ["as_role", "dsn_user"]
