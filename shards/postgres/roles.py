"""Connecting as a role: an address (where) plus a role name (who) make a DSN.

Shard and catalog addresses carry no secret; the password of each role is looked up by libpq
in the passfile, by host, port and user. See ``settings.DatabaseSettings`` for which component
uses which role, and ``infra/roles.py`` with ``shards/postgres/provision.py`` and
``catalog/provision.py`` for what each role may do.
"""

from __future__ import annotations

from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


def as_role(dsn: str, user: str, passfile: Path | str | None = None) -> str:
    """``dsn`` with ``user=`` set to ``user`` (replacing any), and ``passfile=`` when given.

    Idempotent, and keeps the rest of the DSN as written, so the same address always gives
    the same DSN (callers compare DSNs to notice a re-registered shard)."""
    params = conninfo_to_dict(dsn)
    if params.get("user") == user and (passfile is None or params.get("passfile") == str(passfile)):
        return dsn
    params["user"] = user
    if passfile is not None:
        params["passfile"] = str(passfile)
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def dsn_user(dsn: str) -> str | None:
    """The ``user=`` of a DSN, if it names one."""
    user = conninfo_to_dict(dsn).get("user")
    return None if user is None else str(user)


__all__ = ["as_role", "dsn_user"]
