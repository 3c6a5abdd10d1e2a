"""Provisioning the catalog server: its schema as the catalog writer, then the reader's rights.

``provision_catalog`` runs the role step (``infra.roles.provision_roles``: catalog writer and
reader, passwords in the passfile, database privileges, schema ``catalog`` owned by the
writer), then, in the same transaction, the catalog's DDL (``catalog/schema.py``) as the
writer, so it owns every table, function and trigger, then the reader's grants: ``USAGE`` on
the schema and ``SELECT`` on every catalog table, present and future (default privileges of
the writer). ``PUBLIC`` loses ``EXECUTE`` on the catalog's functions, present and future.
``LISTEN`` needs no grant. Idempotent; on a catalog provisioned by an older version it hands
the superuser's objects to the writer first.
"""

from __future__ import annotations

from pathlib import Path

from psycopg import sql

from catalog.schema import DDL
from catalog.store.txn import _DDL_LOCK
from infra.roles import ProvisionedServer, provision_roles
from settings import DatabaseSettings


def provision_catalog(
    superuser_dsn: str,
    passfile: Path,
    *,
    db: DatabaseSettings | None = None,
    passfile_host: str | None = None,
    passfile_port: int | None = None,
) -> ProvisionedServer:
    """Create (or bring up to date) the catalog's roles, schema and grants, in one transaction.

    Args as ``shards.postgres.provision.provision_shard``; returns the roles by purpose
    (``catalog``, ``catalog_reader``).
    """
    with provision_roles(superuser_dsn, passfile, kind="catalog", db=db,
                         passfile_host=passfile_host, passfile_port=passfile_port) as step:
        conn = step.conn
        writer = sql.Identifier(step.db.catalog_user)
        reader = sql.Identifier(step.db.catalog_reader_user)
        with step.as_owner():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            conn.execute(DDL)
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}"
                             " REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC").format(writer))
        conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA catalog FROM PUBLIC")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA catalog TO {}").format(reader))
        # Routers report operations per chunk: they may add counts, through this one function.
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION catalog.report_traffic("
                             "text, bigint[], bigint[], int) TO {}").format(reader))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA catalog TO {}").format(reader))
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA catalog"
                             " GRANT SELECT ON TABLES TO {}").format(writer, reader))
    return step.server


__all__ = ["provision_catalog"]
