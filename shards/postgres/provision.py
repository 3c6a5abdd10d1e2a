"""Provisioning a shard server: its schema as the mover, then the router's narrow rights.

``provision_shard`` is what a shard needs before any component connects to it: the roles
(``infra.roles.provision_roles``: router and mover, passwords in the passfile, database
privileges, schemas ``shardshift`` and ``docs`` owned by the mover, the replication-origin
functions), then, in the same transaction, the shard's DDL (``shards/postgres/schema.py``) run
as the mover, so the mover owns every table, view and function (and the collection tables it
creates later), then the router's grants:

* ``USAGE`` on both schemas;
* ``SELECT, INSERT, UPDATE, DELETE`` on every ``docs`` table, present and future (default
  privileges of the mover);
* ``SELECT`` on ``shardshift.chunk_fence``; the row lock of a routed write through the view
  ``shardshift.chunk_fence_lock`` (``SELECT`` and ``UPDATE`` of its one non-updatable column
  ``lock_only``, see ``shards/postgres/schema.py``);
* ``EXECUTE`` on ``ROUTER_FUNCTIONS``, which only read the fence. ``PUBLIC`` loses
  ``EXECUTE`` on every other shardshift function, present and future.

Nothing else: no DDL, no fence writes, no replication. Idempotent; safe on a live shard; on a
shard provisioned by an older version it hands the superuser's objects to the mover first.
"""

from __future__ import annotations

from pathlib import Path

from psycopg import sql

from infra.roles import ProvisionedServer, provision_roles
from settings import DatabaseSettings
from shards.postgres.engine import _DDL_LOCK
from shards.postgres.schema import DDL

# The functions a routed statement may call: the inline fence check's fallback (it raises the
# rejection) and the patch helpers. None of them writes anything.
ROUTER_FUNCTIONS = (
    "shardshift.fence_check(text, bigint, bigint, bigint, boolean)",
    "shardshift.fence_reject(text, bigint, bigint, bigint)",
    "shardshift.jsonb_set_path(jsonb, text[], jsonb)",
    "shardshift.ejson_add(jsonb, jsonb)",
    "shardshift.apply_patch(jsonb, jsonb)",
)


def provision_shard(
    superuser_dsn: str,
    passfile: Path,
    *,
    db: DatabaseSettings | None = None,
    passfile_host: str | None = None,
    passfile_port: int | None = None,
) -> ProvisionedServer:
    """Create (or bring up to date) a shard's roles, schema and grants, in one transaction.

    Args:
        superuser_dsn: a superuser's DSN to the shard's ``shardshift`` database.
        passfile: the libpq passfile; each role's password is read from it, or generated
            and added (0600).
        db: the role names (default: ``settings.DatabaseSettings()``).
        passfile_host, passfile_port: the address components will use, when it differs from
            the superuser DSN's (see ``infra.roles.provision_roles``).

    Returns the roles by purpose (``router``, ``mover``).
    """
    with provision_roles(superuser_dsn, passfile, kind="shard", db=db,
                         passfile_host=passfile_host, passfile_port=passfile_port) as step:
        conn = step.conn
        mover, router = sql.Identifier(step.db.mover_user), sql.Identifier(step.db.router_user)
        with step.as_owner():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            conn.execute(DDL)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA shardshift, docs TO {}").format(router))
        conn.execute(sql.SQL("GRANT SELECT ON shardshift.chunk_fence TO {}").format(router))
        conn.execute(sql.SQL("GRANT SELECT, UPDATE (lock_only) ON shardshift.chunk_fence_lock"
                             " TO {}").format(router))
        conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shardshift FROM PUBLIC")
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}"
                             " REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC").format(mover))
        for fn in ROUTER_FUNCTIONS:
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + fn + " TO {}").format(router))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN"
                             " SCHEMA docs TO {}").format(router))
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA docs"
                             " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}")
                     .format(mover, router))
    return step.server


__all__ = ["ROUTER_FUNCTIONS", "provision_shard"]
