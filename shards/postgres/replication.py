"""The change stream of a chunk: publication, slot, walsender connection, feedback, cleanup.

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
2. Everything the server sends arrives in commit order, and a keepalive's ``walEnd`` (the
   decoder's position) is sent after every transaction that commits before it. So once every
   transaction received before a keepalive has been applied, the keepalive's position is
   applied too (:class:`~shards.postgres.pgoutput.Position`). A keepalive that arrives in the
   middle of a transaction is *not* turned into a position: the decoder has already read that
   transaction's commit, so the position would run ahead of unapplied data.
3. Feedback (the flush LSN in a standby status update) is the only thing that lets the server
   discard WAL and never resend it. :class:`ChangeStream` sends exactly what its owner passes
   to :meth:`ChangeStream.confirm`, and the applier calls it only after the target committed
   everything before that LSN. A crash before feedback costs a resend, which the applier skips
   by its origin's progress; feedback before the target commit could lose a write.
4. On PostgreSQL 16+ the stream asks pgoutput for ``origin 'none'``: transactions that an
   applier wrote under a replication origin are never sent, so a reverse stream never echoes
   the forward stream back. PostgreSQL 15's pgoutput has no such option; it sends an
   ``Origin`` message in those transactions and the decoder drops them whole.
5. A slot retains WAL until it is dropped. :func:`cleanup_stream_objects` drops every slot,
   publication and origin whose name belongs to a migration, terminating a walsender that
   still holds a slot; the move's cleanup phase (and every abort path) calls it on the source
   and on the target.
"""

from __future__ import annotations

import hashlib
import re
import select
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.pgoutput import (
    ChunkDecoder,
    Position,
    Transaction,
    lsn_from_str,
    lsn_to_str,
    unix_to_pg_time,
)
from shards.postgres.schema import collection_table

NAME_PREFIX = "ss_"
MESSAGE_PREFIX = "shardshift"

_STATUS = struct.Struct(">cqqqqb")
_KEEPALIVE = struct.Struct(">qqb")


class ReplicationError(Exception):
    """The change stream failed (connection lost, slot missing, protocol error)."""


class SlotExistsError(ReplicationError):
    """A slot with the stream's name exists already: its snapshot is gone, so a snapshot
    phase that is retried must drop it (``replace_existing=True``) and copy again."""


class SlotMissingError(ReplicationError):
    """The stream's slot does not exist on the source (dropped, or never created): the changes
    it was keeping are gone, so no retry can resume the stream; the move must start over."""


class _SlotBusy(ReplicationError):
    """The slot is active in another walsender (SQLSTATE 55006)."""


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


def _walsender(dsn: str) -> pq.abc.PGconn:
    conn = pq.PGconn.connect(make_conninfo(dsn, replication="database").encode())
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
    conn = _walsender(dsn)
    try:
        mode = "export" if export_snapshot else "nothing"
        res = _exec(
            conn,
            f'CREATE_REPLICATION_SLOT "{names.slot}" LOGICAL pgoutput (SNAPSHOT \'{mode}\')',
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


# -- the stream --------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamStats:
    frames: int = 0
    transactions: int = 0
    keepalives: int = 0
    feedback_sent: int = 0
    bytes: int = 0
    skipped_foreign: int = 0


@dataclass
class ChangeStream:
    """A streaming walsender connection on one slot, decoded to one chunk's transactions.

    Single-threaded: the owner calls :meth:`poll` to receive and :meth:`confirm` once the
    target has committed, from the same thread.

    Args:
        dsn: the source shard.
        names: the stream's names (slot, publication, message prefix).
        collection, chunk_id, key_range: the chunk.
        start_lsn: where to resume (the applier's origin progress); 0 starts at the slot's
            confirmed position. The server never starts before that position, whatever is
            asked.
        status_interval: seconds between unprompted standby status updates (keeps the
            server's ``wal_sender_timeout`` from firing while the applier is busy or held).
    """

    dsn: str
    names: StreamNames
    collection: str
    chunk_id: int
    key_range: KeyRange
    start_lsn: int = 0
    status_interval: float = 5.0
    stats: StreamStats = field(default_factory=StreamStats)
    server_lsn: int = 0
    """Latest decoder position the server reported (keepalive ``walEnd``)."""
    received_lsn: int = 0
    """End of the last complete transaction (or position) received."""
    confirmed_lsn: int = 0
    """What the last status update told the server is durably applied."""
    server_version: int = 0

    def __post_init__(self) -> None:
        self._conn: pq.abc.PGconn | None = None
        self._decoder: ChunkDecoder | None = None
        self._last_status = 0.0
        self._want_reply = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, busy_timeout: float = 30.0) -> ChangeStream:
        """Connect and start streaming.

        Args:
            busy_timeout: how long to wait for a slot still held by a walsender whose client
                died (a crashed applier): the server notices the dead peer and frees it.
        """
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return self._start()
            except _SlotBusy:
                if time.monotonic() > deadline:
                    raise ReplicationError(
                        f"replication slot {self.names.slot} is held by another walsender "
                        f"after {busy_timeout}s; is another applier running this stream?"
                    ) from None
                time.sleep(0.1)

    def _start(self) -> ChangeStream:
        conn = _walsender(self.dsn)
        self._conn = conn
        self.server_version = conn.server_version
        origin_filter = self.server_version >= 160000
        self._decoder = ChunkDecoder(
            self.collection, self.chunk_id, self.key_range, self.names.message_prefix,
            skip_origins=True,
        )
        options = [
            "proto_version '1'",
            f"publication_names '\"{self.names.publication}\"'",
            "messages 'true'",
        ]
        if origin_filter:
            options.append("origin 'none'")
        command = (
            f'START_REPLICATION SLOT "{self.names.slot}" LOGICAL {lsn_to_str(self.start_lsn)}'
            f" ({', '.join(options)})"
        )
        res = conn.exec_(command.encode())
        if res.status != pq.ExecStatus.COPY_BOTH:
            message = (res.error_message or b"").decode(errors="replace")
            self.close()
            sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
            if sqlstate == b"55006":
                raise _SlotBusy(message)
            if sqlstate == b"42704":
                raise SlotMissingError(f"START_REPLICATION on {self.names.slot}: {message}")
            raise ReplicationError(f"START_REPLICATION on {self.names.slot} failed: {message}")
        conn.nonblocking = 1
        self.confirmed_lsn = self.start_lsn
        self._last_status = time.monotonic()
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.finish()
            self._conn = None

    def __enter__(self) -> ChangeStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_transaction(self) -> bool:
        return self._decoder is not None and self._decoder._txn is not None

    @property
    def decoded_changes(self) -> int:
        return self._decoder.decoded_changes if self._decoder else 0

    # -- receiving ---------------------------------------------------------------------------

    def poll(self, timeout: float, max_items: int = 100_000) -> list[Transaction | Position]:
        """Receive what the server has sent, waiting up to ``timeout`` for the first item.

        Returns complete transactions (possibly empty: positions matter) and positions, in
        server order. Returns early once the socket has nothing more buffered.
        """
        conn = self._require()
        decoder = self._decoder
        assert decoder is not None
        out: list[Transaction | Position] = []
        deadline = time.monotonic() + timeout
        while True:
            n, data = conn.get_copy_data(1)
            if n > 0:
                self._frame(bytes(data), decoder, out)
                if len(out) >= max_items:
                    break
                continue
            if n == -1:
                res = conn.get_result()
                message = (res.error_message if res else b"") or b"stream ended"
                raise ReplicationError(
                    f"replication stream of {self.names.slot} ended: "
                    f"{message.decode(errors='replace')}"
                )
            self.maybe_send_status()
            wait = 0.0 if out else deadline - time.monotonic()
            if wait < 0:
                break
            readable, _, _ = select.select([conn.socket], [], [], wait)
            if not readable:
                break
            conn.consume_input()
        return out

    def _frame(self, data: bytes, decoder: ChunkDecoder,
               out: list[Transaction | Position]) -> None:
        self.stats.frames += 1
        self.stats.bytes += len(data)
        kind = data[0]
        if kind == 0x77:  # 'w' XLogData
            txn = decoder.feed(data[25:])
            if txn is not None:
                self.stats.transactions += 1
                self.received_lsn = max(self.received_lsn, txn.end_lsn)
                if txn.origin is not None and txn.empty:
                    self.stats.skipped_foreign += 1
                if txn.empty:
                    out.append(Position(txn.end_lsn))
                else:
                    out.append(txn)
        elif kind == 0x6B:  # 'k' primary keepalive
            wal_end, _send_time, reply = _KEEPALIVE.unpack_from(data, 1)
            self.stats.keepalives += 1
            if wal_end > self.server_lsn:
                self.server_lsn = wal_end
            if not self.in_transaction:
                self.received_lsn = max(self.received_lsn, wal_end)
                out.append(Position(wal_end))
            if reply:
                self.send_status()
        else:
            raise ReplicationError(f"unexpected CopyData message {chr(kind)!r} from the server")

    # -- feedback ----------------------------------------------------------------------------

    def confirm(self, lsn: int) -> None:
        """Tell the server that everything before ``lsn`` is durably applied.

        Call only after the target transaction holding those changes committed.
        """
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            self.send_status()

    def request_reply(self) -> None:
        """Ask the server for a keepalive (its current position) now."""
        self._want_reply = True
        self.send_status()

    def maybe_send_status(self) -> None:
        if time.monotonic() - self._last_status >= self.status_interval:
            self.send_status()

    def send_status(self) -> None:
        conn = self._require()
        reply = 1 if self._want_reply else 0
        self._want_reply = False
        now = unix_to_pg_time(time.time())
        # write = what we received (informational); flush = apply = what the target holds.
        msg = _STATUS.pack(
            b"r", max(self.received_lsn, self.confirmed_lsn), self.confirmed_lsn,
            self.confirmed_lsn, now, reply,
        )
        while (queued := conn.put_copy_data(msg)) == 0:
            # Non-blocking send buffer full: let libpq drain it, then queue again.
            conn.flush()
            select.select([], [conn.socket], [], 1.0)
        if queued != 1:
            raise ReplicationError(f"could not send feedback: {conn.get_error_message()}")
        while conn.flush() == 1:
            select.select([], [conn.socket], [], 1.0)
        self.stats.feedback_sent += 1
        self._last_status = time.monotonic()

    def _require(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise ReplicationError("the change stream is not started")
        return self._conn


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
    "ChangeStream",
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
