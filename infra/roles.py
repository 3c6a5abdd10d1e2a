"""Least-privilege PostgreSQL roles: who may do what on a shard and on the catalog.

Only this module (as the server's superuser) creates roles and schemas; no component of
shardshift connects as a superuser. ``provision_server`` is idempotent and is what
``shardshift infra up`` runs on every server of the local stack; a production shard or
catalog is provisioned by calling it once with a superuser DSN (it also upgrades a server
provisioned by an older version: objects owned by the superuser are handed to their owner
role, grants are added).

Roles (names from ``settings.DatabaseSettings``):

On a shard
    * **mover** (workers; the CLI's shard DDL): ``LOGIN REPLICATION``, no superuser. Owns the
      schemas ``shardshift`` and ``docs`` and everything in them (a publication may only
      name tables its owner owns; fences, stream state and import progress are its own),
      ``CONNECT, CREATE, TEMPORARY`` on the database (publications need ``CREATE``; the
      applier stages rows in a temp table), ``EXECUTE`` on ``pg_replication_origin_*``.
      Slots and walsenders come with ``REPLICATION``; terminating a walsender that holds a
      slot needs nothing more, because the mover's own sessions are the ones it stops.
    * **router**: ``CONNECT``; ``USAGE`` on both schemas; ``SELECT, INSERT, UPDATE, DELETE`` on
      every ``docs`` table (present and future, through default privileges); ``SELECT`` on
      ``shardshift.chunk_fence``; the row lock of a routed write through the view
      ``shardshift.chunk_fence_lock`` (``UPDATE`` of its one non-updatable column, see
      ``shards/postgres/schema.py``); ``EXECUTE`` on the fence and patch functions, which
      only read the fence. Nothing else: no DDL, no fence writes, no replication.

On the catalog
    * **catalog writer** (workers, CLI): owns schema ``catalog``; ``CONNECT, CREATE``.
    * **catalog reader** (routers): ``CONNECT``, ``USAGE`` and ``SELECT`` on the catalog's
      tables (present and future); ``LISTEN`` needs no grant. It cannot write.

``PUBLIC`` loses ``CONNECT``/``TEMPORARY`` on the database and ``EXECUTE`` on shardshift's
functions. Passwords are random, kept only in the libpq passfile (one line per host, port and
role) and sent to the server as a SCRAM verifier computed client-side, so no statement (or
server log line) ever carries a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from infra.errors import InfraError
from infra.passfile import ensure_password
from settings import DatabaseSettings

ServerKind = Literal["shard", "catalog"]

# The functions a routed statement may call: the inline fence check's fallback (it raises the
# rejection) and the patch helpers. None of them writes anything.
ROUTER_FUNCTIONS = (
    "shardshift.fence_check(text, bigint, bigint, bigint, boolean)",
    "shardshift.fence_reject(text, bigint, bigint, bigint)",
    "shardshift.jsonb_set_path(jsonb, text[], jsonb)",
    "shardshift.ejson_add(jsonb, jsonb)",
    "shardshift.apply_patch(jsonb, jsonb)",
)

_SHARD_DDL_LOCK = 0x5348_4152_4453_4846  # shards.postgres.engine._DDL_LOCK
_CATALOG_DDL_LOCK = 0x5348_4152_4443_4154  # catalog.store._DDL_LOCK

# Everything in ``schemas`` not owned by ``owner`` is handed to it (an upgrade from a stack
# whose superuser created the objects). Sequences owned by a column follow their table.
_REASSIGN = r"""
DO $do$
DECLARE
    r record;
    owner_oid oid := (SELECT oid FROM pg_roles WHERE rolname = {owner});
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS obj, c.relkind FROM pg_class c
         WHERE c.relnamespace = ANY ({schemas}::regnamespace[])
           AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.relowner <> owner_oid
           AND NOT (c.relkind = 'S' AND EXISTS (
                SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                   AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I',
            CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                           WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                           ELSE 'TABLE' END, r.obj, {owner});
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj FROM pg_proc p
         WHERE p.pronamespace = ANY ({schemas}::regnamespace[]) AND p.proowner <> owner_oid
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.obj, {owner});
    END LOOP;
    IF {publications} THEN
        FOR r IN SELECT pubname FROM pg_publication WHERE pubowner <> owner_oid LOOP
            EXECUTE format('ALTER PUBLICATION %I OWNER TO %I', r.pubname, {owner});
        END LOOP;
    END IF;
END
$do$
"""

_GRANT_ORIGIN_FUNCTIONS = r"""
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_proc p
              WHERE p.pronamespace = 'pg_catalog'::regnamespace
                AND p.proname LIKE 'pg\_replication\_origin\_%'
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, {mover});
    END LOOP;
END
$do$
"""


def _reassign(owner: str, schemas: list[str], *, publications: bool) -> sql.Composed:
    return sql.SQL(_REASSIGN).format(
        owner=sql.Literal(owner),
        schemas=sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(map(sql.Literal, schemas))),
        publications=sql.SQL("true" if publications else "false"),
    )


@dataclass(frozen=True)
class ProvisionedServer:
    """What ``provision_server`` set up: the roles (by purpose) on one server."""

    kind: ServerKind
    host: str
    port: int
    roles: dict[str, str]


def _address(dsn: str) -> tuple[str, int, str]:
    params = conninfo_to_dict(dsn)
    host = params.get("host") or params.get("hostaddr")
    if not host:
        raise InfraError("provision_server needs a DSN with host= (a TCP address)")
    return host, int(params.get("port") or 5432), params.get("dbname") or "shardshift"


def _ensure_role(conn: psycopg.Connection[Any], name: str, password: str, *,
                 replication: bool) -> None:
    """Create or correct a login role: never superuser, no CREATEDB/CREATEROLE/BYPASSRLS."""
    verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256")
    attrs = sql.SQL(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS INHERIT {} PASSWORD {}"
    ).format(sql.SQL("REPLICATION" if replication else "NOREPLICATION"),
             sql.Literal(verifier.decode()))
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(sql.SQL(verb + " ROLE {} WITH {}").format(sql.Identifier(name), attrs))


def _check_names(conn: psycopg.Connection[Any], roles: dict[str, str]) -> None:
    me = conn.execute("SELECT current_user, usesuper FROM pg_user WHERE usename = current_user"
                      ).fetchone()
    if not me or not me[1]:
        raise InfraError("provision_server must connect as a superuser (it creates roles)")
    for purpose, name in roles.items():
        if not name or name == me[0]:
            raise InfraError(f"the {purpose} role may not be {name!r} (the superuser)")


def provision_server(
    superuser_dsn: str,
    passfile: Path,
    *,
    kind: ServerKind,
    db: DatabaseSettings | None = None,
    passfile_host: str | None = None,
    passfile_port: int | None = None,
) -> ProvisionedServer:
    """Create (or bring up to date) the roles, schemas and grants of one server.

    Args:
        superuser_dsn: a superuser's DSN to the server's ``shardshift`` database.
        passfile: the libpq passfile; each role's password is read from it, or generated
            and added (0600).
        kind: ``shard`` (router + mover) or ``catalog`` (catalog writer + reader).
        db: the role names (default: ``settings.DatabaseSettings()``).
        passfile_host, passfile_port: the address components will use in their DSNs, when
            it differs from the superuser DSN's host and port (the passfile lines must match
            what the components connect to).

    Returns the roles by purpose. Idempotent; safe to run on a live server (the role
    changes and grants are one transaction; passwords stay those of the passfile).
    """
    from catalog.schema import DDL as CATALOG_DDL  # noqa: PLC0415
    from shards.postgres.schema import DDL as SHARD_DDL  # noqa: PLC0415

    db = db or DatabaseSettings()
    host, port, dbname = _address(superuser_dsn)
    host, port = passfile_host or host, passfile_port or port
    if kind == "shard":
        roles = {"router": db.router_user, "mover": db.mover_user}
    elif kind == "catalog":
        roles = {"catalog": db.catalog_user, "catalog_reader": db.catalog_reader_user}
    else:
        raise InfraError(f"unknown server kind {kind!r}: expected 'shard' or 'catalog'")
    if len(set(roles.values())) != len(roles):
        raise InfraError(f"the {kind} roles must have distinct names: {roles}")
    passwords = {name: ensure_password(passfile, host, port, name) for name in roles.values()}

    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        _check_names(conn, roles)
        ident = sql.Identifier
        with conn.transaction():
            for purpose, name in roles.items():
                _ensure_role(conn, name, passwords[name], replication=purpose == "mover")
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(dbname)))
            if kind == "shard":
                mover, router = ident(db.mover_user), ident(db.router_user)
                conn.execute(sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}")
                             .format(ident(dbname), mover))
                conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}")
                             .format(ident(dbname), router))
                for schema in ("shardshift", "docs"):
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}")
                                 .format(ident(schema), mover))
                    conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}")
                                 .format(ident(schema), mover))
                conn.execute(_reassign(db.mover_user, ["shardshift", "docs"], publications=True))
                # The schema as its owner makes it (objects created by the mover later, such
                # as collection tables, are then the mover's too).
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(mover))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SHARD_DDL_LOCK,))
                conn.execute(SHARD_DDL)
                conn.execute("RESET ROLE")
                conn.execute(sql.SQL(_GRANT_ORIGIN_FUNCTIONS).format(mover=sql.Literal(db.mover_user)))
                conn.execute(sql.SQL("GRANT USAGE ON SCHEMA shardshift, docs TO {}").format(router))
                conn.execute(sql.SQL("GRANT SELECT ON shardshift.chunk_fence TO {}").format(router))
                conn.execute(sql.SQL("GRANT SELECT, UPDATE (lock_only) ON shardshift.chunk_fence_lock"
                                     " TO {}").format(router))
                conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shardshift FROM PUBLIC")
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}"
                                     " REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC").format(mover))
                for fn in ROUTER_FUNCTIONS:
                    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + fn + " TO {}")
                                 .format(router))
                conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN"
                                     " SCHEMA docs TO {}").format(router))
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA docs"
                                     " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}")
                             .format(mover, router))
            else:
                writer, reader = ident(db.catalog_user), ident(db.catalog_reader_user)
                conn.execute(sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}")
                             .format(ident(dbname), writer))
                conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}")
                             .format(ident(dbname), reader))
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS catalog AUTHORIZATION {}")
                             .format(writer))
                conn.execute(sql.SQL("ALTER SCHEMA catalog OWNER TO {}").format(writer))
                conn.execute(_reassign(db.catalog_user, ["catalog"], publications=False))
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(writer))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CATALOG_DDL_LOCK,))
                conn.execute(CATALOG_DDL)
                conn.execute("RESET ROLE")
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}"
                                     " REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC").format(writer))
                conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA catalog FROM PUBLIC")
                conn.execute(sql.SQL("GRANT USAGE ON SCHEMA catalog TO {}").format(reader))
                conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA catalog TO {}")
                             .format(reader))
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA catalog"
                                     " GRANT SELECT ON TABLES TO {}").format(writer, reader))
    return ProvisionedServer(kind=kind, host=host, port=port, roles=roles)


__all__ = ["ROUTER_FUNCTIONS", "ProvisionedServer", "ServerKind", "provision_server"]
