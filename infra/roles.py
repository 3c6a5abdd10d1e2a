"""Least-privilege PostgreSQL roles: the role step of provisioning a shard or the catalog.

Only provisioning (as the server's superuser) creates roles and schemas; no component of
shardshift connects as a superuser. It is split along the import layers, each layer doing
its own part in one transaction per server:

* ``provision_roles`` (here, ``infra``): the roles and their passwords (passfile), the
  database-level privileges, the schemas and their owner, handing objects an older version
  left to the superuser over to that owner, and the replication-origin functions. Nothing
  here knows a table, view or function of a shard or of the catalog.
* ``shards.postgres.provision.provision_shard``: the shard's schema DDL as the mover, then
  the router's grants on the fence, the lock view, the router functions and ``docs``.
* ``catalog.provision.provision_catalog``: the catalog's DDL as the catalog writer, then the
  reader's grants.
* ``catalog.local_stack.provision_stack``: both, on every server of the local stack (what
  ``shardshift infra up`` runs after ``Stack.up()`` has started the servers).

All of it is idempotent; run on a server provisioned by an older version, it upgrades it
(objects owned by the superuser are handed to their owner role, grants are added).

Roles (names from ``settings.DatabaseSettings``):

On a shard
    * **mover** (workers; the CLI's shard DDL): ``LOGIN REPLICATION``, no superuser. Owns the
      schemas ``shardshift`` and ``docs`` and everything in them (a publication may only
      name tables its owner owns; fences, stream state and import progress are its own),
      ``CONNECT, CREATE, TEMPORARY`` on the database (publications need ``CREATE``; the
      applier stages rows in a temp table), ``EXECUTE`` on ``pg_replication_origin_*``.
      Slots and walsenders come with ``REPLICATION``; terminating a walsender that holds a
      slot needs nothing more, because the mover's own sessions are the ones it stops.
      Member of ``pg_read_all_stats``: the copy and apply throttles count the sessions of
      every role that are running a statement (``pg_stat_activity`` hides other roles'
      ``state`` otherwise).
    * **router**: ``CONNECT`` (here); its rights on the shard's objects are granted by
      ``provision_shard``.

On the catalog
    * **catalog writer** (workers, CLI): owns schema ``catalog``; ``CONNECT, CREATE,
      TEMPORARY``.
    * **catalog reader** (routers): ``CONNECT`` (here); ``provision_catalog`` grants it read
      access to the catalog's tables. ``LISTEN`` needs no grant. It cannot write.

``PUBLIC`` loses ``CONNECT``/``TEMPORARY`` on the database. Passwords are random, kept only in
the libpq passfile (one line per host, port and role) and sent to the server as a SCRAM
verifier computed client-side, so no statement (or server log line) ever carries a password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    """What ``provision_roles`` set up: the roles (by purpose) on one server."""

    kind: ServerKind
    host: str
    port: int
    roles: dict[str, str]


def _address(dsn: str) -> tuple[str, int, str]:
    """(host, port, dbname) of a DSN; of a multi-host DSN (a replica set, whose nodes share
    their roles) the first node's."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or params.get("hostaddr") or "").split(",")[0]
    if not host:
        raise InfraError("provisioning needs a DSN with host= (a TCP address)")
    port = str(params.get("port") or 5432).split(",")[0] or "5432"
    return host, int(port), str(params.get("dbname") or "shardshift")


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
        raise InfraError("provisioning must connect as a superuser (it creates roles)")
    for purpose, name in roles.items():
        if not name or name == me[0]:
            raise InfraError(f"the {purpose} role may not be {name!r} (the superuser)")


@dataclass(frozen=True)
class _Layout:
    """What a kind of server has: its roles by purpose, the purpose owning its schemas."""

    roles: dict[str, str]
    owner: str  # a purpose of ``roles``
    schemas: tuple[str, ...]


def _layout(kind: ServerKind, db: DatabaseSettings) -> _Layout:
    if kind == "shard":
        return _Layout({"router": db.router_user, "mover": db.mover_user}, "mover",
                       ("shardshift", "docs"))
    if kind == "catalog":
        return _Layout({"catalog": db.catalog_user, "catalog_reader": db.catalog_reader_user},
                       "catalog", ("catalog",))
    raise InfraError(f"unknown server kind {kind!r}: expected 'shard' or 'catalog'")


@dataclass(frozen=True)
class RoleStep:
    """The open provisioning transaction of one server, after ``provision_roles``' own part.

    The layer that owns the server's objects runs its DDL (``as_owner``) and its grants on
    ``conn``; everything commits together when the ``provision_roles`` block ends, and
    nothing does if it raises.
    """

    conn: psycopg.Connection[Any]
    server: ProvisionedServer
    db: DatabaseSettings
    owner: str  # the role owning the server's schemas (and what is made in them)

    @contextmanager
    def as_owner(self) -> Iterator[psycopg.Connection[Any]]:
        """Statements in this block run as the schema owner (so what they create is its)."""
        self.conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.owner)))
        yield self.conn
        self.conn.execute("RESET ROLE")


@contextmanager
def provision_roles(
    superuser_dsn: str,
    passfile: Path,
    *,
    kind: ServerKind,
    db: DatabaseSettings | None = None,
    passfile_host: str | None = None,
    passfile_port: int | None = None,
) -> Iterator[RoleStep]:
    """Create (or bring up to date) the roles, database privileges and schemas of one server.

    A context manager: the block runs inside the same transaction, after the role step, and
    does the part that knows the server's objects (``provision_shard``, ``provision_catalog``).
    The transaction commits when the block ends, and rolls back if it raises.

    Args:
        superuser_dsn: a superuser's DSN to the server's ``shardshift`` database.
        passfile: the libpq passfile; each role's password is read from it, or generated
            and added (0600).
        kind: ``shard`` (router + mover) or ``catalog`` (catalog writer + reader).
        db: the role names (default: ``settings.DatabaseSettings()``).
        passfile_host, passfile_port: the address components will use in their DSNs, when
            it differs from the superuser DSN's host and port (the passfile lines must match
            what the components connect to).

    Idempotent; safe to run on a live server (passwords stay those of the passfile).
    """
    db = db or DatabaseSettings()
    host, port, dbname = _address(superuser_dsn)
    host, port = passfile_host or host, passfile_port or port
    layout = _layout(kind, db)
    roles = layout.roles
    if len(set(roles.values())) != len(roles):
        raise InfraError(f"the {kind} roles must have distinct names: {roles}")
    owner = roles[layout.owner]
    passwords = {name: ensure_password(passfile, host, port, name) for name in roles.values()}

    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        _check_names(conn, roles)
        ident = sql.Identifier
        with conn.transaction():
            for purpose, name in roles.items():
                _ensure_role(conn, name, passwords[name], replication=purpose == "mover")
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident(dbname)))
            for purpose, name in roles.items():
                rights = "CONNECT, CREATE, TEMPORARY" if purpose == layout.owner else "CONNECT"
                conn.execute(sql.SQL("GRANT " + rights + " ON DATABASE {} TO {}")
                             .format(ident(dbname), ident(name)))
            for schema in layout.schemas:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}")
                             .format(ident(schema), ident(owner)))
                conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}")
                             .format(ident(schema), ident(owner)))
            conn.execute(_reassign(owner, list(layout.schemas), publications=kind == "shard"))
            if kind == "shard":
                conn.execute(sql.SQL(_GRANT_ORIGIN_FUNCTIONS).format(mover=sql.Literal(owner)))
                # The throttles count the source's busy sessions (other roles' included).
                conn.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(ident(owner)))
            yield RoleStep(conn, ProvisionedServer(kind=kind, host=host, port=port, roles=roles),
                           db, owner)


__all__ = ["ProvisionedServer", "RoleStep", "ServerKind", "provision_roles"]
