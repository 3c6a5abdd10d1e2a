"""Decoding of the ``pgoutput`` logical replication protocol (version 1) into typed changes.

What arrives and what leaves
----------------------------
A walsender streaming a logical slot with the ``pgoutput`` plugin sends, inside CopyBoth
``XLogData`` frames, one pgoutput message per frame: ``Begin``, then the transaction's
``Relation``/``Type`` descriptions (sent before first use and again after a schema change),
its ``Insert``/``Update``/``Delete``/``Truncate``/``Message`` records, an ``Origin`` record when
the transaction was itself applied under a replication origin (PostgreSQL 15 only: 16+ drops
those transactions server-side when asked with ``origin 'none'``), and ``Commit``. Tuples are
in text format (proto_version 1 never sends binary).

:class:`ChunkDecoder` turns that message sequence into one :class:`Transaction` per source
commit, holding only what the chunk being moved needs:

* document changes of ``docs."<collection>"`` inside the chunk's khash range, as
  :class:`Upsert` (an insert or update: the full document text) and :class:`Delete`
  (the primary key only), in source order;
* changes of the chunk's own ``shardshift.chunk_fence`` row, as :class:`FenceMarker`
  (a freeze is an UPDATE of that row: seeing it tells the cutover that the target has
  everything the source accepted before the freeze);
* transactional logical messages (``pg_logical_emit_message(true, prefix, ...)``) whose prefix
  belongs to this stream, as :class:`MessageMarker`.

The publication's row filter already keeps other chunks' rows on the server. The decoder
checks the range again because the cost is one integer comparison and a wrong row on the
target is a correctness bug that nothing downstream would catch.

The applier's throughput is bounded by how fast Python turns bytes into records, so the
document changes are tuples (:class:`Upsert` and :class:`Delete` are ``NamedTuple`` classes, built
without a Python-level ``__init__``), their key and document stay the bytes the server sent
(UTF-8 text: the applier stages them with a binary COPY as they are), and a document row's
TupleData is parsed in one pass without a per-column list (``_doc_row``). The other records
are ``slots`` dataclasses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from shards.models import KeyRange

# -- LSNs and timestamps -------------------------------------------------------------------

PG_EPOCH_UNIX_S = 946_684_800
"""Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 UTC)."""

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def lsn_from_str(text: str) -> int:
    """``'16/B374D848'`` -> the 64-bit LSN."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_to_str(lsn: int) -> str:
    """The 64-bit LSN -> ``'16/B374D848'`` (PostgreSQL's ``pg_lsn`` text form)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def pg_time_to_unix(us: int) -> float:
    """Microseconds since the PostgreSQL epoch -> Unix seconds."""
    return us / 1e6 + PG_EPOCH_UNIX_S


def pg_time_to_datetime(us: int) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=us)


def unix_to_pg_time(seconds: float) -> int:
    return int((seconds - PG_EPOCH_UNIX_S) * 1e6)


# -- typed records -----------------------------------------------------------------------------


class Upsert(NamedTuple):
    """A document inserted or updated on the source: the target must hold exactly ``doc``.

    ``id`` and ``doc`` are the column values as the server sent them (UTF-8 text: the ``id``
    column's text, the ``jsonb`` document's text form). ``doc`` is None only when the source
    sent the column as "unchanged TOAST" (an UPDATE that kept a large document as it was);
    the target's copy is then already right.

    ``fresh`` is True when the source INSERTed the row: just before this change the source
    had no such document (the applier inserts it without a conflict check when nothing
    earlier in its batch touched the key; see ``shards/postgres/apply_batch.py``).
    """

    khash: int
    id: bytes
    doc: bytes | None
    fresh: bool = False


class Delete(NamedTuple):
    """A document deleted on the source (identified by its primary key; ``id`` as sent)."""

    khash: int
    id: bytes


@dataclass(slots=True, frozen=True)
class TruncateChunk:
    """The source table was truncated: every document of the chunk is gone."""


Change = Upsert | Delete | TruncateChunk


@dataclass(slots=True, frozen=True)
class FenceMarker:
    """The chunk's fence row changed on the source (``deleted`` when the row was deleted).

    ``state == 'frozen'`` is the freeze: the transaction carrying it is the last one of the
    chunk's history on the source.
    """

    collection: str
    chunk_id: int
    token: int | None
    state: str | None
    deleted: bool = False


@dataclass(slots=True, frozen=True)
class MessageMarker:
    """A transactional logical message (``pg_logical_emit_message``) of this stream."""

    prefix: str
    content: bytes
    lsn: int


Marker = FenceMarker | MessageMarker


@dataclass(slots=True)
class Transaction:
    """One committed source transaction, reduced to what the chunk needs.

    ``commit_lsn`` is where the commit record starts (pgoutput's "final LSN"; an exported
    snapshot taken at LSN L sees exactly the transactions with ``commit_lsn < L``);
    ``end_lsn`` is where it ends: the position a replication origin records, and the one a
    restart resumes from (the server skips transactions with ``commit_lsn`` before it).
    """

    xid: int
    commit_lsn: int
    end_lsn: int = 0
    commit_time_us: int = 0
    origin: str | None = None
    changes: list[Change] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)

    @property
    def commit_time_unix(self) -> float:
        return pg_time_to_unix(self.commit_time_us)

    @property
    def empty(self) -> bool:
        return not self.changes and not self.markers


@dataclass(slots=True, frozen=True)
class Position:
    """The server has sent everything that commits before ``lsn`` (a keepalive, or a
    transaction the chunk does not care about): nothing of ours lies before it."""

    lsn: int


# -- relations -------------------------------------------------------------------------------

_OTHER, _DOCS, _FENCE = 0, 1, 2


@dataclass(slots=True)
class _Relation:
    kind: int
    name: str
    columns: dict[str, int]
    doc_columns: tuple[int, int, int] = (0, 0, 0)
    """Positions of ``khash``, ``id`` and ``doc`` (a document table)."""
    doc_row: bool = False
    """The document table's columns are exactly ``khash, id, doc`` (``_doc_row`` applies)."""


class ProtocolError(Exception):
    """The stream did not follow the pgoutput protocol as this decoder understands it."""


# Byte layouts as the protocol defines them: LSNs are unsigned 64-bit, transaction ids and
# OIDs unsigned 32-bit, timestamps and lengths signed.
_I32 = struct.Struct(">i")
_OID = struct.Struct(">I")
_I16 = struct.Struct(">h")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">bQQq")
_ORIGIN = struct.Struct(">Q")
_MSG = struct.Struct(">bQ")

_UNCHANGED = object()


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[list[object], int]:
    """TupleData -> list of column values (bytes, None for NULL, _UNCHANGED for TOAST)."""
    (n,) = _I16.unpack_from(buf, pos)
    pos += 2
    out: list[object] = []
    append = out.append
    for _ in range(n):
        kind = buf[pos]
        pos += 1
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary (never with proto 1)
            (ln,) = _I32.unpack_from(buf, pos)
            pos += 4
            append(buf[pos:pos + ln])
            pos += ln
        elif kind == 0x6E:  # 'n' NULL
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOASTed value
            append(_UNCHANGED)
        else:
            raise ProtocolError(f"unknown tuple column kind {kind!r}")
    return out, pos


_tnew = tuple.__new__


def _doc_row(buf: bytes, pos: int) -> tuple[bytes, bytes, object] | None:
    """A document row's TupleData at ``pos`` when it is exactly ``(khash, id, doc)`` with a
    text khash and id (every row of a document table): the three raw values, in one pass
    without a per-column list (doc: bytes, or _UNCHANGED/None). None: any other shape
    (the caller falls back to :func:`_tuple`)."""
    if buf[pos] != 0 or buf[pos + 1] != 3 or buf[pos + 2] != 0x74:
        return None
    (ln,) = _I32.unpack_from(buf, pos + 3)
    p = pos + 7 + ln
    khash = buf[pos + 7:p]
    if buf[p] != 0x74:
        return None
    (ln,) = _I32.unpack_from(buf, p + 1)
    e = p + 5 + ln
    id_ = buf[p + 5:e]
    kind = buf[e]
    if kind == 0x74:
        (ln,) = _I32.unpack_from(buf, e + 1)
        return khash, id_, buf[e + 5:e + 5 + ln]
    if kind == 0x75:
        return khash, id_, _UNCHANGED
    if kind == 0x6E:
        return khash, id_, None
    return None


class ChunkDecoder:
    """Decodes pgoutput messages of one slot into :class:`Transaction` records of one chunk.

    Args:
        collection: the collection whose table ``docs."<collection>"`` is followed.
        chunk_id: the chunk whose fence row changes become :class:`FenceMarker` records.
        key_range: the chunk's khash range; document changes outside it are dropped.
        message_prefix: logical messages with this prefix become :class:`MessageMarker`.
        skip_origins: drop whole transactions that carry an ``Origin`` message (they were
            applied by a replication applier, so streaming them back would loop). Needed on
            PostgreSQL 15, whose pgoutput cannot filter by origin.
    """

    def __init__(
        self,
        collection: str,
        chunk_id: int,
        key_range: KeyRange,
        message_prefix: str,
        *,
        skip_origins: bool = True,
    ) -> None:
        self.collection = collection
        self.chunk_id = chunk_id
        self.lo = key_range.lo
        self.hi = key_range.hi
        self.message_prefix = message_prefix
        self.skip_origins = skip_origins
        self._relations: dict[int, _Relation] = {}
        self._txn: Transaction | None = None
        self._skip = False
        self.decoded_changes = 0
        """Document changes kept so far (for throughput metrics)."""
        self.hot_relids: tuple[int, ...] = ()
        """Relations whose Insert/Update :meth:`feed` takes on its hot path: document tables
        shaped ``(khash, id, doc)`` (the C accelerator decodes exactly those)."""

    def feed(self, buf: bytes) -> Transaction | None:
        """Decode one pgoutput message; returns the transaction when ``buf`` is its Commit.

        A message this decoder cannot read (cut short, a bad length or number) is a
        :class:`ProtocolError` naming it, whatever failed inside."""
        try:
            tag = buf[0]
            if (tag == 0x49 or tag == 0x55) and buf[5] == 0x4E:
                # The hot path: an Insert, or an Update without an old key, of a document row
                # shaped (khash, id, doc); anything else falls through to the general handlers.
                (relid,) = _OID.unpack_from(buf, 1)
                rel = self._relations.get(relid)
                if rel is not None and rel.doc_row and not self._skip:
                    row = _doc_row(buf, 6)
                    txn = self._txn
                    if row is not None and txn is not None and type(row[2]) is bytes:
                        khash = int(row[0])
                        if self.lo <= khash < self.hi:
                            txn.changes.append(_tnew(Upsert, (khash, row[1], row[2], tag == 0x49)))
                            self.decoded_changes += 1
                        return None
            if tag == 0x49:  # 'I' insert
                self._insert(buf)
            elif tag == 0x55:  # 'U' update
                self._update(buf)
            elif tag == 0x44:  # 'D' delete
                self._delete(buf)
            elif tag == 0x42:  # 'B' begin
                if self._txn is not None:
                    raise ProtocolError("Begin inside an open transaction")
                final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
                self._txn = Transaction(xid=xid, commit_lsn=final_lsn, commit_time_us=ts)
                self._skip = False
            elif tag == 0x43:  # 'C' commit
                txn = self._require_txn("Commit")
                _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
                if commit_lsn != txn.commit_lsn:
                    raise ProtocolError(
                        f"Commit at {lsn_to_str(commit_lsn)} closes the transaction that began "
                        f"with final LSN {lsn_to_str(txn.commit_lsn)}"
                    )
                txn.end_lsn = end_lsn
                txn.commit_time_us = ts
                self._txn = None
                if self._skip:
                    # Keep the position (the server has sent it; the slot may move past it) but
                    # none of the foreign transaction's content.
                    txn.changes = []
                    txn.markers = []
                return txn
            elif tag == 0x52:  # 'R' relation
                self._relation(buf)
            elif tag == 0x4F:  # 'O' origin
                txn = self._require_txn("Origin")
                _origin_lsn, = _ORIGIN.unpack_from(buf, 1)
                txn.origin, _ = _cstring(buf, 9)
                if self.skip_origins:
                    self._skip = True
            elif tag == 0x4D:  # 'M' logical message
                self._message(buf)
            elif tag == 0x54:  # 'T' truncate
                self._truncate(buf)
            elif tag == 0x59:  # 'Y' type: only describes custom types; ours are built in
                pass
            else:
                raise ProtocolError(f"unexpected pgoutput message {chr(tag)!r}")
            return None
        except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError too
            kind = repr(chr(buf[0])) if buf else "(empty)"
            raise ProtocolError(f"malformed pgoutput message {kind} ({len(buf)} bytes): "
                                f"{exc}") from exc

    # -- message handlers ----------------------------------------------------------------------

    def _require_txn(self, what: str) -> Transaction:
        if self._txn is None:
            raise ProtocolError(f"{what} outside a transaction")
        return self._txn

    def _relation(self, buf: bytes) -> None:
        (relid,) = _OID.unpack_from(buf, 1)
        pos = 5
        namespace, pos = _cstring(buf, pos)
        name, pos = _cstring(buf, pos)
        pos += 1  # replica identity
        (ncols,) = _I16.unpack_from(buf, pos)
        pos += 2
        columns: dict[str, int] = {}
        for i in range(ncols):
            pos += 1  # flags
            col, pos = _cstring(buf, pos)
            pos += 8  # type oid, typmod
            columns[col] = i
        if namespace == "docs" and name == self.collection:
            kind = _DOCS
            missing = {"khash", "id", "doc"} - columns.keys()
        elif namespace == "shardshift" and name == "chunk_fence":
            kind = _FENCE
            missing = {"collection", "chunk_id", "token", "state"} - columns.keys()
        else:
            kind, missing = _OTHER, set()
        if missing:
            raise ProtocolError(f"relation {namespace}.{name} lacks columns {sorted(missing)}")
        rel = _Relation(kind, f"{namespace}.{name}", columns)
        if kind == _DOCS:
            rel.doc_columns = (columns["khash"], columns["id"], columns["doc"])
            rel.doc_row = ncols == 3 and rel.doc_columns == (0, 1, 2)
        self._relations[relid] = rel
        self.hot_relids = tuple(r for r, v in self._relations.items() if v.doc_row)

    def _rel(self, buf: bytes) -> _Relation:
        (relid,) = _OID.unpack_from(buf, 1)
        rel = self._relations.get(relid)
        if rel is None:
            raise ProtocolError(f"change of relation {relid} before its Relation message")
        return rel

    def _doc_key(self, rel: _Relation, values: list[object]) -> tuple[int, bytes] | None:
        cols = rel.columns
        raw_khash = values[cols["khash"]]
        raw_id = values[cols["id"]]
        if not isinstance(raw_khash, bytes) or not isinstance(raw_id, bytes):
            raise ProtocolError(f"{rel.name}: a primary key column arrived NULL or unchanged")
        khash = int(raw_khash)
        if khash < self.lo or khash >= self.hi:
            return None
        return khash, raw_id

    def _upsert(self, rel: _Relation, raw_khash: object, raw_id: object, raw_doc: object,
                fresh: bool) -> None:
        """The document row as an :class:`Upsert` of the open transaction (when inside the
        range): the hot path, one call per document change."""
        if type(raw_khash) is not bytes or type(raw_id) is not bytes:
            raise ProtocolError(f"{rel.name}: a primary key column arrived NULL or unchanged")
        khash = int(raw_khash)
        if khash < self.lo or khash >= self.hi:
            return
        if raw_doc is _UNCHANGED:
            doc = None
        elif type(raw_doc) is bytes:
            doc = raw_doc
        else:
            raise ProtocolError(f"{rel.name}: doc arrived NULL")
        txn = self._txn
        if txn is None:
            raise ProtocolError("a document change outside a transaction")
        txn.changes.append(_tnew(Upsert, (khash, raw_id, doc, fresh)))
        self.decoded_changes += 1

    def _upsert_at(self, rel: _Relation, buf: bytes, pos: int, fresh: bool) -> None:
        """The document row whose TupleData starts at ``pos``."""
        if rel.doc_row:
            row = _doc_row(buf, pos)
            if row is not None:
                self._upsert(rel, row[0], row[1], row[2], fresh)
                return
        values, _ = _tuple(buf, pos)
        k, i, d = rel.doc_columns
        if len(values) <= max(k, i, d):
            raise ProtocolError(f"{rel.name}: a row with {len(values)} columns")
        self._upsert(rel, values[k], values[i], values[d], fresh)

    def _fence(self, rel: _Relation, values: list[object], deleted: bool) -> None:
        cols = rel.columns
        coll = values[cols["collection"]]
        chunk = values[cols["chunk_id"]]
        if not isinstance(coll, bytes) or not isinstance(chunk, bytes):
            return
        if coll.decode() != self.collection or int(chunk) != self.chunk_id:
            return
        token = values[cols["token"]] if len(values) > cols["token"] else None
        state = values[cols["state"]] if len(values) > cols["state"] else None
        txn = self._require_txn("fence change")
        txn.markers.append(FenceMarker(
            collection=self.collection,
            chunk_id=self.chunk_id,
            token=int(token) if isinstance(token, bytes) else None,
            state=state.decode() if isinstance(state, bytes) else None,
            deleted=deleted,
        ))

    def _insert(self, buf: bytes) -> None:
        rel = self._rel(buf)
        if rel.kind == _OTHER or self._skip:
            return
        if buf[5] != 0x4E:  # 'N'
            raise ProtocolError("Insert without a new tuple")
        if rel.kind == _FENCE:
            self._fence(rel, _tuple(buf, 6)[0], deleted=False)
            return
        self._upsert_at(rel, buf, 6, True)

    def _update(self, buf: bytes) -> None:
        rel = self._rel(buf)
        if rel.kind == _OTHER or self._skip:
            return
        pos = 5
        old: list[object] | None = None
        if buf[pos] in (0x4B, 0x4F):  # 'K' old key / 'O' old tuple: the key changed
            old, pos = _tuple(buf, pos + 1)
        if buf[pos] != 0x4E:
            raise ProtocolError("Update without a new tuple")
        if rel.kind == _FENCE:
            self._fence(rel, _tuple(buf, pos + 1)[0], deleted=False)
            return
        txn = self._require_txn("Update")
        if old is not None:
            # A primary-key change (never made by shardshift, handled for completeness):
            # the old row goes away, the new one appears.
            old_key = self._doc_key(rel, old)
            if old_key is not None:
                txn.changes.append(Delete(old_key[0], old_key[1]))
                self.decoded_changes += 1
        self._upsert_at(rel, buf, pos + 1, False)

    def _delete(self, buf: bytes) -> None:
        rel = self._rel(buf)
        if rel.kind == _OTHER or self._skip:
            return
        if buf[5] not in (0x4B, 0x4F):
            raise ProtocolError("Delete without an old key")
        values, _ = _tuple(buf, 6)
        if rel.kind == _FENCE:
            self._fence(rel, values, deleted=True)
            return
        key = self._doc_key(rel, values)
        if key is not None:
            self._require_txn("Delete").changes.append(Delete(key[0], key[1]))
            self.decoded_changes += 1

    def _truncate(self, buf: bytes) -> None:
        if self._skip:
            return
        (n,) = _I32.unpack_from(buf, 1)
        relids = struct.unpack_from(f">{n}I", buf, 6)
        for relid in relids:
            rel = self._relations.get(relid)
            if rel is None:
                continue
            if rel.kind == _DOCS:
                self._require_txn("Truncate").changes.append(TruncateChunk())
            elif rel.kind == _FENCE:
                self._require_txn("Truncate").markers.append(FenceMarker(
                    collection=self.collection, chunk_id=self.chunk_id, token=None,
                    state=None, deleted=True,
                ))

    def _message(self, buf: bytes) -> None:
        flags, lsn = _MSG.unpack_from(buf, 1)
        prefix, pos = _cstring(buf, 10)
        (ln,) = _I32.unpack_from(buf, pos)
        content = bytes(buf[pos + 4:pos + 4 + ln])
        if not flags & 1:
            # A non-transactional message has no commit to ride on, so it cannot be
            # ordered with the data the way a marker must be; shardshift emits only
            # transactional markers.
            return
        if self._skip or prefix != self.message_prefix:
            return
        self._require_txn("Message").markers.append(MessageMarker(prefix, content, lsn))
