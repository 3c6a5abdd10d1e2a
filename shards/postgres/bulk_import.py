"""Bulk import: staged Parquet parts into a target shard with binary ``COPY``.

Invariants
----------
* **A part's rows and its completion commit together.** Each part is one target transaction:
  claim ``shardshift.import_parts (migration_id, part)`` with the row count the part file
  declares and delete whatever the target holds in the part's sub-range (one statement),
  ``COPY`` the rows, check that the copy sent exactly the declared count, commit. A crash anywhere
  before the commit leaves neither rows nor the record; after it, both. An interrupted import
  therefore resumes at the first part without a record, and the data is exact: no row is
  loaded twice, none is lost.
* **Claiming is the lock.** The claim is an ``INSERT ... ON CONFLICT DO NOTHING`` of the
  progress row: a second importer of the same part (a zombie activity and its retry) blocks on
  the first one's uncommitted row and then finds the part done, instead of loading it twice.
* **A part file must belong where it is found.** Its Parquet metadata must name this
  migration, collection, part number and the manifest's sub-range, and every khash in it must
  lie in that sub-range (checked per batch, vectorized), or the import stops before commit.
* The delete of the sub-range is a no-op on a first attempt (a failed attempt rolls back); it
  exists for re-imports of verified-bad ranges. Import runs before the change stream is applied
  to the target; re-loading a range later is :func:`shards.postgres.checksum.recopy_range`'s job.

Speed
-----
The binary COPY stream is built with Arrow compute kernels, a whole record batch at a time:
each row is ``int16 3 | int32 8 | int64 khash | int32 len | id | int32 len+1 | 0x01 | doc``
(jsonb's binary input is a version byte and its text), assembled by
``binary_join_element_wise`` from byte-reversed (big-endian) views of the integer columns.
The joined array's data buffer *is* the COPY payload, handed to the server without a per-row
Python step. Reading, checking and encoding run in one thread of their own (:class:`_Feed`)
that goes through the parts in order without stopping at part boundaries, bounded by bytes,
so the target has the next part's first rows the moment the previous part commits and the
importer's own thread only claims, sends and commits.
"""

from __future__ import annotations

import collections
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from shards.arrow_memory import use_copy_pool
from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.schema import collection_table
from shards.postgres.snapshot import (
    PART_SCHEMA,
    ExportManifest,
    load_manifest,
    range_predicate,
    read_part_metadata,
)
from shards.staging import Staging, check_migration_id

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
_ROW_PREFIX = pa.scalar(struct.pack("!hi", 3, 8), pa.binary())  # 3 fields; khash is 8 bytes
_JSONB_VERSION = pa.scalar(b"\x01", pa.binary())
_T = TypeVar("_T")


class StagedPartError(RuntimeError):
    """A staged part that cannot be imported as it is (missing, foreign or corrupt).

    Retrying does not help; re-export the migration's snapshot.
    """


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImportProgress(_Frozen):
    """Handed to the ``progress`` callback: a heartbeat checkpoint of an import."""

    rows_done: int
    parts_done: int
    parts_total: int
    part_in_flight: int | None = None
    """The part being loaded (its rows are not committed yet), or None between parts."""
    rows_committed_here: int = 0
    """Rows this call committed so far (not those of parts earlier attempts imported)."""


class ImportResult(_Frozen):
    migration_id: str
    parts_total: int
    imported_parts: tuple[int, ...]
    skipped_parts: tuple[int, ...]
    rows_imported: int
    seconds: float


ImportProgressFn = Callable[[ImportProgress], None]


# -- the COPY encoding ------------------------------------------------------------------------


def _big_endian(values: pa.Array, width: int) -> pa.Array:
    """Fixed-width little-endian integers as big-endian byte strings (no copy until reverse)."""
    raw = pa.Array.from_buffers(pa.binary(width), len(values), [None, values.buffers()[1]],
                                offset=values.offset)
    return pc.binary_reverse(raw.cast(pa.binary()))


def encode_copy_rows(batch: pa.RecordBatch) -> memoryview:
    """Rows of a staged batch in PostgreSQL's binary COPY tuple format (no header/trailer).

    Every column is NOT NULL, so no field carries the -1 null length.
    """
    khash = batch.column("khash")
    ids = batch.column("id").cast(pa.binary())
    docs = batch.column("doc").cast(pa.binary())
    if khash.null_count or ids.null_count or docs.null_count:
        raise StagedPartError("a staged part holds NULLs; the table's columns are NOT NULL")
    id_len = _big_endian(pc.binary_length(ids).cast(pa.int32()), 4)
    doc_len = _big_endian(pc.add(pc.binary_length(docs), 1).cast(pa.int32()), 4)
    rows = pc.binary_join_element_wise(
        _ROW_PREFIX, _big_endian(khash, 8), id_len, ids, doc_len, _JSONB_VERSION, docs, b""
    )
    if rows.type != pa.binary():
        rows = rows.cast(pa.binary())
    offsets = rows.buffers()[1]
    (start,) = struct.unpack_from("<i", offsets, 4 * rows.offset)
    (end,) = struct.unpack_from("<i", offsets, 4 * (rows.offset + len(rows)))
    return memoryview(rows.buffers()[2])[start:end]


def copy_from_sql(collection: str) -> sql.Composed:
    return sql.SQL("COPY {} (khash, id, doc) FROM STDIN (FORMAT binary)").format(
        collection_table(check_collection(collection))
    )


# -- import -----------------------------------------------------------------------------------


def forget_parts(dsn: str, migration_id: str) -> int:
    """Delete a finished (or abandoned) migration's import-progress rows; returns how many.

    Those of its restaged copies (``{migration_id}.g{N}``: a copy redone on another worker)
    go too."""
    check_migration_id(migration_id)
    prefix = f"{migration_id}.g"
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "DELETE FROM shardshift.import_parts WHERE migration_id = %s OR "
            "(starts_with(migration_id, %s) AND substr(migration_id, %s) ~ '^[0-9]+$')",
            (migration_id, prefix, len(prefix) + 1))
        return cur.rowcount


def done_parts(conn: psycopg.Connection, migration_id: str) -> dict[int, int]:
    """Parts of a migration already imported on a target: part -> rows."""
    rows = conn.execute(
        "SELECT part, rows FROM shardshift.import_parts WHERE migration_id = %s",
        (migration_id,),
    ).fetchall()
    return {int(p): int(n) for p, n in rows}


def imported_parts(dsn: str, migration_id: str, *, timeout_ms: int = 2000) -> dict[int, int]:
    """:func:`done_parts` on a fresh connection whose statements end within ``timeout_ms``
    (for progress: a target that is slow to answer must not hold the caller up)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                         options=f"-c statement_timeout={int(timeout_ms)}") as conn:
        return done_parts(conn, migration_id)


def import_parts(
    dsn: str,
    collection: str,
    staging: Staging,
    migration_id: str,
    *,
    batch_rows: int = 4_096,
    progress: ImportProgressFn | None = None,
    follow_export_s: float | None = None,
    poll_s: float = 0.05,
    read_ahead_bytes: int = 16 << 20,
    streams: int = 1,
) -> ImportResult:
    """Load every staged part of a migration into the target, resuming where it stopped.

    Args:
        dsn: The target shard (its collection table and secondary indexes already exist).
        collection: The collection (validated before anything is touched).
        staging: Where the parts are.
        migration_id: The migration whose parts to load.
        batch_rows: Rows per record batch read from Parquet and encoded at once.
        progress: Called after every batch and part with an :class:`ImportProgress` (never
            from two threads at once; an exception it raises stops the import).
        follow_export_s: When set, import while the export is still running: wait for the
            manifest and for each missing part to appear, at most this many seconds per part.
            Without it, a missing part is an error.
        poll_s: How often to look for a part while following an export.
        read_ahead_bytes: Encoded COPY payload each stream's reading thread may hold ready
            beyond the batch being sent (see :class:`_Feed`; at least one batch is always
            allowed).
        streams: How many parts are loaded at once, each on a target session of its own
            (the parts are dealt out in turn: stream ``k`` of ``n`` loads the ``k``-th, the
            ``k+n``-th, ... part still to load). One part is still one transaction with its
            claim, so what an interrupted import leaves and how it resumes are unchanged;
            only which parts are committed when it stops differs.

    Returns:
        An :class:`ImportResult`; ``skipped_parts`` were already imported by earlier attempts.

    Raises:
        StagedPartError: a part is missing (export incomplete) or does not belong to this
            migration.
    """
    check_collection(collection)
    check_migration_id(migration_id)
    if streams < 1:
        raise ValueError(f"streams must be at least 1, not {streams}")
    use_copy_pool()
    started = time.monotonic()
    manifest = _wait_for(lambda: load_manifest(staging, migration_id), follow_export_s, poll_s)
    if manifest is None:
        raise StagedPartError(f"migration {migration_id}: nothing staged (no manifest)")
    if manifest.collection != collection:
        raise StagedPartError(
            f"migration {migration_id} staged collection {manifest.collection}, not {collection}"
        )
    total = len(manifest.parts)
    app = f"shardshift-import-{migration_id}"
    with psycopg.connect(dsn, application_name=app) as conn:
        done = done_parts(conn, migration_id)
        conn.rollback()
        todo = [p for p in range(total) if p not in done]
        tally = _Tally(total, [p for p in range(total) if p in done], sum(done.values()),
                       progress)

        def lane(parts: list[int]) -> _Lane:
            return _Lane(manifest, staging, parts, tally, batch_rows=batch_rows,
                         read_ahead_bytes=read_ahead_bytes, follow_export_s=follow_export_s,
                         poll_s=poll_s)

        n = max(1, min(streams, len(todo)))
        lanes = [lane(todo[k::n]) for k in range(n)]
        if n == 1:
            lanes[0].run(conn)
        else:
            _run_lanes(dsn, app, conn, lanes)
    return ImportResult(
        migration_id=migration_id, parts_total=total, imported_parts=tuple(sorted(tally.imported)),
        skipped_parts=tuple(sorted(tally.skipped)), rows_imported=tally.rows_done,
        seconds=time.monotonic() - started,
    )


class _Tally:
    """What the streams of one import have done, and its progress calls (one at a time)."""

    def __init__(self, total: int, skipped: list[int], rows_done: int,
                 progress: ImportProgressFn | None) -> None:
        self.total, self.skipped, self.rows_done = total, skipped, rows_done
        self.imported: list[int] = []
        self.rows_here = 0
        self._sending: dict[int, int] = {}  # part in flight -> rows sent, not yet committed
        self._progress = progress
        self._lock = threading.Lock()

    def sent(self, part: int, rows: int) -> None:
        with self._lock:
            self._sending[part] = rows
            self._report(part)

    def committed(self, part: int, rows: int) -> None:
        with self._lock:
            self._sending.pop(part, None)
            self.rows_done += rows
            self.rows_here += rows
            self.imported.append(part)
            self._report(None)

    def skip(self, part: int) -> None:
        with self._lock:
            self._sending.pop(part, None)
            self.skipped.append(part)

    def _report(self, part: int | None) -> None:
        if self._progress:
            self._progress(ImportProgress(
                rows_done=self.rows_done + sum(self._sending.values()),
                parts_done=len(self.skipped) + len(self.imported), parts_total=self.total,
                part_in_flight=part, rows_committed_here=self.rows_here))


class _LaneStopped(Exception):
    """Another stream of the same import failed: this one stops (its part rolls back)."""


class _Lane:
    """One stream of an import: its parts, in order, on one target session."""

    def __init__(self, manifest: ExportManifest, staging: Staging, parts: list[int],
                 tally: _Tally, *, batch_rows: int, read_ahead_bytes: int,
                 follow_export_s: float | None, poll_s: float) -> None:
        self.manifest, self.staging, self.parts, self.tally = manifest, staging, parts, tally
        self._feed_args: dict[str, Any] = dict(batch_rows=batch_rows, max_bytes=read_ahead_bytes,
                                               follow_export_s=follow_export_s, poll_s=poll_s)
        self._lock = threading.Lock()
        self._feed: _Feed | None = None
        self._stopped = False

    def stop(self) -> None:
        """Stop between batches: the part being sent rolls back; a wait for a part ends."""
        with self._lock:
            self._stopped = True
            if self._feed is not None:
                self._feed.abort()

    def _check(self) -> None:
        if self._stopped:
            raise _LaneStopped()

    def _feed_from(self, i: int) -> _Feed:
        with self._lock:
            self._check()
            self._feed = _Feed(self.staging, self.manifest, self.parts[i:], **self._feed_args)
            return self._feed

    def run(self, conn: psycopg.Connection) -> None:
        feed = self._feed_from(0)
        try:
            for i, part in enumerate(self.parts):

                def on_batch(rows: int, _part: int = part) -> None:
                    self._check()
                    self.tally.sent(_part, rows)

                self._check()
                n = _load_part(conn, self.manifest, part, feed, on_batch=on_batch)
                if n is None:  # another importer committed it meanwhile
                    self.tally.skip(part)
                    if not feed.skip(part):  # its rows failed a check nobody needed: go on
                        feed.close()
                        feed = self._feed_from(i + 1)
                    continue
                self.tally.committed(part, n)
        finally:
            feed.close()


def _run_lanes(dsn: str, app: str, conn: psycopg.Connection, lanes: list[_Lane]) -> None:
    """The first lane on ``conn`` in this thread, the others on threads and sessions of their
    own; the first failure stops the rest and is raised once all have ended."""
    errors: list[BaseException] = []
    errors_lock = threading.Lock()

    def failed(exc: BaseException) -> None:
        with errors_lock:
            if not isinstance(exc, _LaneStopped):
                errors.append(exc)
        for other in lanes:
            other.stop()

    def run_own(lane: _Lane) -> None:
        try:
            with psycopg.connect(dsn, application_name=app) as own:
                lane.run(own)
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            failed(exc)

    threads = [threading.Thread(target=run_own, args=(lane,), name=f"import-stream-{k}",
                                daemon=True) for k, lane in enumerate(lanes[1:], 1)]
    for t in threads:
        t.start()
    try:
        lanes[0].run(conn)
    except BaseException as exc:  # noqa: BLE001 - raised below, after the others stopped
        failed(exc)
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def import_part(
    conn: psycopg.Connection,
    manifest: ExportManifest,
    staging: Staging,
    part: int,
    *,
    batch_rows: int = 4_096,
    on_batch: Callable[[int], None] | None = None,
) -> int | None:
    """Load one staged part in one transaction with its ``import_parts`` record.

    Returns:
        Rows loaded, or None when the part was already imported (nothing changed).
    """
    use_copy_pool()
    with _Feed(staging, manifest, [part], batch_rows=batch_rows) as feed:
        return _load_part(conn, manifest, part, feed, on_batch=on_batch)


def _load_part(conn: psycopg.Connection, manifest: ExportManifest, part: int, feed: _Feed, *,
               on_batch: Callable[[int], None] | None = None) -> int | None:
    """One part's transaction: claim, empty the range, COPY the feed's batches, check, commit.

    The feed has usually read, checked and encoded the part's first batches while the
    previous part was finishing, so the COPY starts sending at once."""
    migration_id, collection = manifest.migration_id, manifest.collection
    sub = manifest.parts[part]
    table = collection_table(check_collection(collection))
    declared = feed.open(part)  # the file checked against the manifest (raises if foreign)
    rows = 0
    with conn.transaction():
        # One statement claims the part (recording the row count its file declares, which
        # the copy must match before the commit) and, only if claimed, empties its range:
        # each round trip between parts is time the target waits.
        row = conn.execute(
            sql.SQL(
                "WITH claim AS (INSERT INTO shardshift.import_parts (migration_id, part, rows)"
                " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING part),"
                " emptied AS (DELETE FROM {} WHERE {} AND EXISTS (SELECT FROM claim))"
                " SELECT count(*) FROM claim"
            ).format(table, range_predicate(sub)),
            (migration_id, part, declared),
        ).fetchone()
        if not row or not row[0]:
            return None
        with conn.cursor().copy(copy_from_sql(collection)) as copy:
            copy.write(COPY_HEADER)
            for n, payload in feed.batches(part):
                copy.write(payload)
                rows += n
                if on_batch:
                    on_batch(rows)
            copy.write(COPY_TRAILER)
        if rows != declared:  # the claim recorded the declared count
            raise StagedPartError(
                f"migration {migration_id} part {part}: read {rows} rows, the file "
                f"declares {declared}"
            )
    return rows


class _Feed:
    """Encoded COPY batches of a migration's parts, in order, read by a thread of their own.

    The importer's loop is read Parquet, decode, check, encode, send; alone, the target waits
    while the first four run, and again at every part boundary (the next part's file opened
    and its first batch encoded only after the previous commit). Here one thread reads the
    parts one after the other, across part boundaries, and hands over messages in order:
    ``("open", part, declared_rows)``, then ``("batch", part, (rows, payload))`` per batch,
    then ``("end", part, None)``; the consumer only claims, sends and commits. Waiting for a
    part to be staged (following an export) and every check of a part's file and batches
    happen in the thread; a failure becomes an ``("error", part, exc)`` message, raised when
    the consumer reaches that part (so parts before it still commit), and ends the thread.

    Memory: the thread waits while the queued payloads reach ``max_bytes`` (one batch is
    always allowed), so at most ``max_bytes`` plus the batch being sent and the one being
    built are held, whatever the part sizes. :meth:`close` (also on leaving a ``with``)
    stops the thread and waits for it, so nothing reads a part file afterwards.
    """

    def __init__(self, staging: Staging, manifest: ExportManifest, parts: list[int], *,
                 batch_rows: int, max_bytes: int = 16 << 20,
                 follow_export_s: float | None = None, poll_s: float = 0.05) -> None:
        self._staging, self._manifest, self._parts = staging, manifest, parts
        self._batch_rows, self._max_bytes = max(1, batch_rows), max_bytes
        self._follow_s, self._poll_s = follow_export_s, poll_s
        self._items: collections.deque[tuple[str, int, Any]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._produce, name="import-read-ahead",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> _Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.abort()
        self._thread.join()

    def abort(self) -> None:
        """Stop the thread and wake a consumer waiting for a message (it raises
        :class:`_LaneStopped`); any thread may call it. :meth:`close` also waits."""
        with self._cond:
            self._stopped = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    # -- the consumer's side ----------------------------------------------------------------

    def _next(self, part: int) -> tuple[str, Any]:
        with self._cond:
            while not self._items:
                if self._stopped:
                    raise _LaneStopped()
                self._cond.wait()
            kind, got, value = self._items.popleft()
            if kind == "batch":
                self._bytes -= len(value[1])
            self._cond.notify_all()  # any pop may be the room the thread waits for
        if got != part:
            raise RuntimeError(f"import feed out of step: part {got} while loading {part}")
        if kind == "error":
            raise value
        return kind, value

    def open(self, part: int) -> int:
        """The part's declared row count, once its file passed the checks."""
        kind, value = self._next(part)
        if kind != "open":
            raise RuntimeError(f"import feed out of step: {kind} opening part {part}")
        return int(value)

    def batches(self, part: int) -> Iterator[tuple[int, memoryview]]:
        while True:
            kind, value = self._next(part)
            if kind == "end":
                return
            yield value

    def skip(self, part: int) -> bool:
        """Discard the rest of a part nobody will load; False when its reading failed (the
        thread has ended: the caller starts a new feed for the parts after it)."""
        try:
            for _ in self.batches(part):
                pass
        except Exception:  # noqa: BLE001 - a check of rows that will not be loaded
            return False
        return True

    # -- the thread's side ------------------------------------------------------------------

    def _put(self, kind: str, part: int, value: Any) -> bool:
        size = len(value[1]) if kind == "batch" else 0
        with self._cond:
            while (not self._stopped and self._items
                   and self._bytes + size > self._max_bytes):
                self._cond.wait()
            if self._stopped:
                return False
            self._items.append((kind, part, value))
            self._bytes += size
            self._cond.notify_all()
            return True

    def _produce(self) -> None:
        migration_id, manifest = self._manifest.migration_id, self._manifest
        part = self._parts[0] if self._parts else -1
        try:
            for part in self._parts:
                if not self._staging.exists(migration_id, part):
                    def staged(p: int = part) -> bool | None:
                        return self._staging.exists(migration_id, p) or self._stopped or None

                    if not _wait_for(staged, self._follow_s, self._poll_s):
                        raise StagedPartError(f"migration {migration_id}: part {part} is not "
                                              "staged (export incomplete)")
                    if self._stopped:
                        return
                sub = manifest.parts[part]
                with self._staging.open_part(migration_id, part) as f:
                    pf = pq.ParquetFile(f)
                    _check_part_file(pf, manifest, part)
                    if not self._put("open", part, pf.metadata.num_rows):
                        return
                    for batch in pf.iter_batches(batch_size=self._batch_rows):
                        _check_batch_range(batch, sub, migration_id, part)
                        if not self._put("batch", part, (batch.num_rows,
                                                         encode_copy_rows(batch))):
                            return
                if not self._put("end", part, None):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put("error", part, exc)


def _check_part_file(pf: pq.ParquetFile, manifest: ExportManifest, part: int) -> None:
    meta = read_part_metadata(pf.schema_arrow.metadata)
    sub = manifest.parts[part]
    expected = {
        "migration_id": manifest.migration_id,
        "collection": manifest.collection,
        "part": str(part),
        "range": json.dumps([sub.lo, sub.hi]),
    }
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise StagedPartError(
            f"migration {manifest.migration_id} part {part}: the staged file does not belong "
            f"here (metadata {wrong}, expected {expected})"
        )
    if pf.schema_arrow.remove_metadata() != PART_SCHEMA:
        raise StagedPartError(
            f"migration {manifest.migration_id} part {part}: unexpected schema {pf.schema_arrow}"
        )


def _check_batch_range(batch: pa.RecordBatch, sub: KeyRange, migration_id: str,
                       part: int) -> None:
    if batch.num_rows == 0:
        return
    mm = pc.min_max(batch.column("khash"))
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo < sub.lo or hi >= sub.hi:
        raise StagedPartError(
            f"migration {migration_id} part {part}: khash values [{lo}, {hi}] fall outside "
            f"the part's range [{sub.lo}, {sub.hi})"
        )


def _wait_for(probe: Callable[[], _T | None], timeout_s: float | None,
                 poll_s: float) -> _T | None:
    """``probe()`` until it returns a value, for at most ``timeout_s`` (once when None)."""
    value = probe()
    if value is not None or timeout_s is None:
        return value
    deadline = time.monotonic() + timeout_s
    while value is None and time.monotonic() < deadline:
        time.sleep(poll_s)  # polling the staging area *is* the condition check here
        value = probe()
    return value


__all__ = [
    "COPY_HEADER",
    "COPY_TRAILER",
    "StagedPartError",
    "ImportProgress",
    "ImportResult",
    "copy_from_sql",
    "done_parts",
    "encode_copy_rows",
    "import_part",
    "import_parts",
    "imported_parts",
]
