"""Snapshot export: a chunk read at one point in time, staged as Parquet parts.

The protocol
------------
The replication module creates the move's logical slot with an exported snapshot; the slot's
consistent point is time T (an LSN) and the snapshot name lets another session see the source
exactly as of T. :func:`export_chunk` imports that snapshot (``SET TRANSACTION SNAPSHOT`` in a
``REPEATABLE READ, READ ONLY`` transaction) and reads the chunk in khash sub-ranges, sorted by
the primary key ``(khash, id)``, one Parquet file per sub-range ("part").

Invariants
----------
* **The part plan is fixed per migration.** The first export writes ``manifest.json`` with the
  sub-range of every part; every later export of the same migration id reuses it (whatever
  the row count is by then), so ``(migration_id, part)`` names the same key range forever.
  That is what makes a retry overwrite instead of duplicate, and what lets the importer and
  its ``import_parts`` progress rows trust part numbers across attempts.
* **A part file is complete or absent.** It is written under a temporary name and renamed
  (see ``shards.staging``); the Parquet key-value metadata repeats the part's range, collection
  and migration id so the importer can refuse a file that does not belong where it is found.
* **Every part is read at one snapshot per attempt.** Within one call all parts are read in a
  single transaction. With ``snapshot`` given, that is time T exactly.

Resuming without the exported snapshot
--------------------------------------
An exported snapshot lives only as long as the transaction of the session that exported it
(the replication connection). A resumed export after that session is gone passes
``snapshot=None``: the missing parts are read at a fresh snapshot T' > T. This is still
correct because the change stream is replayed from T (the slot's consistent point, which does
not move until the applier confirms) and applying it is idempotent: the applier writes the
full new row image for inserts and updates (an upsert by primary key) and deletes by primary
key, so each change leaves a row in the state that change produced whatever the row held
before. A row staged at T' has already seen the changes in (T, T']; replaying them re-applies
states that the later changes in the same window overwrite again, and the row ends in its
latest state, exactly like a row staged at T. The mix of T and T' parts is not a consistent
snapshot by itself, but it is never used without the replay from T.

Memory and speed
----------------
Rows stream from ``COPY (SELECT ...) TO STDOUT (FORMAT binary)``, read by a plain index range
scan of the primary key (the export's transaction turns off the sort, bitmap and parallel plans
the planner would otherwise pick for a part; see :func:`_plan_for_key_order`). The server sends
one message per row; about ``batch_bytes`` of them are copied into one buffer as they arrive and split into
Arrow columns by vectorized kernels (:func:`_decode_rows`: no per-row Python besides receiving
the COPY messages themselves, no quoting or parsing of text on either side), which the Parquet
writer appends as a row group. Memory is a few blocks, flat in the number of rows. Every row's
framing (field count, lengths, jsonb version) is checked, and text is validated as UTF-8,
before anything is staged.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.abc import Buffer
from pydantic import BaseModel, ConfigDict, Field

from shards.arrow_memory import use_copy_pool
from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.schema import collection_table, range_predicate
from shards.postgres.throttle import CopyThrottle
from shards.staging import Staging, check_migration_id

FORMAT_VERSION = 1

PART_SCHEMA = pa.schema(
    [
        pa.field("khash", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("doc", pa.string(), nullable=False),
    ]
)
"""Staged rows: the table's primary key and the document as canonical jsonb text."""

_SNAPSHOT_NAME = re.compile(r"[0-9A-Fa-f]{1,16}-[0-9A-Fa-f]{1,16}(-[0-9]{1,10})?")
_META_PREFIX = "shardshift."


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExportManifest(_Frozen):
    """The immutable part plan of one migration's snapshot (``manifest.json``)."""

    format_version: int = FORMAT_VERSION
    migration_id: str
    collection: str
    range: KeyRange
    parts: tuple[KeyRange, ...] = Field(min_length=1)


class ExportProgress(_Frozen):
    """Handed to the ``progress`` callback: a heartbeat checkpoint of an export."""

    rows_done: int
    parts_done: int
    parts_total: int


class ExportResult(_Frozen):
    """What an export did: parts written now, parts found already staged, rows written."""

    migration_id: str
    parts_total: int
    exported_parts: tuple[int, ...]
    skipped_parts: tuple[int, ...]
    rows_exported: int
    bytes_exported: int
    seconds: float


ExportProgressFn = Callable[[ExportProgress], None]


# -- helpers shared by the sibling modules (checksum, import, range delete) -------------------


def check_snapshot_name(name: object) -> str:
    """An exported snapshot name as ``pg_export_snapshot`` returns it (``0000000A-0000001B-1``)."""
    if not isinstance(name, str) or not _SNAPSHOT_NAME.fullmatch(name):
        raise ValueError(f"invalid exported snapshot name {name!r}")
    return name


def open_snapshot(dsn: str, snapshot: str | None, *, application_name: str) -> psycopg.Connection:
    """A connection inside a ``REPEATABLE READ, READ ONLY`` transaction at a given snapshot.

    Args:
        dsn: The shard's DSN.
        snapshot: An exported snapshot name (the transaction then sees exactly what that
            snapshot saw), or None for a fresh snapshot taken by the first statement.
        application_name: Shown in ``pg_stat_activity`` (operators see who holds the snapshot).

    Returns:
        An open connection whose transaction is already started; the caller closes it.
    """
    conn = psycopg.connect(dsn, application_name=application_name)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        if snapshot is not None:
            # SET TRANSACTION SNAPSHOT must be the transaction's first statement and takes no
            # bind parameters; the name is validated and passed as a quoted literal.
            conn.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(check_snapshot_name(snapshot))
                )
            )
        else:
            conn.execute("SELECT 1")  # takes the transaction's snapshot now
    except BaseException:
        conn.close()
        raise
    return conn


def select_rows_sql(collection: str, key_range: KeyRange) -> sql.Composed:
    """The rows of a key range in primary-key order (an index range scan on the PK)."""
    return sql.SQL("SELECT khash, id, doc FROM {} WHERE {} ORDER BY khash, id").format(
        collection_table(check_collection(collection)), range_predicate(key_range)
    )


# -- planning ---------------------------------------------------------------------------------


RAMP = (8, 4, 2)
"""The first and last parts of a plan hold 1/8, 1/4 and 1/2 of the target rows (see
:func:`part_row_targets`)."""
RAMP_MIN_ROWS = 500
"""No ramp for targets whose eighth is smaller: such parts are quick to export anyway."""


def part_row_targets(rows: int, target_part_rows: int) -> list[int]:
    """Rows per part for a chunk of ``rows`` rows: about ``target_part_rows`` each, with a ramp.

    An import that follows the export can only start once the first part is complete, and
    the last part's import starts only when its export ends; both are time the pipeline runs
    half empty. A chunk of at least four targets' rows therefore starts and ends with parts of
    1/8, 1/4 and 1/2 the target (the import starts after an eighth of a part instead of a whole
    one), and the middle is split evenly into parts of at most the target. Smaller chunks, and
    targets under ``8 * RAMP_MIN_ROWS`` rows, are split evenly. The sum is always ``rows`` (one
    part of 0 rows for an empty chunk).
    """
    if target_part_rows < 1:
        raise ValueError("target_part_rows must be at least 1")
    if rows >= 4 * target_part_rows and target_part_rows // RAMP[0] >= RAMP_MIN_ROWS:
        head = [target_part_rows // d for d in RAMP]
        middle = rows - 2 * sum(head)
        n = math.ceil(middle / target_part_rows)
        even = [middle // n + (1 if i < middle % n else 0) for i in range(n)]
        return head + even + head[::-1]
    n = max(1, math.ceil(rows / target_part_rows))
    return [rows // n + (1 if i < rows % n else 0) for i in range(n)]


def plan_parts(conn: psycopg.Connection, collection: str, key_range: KeyRange,
               target_part_rows: int) -> tuple[KeyRange, ...]:
    """Split a chunk into sub-ranges of about ``target_part_rows`` rows each.

    Each part's share of the khash range is its share of the rows in
    :func:`part_row_targets` (small parts first and last, equal ones between). khash is a
    cryptographic hash of the shard key, so rows are spread uniformly over any khash range:
    a sub-range holds its width's share of the rows within a few standard deviations
    (~sqrt(rows per part)), without the sort that ``percentile_disc`` over millions of keys
    would cost. The one skew hashing cannot remove is many documents sharing one shard-key
    value, and those share one khash, which no khash split can divide anyway. The count is
    exact (an index-only scan of the PK, inside the export's snapshot).
    """
    if target_part_rows < 1:
        raise ValueError("target_part_rows must be at least 1")
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            collection_table(collection), range_predicate(key_range)
        )
    ).fetchone()
    rows = int(row[0]) if row else 0
    return split_by_rows(key_range, part_row_targets(rows, target_part_rows))


MAX_PLAN_PARTS = 10_000


def split_by_rows(key_range: KeyRange, sizes: list[int]) -> tuple[KeyRange, ...]:
    """Contiguous sub-ranges covering ``key_range``, each as wide as its share of ``sizes``.

    More than :data:`MAX_PLAN_PARTS` parts, a range too narrow for them, or no rows at all
    fall back to the even split (at most :data:`MAX_PLAN_PARTS` parts).
    """
    total, width = sum(sizes), key_range.hi - key_range.lo
    if total <= 0 or len(sizes) > min(MAX_PLAN_PARTS, width):
        return tuple(key_range.split(max(1, min(len(sizes), MAX_PLAN_PARTS))))
    bounds, done = [key_range.lo], 0
    for size in sizes[:-1]:
        done += size
        bounds.append(key_range.lo + width * done // total)
    bounds.append(key_range.hi)
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        return tuple(key_range.split(len(sizes)))
    return tuple(KeyRange(lo=a, hi=b) for a, b in zip(bounds, bounds[1:], strict=False))


def load_manifest(staging: Staging, migration_id: str) -> ExportManifest | None:
    data = staging.read_manifest(migration_id)
    return ExportManifest.model_validate_json(data) if data is not None else None


def _manifest_for(conn: psycopg.Connection, staging: Staging, migration_id: str,
                  collection: str, key_range: KeyRange, target_part_rows: int) -> ExportManifest:
    existing = load_manifest(staging, migration_id)
    if existing is not None:
        if existing.collection != collection or existing.range != key_range:
            raise ValueError(
                f"migration {migration_id} already staged {existing.collection} "
                f"[{existing.range.lo}, {existing.range.hi}); refusing to export {collection} "
                f"[{key_range.lo}, {key_range.hi}) under the same id"
            )
        return existing
    manifest = ExportManifest(
        migration_id=migration_id, collection=collection, range=key_range,
        parts=plan_parts(conn, collection, key_range, target_part_rows),
    )
    staging.write_manifest(migration_id, manifest.model_dump_json(indent=1).encode())
    return manifest


# -- export -----------------------------------------------------------------------------------


def export_chunk(
    dsn: str,
    collection: str,
    key_range: KeyRange,
    staging: Staging,
    migration_id: str,
    *,
    snapshot: str | None = None,
    target_part_rows: int = 50_000,
    resume: bool = True,
    compression: str | None = None,
    batch_bytes: int = 8 << 20,
    progress: ExportProgressFn | None = None,
    throttle: CopyThrottle | None = None,
) -> ExportResult:
    """Stage a chunk of a source shard as Parquet parts read at one snapshot.

    Args:
        dsn: The source shard.
        collection: The collection (validated before anything is touched).
        key_range: The chunk's khash range.
        staging: Where the parts go.
        migration_id: Names the staged files (validated; no path traversal).
        snapshot: The slot's exported snapshot (time T), or None for a fresh snapshot (valid
            on resume; see the module docstring).
        target_part_rows: Rows per part when planning a new migration (ignored once a
            manifest exists).
        resume: Skip parts already staged. False re-exports every part (same names, so the
            files are overwritten).
        compression: Parquet codec (``zstd``, ``lz4``, ``snappy``, ``none``); default: the
            staging area's (``Staging.compression``, zstd unless set).
        batch_bytes: Bytes of COPY rows turned into one record batch (bounds memory).
        progress: Called after every batch and part with an :class:`ExportProgress`.
        throttle: Paces the reads and pauses them while the source is busy (see
            ``shards/postgres/throttle.py``); batches are then at most 1 MiB.

    Returns:
        An :class:`ExportResult`.
    """
    check_collection(collection)
    check_migration_id(migration_id)
    if snapshot is not None:
        check_snapshot_name(snapshot)
    use_copy_pool()
    started = time.monotonic()
    exported: list[int] = []
    skipped: list[int] = []
    rows_done = bytes_done = 0
    with open_snapshot(dsn, snapshot, application_name=f"shardshift-export-{migration_id}") as conn:
        _plan_for_key_order(conn)
        manifest = _manifest_for(conn, staging, migration_id, collection, key_range,
                                 target_part_rows)
        total = len(manifest.parts)
        for part, sub in enumerate(manifest.parts):
            if resume and staging.exists(migration_id, part):
                skipped.append(part)
                continue

            def on_batch(rows: int, _part_rows_before: int = rows_done) -> None:
                if progress:
                    progress(ExportProgress(rows_done=_part_rows_before + rows,
                                            parts_done=len(exported) + len(skipped),
                                            parts_total=total))

            if throttle is not None:
                throttle.before()
            rows = _export_part(conn, collection, sub, staging, migration_id, part,
                                compression=compression or staging.compression,
                                batch_bytes=batch_bytes if throttle is None
                                else min(batch_bytes, 1 << 20),
                                on_batch=on_batch, throttle=throttle)
            rows_done += rows
            bytes_done += staging.part_size(migration_id, part)
            exported.append(part)
            if progress:
                progress(ExportProgress(rows_done=rows_done, parts_done=len(exported) + len(skipped),
                                        parts_total=total))
        conn.rollback()  # read-only: nothing to commit; ends the snapshot promptly
    return ExportResult(
        migration_id=migration_id, parts_total=total, exported_parts=tuple(exported),
        skipped_parts=tuple(skipped), rows_exported=rows_done, bytes_exported=bytes_done,
        seconds=time.monotonic() - started,
    )


def _plan_for_key_order(conn: psycopg.Connection) -> None:
    """Read parts with a plain index range scan of the primary key, as the export intends.

    Left alone, the planner prices a part (a few percent of the table) as a parallel bitmap
    heap scan plus an external sort into temporary files merged by a Gather Merge: three
    processes and a disk round trip on the source to produce the order the index already has,
    at several times the CPU of the index scan. ``SET LOCAL`` (after ``SET TRANSACTION
    SNAPSHOT``, which must come first) scopes this to the export's own transaction.
    """
    for setting in ("enable_sort", "enable_bitmapscan"):
        conn.execute(sql.SQL("SET LOCAL {} = off").format(sql.Identifier(setting)))
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")


def part_metadata(migration_id: str, collection: str, part: int, sub: KeyRange) -> dict[str, str]:
    return {
        f"{_META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{_META_PREFIX}migration_id": migration_id,
        f"{_META_PREFIX}collection": collection,
        f"{_META_PREFIX}part": str(part),
        f"{_META_PREFIX}range": json.dumps([sub.lo, sub.hi]),
    }


def read_part_metadata(metadata: dict[bytes, bytes] | None) -> dict[str, str]:
    """The ``shardshift.*`` key-value metadata of a staged Parquet file."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        key = k.decode()
        if key.startswith(_META_PREFIX):
            out[key[len(_META_PREFIX):]] = v.decode()
    return out


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER_LEN = len(_COPY_SIGNATURE) + 8  # + int32 flags + int32 header-extension length
_COPY_TRAILER = b"\xff\xff"  # int16 -1: no more tuples
_ROW_HEAD = pa.scalar(struct.pack("!hi", 3, 8), pa.binary())  # 3 fields; khash is 8 bytes
_ROW_FIXED = 18  # int16 fields | int32 8 | int64 khash | int32 id length
_DOC_HEAD = 5  # int32 doc length | jsonb version byte
_JSONB_VERSION = pa.scalar(b"\x01", pa.binary())
_MAX_BLOCK = 1 << 30  # int32 offsets: a block plus one more row (< 1 GB) stays below 2 GiB
_arange_cache: list[pa.Array] = [pa.array([], pa.int32())]


def _i32(value: int) -> pa.Scalar:
    return pa.scalar(value, pa.int32())


def _arange(n: int) -> pa.Array:
    """``0, 1, ..., n-1`` as int32 (a cached array, sliced; grown when too short)."""
    cached = _arange_cache[0]
    if len(cached) < n:
        cached = pa.array(range(max(n, 2 * len(cached))), pa.int32())
        _arange_cache[0] = cached
    return cached.slice(0, n)


def _big_endian_ints(fields: pa.Array, width: int, type_: pa.DataType) -> pa.Array:
    """A binary array whose values are all ``width`` bytes (big-endian) as integers."""
    reversed_ = pc.binary_reverse(fields)
    n = len(reversed_)
    (first,) = struct.unpack_from("<i", reversed_.buffers()[1], 4 * reversed_.offset)
    data = reversed_.buffers()[2].slice(first, n * width)
    return pa.Array.from_buffers(type_, n, [None, data])


def _copy_batches(conn: psycopg.Connection, query: sql.Composed,
                  batch_bytes: int) -> Iterator[pa.Table]:
    """Tables of about ``batch_bytes`` each, from ``COPY (query) TO STDOUT (FORMAT binary)``.

    The server sends one CopyData message per row (the file header rides on the first one,
    the int16 -1 trailer comes alone), so the message lengths are the row boundaries;
    :func:`_decode_rows` checks every row's framing against them.
    """
    copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)
    limit = max(1, min(batch_bytes, _MAX_BLOCK))
    block = bytearray()
    lengths: list[int] = []
    header = True
    with conn.cursor().copy(copy_sql) as copy:
        for data in _copy_messages(conn, copy):
            if header:
                data = _strip_copy_header(data)
                header = False
            n = len(data)
            if n <= 2:  # the trailer (a row is at least 23 bytes), or an empty message
                if n and bytes(data) != _COPY_TRAILER:
                    raise ValueError("malformed binary COPY stream: short message")
                continue
            # Copied into one block as it arrives (the message is freed at once): no object
            # per row outlives the loop, which keeps the garbage collector from walking
            # thousands of buffers per batch, and the block needs no join.
            block += data
            lengths.append(n)
            if len(block) >= limit:
                yield _decode_rows(block, lengths)
                block, lengths = bytearray(), []
    if lengths:
        yield _decode_rows(block, lengths)


def _copy_messages(conn: psycopg.Connection, copy: psycopg.Copy) -> Iterator[Buffer]:
    """The CopyData messages of a ``COPY TO``, as ``copy``'s iteration gives them, cheaper.

    ``Copy.read`` runs psycopg's wait loop (a generator and a readiness wait) for every
    message, i.e. every row. Here the messages libpq already holds are taken straight from
    it (``PQgetCopyData`` without blocking: about 9 rows per socket read in the bench) and
    psycopg's read is used only when none is buffered, where it waits for the socket, and
    after the binary trailer, where it takes the end of the COPY and its result. A COPY
    that ends without a trailer (the server failed mid-stream) ends with that result
    fetched here and raised as psycopg's error for it, the connection in a clean state.
    """
    get_copy_data = conn.pgconn.get_copy_data
    data: Buffer
    first = True
    while True:
        n, data = get_copy_data(1)
        if n == 0:  # nothing complete buffered: psycopg waits for the socket
            if not (data := copy.read()):
                return
        elif n < 0:  # the COPY ended before its trailer: the server's result says why
            _raise_copy_end(conn)
        yield data
        if _ends_rows(data, first):
            while data := copy.read():  # the end of the COPY (nothing should follow)
                yield data
            return
        first = False


def _ends_rows(data: Buffer, first: bool) -> bool:
    """Whether a CopyData message ends the rows: the trailer alone, or, when there is no row
    at all, the first message, which then carries the file header and the trailer."""
    n = len(data)
    if n == 2:
        return bytes(data) == _COPY_TRAILER
    if not first or n < _COPY_HEADER_LEN + 2:
        return False
    view = memoryview(data)
    (ext,) = struct.unpack_from("!I", view, _COPY_HEADER_LEN - 4)
    return n == _COPY_HEADER_LEN + ext + 2 and bytes(view[-2:]) == _COPY_TRAILER


def _raise_copy_end(conn: psycopg.Connection) -> NoReturn:
    pgconn = conn.pgconn
    results = []
    while (res := pgconn.get_result()) is not None:
        results.append(res)
    for res in results:
        if res.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)
    raise ValueError("malformed binary COPY stream: no trailer")


def _strip_copy_header(data: Buffer) -> memoryview:
    view = memoryview(data)
    if len(view) < _COPY_HEADER_LEN or bytes(view[:len(_COPY_SIGNATURE)]) != _COPY_SIGNATURE:
        raise ValueError("malformed binary COPY stream: no signature")
    flags, ext = struct.unpack_from("!iI", view, len(_COPY_SIGNATURE))
    if flags & (1 << 16):
        raise ValueError("binary COPY stream carries OIDs")
    return view[_COPY_HEADER_LEN + ext:]


def _decode_rows(block: Buffer, lengths: list[int]) -> pa.Table:
    """Binary COPY rows ``(khash bigint, id text, doc jsonb)``, back to back in ``block``
    with the given lengths, as a table (which may share ``block``'s memory).

    Vectorized: the block is viewed as a binary array (one value per row); the fixed-position fields are sliced out of every row at once, and the
    variable ones are cut by a second view with four values per row (fixed head, id, doc
    length and jsonb version, doc text) whose id and doc values are gathered with ``take``.
    Every row's framing is checked before any offset derived from it is used.
    """
    n = len(lengths)
    data = pa.py_buffer(block)
    if data.size != sum(lengths):
        raise ValueError("malformed binary COPY stream: block and row lengths differ")
    row_len = pa.array(lengths, pa.int32())
    ends = pc.cumulative_sum(row_len)
    bounds = pa.concat_arrays([pa.array([0], pa.int32()), ends])
    rows = pa.Array.from_buffers(pa.binary(), n, [None, bounds.buffers()[1], data])
    starts = bounds.slice(0, n)

    def fail(what: str) -> ValueError:
        return ValueError(f"malformed binary COPY row: {what}")

    if pc.min(row_len).as_py() < _ROW_FIXED + _DOC_HEAD:
        raise fail("too short")
    if not pc.all(pc.equal(pc.binary_slice(rows, 0, 6), _ROW_HEAD)).as_py():
        raise fail("not 3 fields with an 8-byte khash")
    khash = _big_endian_ints(pc.binary_slice(rows, 6, _ROW_FIXED - 4), 8, pa.int64())
    id_len = _big_endian_ints(pc.binary_slice(rows, _ROW_FIXED - 4, _ROW_FIXED), 4, pa.int32())
    id_start = pc.add(starts, _i32(_ROW_FIXED))
    id_end = pc.add(id_start, id_len)
    doc_start = pc.add(id_end, _i32(_DOC_HEAD))
    # id_len < 0 is NULL (or garbage); either way the offsets below must stay ordered.
    if not (pc.min(id_len).as_py() >= 0
            and pc.all(pc.less_equal(doc_start, ends)).as_py()):
        raise fail("id length out of bounds")

    # Offsets of 4 values per row, interleaved: row r's are at 4r .. 4r+3.
    stacked = pa.concat_arrays([starts, id_start, id_end, doc_start])
    k = _arange(4 * n)
    order = pc.add(pc.multiply(pc.bit_wise_and(k, _i32(3)), _i32(n)),
                   pc.shift_right(k, _i32(2)))
    offsets = pa.concat_arrays([pc.take(stacked, order), ends.slice(n - 1, 1)])
    fields = pa.Array.from_buffers(pa.binary(), 4 * n, [None, offsets.buffers()[1], data])
    four = pc.multiply(_arange(n), _i32(4))
    ids = pc.take(fields, pc.add(four, _i32(1)))
    doc_head = pc.take(fields, pc.add(four, _i32(2)))
    docs = pc.take(fields, pc.add(four, _i32(3)))
    doc_len = _big_endian_ints(pc.binary_slice(doc_head, 0, 4), 4, pa.int32())
    if not pc.all(pc.equal(doc_len, pc.add(pc.binary_length(docs), _i32(1)))).as_py():
        raise fail("doc length does not match the row length")
    if not pc.all(pc.equal(pc.binary_slice(doc_head, 4, 5), _JSONB_VERSION)).as_py():
        raise fail("unknown jsonb version")
    # The casts validate UTF-8 (the server sends text in the client encoding, UTF8).
    return pa.Table.from_arrays([khash, ids.cast(pa.string()), docs.cast(pa.string())],
                                schema=PART_SCHEMA)


def _export_part(conn: psycopg.Connection, collection: str, sub: KeyRange, staging: Staging,
                 migration_id: str, part: int, *, compression: str, batch_bytes: int,
                 on_batch: Callable[[int], None], throttle: CopyThrottle | None = None) -> int:
    schema = PART_SCHEMA.with_metadata(part_metadata(migration_id, collection, part, sub))
    rows = 0
    with staging.write_part(migration_id, part) as out:
        writer = pq.ParquetWriter(
            out, schema, compression=compression,
            # Documents and ids are nearly unique: dictionaries would only cost time.
            use_dictionary=False,
            write_statistics=["khash"],
        )
        try:
            for table in _copy_batches(conn, select_rows_sql(collection, sub), batch_bytes):
                writer.write_table(table.replace_schema_metadata(schema.metadata))
                rows += table.num_rows
                on_batch(rows)
                if throttle is not None:
                    throttle.after(table.num_rows, table.nbytes)
        finally:
            writer.close()
    return rows


def read_part(staging: Staging, migration_id: str, part: int,
              batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """Record batches of a staged part (for tests, tools and the importer)."""
    with staging.open_part(migration_id, part) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)


def estimate_chunk_rows(dsn: str, collection: str, key_range: KeyRange, *,
                        timeout_ms: int = 2000) -> int | None:
    """The rows of a chunk if the primary-key index can count them within ``timeout_ms`` (an
    index-only scan of the khash range), else None: an estimate for progress, never a plan.

    A server that cannot be reached, or a count that runs out of time, is None too: unknown
    is a fine answer for progress.
    """
    query = sql.SQL("SELECT count(*) FROM {} WHERE khash >= %s"
                    " AND (%s::bigint IS NULL OR khash < %s)").format(
        collection_table(check_collection(collection)))
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                             options=f"-c statement_timeout={int(timeout_ms)}") as conn:
            row = conn.execute(query, (key_range.lo, key_range.sql_hi,
                                       key_range.sql_hi)).fetchone()
            return int(row[0]) if row else None
    except psycopg.Error:
        return None


__all__ = [
    "PART_SCHEMA",
    "ExportManifest",
    "ExportProgress",
    "ExportResult",
    "check_snapshot_name",
    "estimate_chunk_rows",
    "export_chunk",
    "load_manifest",
    "open_snapshot",
    "part_row_targets",
    "plan_parts",
    "range_predicate",
    "read_part",
    "select_rows_sql",
    "split_by_rows",
]
