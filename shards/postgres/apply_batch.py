"""One batch of the change applier: collapsed per key, staged by COPY, applied set-based.

:class:`BatchWriter` turns the source transactions of one applier batch
(``shards/postgres/apply.py``) into at most four set-based statements on the target, inside
the batch's target transaction:

1. the changes are collapsed to the last change per ``(khash, id)`` in source order (changes
   to different keys commute, so only each key's last change matters; a truncate drops every
   earlier change and deletes the chunk's range first);
2. each key is classified by what the target holds *at the start of the batch*: a key whose
   first change in the batch is a source INSERT (``Upsert.fresh``), or that follows a
   truncate, has no row there (the target equals the source as of the previous batch, and
   the source had no such row just before it inserted it). Its last change is then a plain
   insert (no conflict check: half the cost of an upsert), or nothing at all when that last
   change is a delete. Every other key is an upsert (``INSERT ... ON CONFLICT DO UPDATE``)
   or a delete;
3. the deletes and upserts go into the session's temporary table ``pg_temp.ss_apply`` with one
   binary COPY (built in one buffer: the key and document bytes exactly as pgoutput sent
   them, a ``jsonb`` value being its version byte and that text; no per-row formatting), read
   by ``DELETE ... USING`` and the upsert; the plain inserts are COPYed straight into the
   collection's table (no staging, no ``INSERT ... SELECT``). That COPY runs in a savepoint:
   should a row be there after all (a target changed behind the applier's back), its unique
   violation rolls back to the savepoint and the same rows are staged and upserted, which is
   what the batch would have done without the classification.

The whole batch is one query (``COPY ...; DELETE ...; INSERT ... ON CONFLICT ...; SAVEPOINT;
COPY ...; RELEASE``, the COPY data sent from a non-blocking connection), and while the target
works on it, the COPYs included, the applier keeps reading and decoding its change stream
(``pump``): the source's next transactions are decoded while the target applies the current
ones, instead of after.
"""

from __future__ import annotations

import select
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result

from shards.models import KeyRange
from shards.postgres import _accel
from shards.postgres.pgoutput import Delete, Marker, Transaction, TruncateChunk, Upsert
from shards.postgres.schema import collection_table, range_predicate

OP_DELETE, OP_UPSERT, OP_INSERT = 0, 1, 2
"""The ``op`` column of ``pg_temp.ss_apply``."""

STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS ss_apply"
    " (op smallint NOT NULL, khash bigint NOT NULL, id text NOT NULL, doc jsonb)"
    " ON COMMIT DELETE ROWS"
)
"""The applier session's staging table (emptied by every commit)."""

_COPY_SQL = "COPY pg_temp.ss_apply (op, khash, id, doc) FROM STDIN (FORMAT binary)"
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, extension length
_COPY_TRAILER = b"\xff\xff"
_ROW_HEAD = struct.Struct(">hihiqi")
"""4 fields; op (int2); khash (int8); the length of id (text)."""
_DOC_HEAD = struct.Struct(">ib")
"""The length of doc (jsonb) and its binary format's version byte (1: the text follows)."""
_NULL = b"\xff\xff\xff\xff"
_FRESH_HEAD = struct.Struct(">hiqi")
"""3 fields; khash (int8); the length of id (text): a row of the collection's table."""

_UNIQUE_VIOLATION = "23505"
_SAVEPOINT = "ss_apply_fresh"


@dataclass(slots=True)
class Collapsed:
    """A batch reduced to what the target must do."""

    rows: list[tuple[int, int, bytes, bytes | None]] = field(default_factory=list)
    """``(op, khash, id, doc)`` per key, at most one row per key."""
    truncate: bool = False
    """Delete the chunk's range first."""
    markers: list[tuple[int, Marker]] = field(default_factory=list)
    """``(commit_lsn, marker)`` of the batch's fence changes and messages, in order."""
    changes: int = 0
    """Source changes in the batch."""
    counts: tuple[int, int, int] = (0, 0, 0)
    """Rows per op: deletes, upserts, plain inserts."""


def collapse(txns: Sequence[Transaction]) -> Collapsed:
    """The last change per key, classified by whether the target has the key's row at the
    start of the batch (see the module docstring). With the C accelerator built, its
    ``collapse_changes`` does the loop over the changes; :func:`collapse_py` is the
    reference (tests/properties/test_pgoutput_fast.py holds them equal)."""
    fast = _accel.compiled()
    if fast is None:
        return collapse_py(txns)
    return collapse_with(fast, txns)


def collapse_with(fast: Any, txns: Sequence[Transaction]) -> Collapsed:
    """:func:`collapse` through the C module ``fast``."""
    rows, truncate, changes, deletes, upserts, inserts = fast.collapse_changes(
        txns, Upsert, Delete, TruncateChunk)
    out = Collapsed(rows=rows, truncate=truncate, changes=changes,
                    counts=(deletes, upserts, inserts))
    for txn in txns:
        for marker in txn.markers:
            out.markers.append((txn.commit_lsn, marker))
    return out


def collapse_py(txns: Sequence[Transaction]) -> Collapsed:
    """:func:`collapse` in Python (the reference, and the path without the accelerator)."""
    # key -> (absent at the start of the batch, op or None for "nothing to do", doc)
    ops: dict[tuple[int, bytes], tuple[bool, int | None, bytes | None]] = {}
    out = Collapsed()
    truncated = False
    changes = 0
    for txn in txns:
        for change in txn.changes:
            changes += 1
            if type(change) is Upsert:
                key = (change.khash, change.id)
                prev = ops.get(key)
                doc = change.doc
                if prev is None:
                    # "Unchanged TOAST" (doc None) as the key's first change: the document
                    # is on the target and did not change.
                    ops[key] = (change.fresh or truncated,
                                None if doc is None else OP_UPSERT, doc)
                elif doc is not None:
                    ops[key] = (prev[0], OP_UPSERT, doc)
                # else: unchanged TOAST after an earlier change of this batch, which still
                # holds the right document.
            elif type(change) is Delete:
                key = (change.khash, change.id)
                prev = ops.get(key)
                ops[key] = (truncated if prev is None else prev[0], OP_DELETE, None)
            elif type(change) is TruncateChunk:
                ops.clear()
                out.truncate = truncated = True
        for marker in txn.markers:
            out.markers.append((txn.commit_lsn, marker))
    rows = out.rows
    append = rows.append
    deletes = upserts = inserts = 0
    for (khash, id_), (absent, op, doc) in ops.items():
        if op is None:
            continue
        if op == OP_DELETE:
            if absent:
                continue  # inserted and deleted within the batch: nothing to do
            deletes += 1
            append((OP_DELETE, khash, id_, None))
        elif absent:
            inserts += 1
            append((OP_INSERT, khash, id_, doc))
        else:
            upserts += 1
            append((OP_UPSERT, khash, id_, doc))
    out.changes = changes
    out.counts = (deletes, upserts, inserts)
    return out


Pump = Callable[[], bool]
"""Reads and decodes what the change stream has buffered; False when it should not be
called again during this statement (the applier's buffer is full, or it is throttled)."""


class BatchWriter:
    """The target side of one stream's batches (one per applier; statements prepared once).

    Args:
        collection: the collection (validated by the caller).
        key_range: the chunk's range (a truncate deletes it).
    """

    def __init__(self, collection: str, key_range: KeyRange) -> None:
        t = collection_table(collection)
        self._delete = sql.SQL(
            "DELETE FROM {t} d USING pg_temp.ss_apply s"
            " WHERE s.op = 0 AND d.khash = s.khash AND d.id = s.id"
        ).format(t=t)
        self._upsert = sql.SQL(
            "INSERT INTO {t} (khash, id, doc) SELECT khash, id, doc FROM pg_temp.ss_apply"
            " WHERE op = {op} ON CONFLICT (khash, id) DO UPDATE SET doc = EXCLUDED.doc"
        )
        self._upsert_some = self._upsert.format(t=t, op=sql.Literal(OP_UPSERT))
        self._upsert_fresh = self._upsert.format(t=t, op=sql.Literal(OP_INSERT))
        self._copy_fresh = sql.SQL(
            "COPY {t} (khash, id, doc) FROM STDIN (FORMAT binary)").format(t=t)
        # Both bounds (range_predicate): a lone ``khash >= lo`` on the top chunk is priced at a
        # third of a table without statistics and deleted with a scan of every chunk's rows.
        self._truncate = sql.SQL("DELETE FROM {t} WHERE {w}").format(
            t=t, w=range_predicate(key_range))
        self.fallbacks = 0
        """Batches whose plain insert met an existing row and was upserted instead."""

    def write(self, conn: psycopg.Connection[Any], batch: Collapsed,
              pump: Pump | None = None, pump_fd: int | None = None) -> None:
        """Apply ``batch`` in the caller's open transaction on ``conn``; while the target
        works (the COPY data included), call ``pump`` whenever ``pump_fd`` is readable."""
        if batch.truncate:
            conn.execute(self._truncate)
        if not batch.rows:
            return
        staged, fresh = copy_buffers(batch.rows)
        deletes, upserts, inserts = batch.counts
        statements: list[sql.Composable] = []
        copies: list[bytes] = []
        if deletes or upserts:
            statements.append(sql.SQL(_COPY_SQL))
            copies.append(staged)
            if deletes:
                statements.append(self._delete)
            if upserts:
                statements.append(self._upsert_some)
        insert_at = -1
        if inserts:
            statements.append(sql.SQL("SAVEPOINT " + _SAVEPOINT))
            insert_at = len(statements)
            statements.append(self._copy_fresh)
            copies.append(fresh)
            statements.append(sql.SQL("RELEASE SAVEPOINT " + _SAVEPOINT))
        query = sql.SQL("; ").join(statements).as_bytes(conn)
        failed_at, error = _run_pumped(conn, query, pump, pump_fd, copies)
        if error is None:
            return
        if failed_at == insert_at and error.sqlstate == _UNIQUE_VIOLATION:
            # A row the batch expected absent is there: stage those rows and upsert them.
            conn.execute("ROLLBACK TO SAVEPOINT " + _SAVEPOINT)
            query = sql.SQL("; ").join([sql.SQL(_COPY_SQL), self._upsert_fresh]).as_bytes(conn)
            _, error = _run_pumped(conn, query, None, None,
                                   [copy_data([r for r in batch.rows if r[0] == OP_INSERT])])
            if error is not None:
                raise error
            conn.execute("RELEASE SAVEPOINT " + _SAVEPOINT)
            self.fallbacks += 1
            return
        raise error


def copy_data(rows: Sequence[tuple[int, int, bytes, bytes | None]]) -> bytes:
    """``rows`` as the whole input of a binary ``COPY pg_temp.ss_apply FROM STDIN``."""
    parts = [_COPY_HEADER]
    append = parts.append
    row_head = _ROW_HEAD.pack
    doc_head = _DOC_HEAD.pack
    for op, khash, id_, doc in rows:
        append(row_head(4, 2, op, 8, khash, len(id_)))
        append(id_)
        if doc is None:
            append(_NULL)
        else:
            append(doc_head(len(doc) + 1, 1))
            append(doc)
    append(_COPY_TRAILER)
    return b"".join(parts)


def copy_buffers(rows: Sequence[tuple[int, int, bytes, bytes | None]]) -> tuple[bytes, bytes]:
    """The binary COPY inputs of a batch: its deletes and upserts for ``pg_temp.ss_apply``
    (``op, khash, id, doc``), and its plain inserts for the collection's table itself
    (``khash, id, doc``), in one pass (in C when the accelerator is built)."""
    fast = _accel.compiled()
    if fast is None:
        return copy_buffers_py(rows)
    staged, fresh = fast.copy_buffers(rows)
    return staged, fresh


def copy_buffers_py(rows: Sequence[tuple[int, int, bytes, bytes | None]]
                    ) -> tuple[bytes, bytes]:
    """:func:`copy_buffers` in Python (the reference)."""
    staged = [_COPY_HEADER]
    fresh = [_COPY_HEADER]
    put_staged = staged.append
    put_fresh = fresh.append
    row_head = _ROW_HEAD.pack
    fresh_head = _FRESH_HEAD.pack
    doc_head = _DOC_HEAD.pack
    for op, khash, id_, doc in rows:
        if op == OP_INSERT:
            put_fresh(fresh_head(3, 8, khash, len(id_)))
            put_fresh(id_)
            if doc is None:
                put_fresh(_NULL)
            else:
                put_fresh(doc_head(len(doc) + 1, 1))
                put_fresh(doc)
        else:
            put_staged(row_head(4, 2, op, 8, khash, len(id_)))
            put_staged(id_)
            if doc is None:
                put_staged(_NULL)
            else:
                put_staged(doc_head(len(doc) + 1, 1))
                put_staged(doc)
    put_staged(_COPY_TRAILER)
    put_fresh(_COPY_TRAILER)
    return b"".join(staged), b"".join(fresh)


_COPY_CHUNK = 1 << 20


def _run_pumped(conn: psycopg.Connection[Any], query: bytes, pump: Pump | None,
                pump_fd: int | None, copies: Sequence[bytes] = ()
                ) -> tuple[int, psycopg.Error | None]:
    """Run ``query`` (one or more statements, no parameters) on ``conn`` and, until the
    target has answered, call ``pump`` whenever ``pump_fd`` is readable. Each ``COPY ...
    FROM STDIN`` of the query gets the next buffer of ``copies`` as its data.

    Returns the index of the statement that failed and its error (``(-1, None)`` when all
    succeeded); the connection is idle in its transaction either way.
    """
    pgconn = conn.pgconn
    pgconn.send_query(query)  # raises OperationalError when it cannot be sent
    target_fd = pgconn.socket
    index = 0
    failed_at, error = -1, None
    pumping = _Pumping(pump, pump_fd)
    copies_left = list(copies)
    while True:
        pumping.run()
        pgconn.consume_input()
        if pgconn.is_busy():
            pumping.wait([target_fd], [])
            continue
        res = pgconn.get_result()
        if res is None:
            break
        if res.status == pq.ExecStatus.COPY_IN:
            _put_copy(pgconn, copies_left.pop(0) if copies_left else b"", pumping)
            continue
        if res.status == pq.ExecStatus.FATAL_ERROR and error is None:
            failed_at, error = index, error_from_result(res, encoding=conn.info.encoding)
        index += 1
    pumping.raise_error()
    return failed_at, error


def _put_copy(pgconn: pq.abc.PGconn, data: bytes, pumping: _Pumping) -> None:
    """Send ``data`` and the end of the COPY on a non-blocking connection, pumping while
    the target's socket is full."""
    fd = pgconn.socket
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        queued = pgconn.put_copy_data(view[pos:pos + _COPY_CHUNK])
        if queued == 1:
            pos += _COPY_CHUNK
        elif queued == 0:
            pumping.wait([fd], [fd])
            pgconn.consume_input()
        else:
            raise psycopg.OperationalError(
                f"COPY data could not be sent: {pgconn.get_error_message()!r}")
        while pgconn.flush() == 1:
            pumping.wait([fd], [fd])
            pgconn.consume_input()
    while (ended := pgconn.put_copy_end()) == 0:
        pumping.wait([fd], [fd])
    if ended != 1:
        raise psycopg.OperationalError(
            f"COPY could not be ended: {pgconn.get_error_message()!r}")
    while pgconn.flush() == 1:
        pumping.wait([fd], [fd])
        pgconn.consume_input()


class _Pumping:
    """Calls ``pump`` when ``pump_fd`` is readable, while waiting on the target's socket; an
    error of the pump is kept until the target is idle (:meth:`raise_error`)."""

    def __init__(self, pump: Pump | None, pump_fd: int | None) -> None:
        self.pump = pump
        self.fd = pump_fd
        self.watch = pump is not None and pump_fd is not None
        # The first round pumps without waiting: libpq may hold frames already read.
        self.due = self.watch
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.due and self.pump is not None:
            self.due = False
            try:
                self.watch = self.pump()
            except BaseException as exc:  # noqa: BLE001 - re-raised once the target is idle
                self.error, self.watch = exc, False

    def wait(self, read: list[int], write: list[int]) -> None:
        """Until a socket of ``read``/``write`` is ready (at most 1 s), pumping meanwhile."""
        while True:
            fds = read + [self.fd] if self.watch and self.fd is not None else read
            readable, writable, _ = select.select(fds, write, [], 1.0)
            if self.watch and self.fd in readable:
                self.due = True
                self.run()
                if not (set(readable) & set(read)) and not writable:
                    continue
            return

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


__all__ = ["STAGING_DDL", "BatchWriter", "Collapsed", "collapse", "copy_buffers", "copy_data"]
