"""A chunk's stream objects: names, publication, slot, markers, cleanup, WAL positions.

How a stream is laid out
------------------------
A move's stream from shard S to shard T is three server objects, all named from
``(migration_id, part)`` by :func:`stream_names` so a retried activity finds (never duplicates)
what an earlier attempt made:

* on S, a publication ``ss_<mid>_<hash>_<part>`` with row filters: the collection's table
  ``WHERE khash >= lo AND khash < hi`` and ``shardshift.chunk_fence WHERE collection = ... AND
  chunk_id = ...``. The filter columns are in both tables' primary keys (their replica
  identity), which PostgreSQL requires for filtering UPDATE and DELETE. Other chunks' rows
  never leave the server.
* on S, a logical replication slot of the same name (``pgoutput``). It is created *after* the
  publication: pgoutput reads publications through the historic catalog snapshot of each
  decoded transaction, so a publication created after the slot's start would be missing
  for the first transactions.
* on T, a replication origin of the same name (see ``apply.py``).

Invariants
----------
1. The slot's exported snapshot and its consistent point L split history exactly: a
   transaction is visible in the snapshot iff its commit record starts before L, and the slot
   streams exactly the others. A copy made at the snapshot plus the stream from L is the
   source's history with no gap and no overlap.
2. On PostgreSQL 17+ the slot is a failover slot (``FAILOVER true``): a streaming standby
   with ``sync_replication_slots = on`` keeps a copy, and the primary's
   ``synchronized_standby_slots`` holds every change back from the applier until the standby
   has it, so after a promotion the slot on the new primary is never behind what the target
   applied and the applier resumes from its origin. On 15 (no such slots) a failover loses
   the slot: the stream fails with :class:`SlotMissingError` and the move aborts clean.
3. A slot retains WAL until it is dropped. :func:`cleanup_stream_objects` drops every slot,
   publication and origin whose name belongs to a migration, terminating a walsender that
   still holds a slot; the move's cleanup phase (and every abort path) calls it on the source
   and on the target.

The walsender connection that streams a slot's changes and sends feedback is
``shards/postgres/change_stream.py`` (its docstring has the stream's own invariants).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.pgoutput import lsn_from_str, lsn_to_str
from shards.postgres.schema import collection_table

NAME_PREFIX = "ss_"
FAILOVER_SLOTS_VERSION_NUM = 170000
"""Servers from this version on create the streams' slots as failover slots."""
MESSAGE_PREFIX = "shardshift"


class ReplicationError(Exception):
    """The change stream failed (connection lost, slot missing, protocol error)."""


class SlotExistsError(ReplicationError):
    """A slot with the stream's name exists already: its snapshot is gone, so a snapshot
    phase that is retried must drop it (``replace_existing=True``) and copy again."""


class SlotMissingError(ReplicationError):
    """The stream's slot does not exist on the source (dropped, or never created): the changes
    it was keeping are gone, so no retry can resume the stream; the move must start over."""


# -- names -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamNames:
    """Names of one stream's server objects (slot, publication, origin share ``name``)."""

    migration_id: str
    part: str
    name: str
    message_prefix: str

    @property
    def slot(self) -> str:
        return self.name

    @property
    def publication(self) -> str:
        return self.name

    @property
    def origin(self) -> str:
        return self.name


def migration_prefix(migration_id: str) -> str:
    """The name prefix shared by every replication object of one migration.

    Slot names allow only ``[a-z0-9_]`` and 63 bytes, so the id is folded to that alphabet
    and cut, and a hash of the *exact* id keeps two ids that fold alike apart (and keeps
    ``mig_1`` from matching ``mig_10``'s objects: the hash ends the prefix).
    """
    if not migration_id:
        raise ValueError("a migration id must not be empty")
    folded = re.sub(r"[^a-z0-9_]", "_", migration_id.lower())[:32]
    digest = hashlib.blake2b(migration_id.encode(), digest_size=4).hexdigest()
    return f"{NAME_PREFIX}{folded}_{digest}_"


def stream_names(migration_id: str, part: str = "fwd") -> StreamNames:
    """Names of the stream ``part`` (``fwd``, ``rev``, ...) of a migration."""
    if not re.fullmatch(r"[a-z0-9]{1,12}", part):
        raise ValueError(f"invalid stream part {part!r}: use 1-12 lowercase letters or digits")
    name = migration_prefix(migration_id) + part
    return StreamNames(
        migration_id=migration_id, part=part, name=name,
        message_prefix=f"{MESSAGE_PREFIX}:{name}",
    )


# -- publication and slot ----------------------------------------------------------------------


def create_publication(
    dsn: str, names: StreamNames, collection: str, chunk_id: int, key_range: KeyRange
) -> None:
    """Create the stream's publication on the source (idempotent: an existing one is kept).

    Must run before :func:`create_slot` (see the module notes).
    """
    check_collection(collection)
    hi = (
        sql.SQL(" AND khash < {}::bigint").format(sql.Literal(str(key_range.hi)))
        if key_range.sql_hi is not None else sql.SQL("")
    )
    stmt = sql.SQL(
        "CREATE PUBLICATION {pub} FOR"
        " TABLE {docs} WHERE (khash >= {lo}::bigint{hi}),"
        " TABLE shardshift.chunk_fence WHERE (collection = {coll} AND chunk_id = {chunk}::bigint)"
    ).format(
        pub=sql.Identifier(names.publication),
        docs=collection_table(collection),
        lo=sql.Literal(str(key_range.lo)),
        hi=hi,
        coll=sql.Literal(collection),
        chunk=sql.Literal(str(chunk_id)),
    )
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        # Serialize concurrent attempts of the same activity on the name.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (names.publication,))
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (names.publication,)
        ).fetchone()
        if not exists:
            conn.execute(stmt)


@dataclass(frozen=True, slots=True)
class SlotSnapshot:
    """A new slot: its consistent point and (while the context is open) exported snapshot."""

    slot_name: str
    consistent_lsn: str
    snapshot_name: str | None


def open_walsender(dsn: str) -> pq.abc.PGconn:
    """A walsender (``replication=database``) connection to ``dsn``."""
    # UTF-8 whatever the server's encoding: the applier copies column text as bytes into a
    # target session that is UTF-8 too (shards/postgres/apply.py).
    conn = pq.PGconn.connect(
        make_conninfo(dsn, replication="database", client_encoding="UTF8").encode())
    if conn.status != pq.ConnStatus.OK:
        message = conn.get_error_message()
        conn.finish()
        raise ReplicationError(f"walsender connection failed: {message}")
    return conn


def _exec(conn: pq.abc.PGconn, command: str) -> pq.abc.PGresult:
    res = conn.exec_(command.encode())
    if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        raise ReplicationError(
            f"{command.split()[0]} failed: {(res.error_message or b'').decode(errors='replace')}"
        )
    return res


def slot_exists(dsn: str, slot: str) -> bool:
    """Whether the server has a replication slot of that name."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone() is not None


def slot_position(dsn: str, slot: str) -> str | None:
    """Where a slot's stream starts (its confirmed flush position, else its restart
    position) as ``X/Y`` text; None when the slot does not exist."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(confirmed_flush_lsn, restart_lsn)::text FROM pg_replication_slots"
            " WHERE slot_name = %s", (slot,),
        ).fetchone()
        return row[0] if row else None


def ensure_slot(dsn: str, names: StreamNames) -> bool:
    """Create the stream's slot without a snapshot unless it exists (idempotent); True when
    it was created now. The slot retains WAL from its creation on until it is dropped."""
    if slot_exists(dsn, names.slot):
        return False
    with create_slot(dsn, names, export_snapshot=False):
        return True


@contextmanager
def create_slot(
    dsn: str, names: StreamNames, *, export_snapshot: bool = True, replace_existing: bool = False
) -> Iterator[SlotSnapshot]:
    """Create the stream's logical slot; inside the context its snapshot can be imported.

    The exported snapshot lives only while this walsender connection stays open and idle, so
    the copy at the snapshot (``BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION
    SNAPSHOT '<snapshot_name>'`` on other connections) must start inside the ``with`` block.
    The slot itself outlives the context; only :func:`cleanup_stream_objects` or
    :func:`drop_slot` remove it.

    Raises:
        SlotExistsError: the slot exists and ``replace_existing`` is false.
    """
    if slot_exists(dsn, names.slot):
        if not replace_existing:
            raise SlotExistsError(
                f"replication slot {names.slot} exists already; a retried snapshot must "
                "replace it (its exported snapshot died with the connection that made it)"
            )
        drop_slot(dsn, names.slot)
    conn = open_walsender(dsn)
    try:
        mode = "export" if export_snapshot else "nothing"
        # A failover slot (17+): a streaming standby synchronizes it, so the move survives
        # its source's failover (see the module notes).
        failover = ", FAILOVER true" if conn.server_version >= FAILOVER_SLOTS_VERSION_NUM else ""
        res = _exec(
            conn,
            f'CREATE_REPLICATION_SLOT "{names.slot}" LOGICAL pgoutput '
            f"(SNAPSHOT '{mode}'{failover})",
        )
        slot = (res.get_value(0, 0) or b"").decode()
        lsn = (res.get_value(0, 1) or b"").decode()
        snap = res.get_value(0, 2)
        yield SlotSnapshot(slot, lsn, snap.decode() if snap else None)
    finally:
        conn.finish()


def drop_slot(dsn: str, slot: str, timeout: float = 30.0) -> bool:
    """Drop a slot, terminating the walsender that holds it; False when it did not exist."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row is None:
                return False
            if row[0] is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return True
            except psycopg.errors.UndefinedObject:
                return False
            except psycopg.errors.ObjectInUse:
                # The terminated walsender has not exited yet.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# -- markers -----------------------------------------------------------------------------------


def emit_marker(conn: psycopg.Connection[Any], names: StreamNames, content: str) -> str:
    """Write a transactional logical message for the stream; returns its LSN.

    It reaches the applier at its transaction's commit, in order with the data, and the
    applier records it (``stream_state.last_marker``). Call on the source, in the transaction
    the marker should ride with (or autocommit for a marker of its own).
    """
    row = conn.execute(
        "SELECT pg_logical_emit_message(true, %s, %s)::text", (names.message_prefix, content)
    ).fetchone()
    assert row is not None
    return str(row[0])


# -- cleanup -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CleanupReport:
    slots: list[str]
    publications: list[str]
    origins: list[str]


def cleanup_stream_objects(dsn: str, migration_id: str, timeout: float = 30.0) -> CleanupReport:
    """Drop every slot, publication, origin and stream-state row of a migration on one server.

    Idempotent; safe on the source and on the target. Stop the applier first: dropping an
    origin waits for the session that uses it (bounded here by ``timeout``).
    """
    prefix = migration_prefix(migration_id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        slots = [r[0] for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE starts_with(slot_name::text, %s)",
            (prefix,),
        )]
        pubs = [r[0] for r in conn.execute(
            "SELECT pubname FROM pg_publication WHERE starts_with(pubname::text, %s)", (prefix,)
        )]
        origins = [r[0] for r in conn.execute(
            "SELECT roname FROM pg_replication_origin WHERE starts_with(roname, %s)", (prefix,)
        )]
    for slot in slots:
        drop_slot(dsn, slot, timeout)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for pub in pubs:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pub)))
        conn.execute("SELECT set_config('statement_timeout', %s, false)",
                     (f"{int(timeout * 1000)}ms",))
        for origin in origins:
            conn.execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin"
                " WHERE roname = %s", (origin,),
            )
        has_state = conn.execute(
            "SELECT to_regclass('shardshift.stream_state') IS NOT NULL"
        ).fetchone()
        if has_state and has_state[0]:
            conn.execute(
                "DELETE FROM shardshift.stream_markers WHERE starts_with(stream, %s)", (prefix,)
            )
            conn.execute(
                "DELETE FROM shardshift.stream_state WHERE starts_with(stream, %s)", (prefix,)
            )
    return CleanupReport(slots=slots, publications=pubs, origins=origins)


def current_lsn(conn: psycopg.Connection[Any]) -> int:
    """The server's current WAL write position."""
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return lsn_from_str(row[0])


class WalPositionReader:
    """The server's current WAL write position, read on one kept-open connection (for a
    sampler that asks every second): reopened after a failure; ``read`` answers ``None``
    when the server does not answer."""

    def __init__(self, dsn: str, *, connect_timeout: int = 5) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None

    def read(self) -> int | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True,
                                             connect_timeout=self.connect_timeout)
            return current_lsn(self._conn)
        except psycopg.Error:
            self.close()
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def wal_position(dsn: str) -> str:
    """The server's current WAL write position as ``X/Y`` text (one fresh connection)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return lsn_to_str(current_lsn(conn))


__all__ = [
    "WalPositionReader",
    "CleanupReport",
    "ReplicationError",
    "SlotExistsError",
    "SlotMissingError",
    "SlotSnapshot",
    "StreamNames",
    "cleanup_stream_objects",
    "create_publication",
    "create_slot",
    "current_lsn",
    "drop_slot",
    "emit_marker",
    "ensure_slot",
    "migration_prefix",
    "slot_exists",
    "slot_position",
    "stream_names",
    "wal_position",
]
