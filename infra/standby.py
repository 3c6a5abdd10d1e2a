"""Streaming standbys of the local stack's servers: clone, configure, promote.

A replicated server is two PostgreSQL instances of the same binaries: the primary and a hot
standby cloned from it with ``pg_basebackup -R`` (physical streaming replication over the
physical slot ``shardshift_standby``). What each side gets, and why:

* **Synchronous commit.** The primary names the standby in ``synchronous_standby_names``, so a
  commit is acknowledged only once the standby has flushed it: a write a client saw
  acknowledged survives the primary's loss. The price: while the standby is down the primary's
  writes wait (start the standby, or ``ALTER SYSTEM SET synchronous_standby_names = ''``).
* **Failover slots** (PostgreSQL 17+). The standby runs the slot sync worker
  (``sync_replication_slots = on``, which needs ``hot_standby_feedback``, ``primary_slot_name``
  and a ``dbname`` in ``primary_conninfo``), so every logical slot created with
  ``failover => true`` exists on the standby too; the primary lists the standby's slot in
  ``synchronized_standby_slots``, so no logical consumer receives a change the standby has not
  flushed (after a promotion the consumer is never ahead of the new primary). A synced slot is
  usable only once its standby is promoted. PostgreSQL 15 has neither setting: its logical
  slots stay on the primary and are lost with it.
* **Promotion** (``pg_ctl promote``) turns the standby into a primary with no standby of its
  own: its ``synchronous_standby_names`` is cleared so its writes do not wait for one. The old
  primary must never run again as a primary (its data may have diverged): the stack marks it
  stale and ``clone`` makes it a standby of the new primary from scratch.

The standby's password for the replication connection is the superuser's, written by
``pg_basebackup -R`` into its ``postgresql.auto.conf`` (mode 0600, owned by the server user),
the usual place for ``primary_conninfo``; the stack's passfile gets the standby's port for
every role (``add_alias``), so multi-host DSNs log in on either side.
"""

from __future__ import annotations

import os
import pwd
import shutil
import time

import psycopg
from psycopg import sql

from infra.errors import InfraError
from infra.passfile import lookup
from infra.postgres import DATABASE, SUPERUSER, PostgresInstance, binary_version

STANDBY_SLOT = "shardshift_standby"
"""The physical slot on the primary that the standby streams from (and its application name)."""

FAILOVER_SLOTS_VERSION = 17
"""The first PostgreSQL major version that synchronizes logical slots to a standby."""


def is_standby(instance: PostgresInstance) -> bool:
    """Whether the instance's data directory starts as a standby (``standby.signal``)."""
    return (instance.data_dir / "standby.signal").exists()


def clone(primary: PostgresInstance, replica: PostgresInstance, timeout: float) -> None:
    """Make ``replica`` a fresh streaming standby of the running ``primary``.

    Whatever ``replica``'s data directory held is removed first (a stale old primary is
    re-cloned, never rewound). The replica is not started."""
    if replica.pid() is not None:
        raise InfraError(f"{replica.name}: running; stop it before cloning it from {primary.name}")
    password = lookup(primary.passfile, "127.0.0.1", primary.port, SUPERUSER)
    if password is None:
        raise InfraError(f"{primary.name}: no superuser password in {primary.passfile}")
    with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (STANDBY_SLOT,)).fetchone() is None:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (STANDBY_SLOT,))
    shutil.rmtree(replica.data_dir, ignore_errors=True)
    replica.data_dir.mkdir(parents=True)
    if replica.run_as:
        user = pwd.getpwnam(replica.run_as)
        os.chown(replica.data_dir, user.pw_uid, user.pw_gid)
    os.chmod(replica.data_dir, 0o700)
    source = (f"host=127.0.0.1 port={primary.port} user={SUPERUSER} dbname={DATABASE} "
              f"application_name={STANDBY_SLOT}")
    replica.run(
        [str(replica.bin_dir / "pg_basebackup"), "-D", str(replica.data_dir), "-d", source,
         "-R", "-X", "stream", "-S", STANDBY_SLOT, "-c", "fast", "--no-password"],
        timeout=timeout, env={"PGPASSWORD": password},
    )
    version = binary_version(replica.bin_dir)
    lines = [
        "# --- shardshift standby ---",
        f"port = {replica.port}",
        "hot_standby = on",
        "hot_standby_feedback = on",
        f"primary_slot_name = '{STANDBY_SLOT}'",
        # Settings only a primary with a standby of its own should have.
        "synchronous_standby_names = ''",
    ]
    if version >= FAILOVER_SLOTS_VERSION:
        lines += ["sync_replication_slots = on", "synchronized_standby_slots = ''"]
    with (replica.data_dir / "postgresql.auto.conf").open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def configure_primary(primary: PostgresInstance, timeout: float) -> None:
    """Once its standby streams: commits wait for the standby, and (17+) logical walsenders
    send nothing the standby has not flushed. Idempotent."""
    wait_streaming(primary, timeout)
    settings = {"synchronous_standby_names": f'"{STANDBY_SLOT}"'}
    if binary_version(primary.bin_dir) >= FAILOVER_SLOTS_VERSION:
        settings["synchronized_standby_slots"] = STANDBY_SLOT
    _alter_system(primary, settings)


def wait_streaming(primary: PostgresInstance, timeout: float) -> None:
    """Wait until the primary's standby streams from it."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT state FROM pg_stat_replication WHERE application_name = %s",
                (STANDBY_SLOT,)).fetchone()
            if row and row[0] == "streaming":
                return
            if time.monotonic() > deadline:
                raise InfraError(f"{primary.name}: its standby does not stream after "
                                 f"{timeout:.0f}s (state {row[0] if row else 'absent'})")
            time.sleep(0.1)


def promote(replica: PostgresInstance, timeout: float) -> None:
    """Promote a running standby to primary; its writes no longer wait for a standby."""
    if not is_standby(replica):
        raise InfraError(f"{replica.name}: not a standby (already promoted?)")
    replica.run([str(replica.bin_dir / "pg_ctl"), "-D", str(replica.data_dir), "-w",
                 "-t", str(int(timeout)), "promote"], timeout=timeout + 10)
    settings = {"synchronous_standby_names": ""}
    if binary_version(replica.bin_dir) >= FAILOVER_SLOTS_VERSION:
        settings["synchronized_standby_slots"] = ""
    _alter_system(replica, settings)


def in_recovery(instance: PostgresInstance) -> bool:
    with psycopg.connect(instance.dsn("postgres"), autocommit=True, connect_timeout=2) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])


def _alter_system(instance: PostgresInstance, settings: dict[str, str]) -> None:
    with psycopg.connect(instance.dsn("postgres"), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")


__all__ = ["STANDBY_SLOT", "clone", "configure_primary", "in_recovery", "is_standby", "promote",
           "wait_streaming"]
